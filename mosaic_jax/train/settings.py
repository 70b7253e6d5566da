"""The training settings: one typed, frozen object made from the config by `settings_from_config`, which
is also where every problem a user can fix from the command line is found, before anything is built.

`Settings` mirrors configs/flux_ms.py field for field (nested parts for the dataset, its synthetic build,
the optimizer, the losses, the mesh and the sharding rules), so it is also the schema: a config field
that Settings lacks is an unknown field (a misspelt override), and one Settings needs but the config
lacks is missing. Beyond the config it holds what the autoencoder decides (`derived` fields): the token
size in pixels (2 x its downsample factor: 2x2 latent pixels form a token), its latent channels, and
the affine map to model latents.

The settings are frozen and hashable: the jitted step closes over them as constants, and two runs with
equal settings trace the same program. `model_overrides` holds only the FluxConfig fields that are set,
as sorted (name, value) pairs; `transformer_config` applies them, with the remat policy and the
activation rules, to a preset or to a checkpoint's config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Any, Mapping

from mosaic_jax.cli import unknown_field_message
from mosaic_jax.model import config as model_config
from mosaic_jax.model.config import REMAT_POLICIES, FluxConfig

TRAINABLE_CHOICES = ("lora", "base+lora", "base")
SCHEDULES = ("constant", "cosine")
# "checkpoint": the FLUX root's VAE and text encoders; "demo": the pixel autoencoder and tiny random text
# encoders; "random": FLUX's VAE geometry with random weights and the tiny text encoders (flux_random).
ENCODER_CHOICES = ("checkpoint", "demo", "random")


class ConfigError(ValueError):
  """A configuration problem found before anything is compiled; the message names the fix."""


def _derived():
  """A field computed from the autoencoder, not read from the config."""
  return dataclasses.field(default=None, metadata={"derived": True})


@dataclasses.dataclass(frozen=True)
class BuildSettings:
  """A synthetic dataset built on first use (num_train 0: never build)."""
  image_size: int
  min_refs: int
  max_refs: int
  num_train: int
  num_validation: int
  seed: int


@dataclasses.dataclass(frozen=True)
class DatasetSettings:
  name: str
  data_dir: str
  train_split: str
  eval_split: str
  max_pairs: int
  read_threads: int
  worker_processes: int
  cached_features: str
  build: BuildSettings


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  learning_rate: float
  b1: float
  b2: float
  eps: float
  weight_decay: float
  grad_clip_norm: float
  schedule: str
  warmup_steps: int


@dataclasses.dataclass(frozen=True)
class LossSettings:
  scal_weight: float
  mdl_weight: float
  mdl_ramp_start: int
  mdl_ramp_end: int


@dataclasses.dataclass(frozen=True)
class MeshSettings:
  data: int
  fsdp: int
  tensor: int


@dataclasses.dataclass(frozen=True)
class ShardingSettings:
  param_rules: tuple
  logical_rules: tuple


@dataclasses.dataclass(frozen=True)
class Settings:
  """configs/flux_ms.py's fields (its comments say what each does), typed, plus the derived ones."""
  model: str
  model_overrides: tuple  # ((FluxConfig field, value), ...) of the overrides that are set, sorted
  checkpoint: str
  lora: str
  dtype: str
  seed: int
  encoders: str
  pixel_patch_size: int
  batch_size: int
  resolution: int
  ref_resolution: int
  num_refs: int
  text_len: int
  guidance: float
  trainable: str
  lora_rank: int
  dataset: DatasetSettings
  total_steps: int
  optimizer: OptimizerSettings
  ema_decay: float
  losses: LossSettings
  remat_policy: str
  mesh: MeshSettings
  sharding: ShardingSettings
  peak_tflops_per_device: float
  checkpoint_every: int
  keep_checkpoints: int
  log_every: int
  sample_every: int
  sample_steps: int
  eval_examples: int
  eval_timesteps: tuple
  # From the autoencoder:
  token_pixels: int = _derived()  # pixels per token side: 2 x the downsample factor
  latent_channels: int = _derived()
  latent_scaling: float = _derived()
  latent_shift: float = _derived()

  def transformer_config(self, loaded: FluxConfig | None = None) -> FluxConfig:
    """The transformer the run trains: `loaded` (a checkpoint's config) or the preset, with the model
    overrides, the remat policy and the activation rules (an override of remat_policy wins)."""
    from mosaic_jax import parallel
    return model_config.resolve(self.model, {"remat_policy": self.remat_policy,
                                             "logical_rules": parallel.hashable_rules(self.sharding.logical_rules),
                                             **dict(self.model_overrides)}, loaded)

  def for_step(self) -> Settings:
    """These settings as the train step is traced with them: the run's cadence and reporting (how often
    to log, save, sample and evaluate, the peak FLOP/s of the MFU) and where and how the data is read,
    none of which the step reads, at fixed values. Runs that differ only in them share one compiled step
    (jax's caches, train/executable_store.py), so a resume that changes them loads it untraced."""
    return dataclasses.replace(
        self, checkpoint_every=0, keep_checkpoints=0, log_every=0, sample_every=0, sample_steps=0, eval_examples=0,
        eval_timesteps=(), peak_tflops_per_device=0.0,
        dataset=dataclasses.replace(self.dataset, data_dir="", read_threads=0, worker_processes=0))

  @property
  def latent_size(self) -> int:
    """Latent pixels a side of the target (the references: ref_latent_size)."""
    return self.resolution // (self.token_pixels // 2)

  @property
  def ref_latent_size(self) -> int:
    return self.ref_resolution // (self.token_pixels // 2)


# ---- the schema ----------------------------------------------------------------------------------

def _is_part(kind) -> bool:
  return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _schema(cls=Settings, prefix: str = "") -> set[str]:
  """Every config field Settings reads, dotted ("optimizer.learning_rate"), parts included."""
  out = set()
  hints = typing.get_type_hints(cls)
  for field in dataclasses.fields(cls):
    if field.metadata.get("derived"):
      continue
    out.add(prefix + field.name)
    if _is_part(hints[field.name]):
      out |= _schema(hints[field.name], f"{prefix}{field.name}.")
  return out


def known_fields() -> set[str]:
  return _schema()


def _config_fields(config, prefix: str = "") -> set[str]:
  out = set()
  for key, value in config.items():
    out.add(prefix + key)
    if hasattr(value, "items") and key != "model_overrides":
      out |= _config_fields(value, f"{prefix}{key}.")
  return out


def _frozen(value):
  """Lists (JSON) and tuples, nested, as tuples."""
  if isinstance(value, (list, tuple)):
    return tuple(_frozen(v) for v in value)
  return value


def _typed(kind, value, name: str):
  what = {int: "an integer", float: "a number", str: "a string", bool: "true or false", tuple: "a tuple"}[kind]
  ok = {int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str), bool: isinstance(value, bool), tuple: isinstance(value, (list, tuple))}[kind]
  if not ok:
    raise ConfigError(f"config.{name}={value!r}: expected {what}.")
  return _frozen(value) if kind is tuple else kind(value)


def _build(cls, node, prefix: str = "", derived: Mapping[str, Any] | None = None):
  hints = typing.get_type_hints(cls)
  values = {}
  for field in dataclasses.fields(cls):
    name = prefix + field.name
    if field.metadata.get("derived"):
      values[field.name] = (derived or {}).get(field.name)
      continue
    if field.name not in node:
      raise ConfigError(f"config.{name} is missing: the config must have every field of configs/flux_ms.py.")
    value = node[field.name]
    if field.name == "model_overrides" and not prefix:
      values[field.name] = tuple(sorted((k, _frozen(v)) for k, v in dict(value).items() if v is not None))
    elif _is_part(hints[field.name]):
      values[field.name] = _build(hints[field.name], value, name + ".")
    else:
      values[field.name] = _typed(hints[field.name], value, name)
  return cls(**values)


# ---- the one function ----------------------------------------------------------------------------

def autoencoder_geometry(config):
  """The autoencoder of the config without its weights (an `Autoencoder` with empty params): all the
  settings need is its downsample factor, latent channels and latent scaling and shift."""
  from mosaic_jax.model.autoencoder import Autoencoder
  from mosaic_jax.model.pixel_autoencoder import PixelAutoencoderConfig
  from mosaic_jax.model.vae import VaeConfig
  if config.encoders == "demo":
    patch = int(config.pixel_patch_size)
    return Autoencoder("pixel", PixelAutoencoderConfig(patch_size=patch, latent_channels=3 * patch * patch), {})
  if config.encoders == "random":
    return Autoencoder("vae", VaeConfig(), {})
  from mosaic_jax.interop.vae_checkpoint import read_vae_config
  return Autoencoder("vae", read_vae_config(os.path.join(os.path.expanduser(config.checkpoint), "vae")), {})


def _checkpoint_transformer_config(checkpoint: str) -> FluxConfig | None:
  """The architecture in a checkpoint's transformer config.json (read alone, no weights), or None when
  the checkpoint is not a diffusers folder (the loader reports what it is)."""
  root = os.path.expanduser(checkpoint)
  folder = os.path.join(root, "transformer") if os.path.isdir(os.path.join(root, "transformer")) else root
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return FluxConfig.from_diffusers_config(json.load(f), source=path)
  except ValueError as error:  # not JSON, or fields FluxConfig does not know
    raise ConfigError(f"config.checkpoint={checkpoint!r}: {error}") from error


def settings_from_config(config, autoencoder=None, check_files: bool = True) -> Settings:
  """The Settings of a ConfigDict (or of a dict read from a workdir's config.json), checked: every error
  is a ConfigError naming the `--config.` field and what was expected, raised before anything is built.

  autoencoder: the run's autoencoder, or anything with its geometry (`config.latent_channels`,
  `downsample_factor`, scaling and shift); default: read from the config (autoencoder_geometry: for a
  FLUX root only its vae/config.json). check_files=False skips the checks of the files and folders the
  config names (checkpoint, LoRA, dataset): for a step compiled from shapes alone, which reads none."""
  known = known_fields()
  unknown = sorted(_config_fields(config) - known)
  if unknown:
    raise ConfigError(unknown_field_message(unknown, known) + ".")
  if config["model"] not in model_config.PRESETS:
    raise ConfigError(f"config.model={config['model']!r}: expected one of {model_config.PRESETS}.")
  settings = _build(Settings, config)
  try:
    model_config.resolve(settings.model, dict(settings.model_overrides))
  except ValueError as error:  # unknown field, or a value FluxConfig refuses
    raise ConfigError(f"config.model_overrides: {error}") from error
  choices = (("trainable", TRAINABLE_CHOICES), ("optimizer.schedule", SCHEDULES), ("remat_policy", REMAT_POLICIES),
             ("encoders", ENCODER_CHOICES))
  for name, allowed in choices:
    value = _field(settings, name)
    if value not in allowed:
      raise ConfigError(f"config.{name}={value!r}: expected one of {allowed}.")
  if check_files:
    _check_files(settings)
  if settings.total_steps < 1 or settings.batch_size < 1:
    raise ConfigError(f"config.total_steps={settings.total_steps} and config.batch_size={settings.batch_size} "
                      "must be positive.")

  if autoencoder is None:
    if settings.encoders == "checkpoint" and not os.path.isdir(os.path.join(os.path.expanduser(settings.checkpoint),
                                                                             "vae")):
      raise ConfigError(f"config.checkpoint={settings.checkpoint!r} has no vae/ folder: expected a FLUX checkpoint "
                        "root (transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/).")
    autoencoder = autoencoder_geometry(settings)
  ae = autoencoder.config
  settings = dataclasses.replace(settings, token_pixels=2 * int(ae.downsample_factor),
                                 latent_channels=int(ae.latent_channels), latent_scaling=float(ae.scaling_factor),
                                 latent_shift=float(ae.shift_factor))
  for name in ("resolution", "ref_resolution"):
    value = getattr(settings, name)
    if value < 1 or value % settings.token_pixels:
      raise ConfigError(f"config.{name}={value}: expected a positive multiple of {settings.token_pixels} px "
                        f"(one token with encoders={settings.encoders!r}, pixel_patch_size={settings.pixel_patch_size}).")
  loaded = _checkpoint_transformer_config(settings.checkpoint) if check_files and settings.checkpoint else None
  if loaded is not None or not settings.checkpoint:
    in_channels = settings.transformer_config(loaded).in_channels
    if in_channels != 4 * settings.latent_channels:  # else a shape error deep in the compile
      raise ConfigError(
          f"the transformer takes {in_channels} values per token, but the autoencoder gives "
          f"{settings.latent_channels} latent channels, {4 * settings.latent_channels} per 2x2 token: set "
          "--config.model_overrides.in_channels to match (or the pixel_patch_size).")
  return settings


def _check_files(settings: Settings) -> None:
  """The checkpoint, LoRA and dataset the settings name are given, and exist."""
  # A LoRA on a random base is pointless, except in the random-weights check (encoders="random").
  needs_checkpoint = settings.encoders == "checkpoint" or (settings.trainable == "lora"
                                                           and settings.encoders != "random")
  if needs_checkpoint and not settings.checkpoint:
    raise ConfigError("config.checkpoint is empty: pass --config.checkpoint=/path/to/FLUX.1-dev (a FLUX "
                      "checkpoint root with transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, "
                      "tokenizer_2/), or use --config configs/flux_ms.py:demo (or :flux_random, the recipe's "
                      "shapes with random weights).")
  if settings.checkpoint and not os.path.exists(os.path.expanduser(settings.checkpoint)):
    raise ConfigError(f"config.checkpoint={settings.checkpoint!r} does not exist: pass "
                      "--config.checkpoint=/path/to/FLUX.1-dev.")
  if settings.lora and not os.path.exists(os.path.expanduser(settings.lora)):
    raise ConfigError(f"config.lora={settings.lora!r} does not exist: pass --config.lora=FILE or --config.lora=''.")
  if not settings.dataset.data_dir and not settings.dataset.cached_features:
    raise ConfigError("config.dataset.data_dir is empty: pass --config.dataset.data_dir=DIR (where "
                      "launch/build_dataset.py built semalign_ms), or --config.dataset.cached_features=DIR "
                      "(where launch/encode_dataset.py wrote its features).")


def check_batch_splits(settings: Settings, mesh) -> None:
  """The global batch is split over the batch axis' mesh axes: say so before anything is compiled."""
  from mosaic_jax import parallel
  sharding = parallel.batch_sharding(mesh, settings.sharding.logical_rules)
  try:
    sharding.shard_shape((settings.batch_size,))
  except ValueError as error:
    raise ConfigError(f"config.batch_size={settings.batch_size} does not split over the mesh "
                      f"{dict(mesh.shape)}: the batch axis is sharded as {sharding.spec} "
                      "(config.sharding.logical_rules); use a multiple of those axes' sizes.") from error


def _field(settings, dotted: str):
  for part in dotted.split("."):
    settings = getattr(settings, part)
  return settings
