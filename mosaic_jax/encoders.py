"""FLUX's encoders together: the image autoencoder, T5, CLIP and both tokenizers, loaded from one checkpoint.

This is what training, sampling and feature caching call: captions -> (T5 hidden states [B, 512, 4096],
pooled CLIP [B, 768]) and images -> a latent posterior, each as one jitted function run over fixed-size
batches (the last batch is padded, so every call reuses one compiled program). The autoencoder may be
the FLUX VAE or the exact pixel autoencoder (autoencoder.py); the text encoders are optional, so a demo
without a checkpoint can still encode images.

`make_encoders(settings)` is the run's choice (settings.encoders): FLUX's from the checkpoint root, the
demo's file-free ones (the pixel autoencoder and tiny random T5 and CLIP behind a byte tokenizer), or
FLUX's VAE geometry with random weights (flux_random). Training, a workdir read back as a model and
dataset encoding all take their encoders from it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mosaic_jax import text
from mosaic_jax.interop.text_encoder_checkpoint import load_clip_text_encoder, load_t5_encoder
from mosaic_jax.interop.vae_checkpoint import load_vae
from mosaic_jax.model import clip, t5, vae
from mosaic_jax.model import config as model_config
from mosaic_jax.model.autoencoder import Autoencoder
from mosaic_jax.model.latents import Posterior, sample_posterior, to_model_latents
from mosaic_jax.settings import Settings, autoencoder_geometry

# The encoder outputs a train step needs, whether computed on the fly or read from a cache
# (data/cached_features.py): raw posterior statistics, so that every step can draw a fresh target
# sample as the official recipe does, and the text features.
FEATURE_KEYS = ("target_mean", "target_std", "ref_means", "t5", "pooled")


def run_in_batches(fn: Callable, inputs: np.ndarray, batch_size: int):
  """fn over inputs [N, ...] in batches of exactly batch_size (the last padded by repeating the final
  row), results concatenated on the host and trimmed back to N. fn returns an array or a tuple of them."""
  n = len(inputs)
  outputs = []
  for start in range(0, n, batch_size):
    batch = inputs[start:start + batch_size]
    real = len(batch)
    if real < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
    result = jax.device_get(fn(batch))
    outputs.append(jax.tree_util.tree_map(lambda a, real=real: a[:real], result))
  return jax.tree_util.tree_map(lambda *parts: np.concatenate(parts), *outputs)


@dataclasses.dataclass
class FluxEncoders:
  autoencoder: Autoencoder
  t5_config: t5.T5Config | None = None
  t5_params: Any = None
  clip_config: clip.ClipTextConfig | None = None
  clip_params: Any = None
  tokenizers: text.FluxTokenizers | None = None

  def __post_init__(self):
    self._t5 = jax.jit(lambda p, ids: t5.encode(p, self.t5_config, ids))
    self._clip = jax.jit(lambda p, ids: clip.encode(p, self.clip_config, ids)[1])
    self._encode = jax.jit(lambda ae, images: ae.encode(images))

  def encode_captions(self, captions: Sequence[str], batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(T5 hidden states [N, t5_max_length, d_model], pooled CLIP [N, hidden]) as host arrays."""
    if self.tokenizers is None or self.t5_params is None or self.clip_params is None:
      raise ValueError("FluxEncoders.encode_captions needs the tokenizers and both text encoders "
                       "(load_flux_encoders with text=True).")
    t5_ids, clip_ids = self.tokenizers.t5_ids(captions), self.tokenizers.clip_ids(captions)
    t5_states = run_in_batches(lambda ids: self._t5(self.t5_params, ids), t5_ids, batch_size)
    pooled = run_in_batches(lambda ids: self._clip(self.clip_params, ids), clip_ids, batch_size)
    return t5_states, pooled

  def encode_images(self, images: np.ndarray, batch_size: int = 8) -> Posterior:
    """Raw-latent posterior (float32 mean and std) of images [N, H, W, 3] in [-1, 1]."""
    mean, std = run_in_batches(lambda x: tuple(self._encode(self.autoencoder, x)), np.asarray(images), batch_size)
    return Posterior(mean=mean, std=std)

  def batch_features(self, batch: dict, batch_size: int = 8) -> dict[str, np.ndarray]:
    """Encoder outputs (FEATURE_KEYS) of an input-pipeline batch: target [B, H, W, 3], refs
    [B, R, H_r, W_r, 3] (images in [-1, 1]) and caption [B] ("" where the caption was dropped)."""
    target = self.encode_images(batch["target"], batch_size)
    refs = np.asarray(batch["refs"])
    b, r = refs.shape[:2]
    if r:
      ref_means = self.encode_images(refs.reshape((b * r,) + refs.shape[2:]), batch_size).mean
      ref_means = ref_means.reshape((b, r) + ref_means.shape[1:])
    else:
      f = self.autoencoder.downsample_factor
      ref_means = np.zeros((b, 0, refs.shape[2] // f, refs.shape[3] // f, self.autoencoder.latent_channels),
                           np.float32)
    t5_states, pooled = self.encode_captions([str(c) for c in batch["caption"]], batch_size)
    return {"target_mean": target.mean, "target_std": target.std, "ref_means": ref_means,
            "t5": t5_states, "pooled": pooled}


  # ---- inside the train step's mesh: host inputs -> features on device ----

  def device_parts(self) -> dict:
    """The encoders' weights as one pytree (what `features_from_raw` takes; place it on a mesh)."""
    return {"autoencoder": self.autoencoder, "t5": self.t5_params, "clip": self.clip_params}

  def raw_inputs(self, batch: dict) -> dict[str, np.ndarray]:
    """What `features_from_raw` reads, from an input-pipeline batch: images and token ids, host-side."""
    if self.tokenizers is None or self.t5_params is None or self.clip_params is None:
      raise ValueError("FluxEncoders.raw_inputs needs the tokenizers and both text encoders.")
    captions = [str(c) for c in batch["caption"]]
    return {"target_images": np.asarray(batch["target"], np.float32),
            "ref_images": np.asarray(batch["refs"], np.float32),
            "t5_ids": np.asarray(self.tokenizers.t5_ids(captions), np.int32),
            "clip_ids": np.asarray(self.tokenizers.clip_ids(captions), np.int32)}

  def features_from_raw(self, parts: dict, raw: dict) -> dict:
    """FEATURE_KEYS of a batch, traced: jit it on the step's mesh with batch-sharded `raw`, and the
    features stay on the devices, split like the batch, in the encoders' own dtypes (no host round
    trip between encoding and the step)."""
    autoencoder = parts["autoencoder"]
    target = autoencoder.encode(raw["target_images"])
    refs = raw["ref_images"]
    b, r = refs.shape[:2]
    if r:
      ref_means = autoencoder.encode(refs.reshape((b * r,) + refs.shape[2:])).mean
      ref_means = ref_means.reshape((b, r) + ref_means.shape[1:])
    else:
      f = autoencoder.downsample_factor
      ref_means = jnp.zeros((b, 0, refs.shape[2] // f, refs.shape[3] // f, autoencoder.latent_channels), jnp.float32)
    return {"target_mean": target.mean, "target_std": target.std, "ref_means": ref_means,
            "t5": t5.encode(parts["t5"], self.t5_config, raw["t5_ids"]),
            "pooled": clip.encode(parts["clip"], self.clip_config, raw["clip_ids"])[1]}


def training_latents(features: dict, scaling_factor: float, shift_factor: float, key) -> dict:
  """What the DiT trains on, from encoder features (cached or fresh): a posterior sample of the target
  and the posterior means of the references, mapped to model latents (NHWC; pack with pack_latents),
  and the text embeddings as they are."""
  target = sample_posterior(Posterior(jnp.asarray(features["target_mean"]), jnp.asarray(features["target_std"])),
                            key)
  return {"target": to_model_latents(target, scaling_factor, shift_factor),
          "refs": to_model_latents(jnp.asarray(features["ref_means"]), scaling_factor, shift_factor),
          # float32 whatever the encoders' dtype: the numerics of features that came through the host
          "text": jnp.asarray(features["t5"], jnp.float32), "pooled": jnp.asarray(features["pooled"], jnp.float32)}


def load_flux_encoders(root: str, autoencoder: str = "vae", text_encoders: bool = True,
                       t5_dtype=jnp.bfloat16, clip_dtype=jnp.bfloat16, vae_dtype=jnp.float32,
                       t5_max_length: int = text.T5_MAX_LENGTH, place: Callable | None = None,
                       pixel_config=None) -> FluxEncoders:
  """The encoders of a FLUX checkpoint root (vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/).

  autoencoder: "vae" (from root/vae) or "pixel" (the exact space-to-depth autoencoder; `pixel_config`,
  default PixelAutoencoderConfig()). `place(name, array)` places T5's leaves (e.g. sharded like the DiT).
  """
  root = os.fspath(root)
  if autoencoder == "vae":
    vae_cfg, vae_params = load_vae(os.path.join(root, "vae"), dtype=vae_dtype)
    ae = Autoencoder("vae", vae_cfg, vae_params)
  elif autoencoder == "pixel":
    from mosaic_jax.model.pixel_autoencoder import PixelAutoencoderConfig
    ae = Autoencoder("pixel", pixel_config or PixelAutoencoderConfig(), {})
  else:
    raise ValueError(f"autoencoder={autoencoder!r}: expected 'vae' or 'pixel'.")
  if not text_encoders:
    return FluxEncoders(ae)
  t5_cfg, t5_params = load_t5_encoder(os.path.join(root, "text_encoder_2"), dtype=t5_dtype, place=place)
  clip_cfg, clip_params = load_clip_text_encoder(os.path.join(root, "text_encoder"), dtype=clip_dtype)
  return FluxEncoders(ae, t5_cfg, t5_params, clip_cfg, clip_params, text.load_flux_tokenizers(root, t5_max_length))


# ---- the run's choice ------------------------------------------------------------------------------

def make_encoders(settings: Settings, text_encoders: bool | None = None) -> FluxEncoders:
  """The encoders of the settings. By default FLUX's text encoders are not loaded when training reads
  cached features (T5-XXL alone is 9.5 GB): only the autoencoder is needed, to decode sample images."""
  if text_encoders is None:
    text_encoders = not settings.dataset.cached_features
  if settings.encoders == "demo":
    return demo_encoders(settings, settings.seed)
  if settings.encoders == "random":
    return random_encoders(settings, settings.seed)
  return load_flux_encoders(settings.checkpoint, autoencoder="vae", t5_max_length=settings.text_len,
                            text_encoders=text_encoders)


def text_widths(settings: Settings) -> tuple[int, int]:
  """(T5 state width, pooled CLIP width) that the settings' transformer preset (with its overrides) takes:
  the file-free text encoders are built to match it."""
  cfg = model_config.resolve(settings.model, dict(settings.model_overrides))
  return cfg.joint_attention_dim, cfg.pooled_projection_dim


def _tiny_text_encoders(settings: Settings, seed: int) -> dict:
  """Tiny random T5 and CLIP (widths matching the transformer) behind the byte tokenizer."""
  t5_width, clip_width = text_widths(settings)
  t5_cfg = dataclasses.replace(t5.tiny(), d_model=t5_width)
  clip_cfg = dataclasses.replace(clip.tiny(), hidden_size=clip_width, max_position_embeddings=16,
                                 eos_token_id=clip.tiny().vocab_size - 1)
  t5_key, clip_key = jax.random.split(jax.random.key(seed + 1_000_003))
  return dict(t5_config=t5_cfg, t5_params=t5.init_params(t5_key, t5_cfg), clip_config=clip_cfg,
              clip_params=clip.init_params(clip_key, clip_cfg),
              tokenizers=text.ByteTokenizers(t5_cfg.vocab_size, settings.text_len, clip_cfg.max_position_embeddings))


def demo_encoders(settings: Settings, seed: int = 0) -> FluxEncoders:
  """Pixel autoencoder (2 x pixel_patch_size px per token) and tiny random text encoders; no files."""
  return FluxEncoders(autoencoder_geometry(settings), **_tiny_text_encoders(settings, seed))  # no weights


def random_encoders(settings: Settings, seed: int = 0) -> FluxEncoders:
  """FLUX's VAE geometry (/8, 16 channels) with random weights, and the tiny random text encoders:
  the recipe's exact shapes with no downloaded file, to check a machine before the weights are there.
  What it trains on means nothing."""
  vae_cfg = autoencoder_geometry(settings).config  # VaeConfig()
  vae_params = vae.init_params(jax.random.key(seed + 2_000_003), vae_cfg)
  return FluxEncoders(Autoencoder("vae", vae_cfg, vae_params), **_tiny_text_encoders(settings, seed))
