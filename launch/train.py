"""Trains MOSAIC: `python launch/train.py --config configs/flux_ms.py[:variant] --workdir DIR`.

  python launch/train.py --config configs/flux_ms.py:demo --workdir /tmp/mosaic_demo
  python launch/train.py --config configs/flux_ms.py --workdir gs://bucket/run \\
      --config.checkpoint=/ckpt/FLUX.1-dev --config.dataset.data_dir=/data/tfds

Rerunning with the same workdir resumes from its latest checkpoint.

Several processes (a TPU pod slice, a multi-node GPU job): run the same command on every host. The job
is joined whenever jax's own cluster detection finds one (SLURM, Open MPI, Cloud TPU VMs, GKE TPU
jobs, or JAX_COORDINATOR_ADDRESS with a detected process count); `--distributed` insists on it. If one
process fails, every process exits non-zero within about MOSAIC_HEARTBEAT_TIMEOUT_S (30) seconds.

Exit status: 0 done; 2 a user error (one line naming the field, file or value: a bad config, a config
that cannot resume the workdir, a checkpoint that failed to save), 1 an internal error (a traceback);
143 (128 + SIGTERM) preempted after the checkpoint was committed, so that a scheduler restarts the job.
`--verbose` (or MOSAIC_VERBOSE=1) shows tracebacks and the INFO lines of orbax, absl and TFDS.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from mosaic_jax import cli
from mosaic_jax.parallel import distributed
from mosaic_jax.settings import known_fields, settings_from_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/flux_ms.py[:variant]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, logs, LoRA exports and samples go here")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "join a multi-process job even if jax detects none")
flags.mark_flags_as_required(["config", "workdir"])

PREEMPTED_EXIT_STATUS = 143


def main(argv):
  del argv
  settings = settings_from_config(_CONFIG.value)  # the config checked: the one conversion, here
  distributed.initialize(force=_DISTRIBUTED.value)  # before anything touches the devices
  from mosaic_jax.train import train_and_evaluate
  with distributed.exit_on_failure():
    result = train_and_evaluate(settings, _WORKDIR.value)
  if result["status"] == "preempted":
    sys.exit(PREEMPTED_EXIT_STATUS)


if __name__ == "__main__":
  cli.run_absl(main, known_fields)
