"""A model the trainer made, ready to sample or evaluate: from a training workdir, or one of its step
folders (`checkpoints/<step>` or `lora/<step>`), for every config the trainer runs.

What comes from where (the workdir's config.json says which case it is):
- the transformer's architecture: the config's preset and model overrides, or the FLUX checkpoint root
  it names (`config.checkpoint`);
- the base weights: the checkpoint's state when the run trained them (the demo), else the FLUX root
  it names (the recipe), else the seeded random base the run was given (flux_random: recreated
  exactly, as the trainer made it);
- the LoRA: the checkpoint's state (its EMA by default, what the trainer also exports as
  lora/<step>/lora_ema.safetensors);
- the encoders: those the config names (the demo's file-free ones, random ones, or the FLUX root's).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from mosaic_jax import interop, model, parallel
from mosaic_jax.train import checkpoint as checkpoint_lib
from mosaic_jax.train import inputs as inputs_lib
from mosaic_jax.settings import ConfigError, settings_from_config


class TrainedModelError(ValueError):
  """A workdir or step that cannot give a model; the message names the path and what was expected."""


@dataclasses.dataclass
class TrainedModel:
  cfg: model.FluxConfig
  params: Any
  lora: Any
  encoders: Any
  config: ml_collections.ConfigDict  # the workdir's training config
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


def read_config(workdir: epath.Path) -> ml_collections.ConfigDict:
  """The training config a workdir was made with (its config.json)."""
  return ml_collections.ConfigDict(json.loads((epath.Path(workdir) / "config.json").read_text()))


def _committed_steps(workdir: epath.Path) -> list[int]:
  folder = workdir / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "state").exists()) \
      if folder.exists() else []


def load_trained(path: str, step: int | None = None, ema: bool = True, mesh=None) -> TrainedModel:
  """The model of a training workdir (its latest step, or `step`) or of a step folder, placed on `mesh`
  (default: every device on the data axis) with the training rules."""
  found = find_run(path)
  if found is None:
    raise TrainedModelError(f"{path}: not a training workdir (expected config.json and checkpoints/) nor one "
                            "of its step folders (checkpoints/<step> or lora/<step>).")
  workdir, folder_step = found
  config = read_config(workdir)
  steps = _committed_steps(workdir)
  step = step if step is not None else folder_step if folder_step is not None else (steps[-1] if steps else None)
  if step is None or step not in steps:
    raise TrainedModelError(f"{workdir}: no committed checkpoint for step {step} (committed: {steps}).")
  try:  # the dataset, which sampling does not read, need not be here
    settings = settings_from_config(config, check_files=False)
  except ConfigError as error:
    raise TrainedModelError(f"{workdir}/config.json: {error}") from error
  mesh = mesh if mesh is not None else parallel.make_mesh({"data": -1})
  param_rules, logical_rules = settings.sharding.param_rules, parallel.hashable_rules(settings.sharding.logical_rules)
  group = "ema" if ema else "trainable"
  state_dir = workdir / "checkpoints" / str(step) / "state"
  wanted = [(group, part) for part in ("base", "lora") if part in config.trainable]
  trees = checkpoint_lib.read_state_subtrees(state_dir, wanted)
  dtype = jnp.float32 if config.trainable != "lora" else jnp.dtype(config.dtype)

  source = {"workdir": os.fspath(workdir), "step": step, "weights": "EMA" if ema else "trained (not EMA)"}
  if "base" in config.trainable:
    cfg = settings.transformer_config()
    params = parallel.place(trees[(group, "base")], mesh, param_rules, logical_rules)
    source["base"] = f"trained, from checkpoints/{step}"
  elif config.checkpoint:
    root = os.path.expanduser(config.checkpoint)
    transformer = os.path.join(root, "transformer") if os.path.isdir(os.path.join(root, "transformer")) else root

    def place(name, array):
      sharding = parallel.sharding_for(name.replace(".", "/"), array.shape, mesh, param_rules, logical_rules)
      return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
    try:
      cfg, params = interop.load_flux_transformer(transformer, dtype=dtype, place=place)
    except FileNotFoundError as error:
      raise TrainedModelError(f"{workdir}/config.json names the base checkpoint {config.checkpoint}, which is "
                              f"not readable here ({error}).") from error
    cfg = settings.transformer_config(cfg)
    source["base"] = config.checkpoint
  else:  # the seeded random base of the run (flux_random), made as the trainer made it
    from mosaic_jax.train.trainer import create_sharded
    cfg = settings.transformer_config()
    params = create_sharded(lambda key: model.init_params(key, cfg, dtype), config.seed, mesh, param_rules,
                            logical_rules)
    source["base"] = f"random (seed {config.seed}), as the run's"
  lora = None
  if "lora" in config.trainable:
    lora = parallel.place(jax.tree_util.tree_map(lambda x: x.astype(dtype), trees[(group, "lora")]), mesh,
                          param_rules, logical_rules)
    source["lora"] = f"checkpoints/{step} ({'EMA' if ema else 'trained'}; exported as lora/{step}/"
    source["lora"] += ("lora_ema.safetensors)" if ema else "lora.safetensors)")
  encoders = inputs_lib.make_encoders(settings, text_encoders=True)
  return TrainedModel(cfg, params, lora, encoders, config, step, source)
