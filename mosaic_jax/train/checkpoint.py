"""Checkpoints: orbax CheckpointManager (async, keep the last K) holding the train state and the input
pipeline's state together; a SIGTERM flag for preemption; diffusers-format LoRA exports per checkpoint.

Layout of a workdir:
  checkpoints/<step>/state      train state (step, trainable, opt_state, ema), sharded arrays
  checkpoints/<step>/data       input iterator state (JSON)
  lora/<step>/lora.safetensors      the trained LoRA, diffusers format (interop.save_lora)
  lora/<step>/lora_ema.safetensors  its EMA
"""

from __future__ import annotations

import os
import shutil
import signal
import threading

import jax
import orbax.checkpoint as ocp

from mosaic_jax.interop import save_lora


class Checkpointer:
  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.lora_directory = os.path.join(os.path.abspath(workdir), "lora")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                             create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, step: int, abstract_state, data_state_template=None):
    """(state with the shardings of `abstract_state`, input iterator state) at `step`."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def save(self, step: int, state, data_state: dict, cfg=None, force: bool = False) -> None:
    """Starts an async save; exports the LoRA (and its EMA) as diffusers files when there is one."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)
    if cfg is not None and "lora" in state["trainable"] and jax.process_index() == 0:
      folder = os.path.join(self.lora_directory, str(step))
      os.makedirs(folder, exist_ok=True)
      save_lora(os.path.join(folder, "lora.safetensors"), state["trainable"]["lora"], cfg)
      save_lora(os.path.join(folder, "lora_ema.safetensors"), state["ema"]["lora"], cfg)
      self._prune_lora_exports(keep=set(self.manager.all_steps()) | {step})

  def _prune_lora_exports(self, keep: set[int]) -> None:
    for name in os.listdir(self.lora_directory):
      if name.isdigit() and int(name) not in keep:
        shutil.rmtree(os.path.join(self.lora_directory, name), ignore_errors=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class PreemptionFlag:
  """Set by SIGTERM (what schedulers send before preemption); the loop saves and exits when set."""

  def __init__(self):
    self.event = threading.Event()
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.event.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def is_set(self) -> bool:
    return self.event.is_set()
