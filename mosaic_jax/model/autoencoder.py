"""The one interface every image autoencoder offers (the FLUX VAE, the exact pixel autoencoder).

Training and sampling only need: encode images -> a diagonal Gaussian posterior over latents, decode
latents -> images, and the affine map between raw latents and what the DiT sees:
`model_latent = (z - shift_factor) * scaling_factor` (FLUX: shift 0.1159, scaling 0.3611). Layouts are
NHWC: images [B, H, W, 3] in [-1, 1], latents [B, H/f, W/f, latent_channels].

`Autoencoder` binds a config, its params and the module that implements it, so callers choose the
autoencoder once (config) and never branch on its kind.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

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
  b, h, w, c = z.shape
  if h % 2 or w % 2:
    raise ValueError(f"pack_latents: latent height and width must be even, got {h}x{w}.")
  z = z.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
  return z.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens, height: int, width: int):
  """The inverse of pack_latents: tokens [B, (h/2)(w/2), 4C] -> NHWC latents [B, h, w, C]."""
  b, n, c4 = tokens.shape
  if n != (height // 2) * (width // 2) or c4 % 4:
    raise ValueError(f"unpack_latents: {n} tokens of {c4} channels do not make a {height}x{width} latent.")
  z = tokens.reshape(b, height // 2, width // 2, c4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
  return z.reshape(b, height, width, c4 // 4)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Autoencoder:
  """An autoencoder with its params. `kind` is "vae" or "pixel"; `config` is that module's config.

  The configs carry latent_channels, downsample_factor, scaling_factor and shift_factor; the
  implementing module has `encode(params, cfg, images) -> Posterior` and `decode(params, cfg, z)`.
  """
  # A pytree whose only child is params, so an Autoencoder can be passed through jax.jit.
  kind: str = dataclasses.field(metadata={"static": True})
  config: Any = dataclasses.field(metadata={"static": True})
  params: Any = None

  @property
  def _module(self):
    # Imported here: vae.py and pixel_autoencoder.py import Posterior from this file.
    if self.kind == "vae":
      from mosaic_jax.model import vae
      return vae
    if self.kind == "pixel":
      from mosaic_jax.model import pixel_autoencoder
      return pixel_autoencoder
    raise ValueError(f"unknown autoencoder kind {self.kind!r}; expected 'vae' or 'pixel'.")

  @property
  def latent_channels(self) -> int:
    return self.config.latent_channels

  @property
  def downsample_factor(self) -> int:
    return self.config.downsample_factor

  def encode(self, images) -> Posterior:
    return self._module.encode(self.params, self.config, images)

  def decode(self, z):
    return self._module.decode(self.params, self.config, z)

  def encode_to_model_latents(self, images, key=None):
    """Posterior mean (key None) or a posterior sample, mapped to DiT latents."""
    posterior = self.encode(images)
    z = posterior.mean if key is None else sample_posterior(posterior, key)
    return to_model_latents(z, self.config.scaling_factor, self.config.shift_factor)

  def decode_model_latents(self, latents):
    return self.decode(from_model_latents(latents, self.config.scaling_factor, self.config.shift_factor))
