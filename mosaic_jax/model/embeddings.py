"""Conditioning embeddings (time, guidance, pooled text), FLUX RoPE, and the position ids of each branch."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mosaic_jax.model.layers import linear


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


def apply_rope(x, cos_sin):
  """Rotates interleaved pairs (x[2k], x[2k+1]) of x [..., T, H, D] by the tables [T, D], in float32."""
  cos, sin = cos_sin
  xf = x.astype(jnp.float32)
  pairs = xf.reshape(xf.shape[:-1] + (-1, 2))
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xf.shape)
  cos = cos[..., :, None, :]  # broadcast over heads
  sin = sin[..., :, None, :]
  return (xf * cos + rotated * sin).astype(x.dtype)


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
