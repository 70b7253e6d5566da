"""`remat_policy="auto"`: the remat policy chosen for the run at hand, from the compiler's own figures.

The candidates are model/remat.py's CANDIDATES, in its fixed order of preference: each recomputes more
than the one before and needs less device memory. Each is compiled ahead of time for the run's own
step (its mesh, batch, sharding and largest reference count, the most memory), and it fits when the
compiler's memory analysis (arguments, outputs not donated, temporaries) leaves HEADROOM of the
device's memory free. By platform:

  TPU  the time estimate is the executable's own cost analysis: libtpu's optimal_seconds, or where that
       is missing or negative (v5e, v6e in libtpu 0.0.42) the roofline max(FLOPs / peak, bytes / HBM
       bandwidth) with the chip's figures (metrics.PEAK_TFLOPS, tpu_compile.CHIPS). It counts a scanned
       block's body once, not once per block: a figure to compare policies of one step with, not the
       step's time (benchmarks/train_memory.py prints that).
  GPU  no time estimate; the memory analysis and the device's memory limit decide what fits.
  CPU  nothing is compiled: the first candidate (keep_all), since the host gives neither a memory
       limit to fit nor a time estimate.

The search stops at the first candidate that fits (`exhaustive=False`, what the trainer does): at
FLUX.1-dev scale each candidate is a full XLA compile of the step (4 to 15 minutes on a loaded
2-core machine for a v5p-8, benchmarks/train_memory.py), and along the order the estimated step time
rises wherever two candidates both fit (v5p-8 at 1 and 6 references: keep_all, recompute_mlp, full;
docs/performance.md), so compiling the rest would pay minutes to confirm the first. `exhaustive=True` compiles every candidate and keeps the fastest that fits
by the estimate (the order breaks ties and stands in where there is no estimate). The winner's
executable is the trainer's: it is not compiled again.

The choice is recorded in the workdir's config_history.jsonl with what it was made for (the devices
and a digest of the settings the step reads), and a restart with "auto" whose devices and step settings
are the same takes it from there without compiling a candidate; an explicit remat_policy on a resume
wins, as any resume-safe change does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any, Callable, NamedTuple

import jax

from mosaic_jax.model import remat
from mosaic_jax.parallel.distributed import is_leader, say
from mosaic_jax.settings import REMAT_AUTO as AUTO
from mosaic_jax.settings import ConfigError, Settings
from mosaic_jax.train import metrics, tpu_compile
from mosaic_jax.workdir import config as workdir_config

# Device memory left free by a choice: the memory analysis counts XLA's buffers, not the runtime's own
# allocations, fragmentation or what another program on the device holds.
HEADROOM = 0.10


class Candidate(NamedTuple):
  """One compiled candidate: its memory per device (None: the compiler refused it for memory), whether
  it fits, its estimated seconds (None: no estimate on this backend) and the estimate's source."""
  policy: str
  total_bytes: int | None
  fits: bool
  seconds: float | None
  source: str


def wanted(settings: Settings) -> bool:
  """Whether the run asks for the choice: remat_policy "auto" and no model override of the policy."""
  return settings.remat_policy == AUTO and "remat_policy" not in dict(settings.model_overrides)


def device_memory_bytes(device) -> int | None:
  """What the device holds: the runtime's limit where it reports one, else a known TPU chip's HBM."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  # compile-only devices and some backends report nothing
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  known = tpu_compile.chip(device.device_kind)
  return int(known.hbm_gib * 2 ** 30) if known else None


def estimated_seconds(report: tpu_compile.CompileReport, device_kind: str) -> tuple[float | None, str]:
  """(seconds, where the figure comes from) of a TPU executable's cost analysis (module docstring)."""
  if report.optimal_seconds > 0:
    return report.optimal_seconds, "libtpu's estimate"
  peak, known = metrics.peak_tflops(device_kind), tpu_compile.chip(device_kind)
  if peak and known and (report.flops > 0 or report.bytes_accessed > 0):
    seconds = max(report.flops / (peak * 1e12), report.bytes_accessed / (known.hbm_gbps * 1e9))
    return seconds, "roofline of the cost analysis"
  return None, "no estimate"


def choose(compile_policy: Callable[[str], Any], device, *, candidates: tuple[str, ...] = remat.CANDIDATES,
           capacity_bytes: int | None = None, headroom: float = HEADROOM,
           exhaustive: bool = False) -> tuple[str, Any, list[Candidate]]:
  """(the chosen policy, its compiled executable or None when nothing was compiled, every candidate
  compiled). compile_policy(policy) compiles the run's step under `policy` (a JaxRuntimeError saying
  RESOURCE_EXHAUSTED: refused for memory); `device` one of the run's devices; capacity_bytes: its memory
  (default device_memory_bytes). Logs one line per candidate and the choice; raises ConfigError when none
  fits."""
  platform = device.platform
  if platform == "cpu":
    say(f"remat_policy auto: {candidates[0]}, the first of {', '.join(candidates)} (on the CPU nothing is "
        "compiled to choose: no memory limit to fit, no time estimate)")
    return candidates[0], None, []
  capacity = capacity_bytes if capacity_bytes is not None else device_memory_bytes(device)
  usable = None if capacity is None else (1 - headroom) * capacity
  room = ("no memory limit known" if usable is None else
          f"{usable / 2 ** 30:.1f} GiB usable per device ({capacity / 2 ** 30:.1f} less {headroom:.0%} headroom)")
  done: list[Candidate] = []
  executables = {}
  spent = {}  # policy -> seconds compiling it
  for policy in candidates:
    start = time.perf_counter()
    try:
      executable = compile_policy(policy)
    except jax.errors.JaxRuntimeError as error:
      if "RESOURCE_EXHAUSTED" not in str(error):
        raise
      spent[policy] = time.perf_counter() - start
      done.append(Candidate(policy, None, False, None, "refused by the compiler"))
      say(f"remat_policy auto: {policy}: does not fit, the compiler says (after {spent[policy]:.1f} s): "
          f"{str(error).splitlines()[0][:160]}")
      continue
    spent[policy] = time.perf_counter() - start
    report = tpu_compile.report(executable)
    fits = usable is None or report.total_bytes <= usable
    seconds, source = estimated_seconds(report, device.device_kind) if platform == "tpu" else (None, "no estimate")
    done.append(Candidate(policy, report.total_bytes, fits, seconds, source))
    if fits:  # one that does not fit is dropped at once (a loaded executable holds device memory)
      executables[policy] = executable
    time_text = f"estimated {seconds:.3f} s ({source})" if seconds is not None else f"{source} on {platform}"
    say(f"remat_policy auto: {policy}: {report.total_bytes / 2 ** 30:.2f} GiB per device, "
        f"{'fits' if fits else 'does NOT fit'} ({room}); {time_text}; compiled in {spent[policy]:.1f} s")
    if fits and not exhaustive:
      break
  fitting = [c for c in done if c.fits]
  if not fitting:
    raise ConfigError(f"remat_policy auto: no remat policy fits ({room}): "
                      + "; ".join(f"{c.policy} {_gib(c.total_bytes)}" for c in done)
                      + ". Use more devices (config.mesh), a smaller batch_size or fewer references.")
  if exhaustive and all(c.seconds is not None for c in fitting):
    best, how = min(fitting, key=lambda c: c.seconds), "the fastest that fits by the estimate"
  else:
    best, how = fitting[0], "the first in the order that fits"
  skipped = [p for p in candidates if p not in {c.policy for c in done}]
  others = sum(seconds for policy, seconds in spent.items() if policy != best.policy)
  say(f"remat_policy auto: chose {best.policy}, {how}" + (f" (not compiled: {', '.join(skipped)})" if skipped else "")
      + f"; {others:.1f} s spent compiling the others")
  return best.policy, executables[best.policy], done


def _gib(total_bytes: int | None) -> str:
  return "refused by the compiler" if total_bytes is None else f"{total_bytes / 2 ** 30:.2f} GiB"


# ---- the choice in the workdir's record ------------------------------------------------------------

def made_for(settings: Settings) -> dict:
  """What a choice depends on: the devices, and the settings the step reads (a digest), but for the
  policy itself and total_steps (the learning-rate schedule's length: a constant in the step, no memory
  or time; a resume that trains longer keeps the choice)."""
  step = dataclasses.replace(settings, remat_policy=AUTO, total_steps=1).for_step().to_config()
  digest = hashlib.sha256(json.dumps(step, sort_keys=True).encode()).hexdigest()[:16]
  devices = jax.devices()
  return {"devices": f"{len(devices)} x {devices[0].device_kind}", "step_settings": digest}


def record(settings: Settings, workdir: str, chosen: str, candidates: list[Candidate]) -> Settings:
  """The settings with the chosen policy, after writing the choice to the workdir's record (process 0
  writes; workdir/config.py record_choice)."""
  chose = dataclasses.replace(settings, remat_policy=chosen)
  if is_leader():
    details = {"policy": chosen, "for": made_for(settings), "candidates": [
        {"policy": c.policy, "gib": None if c.total_bytes is None else round(c.total_bytes / 2 ** 30, 3),
         "fits": c.fits, "seconds": c.seconds, "source": c.source} for c in candidates]}
    workdir_config.record_choice(workdir, "remat_policy", AUTO, chose, details)
  return chose


def reuse(settings: Settings, workdir: str) -> Settings:
  """The settings with the policy the workdir's record holds, when they ask for "auto" and the record's
  choice was made for the same devices and step settings and is still in effect; else as they are."""
  if not wanted(settings):
    return settings
  recorded = workdir_config.recorded_choice(workdir, "remat_policy")
  if recorded is None or recorded.get("for") != made_for(settings):
    return settings
  say(f"remat_policy auto: {recorded['policy']}, as chosen before for these devices and step settings "
      "(the workdir's config_history.jsonl); no candidate compiled")
  return dataclasses.replace(settings, remat_policy=recorded["policy"])
