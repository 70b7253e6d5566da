"""Compiling the train step ahead of time: for every reference count the data holds, before step 0, each
with its memory report; from shapes alone (`compile_from_shapes`: no weights made or loaded) for the
memory and FLOP figures of a mesh, batch or remat policy before any accelerator time is spent
(benchmarks/train_memory.py, tests). A restart with jax's persistent compilation cache on
(JAX_COMPILATION_CACHE_DIR) loads the XLA compile from it; tracing and lowering are redone, a few seconds
even at FLUX.1-dev scale (benchmarks/compile_phases.py).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mosaic_jax import model, parallel
from mosaic_jax.parallel.distributed import say
from mosaic_jax.settings import Settings
from mosaic_jax.train import step as step_lib


class StepShardings(NamedTuple):
  """Where the step's arguments and results live: the train state, the frozen base, the batch, the metrics."""
  state: Any
  base: Any
  batch: Any
  metrics: Any

  @property
  def of_step(self) -> tuple:
    """(in_shardings, out_shardings) of train_step(state, base, batch) -> (state, metrics)."""
    return (self.state, self.base, self.batch), (self.state, self.metrics)


def memory_report(compiled) -> str:
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend reports
    return "memory analysis unavailable"
  if stats is None:
    return "memory analysis unavailable"
  mib = lambda v: f"{v / 2 ** 20:.1f} MiB"
  return (f"arguments {mib(stats.argument_size_in_bytes)}, outputs {mib(stats.output_size_in_bytes)}, "
          f"temporaries {mib(stats.temp_size_in_bytes)}, aliased (donated) {mib(stats.alias_size_in_bytes)}, "
          f"code {mib(stats.generated_code_size_in_bytes)}")


def compile_steps(cfg, state, base, shardings: StepShardings, settings: Settings, reference_counts, text_shapes,
                  feature_dtypes=None) -> dict[int, Any]:
  """{R: the train step of transformer `cfg` under `settings`}, compiled ahead of time, each with its
  memory report printed. state and base: arrays or shapes; text_shapes and feature_dtypes: see
  step.batch_spec. The step is traced with settings.for_step(): the fields it never reads at fixed values."""
  settings = settings.for_step()
  optimizer = step_lib.make_optimizer(settings.optimizer, settings.total_steps)
  step_fn = functools.partial(step_lib.train_step, cfg=cfg, settings=settings, optimizer=optimizer)
  in_shardings, out_shardings = shardings.of_step
  jitted = jax.jit(step_fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=(0,))
  mesh = shardings.batch.mesh
  compiled = {}
  for r in reference_counts:
    start = time.perf_counter()
    args = (_abstract(state), _abstract(base),
            step_lib.batch_spec(settings, r, text_shapes, feature_dtypes=feature_dtypes))
    with jax.set_mesh(mesh):  # the model's activation pins place onto this mesh
      compiled[r] = jitted.lower(*args).compile()
    say(f"compiled the train step for {r} reference(s) in {time.perf_counter() - start:.1f} s: "
        f"{memory_report(compiled[r])}")
  return compiled


def compile_from_shapes(settings: Settings, cfg, mesh, reference_counts, text_shapes) -> dict[int, Any]:
  """{R: the settings' train step for transformer `cfg` on `mesh`}, compiled from shapes alone: no weights
  are made or loaded, and no file the settings name is read (settings_from_config(..., autoencoder,
  check_files=False) gives the latent geometry without one)."""
  rules = settings.sharding.param_rules, settings.sharding.logical_rules
  shard = functools.partial(parallel.tree_shardings, mesh=mesh, param_rules=rules[0], logical_rules=rules[1])
  optimizer = step_lib.make_optimizer(settings.optimizer, settings.total_steps)
  cfg = dataclasses.replace(cfg, logical_rules=parallel.hashable_rules(rules[1]))
  key = jax.random.key(0)
  base = jax.eval_shape(lambda k: model.init_params(k, cfg, jnp.dtype(settings.dtype)), key)
  lora = jax.eval_shape(lambda k: model.init_lora(k, base, cfg, settings.lora_rank), key)
  state = jax.eval_shape(lambda t: step_lib.init_state(t, optimizer), {"lora": lora})
  shardings = StepShardings(shard(state), shard(base), parallel.batch_sharding(mesh, rules[1]),
                            parallel.replicated(mesh))
  return compile_steps(cfg, state, base, shardings, settings, reference_counts, text_shapes)


def _abstract(tree):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)

