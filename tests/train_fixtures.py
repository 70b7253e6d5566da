"""The tiny training config the trainer tests share (as a ConfigDict and as the command-line flags that
make the same config through launch/train.py), and a reader of the scalars the trainer logs."""

from __future__ import annotations

import glob
import os
import sys

import pytest

from mosaic_jax.configs import flux_ms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """The runs of a test module compile one identical step: share it through the persistent cache
  (import this fixture into the module; its directory is also the JAX_COMPILATION_CACHE_DIR that
  subprocess runs may be given)."""
  import jax
  previous = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  directory = str(tmp_path_factory.mktemp("jax_cache"))
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  yield directory
  jax.config.update("jax_compilation_cache_dir", previous[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])

# The demo shrunk to 64 px, 2 references, patch 8 (16 px per token, 4x4 tokens: the smallest sequence),
# one block of each kind, every loss term in play by step 3.
TINY = {
    "dataset.name": "semalign_ms/synthetic_test64", "dataset.build.image_size": 64,
    "dataset.build.min_refs": 2, "dataset.build.max_refs": 2, "dataset.build.num_train": 16,
    "dataset.build.num_validation": 4, "dataset.max_pairs": 16, "dataset.read_threads": 1,
    "resolution": 64, "ref_resolution": 64, "pixel_patch_size": 8, "batch_size": 2, "lora_rank": 4,
    "model_overrides.in_channels": 768, "model_overrides.num_layers": 1,
    "model_overrides.num_single_layers": 1, "model_overrides.num_attention_heads": 2,
    "total_steps": 4, "checkpoint_every": 2, "log_every": 1, "sample_every": 0, "eval_examples": 0,
    "losses.mdl_ramp_start": 1, "losses.mdl_ramp_end": 3,
}


def tiny_config(data_dir, **changes):
  """The TINY demo config reading (or building) its dataset under data_dir; `changes` use dotted keys
  ("optimizer.learning_rate")."""
  config = flux_ms.get_config("demo")
  for key, value in {"dataset.data_dir": data_dir, **TINY, **changes}.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def train_command(data_dir, workdir, **changes) -> list[str]:
  """launch/train.py's command line for tiny_config(data_dir, **changes)."""
  flags = [f"--config.{key}={value}" for key, value in {"dataset.data_dir": data_dir, **TINY, **changes}.items()]
  return [sys.executable, os.path.join(ROOT, "launch", "train.py"),
          "--config", os.path.join(ROOT, "configs", "flux_ms.py") + ":demo", "--workdir", str(workdir), *flags]


def tensorboard_scalars(folder: str) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value)] of every tensorboardX event file in folder (TFRecord framing: length, crc,
  Event proto, crc), in file order."""
  from tensorboardX.proto import event_pb2
  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
    data = open(path, "rb").read()
    offset = 0
    while offset < len(data):
      length = int.from_bytes(data[offset:offset + 8], "little")
      if offset + 12 + length + 4 > len(data):  # a record cut short by a killed writer
        break
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        if value.HasField("simple_value"):
          out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out
