"""Dense image features from our FLUX transformer for correspondence matching, following DiTF.

DiTF (Gan et al., "Unleashing Diffusion Transformers for Visual Correspondence by Modulating Massive
Activations", arXiv 2505.18584; code: github.com/ganchaofan0000/DiTF) reads the image tokens of a noised
image at one depth of a diffusion transformer, averaged over several noise draws. Raw, these features
match poorly: a few fixed channels hold "massive activations", far larger than the rest on every token.
Its two remedies are options here:
- AdaLN normalization: the hidden states as the next block reads them, layer_norm(h) * (1 + scale) +
  shift, with that block's own modulation of image tokens at the feature timestep;
- channel discard: the massive-activation channels (fixed indices of a given model; 154 and 1446 for
  FLUX.1-dev) zeroed before that LayerNorm, so that they no longer dominate its statistics.
SPair-71k PCK@0.1 on FLUX.1-dev in the paper's ablation: raw 29.9, + AdaLN 65.3, + discard 67.1.

The extraction (DitfConfig's defaults are DiTF's FLUX.1-dev setting for semantic correspondence):
  x0 = packed model latents of the image ((z - shift) * scale of the VAE posterior mean);
  per copy, x_t = (1 - t) x0 + t noise with t = 0.26 (DiTF's 260 of 1000), guidance 3.5, 8 copies;
  the image alone through the transformer (no references) up to block 28 (single block 9: double blocks
  count 0..18, single blocks 19..56, as transformer.block_input counts), whose input is read; its image
  tokens averaged over the copies, then the discard, then block 28's AdaLN normalization.
Only the 28 blocks before it run. The text is the caller's: T5 states and the pooled CLIP vector of one
prompt, encoded once (`encoders.FluxEncoders.encode_captions([""])` for the empty prompt the matcher
uses: T5 padded to 512 tokens, as DiTF encodes). Where this differs from DiTF's own SPair runs: they
prompted each image with a caption written by a multimodal LLM (its README credits that with about 0.3
PCK), encoded a posterior sample per copy rather than the mean, and fed 640 px images (a 40x40 grid);
MOSAIC's matcher feeds 1024 px (the 64x64 grid of the released correspondences).

    cfg = flux_features.DitfConfig()   # block 28, t 0.26, guidance 3.5, 8 copies, both remedies
    feats = flux_features.image_features(params, flux_cfg, latents, text, pooled, key, cfg)
    # latents [B, 128, 128, 16] (or tokens [B, 4096, 64] with grid=(64, 64)) -> [B, 64, 64, 3072] float32
    feats = flux_features.image_features_from_images(autoencoder, params, flux_cfg, images, text, pooled,
                                                     key, cfg)   # images [B, 1024, 1024, 3] in [-1, 1]

Both are pure functions: jit them with `flux_cfg`, `cfg` (and `grid`) static. Each image becomes
`copies` sequences of the batch; under `jax.set_mesh` the model pins them over the mesh's batch axes, as
it does in training, and the params may be placed as training places them (parallel.place). A LoRA is
never needed: MOSAIC's LoRA acts on reference tokens only, and there are none here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mosaic_jax.model import transformer
from mosaic_jax.model.autoencoder import Autoencoder
from mosaic_jax.model.config import FluxConfig
from mosaic_jax.model.embeddings import image_ids, text_ids
from mosaic_jax.model.latents import pack_latents
from mosaic_jax.model.layers import layer_norm, modulate


class FluxFeatureError(ValueError):
  """A feature setting or an input that does not fit the model (one line naming it)."""


@dataclasses.dataclass(frozen=True)
class DitfConfig:
  """What to extract; the defaults are DiTF's FLUX.1-dev setting (its SPair-71k evaluation script).

  block:            the hidden state entering this block is read: the output of the `block` blocks before
                    it (double blocks first, then single; num_layers + num_single_layers: the output layer)
  timestep:         sigma of the noised copies, in [0, 1] (DiTF's t = 260 of 1000)
  copies:           noisy copies averaged per image (DiTF's ensemble size)
  guidance:         FLUX.1-dev's guidance input (DiTF's extractor passes 3.5)
  adaln_normalize:  layer_norm, then the block's own AdaLN scale and shift for image tokens
  discard_massive:  zero `massive_channels` before that LayerNorm (before nothing, if adaln_normalize is off)
  massive_channels: where FLUX.1-dev's massive activations sit (fixed channel indices, as DiTF zeroes them)
  """
  block: int = 28
  timestep: float = 0.26
  copies: int = 8
  guidance: float = 3.5
  adaln_normalize: bool = True
  discard_massive: bool = True
  massive_channels: tuple[int, ...] = (154, 1446)

  def __post_init__(self):
    object.__setattr__(self, "massive_channels", tuple(int(c) for c in self.massive_channels))
    if self.copies < 1:
      raise FluxFeatureError(f"DitfConfig.copies={self.copies}: expected at least 1 noisy copy.")
    if not 0.0 <= self.timestep <= 1.0:
      raise FluxFeatureError(f"DitfConfig.timestep={self.timestep}: expected a sigma in [0, 1] (DiTF: 0.26).")

  def check(self, flux_cfg: FluxConfig) -> None:
    """Raises FluxFeatureError where this setting does not fit the model `flux_cfg`."""
    depth = flux_cfg.num_layers + flux_cfg.num_single_layers
    if not 0 <= self.block <= depth:
      raise FluxFeatureError(
          f"DitfConfig.block={self.block}: this model has blocks 0..{depth - 1} ({flux_cfg.num_layers} double, "
          f"{flux_cfg.num_single_layers} single) and {depth} for the output layer.")
    outside = [c for c in self.massive_channels if not 0 <= c < flux_cfg.hidden_size]
    if self.discard_massive and outside:
      raise FluxFeatureError(f"DitfConfig.massive_channels {outside}: outside the model's "
                             f"{flux_cfg.hidden_size} channels.")


def image_features(params, flux_cfg: FluxConfig, latents, text, pooled, key, cfg: DitfConfig = DitfConfig(),
                   grid: tuple[int, int] | None = None, noise=None):
  """DiTF features [B, gh, gw, hidden] float32 of images given as model latents.

  latents: NHWC model latents [B, h, w, C] (Autoencoder.encode_to_model_latents), or packed tokens
           [B, gh * gw, 4C] with grid=(gh, gw).
  text:    T5 states [1 or B, S, joint_attention_dim] of the prompt; pooled: CLIP [1 or B, pooled_dim].
  key:     jax.random key of the noise; noise: or the noise itself, [B, copies, gh * gw, 4C].
  """
  tokens, grid = _packed(latents, grid, flux_cfg)
  cfg.check(flux_cfg)
  batch, count, channels = tokens.shape
  shape = (batch, cfg.copies, count, channels)
  if noise is None and key is None:
    raise FluxFeatureError("image_features needs a jax.random key or the noise itself (noise=).")
  if noise is None:
    noise = jax.random.normal(key, shape, jnp.float32)
  elif tuple(noise.shape) != shape:
    raise FluxFeatureError(f"noise {tuple(noise.shape)}: expected {shape} (images, copies, tokens, channels).")
  sequences = batch * cfg.copies
  noisy = (1.0 - cfg.timestep) * tokens.astype(jnp.float32)[:, None] + cfg.timestep * noise.astype(jnp.float32)
  inputs = transformer.FluxInputs(
      target=noisy.reshape(sequences, count, channels), target_ids=image_ids(*grid),
      text=_per_sequence(text, "text", batch, cfg.copies), text_ids=text_ids(text.shape[1]),
      pooled=_per_sequence(pooled, "pooled", batch, cfg.copies),
      timestep=jnp.full((sequences,), cfg.timestep, jnp.float32),
      guidance=jnp.full((sequences,), cfg.guidance, jnp.float32))
  entering = transformer.block_input(params, None, flux_cfg, inputs, cfg.block)
  hidden = jnp.mean(entering.image.astype(jnp.float32).reshape(batch, cfg.copies, count, -1), axis=1)
  # The copies share t, guidance and the prompt, so their modulation is one: the first copy's.
  shift, scale = (x.astype(jnp.float32).reshape(batch, cfg.copies, -1)[:, 0] for x in (entering.shift,
                                                                                      entering.scale))
  return _normalize(hidden, shift, scale, cfg).reshape(batch, *grid, -1)


def image_features_from_images(autoencoder: Autoencoder, params, flux_cfg: FluxConfig, images, text, pooled, key,
                               cfg: DitfConfig = DitfConfig(), noise=None):
  """image_features of images [B, H, W, 3] in [-1, 1], encoded to the posterior mean's model latents.
  H and W must be multiples of 2 x the autoencoder's downsampling (16 for the FLUX VAE)."""
  patch = 2 * autoencoder.downsample_factor
  if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % patch or images.shape[2] % patch:
    raise FluxFeatureError(f"images {tuple(images.shape)}: expected [B, H, W, 3] with H and W multiples of "
                           f"{patch}.")
  latents = autoencoder.encode_to_model_latents(images)  # no key: the posterior mean
  return image_features(params, flux_cfg, latents, text, pooled, key, cfg, noise=noise)


def _normalize(hidden, shift, scale, cfg: DitfConfig):
  """DiTF's remedies on averaged hidden states [B, N, D]: massive channels zeroed, then the AdaLN."""
  if cfg.discard_massive and cfg.massive_channels:
    hidden = hidden.at[..., jnp.asarray(cfg.massive_channels)].set(0.0)
  if cfg.adaln_normalize:
    hidden = modulate(layer_norm(hidden), shift, scale)
  return hidden


def _packed(latents, grid, flux_cfg: FluxConfig):
  """(tokens [B, N, C], (gh, gw)) from NHWC latents or from tokens and their grid."""
  if latents.ndim == 4:
    _, h, w, _ = latents.shape
    if h % 2 or w % 2:
      raise FluxFeatureError(f"latents {tuple(latents.shape)}: height and width must be even (2x2 patches).")
    if grid is not None and tuple(grid) != (h // 2, w // 2):
      raise FluxFeatureError(f"grid={tuple(grid)} does not match latents {tuple(latents.shape)} "
                             f"(a {h // 2}x{w // 2} token grid).")
    tokens, grid = pack_latents(latents), (h // 2, w // 2)
  elif latents.ndim == 3:
    if grid is None or len(grid) != 2 or grid[0] * grid[1] != latents.shape[1]:
      raise FluxFeatureError(f"tokens {tuple(latents.shape)} need grid=(rows, cols) with rows * cols = "
                             f"{latents.shape[1]}; got grid={grid}.")
    tokens, grid = latents, (int(grid[0]), int(grid[1]))
  else:
    raise FluxFeatureError(f"latents {tuple(latents.shape)}: expected [B, h, w, C] latents or [B, N, C] tokens.")
  if tokens.shape[-1] != flux_cfg.in_channels:
    raise FluxFeatureError(f"latent tokens of {tokens.shape[-1]} channels; the model takes {flux_cfg.in_channels}.")
  return tokens, grid


def _per_sequence(x, name: str, batch: int, copies: int):
  """One prompt's features [1, ...] or one per image [B, ...] -> one per sequence [B * copies, ...]."""
  if x.shape[0] == 1:
    return jnp.broadcast_to(x, (batch * copies,) + tuple(x.shape[1:]))
  if x.shape[0] == batch:
    return jnp.repeat(x, copies, axis=0)
  raise FluxFeatureError(f"{name} {tuple(x.shape)}: expected a leading axis of 1 (one prompt) or {batch} (per image).")
