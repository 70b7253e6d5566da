"""What the trainer feeds on: the dataset (raw, built on first use for synthetic configs, or its cached
encoder features), the encoders (FLUX's from a checkpoint root, the demo's file-free ones, or FLUX's
shapes with random weights), and host batches -> step batches. Each function takes the run's Settings
(settings.py), or a config with the same fields where no derived field (token_pixels) is read.

The demo's text encoders are tiny random T5 and CLIP behind a byte tokenizer: random but fixed (seeded)
functions of the caption, which is all a conditioning signal needs in a from-scratch demo.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import jax
import numpy as np

from mosaic_jax.encoders import FEATURE_KEYS, FluxEncoders, load_flux_encoders
from mosaic_jax.model import clip, t5, vae
from mosaic_jax.model import config as model_config
from mosaic_jax.model.autoencoder import Autoencoder
from mosaic_jax.train.settings import ENCODER_CHOICES, ConfigError, autoencoder_geometry, settings_from_config


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


def cache_fingerprint(config) -> dict:
  """The config fields that determine encoded features (config path -> value): a cache written under
  one fingerprint is refused by a run with another."""
  fingerprint = {"dataset.name": config.dataset.name, "resolution": config.resolution,
                 "ref_resolution": config.ref_resolution, "text_len": config.text_len,
                 "encoders": config.encoders}
  if config.encoders == "checkpoint":  # by content, so a checkpoint that moved still matches its cache
    digest = hashlib.sha256()
    for folder in ("vae", "text_encoder", "text_encoder_2"):
      path = os.path.join(os.path.expanduser(config.checkpoint), folder, "config.json")
      if not os.path.exists(path):
        raise ConfigError(f"{path} not found: config.checkpoint must be a FLUX checkpoint root "
                          "(vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/).")
      with open(path, "rb") as f:
        digest.update(f.read())
    fingerprint["checkpoint (its vae and text encoder configs)"] = digest.hexdigest()[:16]
  else:  # the file-free encoders are functions of these
    fingerprint.update({"seed": config.seed, "text widths (T5, CLIP)": list(text_widths(config))})
    if config.encoders == "demo":
      fingerprint["pixel_patch_size"] = config.pixel_patch_size
  return fingerprint


def open_dataset(config, split: str, build_if_missing: bool = True):
  """(record source, per-record reference counts) of a split: the cached features of
  config.dataset.cached_features when set, else the raw dataset (a synthetic one is built on first use)."""
  if config.dataset.cached_features:
    from mosaic_jax.data import cached_features
    try:
      return cached_features.open_split(config.dataset.cached_features, split, cache_fingerprint(config))
    except cached_features.CacheError as error:
      raise ConfigError(f"{error} (--config.dataset.cached_features={config.dataset.cached_features})") from error
  return open_raw_dataset(config.dataset, split, build_if_missing)


def open_raw_dataset(dataset_config, split: str, build_if_missing: bool = True):
  """(record source, per-record reference counts) of a raw split (pipeline.open_split's checks); builds a
  synthetic dataset on first use."""
  from mosaic_jax.data import pipeline
  if not dataset_config.data_dir:
    raise ConfigError("config.dataset.data_dir is empty: pass --config.dataset.data_dir=DIR (a directory "
                      "holding the built semalign_ms dataset; see launch/build_dataset.py).")
  builder = _builder(dataset_config)
  if not pipeline.is_built(builder):
    buildable = dataset_config.build.num_train > 0 and builder.builder_config.source == "synthetic"
    if not (build_if_missing and buildable):
      from mosaic_jax.data.semalign_ms import build_command
      raise ConfigError(
          f"dataset {dataset_config.name} is not built under {builder.data_dir}: build it with "
          f"`{build_command(builder.builder_config, os.path.expanduser(dataset_config.data_dir))}`, or pass "
          "--config.dataset.data_dir=DIR where it was built.")
    print(f"building {dataset_config.name} into {builder.data_dir} (first use)", flush=True)
    builder.download_and_prepare()
  try:
    return pipeline.open_split(dataset_config.name, split, builder=builder)
  except pipeline.DatasetError as error:
    raise ConfigError(f"{error} (--config.dataset.data_dir={dataset_config.data_dir})") from error


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


def text_widths(config) -> tuple[int, int]:
  """(T5 state width, pooled CLIP width) that the config's transformer preset (with its overrides) takes:
  the file-free text encoders are built to match it."""
  cfg = model_config.resolve(config.model, config.model_overrides)
  return cfg.joint_attention_dim, cfg.pooled_projection_dim


def _tiny_text_encoders(config, seed: int):
  """Tiny random T5 and CLIP (widths matching the transformer) behind the byte tokenizer."""
  t5_width, clip_width = text_widths(config)
  t5_cfg = dataclasses.replace(t5.tiny(), d_model=t5_width)
  clip_cfg = dataclasses.replace(clip.tiny(), hidden_size=clip_width, max_position_embeddings=16,
                                 eos_token_id=clip.tiny().vocab_size - 1)
  t5_key, clip_key = jax.random.split(jax.random.key(seed + 1_000_003))
  return dict(t5_config=t5_cfg, t5_params=t5.init_params(t5_key, t5_cfg), clip_config=clip_cfg,
              clip_params=clip.init_params(clip_key, clip_cfg),
              tokenizers=ByteTokenizers(t5_cfg.vocab_size, config.text_len, clip_cfg.max_position_embeddings))


def demo_encoders(config, seed: int = 0) -> FluxEncoders:
  """Pixel autoencoder (2 x pixel_patch_size px per token) and tiny random text encoders; no files."""
  return FluxEncoders(autoencoder_geometry(config), **_tiny_text_encoders(config, seed))  # no weights


def random_encoders(config, seed: int = 0) -> FluxEncoders:
  """FLUX's VAE geometry (/8, 16 channels) with random weights, and the tiny random text encoders:
  the recipe's exact shapes with no downloaded file, to check a machine before the weights are there.
  What it trains on means nothing."""
  vae_cfg = autoencoder_geometry(config).config  # VaeConfig()
  vae_params = vae.init_params(jax.random.key(seed + 2_000_003), vae_cfg)
  return FluxEncoders(Autoencoder("vae", vae_cfg, vae_params), **_tiny_text_encoders(config, seed))


def make_encoders(config, text_encoders: bool | None = None) -> FluxEncoders:
  """The encoders of the config. By default FLUX's text encoders are not loaded when training reads
  cached features (T5-XXL alone is 9.5 GB): only the autoencoder is needed, to decode sample images."""
  if text_encoders is None:
    text_encoders = not config.dataset.cached_features
  if config.encoders == "demo":
    return demo_encoders(config, config.seed)
  if config.encoders == "random":
    return random_encoders(config, config.seed)
  if config.encoders == "checkpoint":
    return load_flux_encoders(config.checkpoint, autoencoder="vae", t5_max_length=config.text_len,
                              text_encoders=text_encoders)
  raise ConfigError(f"config.encoders={config.encoders!r}: expected one of {ENCODER_CHOICES}.")


def pipeline_config(settings, **changes):
  """The input pipeline's settings for the run's Settings (training's; `changes` for evaluation or
  encoding): pairs on the autoencoder's token grid (settings.token_pixels)."""
  from mosaic_jax.data.pipeline import PipelineConfig
  return PipelineConfig(**{**dict(
      target_size=settings.resolution, ref_size=settings.ref_resolution, global_batch_size=settings.batch_size,
      max_pairs=settings.dataset.max_pairs, token_pixels=settings.token_pixels, seed=settings.seed,
      read_threads=settings.dataset.read_threads, worker_processes=settings.dataset.worker_processes), **changes})


def text_feature_shapes(config, encoders: FluxEncoders, source) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(T5 states [L, D], pooled [P]) of one example: from the cache, or from the text encoders."""
  spec = getattr(source, "spec", None)
  if spec is not None:
    return tuple(spec["text"]["t5"]), tuple(spec["text"]["pooled"])
  return (config.text_len, encoders.t5_config.d_model), (encoders.clip_config.hidden_size,)


def _host_spec(host_batch: dict, settings) -> dict:
  """step.batch_spec for a host batch of any size and pair count (evaluation's are smaller)."""
  from mosaic_jax.train.step import batch_spec
  (b, k), r = np.shape(host_batch["pair_ref"]), np.shape(host_batch["ref_means" if "ref_means" in host_batch
                                                                      else "refs"])[1]
  text = (np.shape(host_batch["t5"])[1:], np.shape(host_batch["pooled"])[1:]) if "t5" in host_batch else ((), ())
  return batch_spec(settings, r, text, batch_size=b, max_pairs=k)


def step_batch(host_batch: dict, encoders: FluxEncoders, settings) -> dict:
  """Pipeline batch (images and captions, or their cached features; pairs) -> the numpy arrays the
  train step reads (step.batch_spec)."""
  if "target_mean" in host_batch:  # cached features
    features = {key: host_batch[key] for key in FEATURE_KEYS}
  else:
    features = encoders.batch_features(host_batch, batch_size=len(host_batch["target"]))
  arrays = {**features, **{k: host_batch[k] for k in PAIR_KEYS}}
  spec = _host_spec(arrays, settings)
  out = {key: np.asarray(arrays[key], spec[key].dtype) for key in spec}
  for key, value in out.items():
    if key not in ("t5", "pooled") and value.shape != spec[key].shape:
      raise ValueError(f"step_batch: {key} has shape {value.shape}, the step reads {spec[key].shape}.")
  return out


PAIR_KEYS = ("pair_ref", "pair_ref_token", "pair_target_token", "pair_valid", "drop_refs")


def host_inputs(host_batch: dict, encoders: FluxEncoders, settings) -> dict[str, np.ndarray]:
  """What the trainer sends to the devices each step: cached features (float32), or, with encoders
  run on the fly, the images and token ids they encode inside the step's mesh
  (`FluxEncoders.features_from_raw`); plus the pairs, typed as step.batch_spec says."""
  if "target_mean" in host_batch:
    return step_batch(host_batch, encoders, settings)
  spec = _host_spec(host_batch, settings)
  return {**encoders.raw_inputs(host_batch), **{k: np.asarray(host_batch[k], spec[k].dtype) for k in PAIR_KEYS}}


def encode_dataset(config, out: str, splits=None, batch_size: int = 8, dtype: str = "float32") -> dict:
  """Writes the cached features of `config`'s dataset splits (default: the train and eval splits) into
  the new directory `out`, with the config's encoders and sizes; returns the cache spec."""
  from mosaic_jax.data import cached_features
  settings = settings_from_config(config)
  splits = list(splits or dict.fromkeys([settings.dataset.train_split, settings.dataset.eval_split]))
  sources = {split: open_raw_dataset(settings.dataset, split) for split in splits}
  return cached_features.encode_dataset(sources, out, make_encoders(settings, text_encoders=True),
                                        pipeline_config(settings), cache_fingerprint(settings),
                                        batch_size=batch_size, read_threads=config.dataset.read_threads,
                                        dtype=jax.numpy.dtype(dtype))
