"""`train_and_evaluate(config, workdir)`: MOSAIC training, end to end, resumable.

Read top to bottom: the settings (the config checked, before anything is built: mosaic_jax/settings/), the run
set up as one context (setup.py: workdir record, mesh, data, encoders, weights and state, compiled
steps, logger), the loop over it (loop.py: steps, NaN guard, logs, samples, checkpoints), then the
evaluation table on held-out samples and the final sample panels.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
import ml_collections
from etils import epath

from mosaic_jax.parallel.distributed import is_leader, say
from mosaic_jax.settings import Settings, settings_from_config
from mosaic_jax.train import evaluate as evaluate_lib
from mosaic_jax.train.loop import train_loop
from mosaic_jax.train.samples import attention_path, write_samples
from mosaic_jax.train.setup import TrainingContext, setup


def train_and_evaluate(config: ml_collections.ConfigDict | Settings, workdir: str,
                       on_step: Callable[[int, dict], None] | None = None) -> dict:
  """Trains (resuming from `workdir` if it holds a checkpoint), then evaluates. `config`: the run's
  Settings, or a config they are made from (every config error comes first, before anything is built).

  Returns {"status": "done" | "preempted", "step", "losses": {step: loss of this process's steps},
  "eval": the evaluation table row or None}. `on_step(step, metrics)` runs after every step (tests).
  """
  settings = config if isinstance(config, Settings) else settings_from_config(config)
  ctx = setup(settings, workdir)
  result = train_loop(ctx, on_step)
  table = None
  if result.status == "done" and settings.eval_examples > 0:
    with jax.set_mesh(ctx.mesh):  # traced here, like the step
      table = final_evaluation(ctx, result.step)
  ctx.logger.close()
  return {"status": result.status, "step": result.step, "losses": result.losses, "eval": table}


def final_evaluation(ctx: TrainingContext, step: int) -> dict:
  """The held-out table (printed and written to eval.json) and the final sample panels."""
  settings, lora = ctx.settings, ctx.trainable.get("lora")
  batches = evaluate_lib.evaluation_batches(settings, ctx.encoders, ctx.mesh)
  table = evaluate_lib.evaluate_attention(ctx.params, lora, ctx.cfg, batches, tuple(settings.eval_timesteps),
                                          settings.seed)
  table["step"] = step
  say("evaluation on held-out samples (trained weights, t in "
      f"{tuple(settings.eval_timesteps)}):\n" + evaluate_lib.format_table({epath.Path(ctx.workdir).name: table}))
  if is_leader():
    (epath.Path(ctx.workdir) / "eval.json").write_text(json.dumps(table, indent=2))
  if batches:
    path = write_samples(os.path.join(ctx.workdir, "samples", "final.png"), ctx.params, lora, ctx.cfg,
                         ctx.encoders, batches[0], settings, ctx.logger, step)
    say(f"sample panels (references | sample | real target): {path}; their attention heatmaps: "
        f"{attention_path(path)}")
  return table
