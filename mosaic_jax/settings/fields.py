"""The settings' fields: `Settings` mirrors configs/flux_ms.py field for field (nested parts for the
dataset, its synthetic build, the optimizer, the losses, the mesh and the sharding rules), so it is also
the schema: a config field that Settings lacks is an unknown field (a misspelt override), and one
Settings needs but the config lacks is missing. Beyond the config it holds what the autoencoder decides
(`derived` fields): the token size in pixels (2 x its downsample factor: 2x2 latent pixels form a
token), its latent channels, and the affine map to model latents.

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
import typing
from typing import Any

from mosaic_jax import parallel
from mosaic_jax.model import config as model_config
from mosaic_jax.model.config import FluxConfig

TRAINABLE_CHOICES = ("lora", "base+lora", "base")
SCHEDULES = ("constant", "cosine")
# "checkpoint": the FLUX root's VAE and text encoders; "demo": the pixel autoencoder and tiny random text
# encoders; "random": FLUX's VAE geometry with random weights and the tiny text encoders (flux_random).
ENCODER_CHOICES = ("checkpoint", "demo", "random")
# FluxConfig fields a resume may override: how the transformer runs (attention kernel, chunk sizes,
# rematerialization, scan or unrolled blocks), never what it computes. The architecture may not change.
RESUME_SAFE_OVERRIDES = ("attention_impl", "attention_chunk", "stats_chunk", "remat_policy", "unroll_layers")
# remat_policy: one of model/config.py's REMAT_POLICIES, or this: chosen for the run's devices and step
# when it starts (train/remat_choice.py), and recorded in its workdir.
REMAT_AUTO = "auto"


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
    overrides, the remat policy and the activation rules (an override of remat_policy wins). Under
    remat_policy "auto" the preset's (or checkpoint's) policy stands until the trainer chooses one."""
    remat = {} if self.remat_policy == REMAT_AUTO else {"remat_policy": self.remat_policy}
    rules = parallel.hashable_rules(self.sharding.logical_rules)
    return model_config.resolve(self.model, {**remat, "logical_rules": rules, **dict(self.model_overrides)}, loaded)

  def for_step(self) -> Settings:
    """These settings as the train step is traced with them: every field the step never reads (the
    fields' `step_reads`) at a fixed value, so the step cannot come to depend on them unnoticed, and runs
    that differ only in them lower to the same program (one entry in jax's compilation cache)."""
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

def is_part(kind) -> bool:
  return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def fields_of(cls) -> list[tuple[dataclasses.Field, Any]]:
  """(field, its type) of a settings class, derived fields left out."""
  hints = typing.get_type_hints(cls)
  return [(field, hints[field.name]) for field in dataclasses.fields(cls) if not field.metadata.get("derived")]


def _leaves(cls=Settings, prefix: str = ""):
  """(dotted name, field) of every config field Settings reads, parts opened (the model overrides are
  FluxConfig's fields: `config_fields` lists them)."""
  for field, kind in fields_of(cls):
    if is_part(kind):
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
    found = {field.name: (field, kind) for field, kind in fields_of(cls)}.get(part) if cls else None
    if found is None:
      return False
    field, kind = found
    if field.metadata.get("resume_safe"):
      return True
    cls = kind if is_part(kind) else None
  return False


def encoding_fields(settings: Settings) -> dict[str, Any]:
  """{dotted field: value} of the fields that decide what the settings' encoders make of the data."""
  out = {}
  for name, field in _leaves():
    if settings.encoders in field.metadata.get("encodes", ()):
      out[name] = field_value(settings, name)
  return out


def _step_view(node):
  """`node` (Settings or a part) with the fields the step never reads at their type's empty value."""
  changes = {}
  for field, kind in fields_of(type(node)):
    value = getattr(node, field.name)
    if not field.metadata.get("step_reads", True):
      changes[field.name] = type(value)()
    elif is_part(kind):
      changes[field.name] = _step_view(value)
  return dataclasses.replace(node, **changes)


def field_value(settings, dotted: str):
  """The value of a dotted field ("optimizer.learning_rate") of Settings."""
  for part in dotted.split("."):
    settings = getattr(settings, part)
  return settings
