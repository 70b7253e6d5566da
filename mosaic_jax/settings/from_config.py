"""A config made into checked Settings: `settings_from_config` is where every problem a user can fix from
the command line is found (a misspelt or missing field, a wrong type or choice, a count below 1, a
checkpoint, LoRA or dataset folder that is not there, a size that is not a whole number of tokens),
before anything is built. Each error is one ConfigError naming the `--config.` field and what was
expected. The autoencoder's geometry (read from a FLUX root's vae/config.json alone) fills in the
derived fields.
"""

from __future__ import annotations

import dataclasses
import json
import os

from mosaic_jax import parallel
from mosaic_jax.cli import unknown_field_message
from mosaic_jax.model import config as model_config
from mosaic_jax.model.config import REMAT_POLICIES, FluxConfig
from mosaic_jax.settings.fields import (ENCODER_CHOICES, REMAT_AUTO, SCHEDULES, TRAINABLE_CHOICES, ConfigError, Settings,
                                        config_fields, field_value, fields_of, is_part, known_fields)


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
  for field, kind in fields_of(cls):
    name = prefix + field.name
    if field.name not in node:
      raise ConfigError(f"config.{name} is missing: the config must have every field of configs/flux_ms.py.")
    value = node[field.name]
    if field.name == "model_overrides" and not prefix:
      values[field.name] = tuple(sorted((k, _frozen(v)) for k, v in dict(value).items() if v is not None))
    elif is_part(kind):
      values[field.name] = _build(kind, value, name + ".")
    else:
      values[field.name] = _typed(kind, value, name)
  return cls(**values)


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
  choices = (("trainable", TRAINABLE_CHOICES), ("optimizer.schedule", SCHEDULES),
             ("remat_policy", REMAT_POLICIES + (REMAT_AUTO,)),
             ("encoders", ENCODER_CHOICES))
  for name, allowed in choices:
    value = field_value(settings, name)
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
