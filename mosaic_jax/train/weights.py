"""What a run starts from: the transformer (its base loaded from a FLUX checkpoint, or drawn) and LoRA,
and the train state around the trainable part, drawn fresh or restored from the workdir's newest good
checkpoint. Everything is made in its shardings, never whole on one device (at FLUX.1-dev size the bf16
base is 24 GB, a rank-512 LoRA 7 GB).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp

from mosaic_jax import interop, model, parallel
from mosaic_jax.parallel.distributed import say
from mosaic_jax.settings import Settings
from mosaic_jax.train import step as step_lib
from mosaic_jax.train.checkpoint import Checkpointer


def build_model(settings: Settings, mesh, draw: bool = True):
  """(FluxConfig, base params placed with their shardings, initial LoRA or None). draw=False (a run
  that will restore its trainable weights): randomly initialized trainable parts are returned as
  shapes only (jax.ShapeDtypeStruct), not drawn."""
  rules = settings.sharding.param_rules, settings.sharding.logical_rules
  dtype = jnp.float32 if settings.trainable != "lora" else jnp.dtype(settings.dtype)
  if settings.checkpoint:
    transformer = os.path.expanduser(settings.checkpoint)
    if os.path.isdir(os.path.join(transformer, "transformer")):
      transformer = os.path.join(transformer, "transformer")

    def place(name, array):  # each tensor goes straight to its sharding, never all on one device
      return jax.device_put(array, parallel.sharding_for(name.replace(".", "/"), array.shape, mesh, *rules))
    cfg, params = interop.load_flux_transformer(transformer, dtype=dtype, place=place)
    cfg = settings.transformer_config(cfg)
  else:
    cfg = settings.transformer_config()
    params = _drawn(lambda key: model.init_params(key, cfg, dtype), settings.seed, mesh, rules,
                    draw or "base" not in settings.trainable)
  lora = None
  if "lora" in settings.trainable:
    if settings.lora:
      lora = interop.load_lora(os.path.expanduser(settings.lora), cfg)
    else:
      shapes = jax.eval_shape(lambda: params)  # the LoRA needs the base's shapes only
      lora = _drawn(lambda key: model.init_lora(key, shapes, cfg, settings.lora_rank), settings.seed + 1, mesh,
                    rules, draw)
  return cfg, params, lora


def _drawn(make, seed: int, mesh, rules, draw: bool):
  """make(key)'s random tree, drawn in its shardings, or its shapes alone."""
  if draw:
    return parallel.create_sharded(make, seed, mesh, *rules)
  return jax.eval_shape(make, jax.random.key(seed))


@dataclasses.dataclass
class Start:
  """Where the run starts: the transformer, its base, the train state (drawn or restored) and its
  shardings, the step and the input iterator's state it was saved with (None for a fresh run)."""
  cfg: model.FluxConfig
  params: Any  # the base, trained or frozen
  base: Any  # what the step takes as the frozen base ({} when the base is trained: it is in the state)
  state: dict
  state_shardings: Any
  step: int = 0
  data_state: dict | None = None

  @property
  def trains_base(self) -> bool:
    return "base" in self.state["trainable"]


def start(settings: Settings, mesh, checkpointer: Checkpointer) -> Start:
  """The run's start: restored from the newest checkpoint that verifies and restores (unusable ones are
  reported and moved aside by the checkpointer), else drawn fresh. A run that resumes builds its
  trainable weights as shapes only, and draws them after all when no step restores."""
  shard = functools.partial(parallel.tree_shardings, mesh=mesh, param_rules=settings.sharding.param_rules,
                            logical_rules=settings.sharding.logical_rules)
  optimizer = step_lib.make_optimizer(settings.optimizer, settings.total_steps)
  init_state = lambda trainable: step_lib.init_state(trainable, optimizer)
  drawn = checkpointer.latest_step() is None
  cfg, params, lora = build_model(settings, mesh, draw=drawn)
  trainable = _trainable(settings, params, lora)
  state_shardings = shard(jax.eval_shape(init_state, trainable))
  # Adam moments and the EMA copy are made in place, in their shardings (never whole on one device).
  make_state = jax.jit(init_state, out_shardings=state_shardings)
  state = make_state(trainable) if drawn else jax.eval_shape(init_state, trainable)
  abstract_state = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings)
  resumed = checkpointer.restore_newest_good(abstract_state, cfg, report=say)  # verified, else older
  if resumed is not None:
    step, state, data_state = resumed
    say(f"resumed from {checkpointer.directory} at step {step}")
    return Start(cfg, params, _frozen_base(params, state), state, state_shardings, step, data_state)
  if not drawn:  # every step was unusable (reported above): start from step 0 with drawn weights
    cfg, params, lora = build_model(settings, mesh)
    state = make_state(_trainable(settings, params, lora))
  return Start(cfg, params, _frozen_base(params, state), state, state_shardings)


def _trainable(settings: Settings, params, lora) -> dict:
  return {**({"base": params} if "base" in settings.trainable else {}),
          **({"lora": lora} if lora is not None else {})}


def _frozen_base(params, state) -> Any:
  return {} if "base" in state["trainable"] else params
