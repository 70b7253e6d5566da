"""Dense attention through the Pallas TPU splash-attention kernel, for attention.py's two groups.

The groups are dense (the MOSAIC mask is handled by how attention.py forms them), so the kernel gets
a full mask. Pallas kernels are not partitioned automatically: when a mesh is set (`jax.set_mesh`) the
call runs under `jax.shard_map` with the batch split over the mesh axes that the logical rules (the
model config's, passed in) give "batch", and the heads over those of "heads". The kernel
is compiled for the mesh's platform (a compile-only TPU topology too, tpu_compile.py); off TPU it runs
in Pallas interpret mode (slow; for tests only).
Sequence lengths must be multiples of 128 (FLUX's 512 text, 1024-token 512 px grids are).
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from mosaic_jax.model.remat import keep
from mosaic_jax.parallel.sharding import DEFAULT_LOGICAL_RULES, trace_platform


def _block(length: int) -> int:
  for block in (512, 256, 128):
    if length % block == 0:
      return block
  raise ValueError(f"splash attention needs sequence lengths that are multiples of 128; got {length}. "
                   "Use attention_impl='xla' or 'cudnn' for this shape.")


def _kernel(heads: int, q_len: int, kv_len: int, interpret: bool):
  """A fresh kernel per trace: not cached, since its mask arrays belong to the trace (and the shard_map
  mesh) they were built in; a cached one fails in a second jit or on another mesh."""
  bq, bkv = _block(q_len), _block(kv_len)
  # The fused backward kernel: dq comes out of the dk/dv kernel, which has the probabilities at hand,
  # instead of a third kernel recomputing them (5 [Q, K, D] matmuls per head instead of 7; one double +
  # one single block at 6 references on a v5p chip, by benchmarks/hlo_costs.py: 2.5% less step time).
  sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                            block_kv_dkv=bkv, block_kv_dkv_compute=bkv, use_fused_bwd_kernel=True)
  mask = splash.MultiHeadMask([splash.FullMask((q_len, kv_len)) for _ in range(heads)])
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _with_kept_outputs(fn, dtype):
  """`fn` (the kernel) under a custom_vjp that does two things for the backward pass:

  - keeps what the kernel made for it, its output and per-query softmax statistics, tagged "attention"
    (model/remat.py): a remat policy that keeps attention outputs then keeps these and never reruns the
    forward kernel in the backward pass to get the statistics back (only q, k and v, its inputs, are left
    to the policy);
  - traces the kernel and its backward at the default matmul precision for bf16 operands: Mosaic takes
    "highest" (jax_default_matmul_precision, which the tests set) as an fp32 contraction and rejects it
    for bf16, whose products are exact in the f32 accumulator anyway. The backward kernels are traced
    when the step is differentiated, outside this call, hence the custom_vjp that carries the setting.
  """
  precision = (lambda: jax.default_matmul_precision("default")) if dtype != jnp.float32 else contextlib.nullcontext

  @jax.custom_vjp
  def wrapped(*args):
    with precision():
      return fn(*args)

  def forward(*args):
    with precision():
      out, vjp = jax.vjp(fn, *args)
    made = lambda x: not any(x is a for a in args) and jnp.issubdtype(x.dtype, jnp.floating)
    return out, jax.tree_util.tree_map(lambda x: keep(x, "attention") if made(x) else x, vjp)

  def backward(vjp, grad):
    with precision():
      return vjp(grad)

  wrapped.defvjp(forward, backward)
  return wrapped


def _local_splash(q, k, v, interpret: bool):
  """[B, T, H, D] in, [B, T, H, D] out, on this device's shard."""
  kernel = _with_kept_outputs(jax.vmap(_kernel(q.shape[2], q.shape[1], k.shape[1], interpret)), q.dtype)
  scale = q.shape[-1] ** -0.5
  to_heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  out = kernel(to_heads_first(q * jnp.asarray(scale, q.dtype)), to_heads_first(k), to_heads_first(v))
  return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def _mesh_axes(logical: str, rules, mesh, size: int):
  """The mesh axes that `rules` give the logical axis, those in `mesh`, if their product divides `size`
  (else None: that dimension stays whole on each device)."""
  axes = dict(rules).get(logical)
  axes = tuple(a for a in ((axes,) if isinstance(axes, str) else tuple(axes or ())) if a in mesh.axis_names)
  if not axes or size % math.prod(mesh.shape[a] for a in axes):
    return None
  return axes[0] if len(axes) == 1 else axes


def splash_dense(q, k, v, logical_rules=DEFAULT_LOGICAL_RULES):
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return _local_splash(q, k, v, interpret=trace_platform() != "tpu")
  spec = P(_mesh_axes("batch", logical_rules, mesh, q.shape[0]), None,
           _mesh_axes("heads", logical_rules, mesh, q.shape[2]), None)
  local = functools.partial(_local_splash, interpret=trace_platform() != "tpu")
  # check_vma=False: the Pallas kernel's outputs carry no varying-axes annotation; each shard's
  # attention is independent (no collectives), so there is nothing for the check to catch.
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)
