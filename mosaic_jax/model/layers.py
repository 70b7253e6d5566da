"""Leaf operations of the DiT: linear (with optional LoRA), norms, activations, modulation.

Parameter leaves: a linear is {"kernel": [in, out], "bias": [out]} (the transpose of torch's
`weight`), an RMSNorm is {"scale": [d]}. A LoRA for a linear is {"lora_A": [in, r], "lora_B": [r, out]}
with the alpha/r scale already folded into lora_B (see interop/lora_file.py).

Precision: matmuls accumulate in float32 and write the weights' dtype. A float32 model (the parity
tests) computes in float32 throughout. A bf16 one (the recipe) rounds as torch's bf16 autocast with a
peft LoRA does (the official recipe's `--mixed_precision bf16`): x W + b is rounded to bf16 once, the
LoRA's x A and (x A) B are each rounded to bf16, and their sum is taken in bf16; so no float32 copy of
a projection's output crosses HBM. Norms and RoPE compute in float32 internally where FLUX does,
reading and writing the activation dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mosaic_jax.model.remat import keep


def linear(p, x, lora=None):
  """y = x W + b, plus (x A) B when a LoRA for this module is given, in the weights' dtype."""
  kernel = p["kernel"]
  y = jnp.einsum("...i,io->...o", x.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)
  if "bias" in p:
    y = y + p["bias"].astype(jnp.float32)
  y = y.astype(kernel.dtype)  # rounded once, bias included (torch's addmm)
  if lora is not None:
    # LoRA master weights may be float32 while the base is bf16: compute in the activation dtype.
    y = y + lora_delta(x.astype(kernel.dtype), lora["lora_A"].astype(kernel.dtype),
                       lora["lora_B"].astype(kernel.dtype))
  return y


def _rank_major(x):
  """x [..., r] as a materialized [r, tokens] array. The barrier keeps the compiler from folding the
  transpose back into the matmul that reads it: the weight gradients below then contract their
  operands' leading axes as plain row-major matmuls (on XLA:CPU a matmul contracting a leading axis
  falls back to a kernel 2-3x slower). Only rank-sized arrays are transposed."""
  return jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)


@jax.custom_vjp
def lora_delta(x, a, b):
  """(x A) B [..., out] in the operands' dtype, the LoRA's low-rank path (float32 accumulation)."""
  return _lora_forward(x, a, b)[0]


def _lora_forward(x, a, b):
  # tagged for the remat policies that keep it (model/remat.py): rank-wide, cheap to keep
  h = keep(jnp.einsum("...i,ir->...r", x, a, preferred_element_type=jnp.float32).astype(a.dtype), "lora_hidden")
  return jnp.einsum("...r,ro->...o", h, b, preferred_element_type=b.dtype), (x, a, b, h)


def _lora_backward(residuals, g):
  x, a, b, h = residuals
  g = g.astype(b.dtype)
  dh = jnp.einsum("...o,ro->...r", g, b, preferred_element_type=jnp.float32).astype(a.dtype)
  dx = jnp.einsum("...r,ir->...i", dh, a, preferred_element_type=x.dtype)
  db = jnp.dot(_rank_major(h), g.reshape(-1, g.shape[-1]), preferred_element_type=jnp.float32)
  # dA^T [r, in] as computed, transposed after a barrier: left foldable, the transpose makes the compiler
  # swap the operands into a matmul contracting x's leading (token) axis, 2-4x slower on XLA:CPU
  # (benchmarks/profile_step.py).
  da = jax.lax.optimization_barrier(
      jnp.dot(_rank_major(dh), x.reshape(-1, x.shape[-1]), preferred_element_type=jnp.float32)).T
  return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


lora_delta.defvjp(_lora_forward, _lora_backward)


def layer_norm(x, eps=1e-6):
  """LayerNorm without affine parameters, computed in float32."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def rms_norm(p, x, eps=1e-6):
  """QK-RMSNorm over the last axis (head_dim), variance in float32."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
  return (y * p["scale"].astype(jnp.float32)).astype(x.dtype)


def gelu_tanh(x):
  return jax.nn.gelu(x, approximate=True)


def modulate(x, shift, scale):
  """x * (1 + scale) + shift, with [B, D] modulation broadcast over the token axes of x."""
  extra = x.ndim - shift.ndim
  shift = shift.reshape(shift.shape[:1] + (1,) * extra + shift.shape[1:])
  scale = scale.reshape(scale.shape[:1] + (1,) * extra + scale.shape[1:])
  return (x * (1 + scale) + shift).astype(x.dtype)


def gate(g, x):
  """g * x with a [B, D] gate broadcast over the token axes of x."""
  extra = x.ndim - g.ndim
  return (g.reshape(g.shape[:1] + (1,) * extra + g.shape[1:]) * x).astype(x.dtype)


def modulation(p, temb, n_chunks, lora=None):
  """AdaLN modulation: linear(silu(temb)) split into n_chunks vectors of width D."""
  return jnp.split(linear(p, jax.nn.silu(temb), lora), n_chunks, axis=-1)


def random_params(key, shapes: dict, dtype=jnp.float32, norm_dtype=None, embedding_std: float = 0.02):
  """Random weights for demos, benchmarks and tests, from a nested dict of shape tuples.

  Kernels: normal scaled by fan-in (all but the output axis for 4-D conv kernels [kh, kw, in, out],
  the input axis otherwise, so stacked [L, in, out] linears work); norm scales around 1; embeddings
  normal * embedding_std; biases 0.02 * normal. Leaves of norm modules (a "scale" leaf, or a module
  named like a norm) are in `norm_dtype` (default: dtype). One key per leaf, in flattening order.
  """
  norm_dtype = norm_dtype or dtype
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
  module_leaves: dict = {}
  for path, _ in flat:
    module_leaves.setdefault(tuple(p.key for p in path[:-1]), set()).add(path[-1].key)
  arrays = []
  for k, (path, shape) in zip(jax.random.split(key, len(flat)), flat):
    name, module = path[-1].key, tuple(p.key for p in path[:-1])
    in_norm = "scale" in module_leaves[module] or (module and "norm" in module[-1])
    if name == "kernel":
      fan_in = math.prod(shape[:-1]) if len(shape) == 4 else shape[-2]
      arrays.append((jax.random.normal(k, shape) * fan_in ** -0.5).astype(dtype))
    elif name == "scale":
      arrays.append((1.0 + 0.1 * jax.random.normal(k, shape)).astype(norm_dtype))
    elif name == "embedding":
      arrays.append((embedding_std * jax.random.normal(k, shape)).astype(dtype))
    else:
      arrays.append((0.02 * jax.random.normal(k, shape)).astype(norm_dtype if in_norm else dtype))
  return jax.tree_util.tree_unflatten(treedef, arrays)
