"""What the trainer feeds on: the dataset (built on first use for synthetic configs), the encoders
(FLUX's from a checkpoint root, or the demo's file-free ones), and host batches -> step batches.

The demo's text encoders are tiny random T5 and CLIP behind a byte tokenizer: random but fixed (seeded)
functions of the caption, which is all a conditioning signal needs in a from-scratch demo.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from mosaic_jax.encoders import FluxEncoders, load_flux_encoders
from mosaic_jax.model import clip, t5
from mosaic_jax.model.autoencoder import Autoencoder
from mosaic_jax.model.pixel_autoencoder import PixelAutoencoderConfig


class ConfigError(ValueError):
  """A configuration problem found before anything is compiled; the message names the fix."""


# ---- dataset -------------------------------------------------------------------------------------

def _builder(dataset_config):
  """The tfds builder of config.dataset: a registered `semalign_ms` config, or a custom synthetic one."""
  from mosaic_jax.data.semalign_ms import SemalignMs, SemalignMsConfig
  family, _, name = dataset_config.name.partition("/")
  if family != "semalign_ms" or not name:
    raise ConfigError(f"config.dataset.name={dataset_config.name!r}: expected 'semalign_ms/<config>'.")
  data_dir = os.path.expanduser(dataset_config.data_dir)
  if name in {c.name for c in SemalignMs.BUILDER_CONFIGS}:
    return SemalignMs(config=name, data_dir=data_dir)
  build = dataset_config.build
  return SemalignMs(config=SemalignMsConfig(
      name=name, source="synthetic", image_size=build.image_size, min_refs=build.min_refs,
      max_refs=build.max_refs, num_train=build.num_train, num_validation=build.num_validation,
      seed=build.seed), data_dir=data_dir)


def open_dataset(dataset_config, split: str, build_if_missing: bool = True):
  """(record source, per-record reference counts) of a split; builds a synthetic dataset on first use."""
  from mosaic_jax.data.pipeline import RAW_IMAGE_DECODERS
  if not dataset_config.data_dir:
    raise ConfigError("config.dataset.data_dir is empty: pass --config.dataset.data_dir=DIR (a directory "
                      "holding the built semalign_ms dataset; see launch/build_dataset.py).")
  builder = _builder(dataset_config)
  if not os.path.isdir(builder.data_dir) or not os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
    buildable = dataset_config.build.num_train > 0
    if not (build_if_missing and buildable):
      raise ConfigError(
          f"dataset {dataset_config.name} not found under {builder.data_dir}: build it with "
          "launch/build_dataset.py or pass --config.dataset.data_dir=DIR where it was built.")
    print(f"building {dataset_config.name} into {builder.data_dir} (first use)", flush=True)
    builder.download_and_prepare()
  per_split = (builder.info.metadata or {}).get("num_refs", {})
  if split not in per_split:
    raise ConfigError(f"dataset {dataset_config.name} in {builder.data_dir} has no split {split!r} "
                      f"(has {sorted(per_split)}).")
  num_refs = np.asarray(per_split[split], np.int64)
  if len(num_refs) == 0:
    raise ConfigError(f"dataset {dataset_config.name} split {split!r} in {builder.data_dir} is empty.")
  return builder.as_data_source(split, decoders=RAW_IMAGE_DECODERS), num_refs


# ---- encoders ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ByteTokenizers:
  """UTF-8 bytes -> ids in [1, vocab - 2], then the end token (vocab - 1), padded with 0."""
  vocab_size: int
  t5_max_length: int
  clip_max_length: int

  def _ids(self, captions, length: int) -> np.ndarray:
    out = np.zeros((len(captions), length), np.int32)
    for row, caption in enumerate(captions):
      ids = [1 + b % (self.vocab_size - 2) for b in str(caption).encode("utf-8")][:length - 1]
      out[row, :len(ids)] = ids
      out[row, len(ids)] = self.vocab_size - 1
    return out

  def t5_ids(self, captions) -> np.ndarray:
    return self._ids(captions, self.t5_max_length)

  def clip_ids(self, captions) -> np.ndarray:
    return self._ids(captions, self.clip_max_length)


def demo_encoders(config, seed: int = 0) -> FluxEncoders:
  """Pixel autoencoder (16 px per token with patch 8) and tiny random text encoders; no files."""
  patch = config.pixel_patch_size
  pixel = PixelAutoencoderConfig(patch_size=patch, latent_channels=3 * patch * patch)
  t5_cfg = dataclasses.replace(t5.tiny(), d_model=config.model_overrides.get("joint_attention_dim", 32))
  clip_cfg = dataclasses.replace(clip.tiny(), hidden_size=config.model_overrides.get("pooled_projection_dim", 32),
                                 max_position_embeddings=16, eos_token_id=clip.tiny().vocab_size - 1)
  t5_key, clip_key = jax.random.split(jax.random.PRNGKey(seed + 1_000_003))
  return FluxEncoders(Autoencoder("pixel", pixel, {}), t5_cfg, t5.init_params(t5_key, t5_cfg), clip_cfg,
                      clip.init_params(clip_key, clip_cfg),
                      ByteTokenizers(t5_cfg.vocab_size, config.text_len, clip_cfg.max_position_embeddings))


def make_encoders(config) -> FluxEncoders:
  if config.encoders == "demo":
    return demo_encoders(config, config.seed)
  if config.encoders == "checkpoint":
    return load_flux_encoders(config.checkpoint, autoencoder="vae", t5_max_length=config.text_len)
  raise ConfigError(f"config.encoders={config.encoders!r}: expected 'checkpoint' or 'demo'.")


def step_batch(host_batch: dict, encoders: FluxEncoders) -> dict:
  """Pipeline batch (images, captions, pairs) -> the numpy arrays the train step reads (step.BATCH_KEYS)."""
  features = encoders.batch_features(host_batch, batch_size=len(host_batch["target"]))
  out = {key: np.asarray(value, np.float32) for key, value in features.items()}
  for key in ("pair_ref", "pair_ref_token", "pair_target_token"):
    out[key] = np.asarray(host_batch[key], np.int32)
  out["pair_valid"] = np.asarray(host_batch["pair_valid"], bool)
  out["drop_refs"] = np.asarray(host_batch["drop_refs"], bool)
  return out
