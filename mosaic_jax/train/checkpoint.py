"""Checkpoints: orbax CheckpointManager (async, keep the last K) holding the train state and the input
pipeline's state together; preemption agreed on by every process; diffusers-format LoRA exports
written from committed checkpoints, off the training loop.

Layout of a workdir (any etils.epath path: local, or gs://bucket/run):
  checkpoints/<step>/state      train state (step, trainable, opt_state, ema), sharded arrays
  checkpoints/<step>/data       input iterator state (JSON)
  lora/<step>/lora.safetensors      the trained LoRA, diffusers format (interop.save_lora)
  lora/<step>/lora_ema.safetensors  its EMA

Why exports are read back from the checkpoint: at scale the LoRA is split over every host (fsdp), so
no process can fetch it whole from the devices without a gather on every host, and two rank-512 LoRAs
are ~15 GB of synchronous device-to-host copies that would stall the loop the asynchronous save just
freed. Once orbax has committed step S, process 0 alone reads the LoRA and its EMA from the step's
files in a background thread (no collective: the other processes never wait for it) and writes the
exports. An export therefore always has a committed checkpoint behind it.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mosaic_jax.interop import save_lora

LORA_FILES = {"lora.safetensors": ("trainable", "lora"), "lora_ema.safetensors": ("ema", "lora")}


class Checkpointer:
  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    workdir = epath.Path(workdir)
    self.directory = workdir / "checkpoints"
    self.lora_directory = workdir / "lora"
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                             create=True))
    self._pending_exports: list[tuple[int, Any]] = []  # (step, FluxConfig) saved, not yet exported
    self._export_threads: list[threading.Thread] = []
    self._export_errors: list[BaseException] = []

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, step: int, abstract_state):
    """(state with the shardings of `abstract_state`, input iterator state) at `step`."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def save(self, step: int, state, data_state: dict, cfg=None, force: bool = False) -> None:
    """Starts an asynchronous save (every process); the LoRA exports follow once it is committed."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)
    if cfg is not None and "lora" in state["trainable"]:
      self._pending_exports.append((step, cfg))

  # ---- exports ----

  def export_committed(self) -> None:
    """Starts the exports of every saved step whose checkpoint orbax has committed (cheap: call it
    every step). Only process 0 writes; an export failure is raised here, on the next call."""
    self._raise_export_errors()
    if not self._pending_exports or self.manager.is_saving_in_progress():
      return
    committed = set(self.manager.all_steps())
    for step, cfg in self._pending_exports:
      if step in committed and jax.process_index() == 0:
        thread = threading.Thread(target=self._export, args=(step, cfg), name=f"lora-export-{step}",
                                  daemon=True)
        thread.start()
        self._export_threads.append(thread)
    self._pending_exports.clear()

  def _export(self, step: int, cfg) -> None:
    try:
      trees = read_lora_trees(self.directory / str(step) / "state")
      folder = self.lora_directory / str(step)
      folder.mkdir(parents=True, exist_ok=True)
      for name, path in LORA_FILES.items():
        save_lora(str(folder / name), trees[path], cfg)
      self._prune_lora_exports(keep=set(self.manager.all_steps()) | {step})
    except BaseException as error:  # pylint: disable=broad-except  # raised on the loop's thread
      self._export_errors.append(error)

  def _raise_export_errors(self) -> None:
    if self._export_errors:
      error = self._export_errors.pop(0)
      raise RuntimeError(f"LoRA export into {self.lora_directory} failed: {error}") from error

  def _prune_lora_exports(self, keep: set[int]) -> None:
    if not self.lora_directory.exists():
      return
    for entry in self.lora_directory.iterdir():
      if entry.name.isdigit() and int(entry.name) not in keep:
        entry.rmtree(missing_ok=True)

  def wait(self) -> None:
    """Every started save committed and its exports written."""
    self.manager.wait_until_finished()
    self.export_committed()
    for thread in self._export_threads:
      thread.join()
    self._export_threads.clear()
    self._raise_export_errors()

  def close(self) -> None:
    self.wait()
    self.manager.close()


def read_lora_trees(state_directory: epath.Path) -> dict[tuple[str, str], dict]:
  """{(group, "lora"): the LoRA pytree as numpy} for the groups of LORA_FILES, from a committed step."""
  return read_state_subtrees(state_directory, list(LORA_FILES.values()))


def read_state_subtrees(state_directory: epath.Path, paths: list[tuple[str, str]]) -> dict[tuple[str, str], Any]:
  """{(group, name): that subtree of a committed checkpoint's state item, as numpy}, read by this process
  alone (no barrier with the others; whole arrays on the host, whichever hosts wrote their shards)."""
  options = ocp.options.MultiprocessingOptions(primary_host=None, active_processes={jax.process_index()})
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=options),
                                  multiprocessing_options=options)
  metadata = checkpointer.metadata(state_directory)
  tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata.tree
  wanted = {}
  for group, name in paths:
    wanted.setdefault(group, {})[name] = tree[group][name]
  restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  restored = checkpointer.restore(state_directory, args=ocp.args.PyTreeRestore(
      item=wanted, restore_args=restore_args, partial_restore=True))
  return {(group, name): restored[group][name] for group, name in paths}


class PreemptionFlag:
  """Whether to save and stop now, agreed on by every process.

  One process: set by SIGTERM (what schedulers send before preemption). Several: jax's preemption
  sync point (the coordination service catches SIGTERM on any process and names one step at which
  every process sees True), so all hosts save the same step; a Python handler there would replace
  the service's own."""

  def __init__(self):
    self.event = threading.Event()
    self._previous = None
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.event.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self, step: int) -> bool:
    """Call once per step, with the same step on every process."""
    if self._multi:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        self.event.set()
    return self.event.is_set()

  def is_set(self) -> bool:
    return self.event.is_set()
