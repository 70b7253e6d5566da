"""The latent space every image autoencoder shares with the DiT: the posterior an encoder returns, the
affine map between raw latents and what the DiT sees, `model_latent = (z - shift_factor) *
scaling_factor` (FLUX: shift 0.1159, scaling 0.3611), and the packing of NHWC latents into DiT tokens.

The autoencoders (vae.py, pixel_autoencoder.py) build on this module; autoencoder.py binds one of
them to its params.
"""

from __future__ import annotations

from typing import NamedTuple

import einops
import jax
import jax.numpy as jnp


class Posterior(NamedTuple):
  """Diagonal Gaussian over raw latents; float32 arrays [B, h, w, C]. std is 0 for deterministic encoders."""
  mean: jax.Array
  std: jax.Array


def sample_posterior(posterior: Posterior, key) -> jax.Array:
  """mean + std * eps, eps ~ N(0, 1): the target latent draw of the training recipe."""
  eps = jax.random.normal(key, posterior.mean.shape, jnp.float32)
  return posterior.mean + posterior.std * eps


def to_model_latents(z, scaling_factor: float, shift_factor: float):
  """Raw latents -> what the DiT sees: (z - shift) * scale."""
  return (z - shift_factor) * scaling_factor


def from_model_latents(latents, scaling_factor: float, shift_factor: float):
  """The inverse of to_model_latents, before decoding."""
  return latents / scaling_factor + shift_factor


def pack_latents(z):
  """NHWC latents [B, h, w, C] -> DiT tokens [B, (h/2)(w/2), 4C], row-major over 2x2 patches, each token
  channel-major (c, row, col): diffusers' `b c (h 2) (w 2) -> b (h w) (c 2 2)` on NHWC input."""
  _, h, w, _ = z.shape
  if h % 2 or w % 2:
    raise ValueError(f"pack_latents: latent height and width must be even, got {h}x{w}.")
  return einops.rearrange(z, "b (h ph) (w pw) c -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack_latents(tokens, height: int, width: int):
  """The inverse of pack_latents: tokens [B, (h/2)(w/2), 4C] -> NHWC latents [B, h, w, C]."""
  _, n, c4 = tokens.shape
  if n != (height // 2) * (width // 2) or c4 % 4:
    raise ValueError(f"unpack_latents: {n} tokens of {c4} channels do not make a {height}x{width} latent.")
  return einops.rearrange(tokens, "b (h w) (c ph pw) -> b (h ph) (w pw) c", h=height // 2, ph=2, pw=2)
