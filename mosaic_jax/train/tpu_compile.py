"""Compile for a Cloud TPU slice on a machine without one: the slice's devices, and what the compiler says.

With `libtpu` installed (`pip install "jax[tpu]"`), `jax.experimental.topologies.get_topology_desc`
gives compile-only devices of a named TPU topology, so the real TPU compiler lowers and compiles a
step on a CPU machine: memory per chip, FLOPs and the compiler's time estimate, before any TPU time
is spent (benchmarks/train_memory.py --topology, tests/test_tpu_compile.py). Nothing runs on them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any


@dataclasses.dataclass(frozen=True)
class Slice:
  """A Cloud TPU slice as get_topology_desc names it. `chips`: devices JAX sees (v5p and v4 pair their
  two TensorCores per chip, "megacore", so v5p-8 is 4 chips); `hbm_gib`: HBM per chip; `hbm_gbps`: its
  bandwidth in GB/s (Cloud TPU's published figures), for a roofline when the compiler's estimate fails."""
  topology: str
  chip_config: str
  chips_per_host: tuple[int, int, int]
  chips: int
  hbm_gib: float
  hbm_gbps: float


# The accelerator type (what `gcloud compute tpus` calls the slice) -> its topology. The chip counts
# and host bounds are Cloud TPU's published slice shapes (v5e/v6e hosts hold 2x2 chips, except the
# single-host 8-chip v5e-8 / v6e-8 machine types; v5p hosts hold 2x2x1 chips).
SLICES = {
    "v5e-1": Slice("v5e:1x1", "default", (1, 1, 1), 1, 16, 819),
    "v5e-4": Slice("v5e:2x2", "default", (2, 2, 1), 4, 16, 819),
    "v5e-8": Slice("v5e:2x4", "default", (2, 4, 1), 8, 16, 819),
    "v5e-16": Slice("v5e:4x4", "default", (2, 2, 1), 16, 16, 819),
    "v5p-8": Slice("v5:2x2x1", "megacore", (2, 2, 1), 4, 95, 2765),
    "v5p-16": Slice("v5:2x2x2", "megacore", (2, 2, 1), 8, 95, 2765),
    "v6e-1": Slice("v6e:1x1", "default", (1, 1, 1), 1, 32, 1640),
    "v6e-4": Slice("v6e:2x2", "default", (2, 2, 1), 4, 32, 1640),
    "v6e-8": Slice("v6e:2x4", "default", (2, 4, 1), 8, 32, 1640),
}


def libtpu_missing() -> str | None:
  """Why TPU topologies cannot be compiled for here, or None when they can."""
  if importlib.util.find_spec("libtpu") is None:
    return "libtpu is not installed (pip install 'jax[tpu]' matching the installed jax)"
  return None


def slice_devices(name: str) -> list[Any]:
  """The compile-only devices of slice `name` (a key of SLICES)."""
  if name not in SLICES:
    raise ValueError(f"unknown TPU slice {name!r}; expected one of {sorted(SLICES)}.")
  missing = libtpu_missing()
  if missing:
    raise RuntimeError(f"cannot compile for {name}: {missing}.")
  spec = SLICES[name]
  # libtpu otherwise asks the GCE metadata server who it is (minutes of retries off Cloud), and takes a
  # lockfile that a second process on the machine (a parallel test, a benchmark) would be refused.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", name)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  return list(topologies.get_topology_desc(
      platform="tpu", topology_name=spec.topology, chip_config_name=spec.chip_config,
      chips_per_host_bounds=spec.chips_per_host, num_slices=1).devices)


@dataclasses.dataclass(frozen=True)
class CompileReport:
  """Per chip, as the compiler reports it. `flops`, `bytes_accessed` (HBM traffic of the compiled ops:
  their operands and results) and `optimal_seconds` count a `lax.scan` body once (not once per
  iteration): for a scanned model they are not the step's (see train_memory.py)."""
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  flops: float
  bytes_accessed: float
  optimal_seconds: float

  @property
  def total_bytes(self) -> int:
    """What the step holds at its peak: arguments, outputs not written over donated inputs, temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def report(compiled) -> CompileReport:
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list of one dict in older jax
  cost = cost or {}
  return CompileReport(memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.alias_size_in_bytes,
                       memory.temp_size_in_bytes, float(cost.get("flops", 0.0)),
                       float(cost.get("bytes accessed", 0.0)), float(cost.get("optimal_seconds", 0.0)))
