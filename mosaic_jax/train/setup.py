"""Setting a run up, maxtext's way: `setup(settings, workdir)` makes everything the loop reads and returns
it as one typed TrainingContext. In order, so that everything a user can get wrong fails before anything
is written or compiled: the settings against the workdir's config in effect (a refused resume); the
mesh, and whether the batch splits over it; the data (opened before the model, so a wrong path fails
in seconds); then the workdir's record of the config (config.json, or the resume's changes), the
encoders, the weights and train state, drawn or restored (weights.py), the step, compiled for every
reference count the data holds (compilation.py; under remat_policy "auto" after choosing the policy,
remat_choice.py), and the logger.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from jax.experimental import multihost_utils

from mosaic_jax import parallel
from mosaic_jax.data import make_iterator
from mosaic_jax.encoders import FluxEncoders, make_encoders
from mosaic_jax.model import FluxConfig
from mosaic_jax.parallel.distributed import is_leader, say
from mosaic_jax.settings import ConfigError, Settings, check_batch_splits
from mosaic_jax.train import compilation, remat_choice
from mosaic_jax.train import weights as weights_lib
from mosaic_jax.train.batches import DeviceBatches, text_feature_shapes
from mosaic_jax.train.checkpoint import Checkpointer
from mosaic_jax.train.compilation import StepShardings
from mosaic_jax.train.datasets import open_dataset, pipeline_config
from mosaic_jax.train.metrics import Logger
from mosaic_jax.workdir.config import record, resume_changes


@dataclasses.dataclass
class TrainingContext:
  """What the loop reads. `state` is the train state (step, trainable, opt_state, ema), donated to each
  step and replaced by its result; `base` the frozen base the step also takes ({} when the base is
  trained: then it is in the state)."""
  settings: Settings
  workdir: str
  mesh: jax.sharding.Mesh
  cfg: FluxConfig
  state: dict
  base: Any
  shardings: StepShardings
  compiled: dict[int, Any]  # reference count -> the compiled step
  iterator: Any  # the input pipeline: its state is checkpointed with the train state
  batches: DeviceBatches  # host batch -> the step's batch on the devices
  encoders: FluxEncoders
  checkpointer: Checkpointer
  logger: Logger
  start_step: int  # the step resumed from; 0 for a fresh run

  @property
  def trainable(self) -> dict:
    return self.state["trainable"]

  @property
  def params(self):
    """The base as it is now: the trained one, or the frozen one."""
    return self.trainable.get("base", self.base)


def setup(settings: Settings, workdir: str) -> TrainingContext:
  """The run's context (module docstring); its settings are checked already (settings_from_config)."""
  settings = remat_choice.reuse(settings, workdir)  # "auto" chosen before for this step: that policy
  changed = resume_changes(settings, workdir)  # reads only; every path through etils.epath (gs:// too)
  mesh = parallel.make_mesh(dataclasses.asdict(settings.mesh))
  check_batch_splits(settings, mesh)
  source, iterator = _training_data(settings)
  if is_leader():  # one writer
    record(settings, workdir, changed)
  if changed:
    say("resuming with changed settings (recorded in config_history.jsonl): "
        + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
  encoders = make_encoders(settings)
  checkpointer = Checkpointer(workdir, settings.keep_checkpoints)
  start = weights_lib.start(settings, mesh, checkpointer)
  if start.data_state is not None:
    iterator.set_state(start.data_state)
  _describe(settings, start, mesh)
  # Encoders run on the fly go onto the mesh too, so their features stay on the devices, split like the
  # batch, in their own dtypes (batches.py); the step is compiled for those.
  batches = DeviceBatches(settings, encoders, mesh, iterator.reference_counts[0])
  shard = functools.partial(parallel.tree_shardings, mesh=mesh, param_rules=settings.sharding.param_rules,
                            logical_rules=settings.sharding.logical_rules)
  shardings = StepShardings(start.state_shardings, shard(start.base), batches.sharding, parallel.replicated(mesh))
  compile_for = functools.partial(compilation.compile_steps, state=start.state, base=start.base, shardings=shardings,
                                  settings=settings, text_shapes=text_feature_shapes(settings, encoders, source),
                                  feature_dtypes=batches.feature_dtypes)
  cfg, compiled = start.cfg, {}
  if remat_choice.wanted(settings):
    settings, cfg, compiled = _choose_remat(settings, workdir, cfg, compile_for, max(iterator.reference_counts))
  rest = [r for r in iterator.reference_counts if r not in compiled]
  compiled = {**compiled, **compile_for(cfg, reference_counts=rest)}
  logger = Logger(workdir, settings.total_steps, enabled=is_leader())
  return TrainingContext(settings, workdir, mesh, cfg, start.state, start.base, shardings, compiled, iterator,
                         batches, encoders, checkpointer, logger, start.step)


def _choose_remat(settings: Settings, workdir: str, cfg: FluxConfig, compile_for, most_refs: int):
  """(the settings with the chosen policy, the transformer under it, {most_refs: its compiled step} or {})
  for remat_policy "auto": the candidates compiled for the run's largest reference count (the most
  memory), the choice recorded in the workdir (train/remat_choice.py)."""
  compile_policy = lambda policy: compile_for(dataclasses.replace(cfg, remat_policy=policy),
                                              reference_counts=[most_refs])[most_refs]
  chosen, executable, candidates = remat_choice.choose(compile_policy, jax.devices()[0])
  settings = remat_choice.record(settings, workdir, chosen, candidates)
  return settings, dataclasses.replace(cfg, remat_policy=chosen), {} if executable is None else {most_refs: executable}


def _training_data(settings: Settings):
  """(the train split's source, this process's iterator over it)."""
  split = settings.dataset.train_split
  if jax.process_count() > 1:  # a synthetic set is built on first use: by process 0 alone
    if is_leader():
      open_dataset(settings, split)
    multihost_utils.sync_global_devices("dataset ready")
  source, num_refs = open_dataset(settings, split)
  try:
    iterator = make_iterator(source, num_refs, pipeline_config(settings), process_index=jax.process_index(),
                             process_count=jax.process_count())
  except ValueError as error:  # e.g. no reference count with a full batch of examples
    raise ConfigError(f"dataset {settings.dataset.name} split {split!r} gives no training batch: {error} "
                      f"(--config.batch_size={settings.batch_size})") from error
  return source, iterator


def _describe(settings: Settings, start: weights_lib.Start, mesh) -> None:
  n_trainable = sum(x.size for x in jax.tree_util.tree_leaves(start.state["trainable"]))
  n_base = sum(x.size for x in jax.tree_util.tree_leaves(start.params))
  say(f"model {start.cfg}\nbase parameters {n_base:,} "
      f"({'trained' if start.trains_base else 'frozen, ' + settings.dtype}); trainable {n_trainable:,}; "
      f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s) in "
      f"{jax.process_count()} process(es)")
