"""The run's settings: one typed, frozen object made from the config by `settings_from_config`, which is
also where every problem a user can fix from the command line is found, before anything is built. Every
program past the command line (training, sampling a workdir, forward.py, encoding a dataset) reads a
run's config through it, which is why it stands below train/, sampling/ and workdir/.

`Settings` mirrors configs/flux_ms.py field for field (nested parts for the dataset, its synthetic build,
the optimizer, the losses, the mesh and the sharding rules), so it is also the schema: a config field
that Settings lacks is an unknown field (a misspelt override), and one Settings needs but the config
lacks is missing. Beyond the config it holds what the autoencoder decides (`derived` fields): the token
size in pixels (2 x its downsample factor: 2x2 latent pixels form a token), its latent channels, and
the affine map to model latents.

What the rest of the program must know about a field is said once, on the field (`_setting`):
  resume_safe  a resume may change it (workdir/config.py); on a part, every field inside it
  step_reads   False: the train step never reads it; `for_step` fixes it, so runs that differ only in
               such fields (their cadence, reporting, where the data is read) share one compiled step
  encodes      the encoder choices under which it decides what cached encoder features hold
               (train/fingerprint.py: a cache written under other values is refused)
The model overrides are FluxConfig's own fields; the resume-safe ones (how the transformer is executed,
not what it computes) are RESUME_SAFE_OVERRIDES. `config_fields` is the one walk over a config tree (a
ConfigDict or a workdir's config.json); it lists each model override as a field of its own.

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
from typing import Any

from mosaic_jax import parallel
from mosaic_jax.cli import unknown_field_message
from mosaic_jax.model import config as model_config
from mosaic_jax.model.config import REMAT_POLICIES, FluxConfig

TRAINABLE_CHOICES = ("lora", "base+lora", "base")
SCHEDULES = ("constant", "cosine")
# "checkpoint": the FLUX root's VAE and text encoders; "demo": the pixel autoencoder and tiny random text
# encoders; "random": FLUX's VAE geometry with random weights and the tiny text encoders (flux_random).
ENCODER_CHOICES = ("checkpoint", "demo", "random")
# FluxConfig fields a resume may override: how the transformer runs (attention kernel, chunk sizes,
# rematerialization, scan or unrolled blocks), never what it computes. The architecture may not change.
RESUME_SAFE_OVERRIDES = ("attention_impl", "attention_chunk", "stats_chunk", "remat_policy", "unroll_layers")


class ConfigError(ValueError):
  """A configuration problem found before anything is compiled; the message names the fix."""


def _setting(*, resume_safe: bool = False, step_reads: bool = True, encodes: tuple[str, ...] = ()):
  """A config field and what the program must know about it (module docstring)."""
  return dataclasses.field(metadata={"resume_safe": resume_safe, "step_reads": step_reads, "encodes": encodes})


def _derived():
  """A field computed from the autoencoder, not read from the config."""
  return dataclasses.field(default=None, metadata={"derived": True})


# The cadence and reporting of a run: a resume may change them, and the train step never reads them.
_CADENCE = dict(resume_safe=True, step_reads=False)
_ANY_ENCODERS = ENCODER_CHOICES
_FILE_FREE_ENCODERS = ("demo", "random")


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
  name: str = _setting(encodes=_ANY_ENCODERS)
  data_dir: str = _setting(**_CADENCE)  # where the data is read, not what it holds
  train_split: str = _setting()
  eval_split: str = _setting()
  max_pairs: int = _setting()
  read_threads: int = _setting(**_CADENCE)
  worker_processes: int = _setting(**_CADENCE)
  cached_features: str = _setting()
  build: BuildSettings = _setting()


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
  model: str = _setting()
  model_overrides: tuple = _setting()  # ((FluxConfig field, value), ...) of the overrides that are set, sorted
  checkpoint: str = _setting(encodes=("checkpoint",))  # by the content of its encoders' configs
  lora: str = _setting()
  dtype: str = _setting()
  seed: int = _setting(encodes=_FILE_FREE_ENCODERS)  # the file-free encoders' weights are drawn from it
  encoders: str = _setting(encodes=_ANY_ENCODERS)
  pixel_patch_size: int = _setting(encodes=("demo",))
  batch_size: int = _setting()
  resolution: int = _setting(encodes=_ANY_ENCODERS)
  ref_resolution: int = _setting(encodes=_ANY_ENCODERS)
  num_refs: int = _setting()
  text_len: int = _setting(encodes=_ANY_ENCODERS)
  guidance: float = _setting(**_CADENCE)  # sampling's; the step trains at 1.0
  trainable: str = _setting()
  lora_rank: int = _setting()
  dataset: DatasetSettings = _setting()
  total_steps: int = _setting(resume_safe=True)  # stretches the learning-rate schedule from the resumed step
  optimizer: OptimizerSettings = _setting()
  ema_decay: float = _setting()
  losses: LossSettings = _setting()
  remat_policy: str = _setting(resume_safe=True)
  mesh: MeshSettings = _setting(resume_safe=True)  # the state is resharded on restore
  sharding: ShardingSettings = _setting(resume_safe=True)
  peak_tflops_per_device: float = _setting(**_CADENCE)
  checkpoint_every: int = _setting(**_CADENCE)
  keep_checkpoints: int = _setting(**_CADENCE)
  log_every: int = _setting(**_CADENCE)
  sample_every: int = _setting(**_CADENCE)
  sample_steps: int = _setting(**_CADENCE)
  eval_examples: int = _setting(**_CADENCE)
  eval_timesteps: tuple = _setting(**_CADENCE)
  # From the autoencoder:
  token_pixels: int = _derived()  # pixels per token side: 2 x the downsample factor
  latent_channels: int = _derived()
  latent_scaling: float = _derived()
  latent_shift: float = _derived()

  def transformer_config(self, loaded: FluxConfig | None = None) -> FluxConfig:
    """The transformer the run trains: `loaded` (a checkpoint's config) or the preset, with the model
    overrides, the remat policy and the activation rules (an override of remat_policy wins)."""
    return model_config.resolve(self.model, {"remat_policy": self.remat_policy,
                                             "logical_rules": parallel.hashable_rules(self.sharding.logical_rules),
                                             **dict(self.model_overrides)}, loaded)

  def for_step(self) -> Settings:
    """These settings as the train step is traced with them: every field the step never reads (the
    fields' `step_reads`) at a fixed value. Runs that differ only in them share one compiled step (jax's
    caches, train/executable_store.py), so a resume that changes them loads it untraced."""
    return _step_view(self)

  def to_config(self) -> dict:
    """The config these settings were made from, as a JSON-able dict (what a workdir's config.json
    holds): every field of configs/flux_ms.py, the model overrides that are not set as None."""
    out = {}
    for field in dataclasses.fields(self):
      if not field.metadata.get("derived"):
        value = getattr(self, field.name)
        out[field.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    out["model_overrides"] = {**dict.fromkeys(model_config.field_types()), **dict(self.model_overrides)}
    return json.loads(json.dumps(out))  # tuples as lists, as a JSON file reads back

  @property
  def latent_size(self) -> int:
    """Latent pixels a side of the target (the references: ref_latent_size)."""
    return self.resolution // (self.token_pixels // 2)

  @property
  def ref_latent_size(self) -> int:
    return self.ref_resolution // (self.token_pixels // 2)


# ---- the fields and their metadata ---------------------------------------------------------------

def _is_part(kind) -> bool:
  return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _fields(cls) -> list[tuple[dataclasses.Field, Any]]:
  """(field, its type) of a settings class, derived fields left out."""
  hints = typing.get_type_hints(cls)
  return [(field, hints[field.name]) for field in dataclasses.fields(cls) if not field.metadata.get("derived")]


def _leaves(cls=Settings, prefix: str = ""):
  """(dotted name, field) of every config field Settings reads, parts opened (the model overrides are
  FluxConfig's fields: `config_fields` lists them)."""
  for field, kind in _fields(cls):
    if _is_part(kind):
      yield from _leaves(kind, f"{prefix}{field.name}.")
    elif field.name != "model_overrides":
      yield prefix + field.name, field


def known_fields() -> set[str]:
  """Every config field (dotted, "optimizer.learning_rate"), each model override one of them."""
  return {name for name, _ in _leaves()} | {f"model_overrides.{name}" for name in model_config.field_types()}


def config_fields(config, prefix: str = "") -> dict[str, Any]:
  """{dotted field: value} of a config tree (a ConfigDict, or a dict read from a workdir's config.json):
  the one walk over a config; "model_overrides.attention_impl" is a field like any other."""
  out = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      out.update(config_fields(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def resume_safe(name: str) -> bool:
  """Whether a resume may change the config field `name` (dotted): its own or a part's `resume_safe`."""
  first, _, rest = name.partition(".")
  if first == "model_overrides":
    return rest in RESUME_SAFE_OVERRIDES
  cls = Settings
  for part in name.split("."):
    found = {field.name: (field, kind) for field, kind in _fields(cls)}.get(part) if cls else None
    if found is None:
      return False
    field, kind = found
    if field.metadata.get("resume_safe"):
      return True
    cls = kind if _is_part(kind) else None
  return False


def encoding_fields(settings: Settings) -> dict[str, Any]:
  """{dotted field: value} of the fields that decide what the settings' encoders make of the data."""
  out = {}
  for name, field in _leaves():
    if settings.encoders in field.metadata.get("encodes", ()):
      out[name] = _field(settings, name)
  return out


def _step_view(node):
  """`node` (Settings or a part) with the fields the step never reads at their type's empty value."""
  changes = {}
  for field, kind in _fields(type(node)):
    value = getattr(node, field.name)
    if not field.metadata.get("step_reads", True):
      changes[field.name] = type(value)()
    elif _is_part(kind):
      changes[field.name] = _step_view(value)
  return dataclasses.replace(node, **changes)


# ---- typed values ---------------------------------------------------------------------------------

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


def _build(cls, node, prefix: str = ""):
  values = {}
  for field, kind in _fields(cls):
    name = prefix + field.name
    if field.name not in node:
      raise ConfigError(f"config.{name} is missing: the config must have every field of configs/flux_ms.py.")
    value = node[field.name]
    if field.name == "model_overrides" and not prefix:
      values[field.name] = tuple(sorted((k, _frozen(v)) for k, v in dict(value).items() if v is not None))
    elif _is_part(kind):
      values[field.name] = _build(kind, value, name + ".")
    else:
      values[field.name] = _typed(kind, value, name)
  return cls(**values)


def _field(settings, dotted: str):
  for part in dotted.split("."):
    settings = getattr(settings, part)
  return settings


# ---- the one function ----------------------------------------------------------------------------

def settings_from_config(config, autoencoder=None, check_files: bool = True) -> Settings:
  """The Settings of a ConfigDict (or of a dict read from a workdir's config.json), checked: every error
  is a ConfigError naming the `--config.` field and what was expected, raised before anything is built.

  autoencoder: the run's autoencoder, or anything with its geometry (`config.latent_channels`,
  `downsample_factor`, scaling and shift); default: read from the config (autoencoder_geometry: for a
  FLUX root only its vae/config.json). check_files=False skips the checks of the files and folders the
  config names (checkpoint, LoRA, dataset): for a step compiled from shapes alone, which reads none."""
  known = known_fields()
  unknown = sorted(set(config_fields(config)) - known)
  if unknown:
    raise ConfigError(unknown_field_message(unknown, known) + ".")
  if config["model"] not in model_config.PRESETS:
    raise ConfigError(f"config.model={config['model']!r}: expected one of {model_config.PRESETS}.")
  settings = _build(Settings, config)
  _check_values(settings)
  if check_files:
    _check_files(settings)
  settings = _with_geometry(settings, autoencoder)
  _check_sizes(settings, check_files)
  return settings


def _check_values(settings: Settings) -> None:
  """The model overrides, the choices and the counts."""
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
  counts = (("total_steps", "the steps to train"), ("batch_size", "the global batch"))
  if "lora" in settings.trainable:
    counts += (("lora_rank", "the LoRA's rank"),)
  for name, what in counts:
    if getattr(settings, name) < 1:
      raise ConfigError(f"config.{name}={getattr(settings, name)}: expected a positive integer ({what}).")


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
  if not settings.dataset.cached_features:
    _check_data_dir(settings.dataset.data_dir)


def _check_data_dir(data_dir: str) -> None:
  """A dataset folder that exists, or one whose parent exists: a synthetic dataset built on first use
  creates at most that one folder, so a mistyped path is refused instead of built into folders made
  from the root."""
  if "://" in data_dir:  # an object store: the builder reports what is missing there
    return
  folder = os.path.abspath(os.path.expanduser(data_dir))
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise ConfigError(f"config.dataset.data_dir={data_dir!r} is a file: expected the folder of the datasets.")
  parent = os.path.dirname(folder)
  if not os.path.exists(folder) and not os.path.isdir(parent):
    raise ConfigError(f"config.dataset.data_dir={data_dir!r} does not exist, nor does {parent}: pass the folder "
                      "where launch/build_dataset.py built semalign_ms (a synthetic set is built on first use into "
                      "a new folder only where its parent folder exists).")


def _with_geometry(settings: Settings, autoencoder) -> Settings:
  """The settings with the autoencoder's geometry (the derived fields), its token size checked."""
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
  return settings


def _check_sizes(settings: Settings, check_files: bool) -> None:
  """The transformer takes the autoencoder's tokens (else a shape error deep in the compile)."""
  loaded = checkpoint_transformer_config(settings.checkpoint) if check_files and settings.checkpoint else None
  if loaded is None and settings.checkpoint:
    return  # the transformer comes from a checkpoint that is not read here
  in_channels = settings.transformer_config(loaded).in_channels
  if in_channels != 4 * settings.latent_channels:
    raise ConfigError(
        f"the transformer takes {in_channels} values per token, but the autoencoder gives "
        f"{settings.latent_channels} latent channels, {4 * settings.latent_channels} per 2x2 token: set "
        "--config.model_overrides.in_channels to match (or the pixel_patch_size).")


def autoencoder_geometry(settings: Settings):
  """The autoencoder of the settings without its weights (an `Autoencoder` with empty params): all the
  settings need is its downsample factor, latent channels and latent scaling and shift."""
  from mosaic_jax.model.autoencoder import Autoencoder
  from mosaic_jax.model.pixel_autoencoder import PixelAutoencoderConfig
  from mosaic_jax.model.vae import VaeConfig
  if settings.encoders == "demo":
    patch = int(settings.pixel_patch_size)
    return Autoencoder("pixel", PixelAutoencoderConfig(patch_size=patch, latent_channels=3 * patch * patch), {})
  if settings.encoders == "random":
    return Autoencoder("vae", VaeConfig(), {})
  from mosaic_jax.interop.vae_checkpoint import read_vae_config
  return Autoencoder("vae", read_vae_config(os.path.join(os.path.expanduser(settings.checkpoint), "vae")), {})


def checkpoint_transformer_config(checkpoint: str) -> FluxConfig | None:
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


def check_batch_splits(settings: Settings, mesh) -> None:
  """The global batch is split over the batch axis' mesh axes: say so before anything is compiled."""
  sharding = parallel.batch_sharding(mesh, settings.sharding.logical_rules)
  try:
    sharding.shard_shape((settings.batch_size,))
  except ValueError as error:
    raise ConfigError(f"config.batch_size={settings.batch_size} does not split over the mesh "
                      f"{dict(mesh.shape)}: the batch axis is sharded as {sharding.spec} "
                      "(config.sharding.logical_rules); use a multiple of those axes' sizes.") from error
