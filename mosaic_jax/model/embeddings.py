"""Conditioning embeddings (time, guidance, pooled text), FLUX RoPE, and the position ids of each branch."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mosaic_jax.model.layers import linear
from mosaic_jax.parallel.sharding import trace_platform


def timestep_sinusoid(t, dim=256, max_period=10000.0):
  """Sinusoidal embedding of t (already scaled by 1000), cos half first, in float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _mlp_embed(p, x):
  return linear(p["linear_2"], jax.nn.silu(linear(p["linear_1"], x)))


def conditioning(p, cfg, timestep, guidance, pooled):
  """temb = time(t) + guidance(g) + text(pooled); t and g are in [0, 1]-scale and multiplied by 1000 here."""
  dtype = p["timestep_embedder"]["linear_1"]["kernel"].dtype
  temb = _mlp_embed(p["timestep_embedder"], timestep_sinusoid(timestep * 1000).astype(dtype))
  if cfg.guidance_embeds:
    temb = temb + _mlp_embed(p["guidance_embedder"], timestep_sinusoid(guidance * 1000).astype(dtype))
  return temb + _mlp_embed(p["text_embedder"], pooled.astype(dtype))


def rope(ids, axes_dims, theta):
  """cos and sin tables [..., head_dim] for 3-axis ids [..., 3], each frequency repeated for its pair."""
  cos, sin = [], []
  for axis, dim in enumerate(axes_dims):
    freqs = (1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)
    angles = ids[..., axis].astype(jnp.float32)[..., None] * freqs
    cos.append(jnp.repeat(jnp.cos(angles), 2, axis=-1))
    sin.append(jnp.repeat(jnp.sin(angles), 2, axis=-1))
  return jnp.concatenate(cos, axis=-1), jnp.concatenate(sin, axis=-1)


def _quarter_turn_by_reshape(x):
  """(-x[1], x[0], -x[3], x[2], ...) in float32, through a [..., D/2, 2] view."""
  pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (-1, 2))
  return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def _quarter_turn_by_matmul(x):
  """The same numbers as a matmul with a signed permutation: exact (one +-1 per column, float32
  accumulation, full precision for float32 inputs)."""
  d = x.shape[-1]
  r = np.zeros((d, d), np.float32)
  r[np.arange(1, d, 2), np.arange(0, d, 2)] = -1.0
  r[np.arange(0, d, 2), np.arange(1, d, 2)] = 1.0
  return jnp.einsum("...d,de->...e", x, jnp.asarray(r, x.dtype), preferred_element_type=jnp.float32,
                    precision=jax.lax.Precision.HIGHEST)


def apply_rope(x, cos_sin):
  """Rotates interleaved pairs (x[2k], x[2k+1]) of x [..., T, H, D] by the tables [T, D], in float32.

  The quarter turn of each pair depends on the platform compiled for, same numbers either way. On a TPU an axis of 2
  pads every vector register 64-fold: the reshape form's reshapes and stacks become separate float32
  copies of q and k, 4.7x the HBM traffic of the matmul form (forward, one block's reference queries,
  by the TPU compiler's cost analysis), which is one fusion reading x and writing the result. On
  XLA:CPU the matmul form is the slower one (1.7x, forward and backward, at the official_compare.py
  shapes), so elsewhere the reshape form stays.
  """
  cos, sin = cos_sin
  rotated = (_quarter_turn_by_matmul if trace_platform() == "tpu" else _quarter_turn_by_reshape)(x)
  cos = cos[..., :, None, :]  # broadcast over heads
  sin = sin[..., :, None, :]
  return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


# ---- position ids of the packed branches (docs/method.md, 'Sequence') ----------------------------

def text_ids(seq_len: int) -> np.ndarray:
  """Text tokens sit at position (0, 0, 0)."""
  return np.zeros((seq_len, 3), np.int32)


def image_ids(height: int, width: int) -> np.ndarray:
  """Target token (r, c) of a height x width token grid has id (0, r, c), row-major."""
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return np.stack([np.zeros_like(rows), rows, cols], axis=-1).reshape(-1, 3).astype(np.int32)


def reference_ids(num_refs: int, height: int, width: int) -> np.ndarray:
  """[R, M, 3]: reference i (1-based) token (r, c) has id (0, r, c - i * width): side by side, left of the target."""
  base = image_ids(height, width)
  out = np.repeat(base[None], num_refs, axis=0)
  out[..., 2] -= (np.arange(1, num_refs + 1, dtype=np.int32) * width)[:, None]
  return out
