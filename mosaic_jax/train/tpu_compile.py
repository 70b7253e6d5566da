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
class Chip:
  """A TPU chip's memory: `hbm_gib` of HBM at `hbm_gbps` GB/s (Cloud TPU's published figures): what fits,
  and the bandwidth of a roofline where the compiler's time estimate fails. Its peak FLOP/s is
  train/metrics.py's PEAK_TFLOPS."""
  hbm_gib: float
  hbm_gbps: float


# jax's device_kind -> the chip. v5p reports "TPU v5", v5e "TPU v5 lite", v6e "TPU v6 lite".
CHIPS = {"TPU v5 lite": Chip(16, 819), "TPU v5": Chip(95, 2765), "TPU v6 lite": Chip(32, 1640), "TPU v4": Chip(32, 1200)}


def chip(device_kind: str) -> Chip | None:
  """The chip of a jax device_kind, or None for one the table does not know (or not a TPU)."""
  return CHIPS.get(device_kind)


@dataclasses.dataclass(frozen=True)
class Slice:
  """A Cloud TPU slice as get_topology_desc names it. `chips`: devices JAX sees (v5p and v4 pair their
  two TensorCores per chip, "megacore", so v5p-8 is 4 chips); `kind`: their device_kind (CHIPS)."""
  topology: str
  chip_config: str
  chips_per_host: tuple[int, int, int]
  chips: int
  kind: str

  @property
  def hbm_gib(self) -> float:
    return CHIPS[self.kind].hbm_gib

  @property
  def hbm_gbps(self) -> float:
    return CHIPS[self.kind].hbm_gbps


# The accelerator type (what `gcloud compute tpus` calls the slice) -> its topology. The chip counts
# and host bounds are Cloud TPU's published slice shapes (v5e/v6e hosts hold 2x2 chips, except the
# single-host 8-chip v5e-8 / v6e-8 machine types; v5p hosts hold 2x2x1 chips).
SLICES = {
    "v5e-1": Slice("v5e:1x1", "default", (1, 1, 1), 1, "TPU v5 lite"),
    "v5e-4": Slice("v5e:2x2", "default", (2, 2, 1), 4, "TPU v5 lite"),
    "v5e-8": Slice("v5e:2x4", "default", (2, 4, 1), 8, "TPU v5 lite"),
    "v5e-16": Slice("v5e:4x4", "default", (2, 2, 1), 16, "TPU v5 lite"),
    "v5p-8": Slice("v5:2x2x1", "megacore", (2, 2, 1), 4, "TPU v5"),
    "v5p-16": Slice("v5:2x2x2", "megacore", (2, 2, 1), 8, "TPU v5"),
    "v6e-1": Slice("v6e:1x1", "default", (1, 1, 1), 1, "TPU v6 lite"),
    "v6e-4": Slice("v6e:2x2", "default", (2, 2, 1), 4, "TPU v6 lite"),
    "v6e-8": Slice("v6e:2x4", "default", (2, 4, 1), 8, "TPU v6 lite"),
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
