"""The training loop: reads a TrainingContext (setup.py) and runs its steps to total_steps, checkpointing
every checkpoint_every steps, at the end and on SIGTERM (preemption, agreed on by every process), with
sample panels every sample_every steps. Each step's metrics are checked one step late, so the host
prepares the next batch while the device works: a non-finite step stops the run (the NaN guard) with
the last good checkpoint named, and every log_every-th step is logged.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax

from mosaic_jax.parallel.distributed import say
from mosaic_jax.train import checkpoint as checkpoint_lib
from mosaic_jax.train import metrics as metrics_lib
from mosaic_jax.train.samples import PeriodicSamples
from mosaic_jax.train.setup import TrainingContext


@dataclasses.dataclass
class LoopResult:
  status: str  # "done" | "preempted"
  step: int
  losses: dict[int, float]  # the loss of each step this process ran


def train_loop(ctx: TrainingContext, on_step: Callable[[int, dict], None] | None = None) -> LoopResult:
  """Trains from ctx.start_step to total_steps (or a preemption); ctx.state ends as the last step's.
  `on_step(step, metrics)` runs after every step's check (tests)."""
  settings, checkpointer = ctx.settings, ctx.checkpointer
  checks = StepChecks(ctx, on_step)
  samples = PeriodicSamples(settings, ctx.encoders, ctx.mesh, ctx.workdir, ctx.logger)
  step, status, pending = ctx.start_step, "done", None  # pending: the last dispatched step, not checked yet
  with checkpoint_lib.PreemptionFlag() as preempted, checkpointer.stopping_cleanly():
    while step < settings.total_steps:
      host_batch = next(ctx.iterator)
      num_refs = host_batch["refs" if "refs" in host_batch else "ref_means"].shape[1]  # images, or cached features
      ctx.state, metrics = ctx.compiled[num_refs](ctx.state, ctx.base, ctx.batches(host_batch))
      step += 1
      if pending is not None:
        checks.check(*pending)
      pending = (step, metrics, num_refs)
      stop = preempted.reached(step)  # the same answer on every process, at the same step
      if step % settings.checkpoint_every == 0 or step == settings.total_steps or stop:
        checks.check(*pending)
        pending = None
        checkpointer.save(step, ctx.state, ctx.iterator.get_state(), ctx.cfg)
      checkpointer.poll()  # a failed save stops the run here; committed ones get checksums and exports
      if samples.due(step):
        samples.write(step, ctx.params, ctx.trainable.get("lora"), ctx.cfg)
      if stop:
        status = "preempted"
        break
    if pending is not None:
      checks.check(*pending)
    checkpointer.close()
  if status == "preempted":
    say(f"preempted (SIGTERM): step {step} committed to {checkpointer.directory}; exiting")
  return LoopResult(status, step, checks.losses)


class StepChecks:
  """Each step's metrics, fetched from the devices: the NaN guard, the losses, the on_step hook, and the
  logs (tensorboard and the console line) of every log_every-th step, timed over the steps since the
  last logged one."""

  def __init__(self, ctx: TrainingContext, on_step: Callable[[int, dict], None] | None):
    self.ctx, self.on_step = ctx, on_step
    self.losses: dict[int, float] = {}
    self.peak = metrics_lib.peak_tflops(jax.devices()[0].device_kind, ctx.settings.peak_tflops_per_device)
    self.window_start, self.window_steps = time.perf_counter(), 0

  def check(self, step: int, metrics, num_refs: int) -> None:
    metrics = jax.device_get(metrics)
    if not bool(metrics["finite"]):
      self._stop(step, metrics)
    self.losses[step] = float(metrics["loss"])
    self.window_steps += 1
    if self.on_step is not None:
      self.on_step(step, metrics)
    settings = self.ctx.settings
    if step % settings.log_every == 0 or step == settings.total_steps:
      self._log(step, metrics, num_refs)

  def _stop(self, step: int, metrics) -> None:
    """The NaN guard: the state kept its last finite values (step.py); the run ends naming the step."""
    ctx = self.ctx
    # Saves are asynchronous: let the last good one commit before the error ends the process (an
    # uncaught exception would otherwise leave it as an unreadable *.orbax-checkpoint-tmp).
    ctx.checkpointer.close()  # the last good one committed, and exported (or CheckpointError)
    last_good = ctx.checkpointer.last_committed()
    ctx.logger.close()  # flush the logs up to the bad step
    where = (f"non-finite loss, gradient or update at step {step} (loss {metrics['loss']}, grad norm "
             f"{metrics['grad_norm']}): stopped; ")
    if ctx.start_step and step == ctx.start_step + 1:  # the first step on restored weights
      where += (f"it is the first step after resuming from checkpoint step {ctx.start_step} in "
                f"{ctx.checkpointer.directory}, which is possibly corrupt (move checkpoints/{ctx.start_step} "
                "aside and rerun to resume from an older step); if not, ")
    raise FloatingPointError(
        where + (f"the last good checkpoint (step {last_good}) in {ctx.checkpointer.directory} is intact"
                 if last_good is not None else f"no checkpoint was written to {ctx.checkpointer.directory}")
        + " (lower the learning rate, or check the data).")

  def _log(self, step: int, metrics, num_refs: int) -> None:
    ctx, settings = self.ctx, self.ctx.settings
    step_time = (time.perf_counter() - self.window_start) / self.window_steps
    grid, ref_grid = settings.resolution // settings.token_pixels, settings.ref_resolution // settings.token_pixels
    shape = metrics_lib.StepShape(settings.batch_size, settings.text_len, grid * grid, num_refs, ref_grid * ref_grid)
    lora_rank = settings.lora_rank if "lora" in ctx.trainable else 0
    flops = metrics_lib.train_step_flops(ctx.cfg, shape, lora_rank, "base" in ctx.trainable)
    tflops = flops / step_time / jax.device_count() / 1e12
    values = {k: v for k, v in metrics.items() if k != "finite"}
    values.update(step_time_s=step_time, examples_per_s=settings.batch_size / step_time,
                  tflops_per_device=tflops, num_refs=num_refs)
    if self.peak:
      values["mfu"] = tflops / self.peak
    ctx.logger.scalars(step, values)
    ctx.logger.console(step, values, step_time)
    self.window_start, self.window_steps = time.perf_counter(), 0
