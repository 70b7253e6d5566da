"""An exactly invertible pixel-space "autoencoder": space-to-depth, the stand-in for the VAE in demos.

Tiny demo models have no trained VAE, and a random VAE decodes to noise. This one rearranges each
p x p patch of pixels into channels (channel-major: c, row, col within the patch, like FLUX's 2x2
packing) and pads with zero channels up to `latent_channels`, so decode(encode(x)) == x bit for bit
and any latent the DiT produces decodes to an image a person can look at.

Exact invertibility bounds the shape: a p x p patch of 3 channels has 3 p^2 values, so
latent_channels >= 3 p^2. The default p = 2 gives 12 values padded to FLUX's 16 latent channels (the
DiT keeps its 16-channel, 64-packed-channel input) at 1/2 resolution instead of the VAE's 1/8; p = 8
gives the VAE's 1/8 grid with 192 channels. The interface is the VAE's (autoencoder.py): encode ->
Posterior (std 0: deterministic), decode; there are no parameters (params is an empty dict).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mosaic_jax.model.latents import Posterior


@dataclasses.dataclass(frozen=True)
class PixelAutoencoderConfig:
  patch_size: int = 2
  in_channels: int = 3
  latent_channels: int = 16
  # Pixels in [-1, 1] already have about unit scale; kept so the interface matches the VAE's.
  scaling_factor: float = 1.0
  shift_factor: float = 0.0

  def __post_init__(self):
    needed = self.in_channels * self.patch_size ** 2
    if self.patch_size < 1 or self.latent_channels < needed:
      raise ValueError(
          f"PixelAutoencoderConfig: patch_size={self.patch_size} with in_channels={self.in_channels} "
          f"needs latent_channels >= {needed} to be invertible, got {self.latent_channels}.")

  @property
  def downsample_factor(self) -> int:
    return self.patch_size

  @property
  def used_channels(self) -> int:
    return self.in_channels * self.patch_size ** 2


def init_params(key=None, cfg: PixelAutoencoderConfig | None = None, dtype=None) -> dict:
  """No parameters; here so that every autoencoder module offers the same functions."""
  return {}


def encode(params, cfg: PixelAutoencoderConfig, images) -> Posterior:
  """Images [B, H, W, C] -> Posterior(mean [B, H/p, W/p, latent_channels] float32, std zeros)."""
  p = cfg.patch_size
  if images.ndim != 4 or images.shape[-1] != cfg.in_channels or images.shape[1] % p or images.shape[2] % p:
    raise ValueError(f"pixel autoencoder encode: expected images [B, H, W, {cfg.in_channels}] with H and W "
                     f"multiples of {p}, got shape {tuple(images.shape)}.")
  b, h, w, c = images.shape
  x = images.astype(jnp.float32).reshape(b, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // p, w // p, c * p * p)
  mean = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, cfg.latent_channels - cfg.used_channels)))
  return Posterior(mean=mean, std=jnp.zeros_like(mean))


def decode(params, cfg: PixelAutoencoderConfig, latents):
  """Latents [B, h, w, latent_channels] -> images [B, h*p, w*p, C]; the zero-padding channels are dropped."""
  p, c = cfg.patch_size, cfg.in_channels
  if latents.ndim != 4 or latents.shape[-1] != cfg.latent_channels:
    raise ValueError(f"pixel autoencoder decode: expected latents [B, h, w, {cfg.latent_channels}], got shape "
                     f"{tuple(latents.shape)}.")
  b, h, w, _ = latents.shape
  x = latents[..., :cfg.used_channels].reshape(b, h, w, c, p, p)
  return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * p, w * p, c)
