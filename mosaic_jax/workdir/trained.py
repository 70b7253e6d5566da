"""A model the trainer made, ready to sample or evaluate: from a training workdir, or one of its step
folders (`checkpoints/<step>` or `lora/<step>`), for every config the trainer runs.

The settings are those in effect at the step's last resume (config.json, then config_history.jsonl:
config.py's `in_effect`), so a resume that changed a sampling setting (sample_steps, guidance, the
attention implementation) is what the sampler uses. What comes from where:
- the transformer's architecture: the settings' preset and model overrides, or the FLUX checkpoint root
  they name (`checkpoint`);
- the base weights: the checkpoint's state when the run trained them (the demo), else the FLUX root
  it names (the recipe), else the seeded random base the run was given (flux_random: recreated
  exactly, as the trainer made it);
- the LoRA: the checkpoint's state (its EMA by default, what the trainer also exports as
  lora/<step>/lora_ema.safetensors);
- the encoders: those the settings name (the demo's file-free ones, random ones, or the FLUX root's).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from mosaic_jax import interop, model, parallel
from mosaic_jax.encoders import make_encoders
from mosaic_jax.settings import ConfigError, Settings, settings_from_config
from mosaic_jax.workdir import steps as steps_lib
from mosaic_jax.workdir.config import in_effect


class TrainedModelError(ValueError):
  """A workdir or step that cannot give a model; the message names the path and what was expected."""


@dataclasses.dataclass
class TrainedModel:
  cfg: model.FluxConfig
  params: Any
  lora: Any
  encoders: Any
  settings: Settings  # in effect in the workdir (its last resume's)
  step: int
  source: dict  # what a run.json records: workdir, step, weights used, base checkpoint


def find_run(path: str) -> tuple[epath.Path, int | None] | None:
  """(workdir, step or None) when `path` is a training workdir or one of its step folders, else None."""
  path = epath.Path(path)
  if (path / "config.json").exists() and (path / "checkpoints").exists():
    return path, None
  if path.name.isdigit() and path.parent.name in ("checkpoints", "lora"):
    workdir = path.parent.parent
    if (workdir / "config.json").exists():
      return workdir, int(path.name)
  return None


def read_settings(workdir: epath.Path) -> Settings:
  """The settings in effect in a workdir (config.json, then every resume's changes); the files they name
  for training (the dataset), which sampling does not read, need not be here."""
  config = in_effect(epath.Path(workdir))
  if config is None:
    raise TrainedModelError(f"{workdir}: no config.json (not a training workdir).")
  try:
    return settings_from_config(config, check_files=False)
  except ConfigError as error:
    raise TrainedModelError(f"{workdir}/config.json: {error}") from error


def sampling_guidance(settings: Settings) -> float:
  """The guidance a trained model samples at: the settings' when only the LoRA was trained; 1.0 for a
  base trained from scratch (the demo's DiT saw nothing else)."""
  return settings.guidance if settings.trainable == "lora" else 1.0


def load_trained(path: str, step: int | None = None, ema: bool = True, mesh=None) -> TrainedModel:
  """The model of a training workdir (its latest step, or `step`) or of a step folder, placed on `mesh`
  (default: every device on the data axis) with the training rules."""
  workdir, step = _workdir_and_step(path, step)
  settings = read_settings(workdir)
  mesh = mesh if mesh is not None else parallel.make_mesh({"data": -1})
  rules = settings.sharding.param_rules, parallel.hashable_rules(settings.sharding.logical_rules)
  group = "ema" if ema else "trainable"
  trees = steps_lib.read_state_subtrees(steps_lib.state_directory(workdir, step),
                                        [(group, part) for part in ("base", "lora") if part in settings.trainable])
  source = {"workdir": os.fspath(workdir), "step": step, "weights": "EMA" if ema else "trained (not EMA)"}
  cfg, params, source["base"] = _base(settings, trees.get((group, "base")), mesh, rules, f"checkpoints/{step}")
  lora = None
  if "lora" in settings.trainable:
    lora = jax.tree_util.tree_map(lambda x: x.astype(_dtype(settings)), trees[(group, "lora")])
    lora = parallel.place(lora, mesh, *rules)
    export = "lora_ema.safetensors" if ema else "lora.safetensors"
    source["lora"] = f"checkpoints/{step} ({'EMA' if ema else 'trained'}; exported as lora/{step}/{export})"
  return TrainedModel(cfg, params, lora, make_encoders(settings, text_encoders=True), settings, step, source)


def _workdir_and_step(path: str, step: int | None) -> tuple[epath.Path, int]:
  found = find_run(path)
  if found is None:
    raise TrainedModelError(f"{path}: not a training workdir (expected config.json and checkpoints/) nor one "
                            "of its step folders (checkpoints/<step> or lora/<step>).")
  workdir, folder_step = found
  steps = steps_lib.committed_steps(workdir)
  step = step if step is not None else folder_step if folder_step is not None else (steps[-1] if steps else None)
  if step is None or step not in steps:
    raise TrainedModelError(f"{workdir}: no committed checkpoint for step {step} (committed: {steps}).")
  return workdir, step


def _dtype(settings: Settings):
  return jnp.float32 if settings.trainable != "lora" else jnp.dtype(settings.dtype)


def _base(settings: Settings, trained, mesh, rules, step_folder: str) -> tuple[model.FluxConfig, Any, str]:
  """(transformer config, base weights on `mesh`, where they came from)."""
  if trained is not None:  # the run trained its base: the checkpoint holds it
    return settings.transformer_config(), parallel.place(trained, mesh, *rules), f"trained, from {step_folder}"
  if settings.checkpoint:
    root = os.path.expanduser(settings.checkpoint)
    transformer = os.path.join(root, "transformer") if os.path.isdir(os.path.join(root, "transformer")) else root

    def place(name, array):
      sharding = parallel.sharding_for(name.replace(".", "/"), array.shape, mesh, *rules)
      return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
    try:
      cfg, params = interop.load_flux_transformer(transformer, dtype=_dtype(settings), place=place)
    except FileNotFoundError as error:
      raise TrainedModelError(f"the workdir's config names the base checkpoint {settings.checkpoint}, which is "
                              f"not readable here ({error}).") from error
    return settings.transformer_config(cfg), params, settings.checkpoint
  # The seeded random base of the run (flux_random), made as the trainer made it.
  cfg = settings.transformer_config()
  params = parallel.create_sharded(lambda key: model.init_params(key, cfg, _dtype(settings)), settings.seed, mesh,
                                   *rules)
  return cfg, params, f"random (seed {settings.seed}), as the run's"
