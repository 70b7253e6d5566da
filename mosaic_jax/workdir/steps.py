"""A workdir's committed steps, read: which steps are there, and any part of a step's train state as numpy.

  checkpoints/<step>/state      the train state (step, trainable, opt_state, ema), written by orbax
  checkpoints/<step>/data       the input iterator's state

Reading is this process's alone (no barrier with the others, whole arrays on the host whichever hosts
wrote their shards), so that a workdir can be read back on any machine (the sampler) and by a
background thread while training goes on (the trainer's LoRA exports, train/checkpoint.py). Writing
and verifying steps is the trainer's (train/checkpoint.py).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

ITEMS = ("state", "data")


def committed_steps(workdir: epath.Path) -> list[int]:
  """The steps of the workdir whose state orbax committed, oldest first."""
  folder = epath.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "state").exists()) \
      if folder.exists() else []


def state_directory(workdir: epath.Path, step: int) -> epath.Path:
  return epath.Path(workdir) / "checkpoints" / str(step) / "state"


def read_state_subtrees(state_dir: epath.Path, paths: list[tuple[str, str]]) -> dict[tuple[str, str], Any]:
  """{(group, name): that subtree of a committed checkpoint's state item, as numpy}, e.g.
  ("ema", "lora")."""
  options = ocp.options.MultiprocessingOptions(primary_host=None, active_processes={jax.process_index()})
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=options),
                                  multiprocessing_options=options)
  metadata = checkpointer.metadata(state_dir)
  tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata.tree
  wanted = {}
  for group, name in paths:
    wanted.setdefault(group, {})[name] = tree[group][name]
  restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
      item=wanted, restore_args=restore_args, partial_restore=True))
  return {(group, name): restored[group][name] for group, name in paths}
