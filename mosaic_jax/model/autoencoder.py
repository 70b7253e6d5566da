"""The one interface every image autoencoder offers (the FLUX VAE, the exact pixel autoencoder).

Training and sampling only need: encode images -> a diagonal Gaussian posterior over latents, decode
latents -> images, and the affine map between raw latents and what the DiT sees (latents.py). Layouts
are NHWC: images [B, H, W, 3] in [-1, 1], latents [B, H/f, W/f, latent_channels].

`Autoencoder` binds a config, its params and the module that implements it, so callers choose the
autoencoder once (config) and never branch on its kind. The implementations import only latents.py,
so this file can import them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from mosaic_jax.model import pixel_autoencoder, vae
from mosaic_jax.model.latents import Posterior, from_model_latents, sample_posterior, to_model_latents

# kind -> the module with `encode(params, cfg, images) -> Posterior` and `decode(params, cfg, z)`.
IMPLEMENTATIONS = {"vae": vae, "pixel": pixel_autoencoder}


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
    if self.kind not in IMPLEMENTATIONS:
      raise ValueError(f"unknown autoencoder kind {self.kind!r}; expected one of {sorted(IMPLEMENTATIONS)}.")
    return IMPLEMENTATIONS[self.kind]

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
