"""`train_and_evaluate(config, workdir)`: MOSAIC training, end to end, resumable.

Read top to bottom:
  1. the settings: the config checked (unknown fields, missing paths) before anything is built or compiled;
  2. mesh; model (base frozen in config.dtype, or trained for the demo) and LoRA;
  3. data iterator and encoders;
  4. train state, its shardings, and automatic resumption from the workdir's latest checkpoint;
  5. AOT compilation of the step for every reference count the data holds, with a memory report;
  6. the loop: step, NaN guard, logs, samples, checkpoints (every N steps, at the end, on SIGTERM);
  7. the evaluation table on held-out samples and the sample panels.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from mosaic_jax import images, interop, model, parallel
from mosaic_jax.data import make_iterator, to_global_arrays
from mosaic_jax.encoders import training_latents
from mosaic_jax.parallel.distributed import is_leader, say
from mosaic_jax.train import checkpoint as checkpoint_lib
from mosaic_jax.train import evaluate as evaluate_lib
from mosaic_jax.train import executable_store
from mosaic_jax.train import inputs as inputs_lib
from mosaic_jax.train import metrics as metrics_lib
from mosaic_jax.train import step as step_lib
from mosaic_jax.train import workdir_config
from mosaic_jax.settings import ConfigError, Settings, check_batch_splits, settings_from_config


# ---- 2. model -------------------------------------------------------------------------------------

def build_model(settings: Settings, mesh, param_rules, logical_rules, draw: bool = True):
  """(FluxConfig, base params placed with their shardings, initial LoRA or None). draw=False (a run
  that will restore its trainable weights): randomly initialized trainable parts are returned as
  shapes only (jax.ShapeDtypeStruct), not drawn (at FLUX.1-dev size a rank-512 LoRA is 7 GB)."""
  dtype = jnp.float32 if settings.trainable != "lora" else jnp.dtype(settings.dtype)
  if settings.checkpoint:
    transformer = os.path.expanduser(settings.checkpoint)
    if os.path.isdir(os.path.join(transformer, "transformer")):
      transformer = os.path.join(transformer, "transformer")

    def place(name, array):  # each tensor goes straight to its sharding, never all on one device
      return jax.device_put(array, parallel.sharding_for(name.replace(".", "/"), array.shape, mesh,
                                                         param_rules, logical_rules))
    cfg, params = interop.load_flux_transformer(transformer, dtype=dtype, place=place)
    cfg = settings.transformer_config(cfg)
  else:
    cfg = settings.transformer_config()
    make = lambda key: model.init_params(key, cfg, dtype)
    if draw or "base" not in settings.trainable:
      params = create_sharded(make, settings.seed, mesh, param_rules, logical_rules)
    else:
      params = jax.eval_shape(make, jax.random.key(settings.seed))
  lora = None
  if "lora" in settings.trainable:
    if settings.lora:
      lora = interop.load_lora(os.path.expanduser(settings.lora), cfg)
    else:
      shapes = jax.eval_shape(lambda: params)  # the LoRA needs the base's shapes only
      make = lambda key: model.init_lora(key, shapes, cfg, settings.lora_rank)
      if draw:
        lora = create_sharded(make, settings.seed + 1, mesh, param_rules, logical_rules)
      else:
        lora = jax.eval_shape(make, jax.random.key(settings.seed + 1))
  return cfg, params, lora


def create_sharded(make, seed, mesh, param_rules, logical_rules):
  """make(key)'s random pytree, created inside jit straight into its shardings: at FLUX.1-dev size
  (24 GB of bf16 base, 7 GB of rank-512 LoRA) it need not fit on one device first."""
  key = jax.random.key(seed)
  shardings = parallel.tree_shardings(jax.eval_shape(make, key), mesh, param_rules, logical_rules)
  return jax.jit(make, out_shardings=shardings)(key)


# ---- 5. compilation -------------------------------------------------------------------------------

def _memory_report(compiled) -> str:
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


def compile_steps(cfg, state, base, state_shardings, base_shardings, batch_shardings, metric_sharding,
                  settings: Settings, reference_counts, text_shapes, feature_dtypes=None) -> dict[int, Any]:
  """{R: the train step of transformer `cfg` under `settings`}, compiled ahead of time, each with its
  memory report printed; loaded instead from the executable store when it holds the same step (a
  restart: no tracing, executable_store.py). text_shapes and feature_dtypes: see step.batch_spec."""
  settings = settings.for_step()
  optimizer = step_lib.make_optimizer(settings.optimizer, settings.total_steps)
  step_fn = functools.partial(step_lib.train_step, cfg=cfg, settings=settings, optimizer=optimizer)
  shardings = ((state_shardings, base_shardings, batch_shardings), (state_shardings, metric_sharding))
  jitted = jax.jit(step_fn, in_shardings=shardings[0], out_shardings=shardings[1], donate_argnums=(0,))
  mesh = batch_shardings.mesh
  abstract = lambda tree: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  store = executable_store.directory(mesh.devices.flat)
  compiled = {}
  for r in reference_counts:
    start = time.perf_counter()
    args = (abstract(state), abstract(base),
            step_lib.batch_spec(settings, r, text_shapes, feature_dtypes=feature_dtypes))
    name = executable_store.key((cfg, settings, dict(mesh.shape), mesh.devices.tolist()), args, shardings)
    compiled[r] = executable_store.load(store, name, say) if store else None
    if compiled[r] is not None:
      say(f"loaded the compiled train step for {r} reference(s) from {store / name}.exe in "
          f"{time.perf_counter() - start:.1f} s: {_memory_report(compiled[r])}")
      continue
    with jax.set_mesh(mesh):  # the model's activation pins place onto this mesh
      lowered = jitted.lower(*args)
    compiled[r], fresh = executable_store.compile_fresh(lowered)
    if store and fresh:
      executable_store.save(store, name, compiled[r])
    say(f"compiled the train step for {r} reference(s) in {time.perf_counter() - start:.1f} s: "
          f"{_memory_report(compiled[r])}")
  return compiled


def compile_from_shapes(config, cfg, mesh, reference_counts, autoencoder, text_shapes) -> dict[int, Any]:
  """{R: the config's train step for transformer `cfg` on `mesh`}, compiled from shapes alone (no weights
  are made or loaded): memory and FLOP reports for a mesh, batch or remat policy before any accelerator
  time is spent (benchmarks/train_memory.py). `autoencoder` only gives the latent geometry; no file the
  config names (checkpoint, LoRA, dataset) is needed."""
  settings = settings_from_config(config, autoencoder, check_files=False)
  rules = settings.sharding.param_rules, settings.sharding.logical_rules
  shard = functools.partial(parallel.tree_shardings, mesh=mesh, param_rules=rules[0], logical_rules=rules[1])
  optimizer = step_lib.make_optimizer(settings.optimizer, settings.total_steps)
  cfg = dataclasses.replace(cfg, logical_rules=parallel.hashable_rules(rules[1]))
  key = jax.random.key(0)
  base = jax.eval_shape(lambda k: model.init_params(k, cfg, jnp.dtype(settings.dtype)), key)
  lora = jax.eval_shape(lambda k: model.init_lora(k, base, cfg, settings.lora_rank), key)
  state = jax.eval_shape(lambda t: step_lib.init_state(t, optimizer), {"lora": lora})
  return compile_steps(cfg, state, base, shard(state), shard(base), parallel.batch_sharding(mesh, rules[1]),
                       parallel.replicated(mesh), settings, reference_counts, text_shapes)


def _example_host_batch(config, num_refs: int) -> dict:
  """A pipeline batch of the right shapes (zeros), to trace the on-device encoders for their dtypes."""
  b, s, sr = config.batch_size, config.resolution, config.ref_resolution
  return {"target": np.zeros((b, s, s, 3), np.float32), "refs": np.zeros((b, num_refs, sr, sr, 3), np.float32),
          "caption": np.array([""] * b, object)}


# ---- 7. evaluation --------------------------------------------------------------------------------

def model_latents(host_batch, encoders, settings: Settings, mesh=None):
  """Pipeline batch -> deterministic model latents (posterior means) and text features, replicated on
  `mesh` when given (every process holds the same whole evaluation batch)."""
  features = inputs_lib.step_batch(host_batch, encoders, settings)
  latents = training_latents({**features, "target_std": np.zeros_like(features["target_std"])},
                             settings.latent_scaling, settings.latent_shift, jax.random.key(0))
  batch = {"target": latents["target"], "refs": latents["refs"], "text": latents["text"],
           "pooled": latents["pooled"], **{k: features[k] for k in
                                           ("pair_ref", "pair_ref_token", "pair_target_token", "pair_valid")}}
  if mesh is None:
    return {k: jnp.asarray(v) for k, v in batch.items()}
  with jax.set_mesh(mesh):
    return parallel.on_mesh(batch)


def evaluation_batches(settings: Settings, encoders, mesh=None) -> list[dict]:
  source, num_refs = inputs_lib.open_dataset(settings, settings.dataset.eval_split)
  batch_size = min(settings.batch_size, 8)
  iterator = make_iterator(source, num_refs, inputs_lib.pipeline_config(
      settings, global_batch_size=batch_size, shuffle=False, dropout=False, num_epochs=1, worker_processes=0))
  batches = []
  for host_batch in iterator:
    if len(batches) * batch_size >= settings.eval_examples:
      break
    batches.append(model_latents(host_batch, encoders, settings, mesh))
  return batches


def write_samples(path, params, lora, cfg, encoders, batch, settings: Settings, logger=None, step=0):
  """Every process samples (the model is split over all of them); process 0 draws and writes the panel
  at `path` and, beside it (`<name>_attention.png`), each sample's attention heatmaps."""
  guidance = settings.guidance if settings.trainable == "lora" else 1.0  # the demo DiT only saw 1.0
  tokens, attention = evaluate_lib.sample_targets(params, lora, cfg, batch, settings.sample_steps, guidance,
                                                  settings.seed, record_attention=True)
  tokens = multihost_utils.process_allgather(tokens, tiled=True)  # whole on every host
  attention = multihost_utils.process_allgather(attention, tiled=True)
  if not is_leader():
    return path
  host_batch = {k: multihost_utils.process_allgather(batch[k], tiled=True) for k in ("target", "refs")}
  panel = images.sample_panel(encoders.autoencoder, host_batch, tokens)
  images.write_png(path, panel)
  if logger is not None:
    logger.image(step, "samples", panel)
  if attention.shape[1]:  # a batch with references
    sheet = images.attention_sheet(encoders.autoencoder, host_batch, tokens, attention)
    images.write_png(attention_path(path), sheet)
    if logger is not None:
      logger.image(step, "attention", sheet)
  return path


def attention_path(samples_path: str) -> str:
  """samples/step_N.png -> samples/step_N_attention.png (the heatmaps of the same samples)."""
  stem, extension = os.path.splitext(samples_path)
  return f"{stem}_attention{extension}"


def final_evaluation(settings: Settings, workdir, params, lora, cfg, encoders, logger, step, mesh) -> dict:
  """The held-out table (printed and written to eval.json) and the final sample panels."""
  batches = evaluation_batches(settings, encoders, mesh)
  table = evaluate_lib.evaluate_attention(params, lora, cfg, batches, tuple(settings.eval_timesteps), settings.seed)
  table["step"] = step
  say("evaluation on held-out samples (trained weights, t in "
      f"{tuple(settings.eval_timesteps)}):\n" + evaluate_lib.format_table({epath.Path(workdir).name: table}))
  if is_leader():
    (epath.Path(workdir) / "eval.json").write_text(json.dumps(table, indent=2))
  if batches:
    path = write_samples(os.path.join(workdir, "samples", "final.png"), params, lora, cfg, encoders, batches[0],
                         settings, logger, step)
    say(f"sample panels (references | sample | real target): {path}; their attention heatmaps: "
        f"{attention_path(path)}")
  return table


# ---- the run --------------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict | Settings, workdir: str,
                       on_step: Callable[[int, dict], None] | None = None) -> dict:
  """Trains (resuming from `workdir` if it holds a checkpoint), then evaluates.

  Returns {"status": "done" | "preempted", "step", "losses": {step: loss of this process's steps},
  "eval": the evaluation table row or None}. `on_step(step, metrics)` runs after every step (tests).
  """
  # 1. settings (every config error, before anything is built) and the workdir's record of the config
  settings = config if isinstance(config, Settings) else settings_from_config(config)
  # Compared with the workdir's before anything is written; one writer; every path through etils.epath,
  # so gs:// workdirs work.
  changed = workdir_config.check_and_record(settings, workdir, write=is_leader())
  if changed:
    say("resuming with changed settings (recorded in config_history.jsonl): "
        + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))

  # 2. mesh and model
  mesh = parallel.make_mesh(dataclasses.asdict(settings.mesh))
  param_rules, logical_rules = settings.sharding.param_rules, settings.sharding.logical_rules
  check_batch_splits(settings, mesh)
  shard = functools.partial(parallel.tree_shardings, mesh=mesh, param_rules=param_rules,
                            logical_rules=logical_rules)

  # 3. data (opened before the model, so a wrong path fails in seconds) and encoders
  if jax.process_count() > 1:  # a synthetic set is built on first use: by process 0 alone
    if is_leader():
      inputs_lib.open_dataset(settings, settings.dataset.train_split)
    multihost_utils.sync_global_devices("dataset ready")
  source, num_refs = inputs_lib.open_dataset(settings, settings.dataset.train_split)
  try:
    iterator = make_iterator(source, num_refs, inputs_lib.pipeline_config(settings),
                             process_index=jax.process_index(), process_count=jax.process_count())
  except ValueError as error:  # e.g. no reference count with a full batch of examples
    raise ConfigError(f"dataset {settings.dataset.name} split {settings.dataset.train_split!r} gives no "
                      f"training batch: {error} (--config.batch_size={settings.batch_size})") from error
  encoders = inputs_lib.make_encoders(settings)
  checkpointer = checkpoint_lib.Checkpointer(workdir, settings.keep_checkpoints)
  # A run that resumes restores its trainable weights: they are not drawn at random first.
  cfg, params, lora = build_model(settings, mesh, param_rules, logical_rules,
                                  draw=checkpointer.latest_step() is None)

  # 4. state, shardings, resumption
  optimizer = step_lib.make_optimizer(settings.optimizer, settings.total_steps)
  init_state = lambda trainable: step_lib.init_state(trainable, optimizer)

  def trainable_parts(params, lora):
    return {**({"base": params} if "base" in settings.trainable else {}),
            **({"lora": lora} if lora is not None else {})}

  trainable = trainable_parts(params, lora)
  base = {} if "base" in trainable else params
  state_shardings = shard(jax.eval_shape(init_state, trainable))
  # Adam moments and the EMA copy are made in place, in their shardings (never whole on one device).
  make_state = jax.jit(init_state, out_shardings=state_shardings)
  drawn = not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(trainable))
  state = make_state(trainable) if drawn else jax.eval_shape(init_state, trainable)
  base_shardings = shard(base)
  batch_shardings = parallel.batch_sharding(mesh, logical_rules)
  metric_sharding = parallel.replicated(mesh)

  start_step = 0
  abstract_state = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings)
  resumed = checkpointer.restore_newest_good(abstract_state, cfg, report=say)  # verified, else older
  if resumed is not None:
    start_step, state, data_state = resumed
    iterator.set_state(data_state)
    say(f"resumed from {checkpointer.directory} at step {start_step}")
  elif not drawn:  # every step was unusable (reported above): start from step 0 with drawn weights
    cfg, params, lora = build_model(settings, mesh, param_rules, logical_rules)
    trainable = trainable_parts(params, lora)
    base = {} if "base" in trainable else params
    state = make_state(trainable)

  n_trainable = sum(x.size for x in jax.tree_util.tree_leaves(state["trainable"]))
  n_base = sum(x.size for x in jax.tree_util.tree_leaves(params))
  say(f"model {cfg}\nbase parameters {n_base:,} ({'trained' if 'base' in trainable else 'frozen, ' + settings.dtype}); "
      f"trainable {n_trainable:,}; mesh {dict(mesh.shape)} over {jax.device_count()} "
      f"{jax.devices()[0].platform} device(s) in {jax.process_count()} process(es)")

  # 5. compile for every reference count before step 0; encoders run on the fly go onto the mesh too,
  # so their features stay on the devices, split like the batch, in their own dtypes.
  encode, encoder_parts, feature_dtypes = None, None, None
  if not settings.dataset.cached_features:
    encoder_parts = parallel.place(encoders.device_parts(), mesh, param_rules, logical_rules)
    encode = jax.jit(encoders.features_from_raw, out_shardings=batch_shardings)
    feature_dtypes = {k: v.dtype for k, v in jax.eval_shape(
        encoders.features_from_raw, encoder_parts,
        encoders.raw_inputs(_example_host_batch(settings, iterator.reference_counts[0]))).items()}
  compiled = compile_steps(cfg, state, base, state_shardings, base_shardings, batch_shardings,
                           metric_sharding, settings, iterator.reference_counts,
                           inputs_lib.text_feature_shapes(settings, encoders, source), feature_dtypes)

  def device_batch(host_batch):
    """This step's batch as global arrays (each process sends its own rows), features made on device."""
    inputs = to_global_arrays(inputs_lib.host_inputs(host_batch, encoders, settings), batch_shardings)
    if encode is None:
      return inputs
    raw = {k: inputs.pop(k) for k in ("target_images", "ref_images", "t5_ids", "clip_ids")}
    with jax.set_mesh(mesh):
      return {**encode(encoder_parts, raw), **inputs}

  # 6. the loop
  logger = metrics_lib.Logger(workdir, settings.total_steps, enabled=is_leader())
  peak = metrics_lib.peak_tflops(jax.devices()[0].device_kind, settings.peak_tflops_per_device)
  grid, ref_grid = settings.resolution // settings.token_pixels, settings.ref_resolution // settings.token_pixels
  losses_by_step: dict[int, float] = {}
  status = "done"
  step = start_step
  sample_batch = None
  pending = None  # (step, metrics) of the last dispatched step: checked one step late, so the host
  window_start, window_steps = time.perf_counter(), 0  # prepares the next batch while the device works

  def finish(pending_step, metrics, num_refs_of_step):
    nonlocal window_start, window_steps
    metrics = jax.device_get(metrics)
    if not bool(metrics["finite"]):
      # Saves are asynchronous: let the last good one commit before the error ends the process
      # (an uncaught exception would otherwise leave it as an unreadable *.orbax-checkpoint-tmp).
      checkpointer.close()  # the last good one committed, and exported (or CheckpointError)
      last_good = checkpointer.last_committed()
      logger.close()  # flush the logs up to the bad step
      where = (f"non-finite loss, gradient or update at step {pending_step} (loss {metrics['loss']}, grad norm "
               f"{metrics['grad_norm']}): stopped; ")
      if start_step and pending_step == start_step + 1:  # the first step on restored weights
        where += (f"it is the first step after resuming from checkpoint step {start_step} in "
                  f"{checkpointer.directory}, which is possibly corrupt (move checkpoints/{start_step} aside "
                  "and rerun to resume from an older step); if not, ")
      raise FloatingPointError(
          where + (f"the last good checkpoint (step {last_good}) in {checkpointer.directory} is intact"
                   if last_good is not None else f"no checkpoint was written to {checkpointer.directory}")
          + " (lower the learning rate, or check the data).")
    losses_by_step[pending_step] = float(metrics["loss"])
    window_steps += 1
    if on_step is not None:
      on_step(pending_step, metrics)
    if pending_step % settings.log_every == 0 or pending_step == settings.total_steps:
      step_time = (time.perf_counter() - window_start) / window_steps
      flops = metrics_lib.train_step_flops(
          cfg, metrics_lib.StepShape(settings.batch_size, settings.text_len, grid * grid, num_refs_of_step,
                                     ref_grid * ref_grid), settings.lora_rank if lora is not None else 0,
          "base" in trainable)
      tflops = flops / step_time / jax.device_count() / 1e12
      values = {k: v for k, v in metrics.items() if k != "finite"}
      values.update(step_time_s=step_time, examples_per_s=settings.batch_size / step_time,
                    tflops_per_device=tflops, num_refs=num_refs_of_step)
      if peak:
        values["mfu"] = tflops / peak
      logger.scalars(pending_step, values)
      logger.console(pending_step, values, step_time)
      window_start, window_steps = time.perf_counter(), 0

  with checkpoint_lib.PreemptionFlag() as preempted, checkpointer.stopping_cleanly():
    while step < settings.total_steps:
      host_batch = next(iterator)
      r = host_batch["refs" if "refs" in host_batch else "ref_means"].shape[1]  # images, or cached features
      state, metrics = compiled[r](state, base, device_batch(host_batch))
      step += 1
      if pending is not None:
        finish(*pending)
      pending = (step, metrics, r)
      stop = preempted.reached(step)  # the same answer on every process, at the same step
      if step % settings.checkpoint_every == 0 or step == settings.total_steps or stop:
        finish(*pending)
        pending = None
        checkpointer.save(step, state, iterator.get_state(), cfg)
      checkpointer.poll()  # a failed save stops the run here; committed ones get checksums and exports
      if settings.sample_every and step % settings.sample_every == 0 and step < settings.total_steps:
        with jax.set_mesh(mesh):  # the sampler is traced here
          if sample_batch is None:
            sample_batch = evaluation_batches(settings, encoders, mesh)[:1]
          if sample_batch:
            current = state["trainable"]
            write_samples(os.path.join(workdir, "samples", f"step_{step}.png"),
                          current.get("base", base), current.get("lora"), cfg, encoders, sample_batch[0],
                          settings, logger, step)
      if stop:
        status = "preempted"
        break
    if pending is not None:
      finish(*pending)
    checkpointer.close()
  if status == "preempted":
    say(f"preempted (SIGTERM): step {step} committed to {checkpointer.directory}; exiting")

  # 7. evaluation
  table = None
  if status == "done" and settings.eval_examples > 0:
    with jax.set_mesh(mesh):  # traced here, like the step
      table = final_evaluation(settings, workdir, state["trainable"].get("base", base),
                               state["trainable"].get("lora"), cfg, encoders, logger, step, mesh)
  logger.close()
  return {"status": status, "step": step, "losses": losses_by_step, "eval": table}
