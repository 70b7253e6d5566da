"""Trains MOSAIC: `python launch/train.py --config configs/flux_ms.py[:variant] --workdir DIR`.

  python launch/train.py --config configs/flux_ms.py:demo --workdir /tmp/mosaic_demo
  python launch/train.py --config configs/flux_ms.py --workdir gs://bucket/run \\
      --config.checkpoint=/ckpt/FLUX.1-dev --config.dataset.data_dir=/data/tfds

Rerunning with the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/flux_ms.py[:variant]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, logs, LoRA exports and samples go here")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  # Several processes (a TPU pod slice, a multi-node GPU job): the environment tells jax how many.
  if any(os.environ.get(v) for v in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS")) or \
      int(os.environ.get("JAX_PROCESS_COUNT", "1")) > 1:
    jax.distributed.initialize()
  from mosaic_jax.train import train_and_evaluate  # after initialize: it touches the devices
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
