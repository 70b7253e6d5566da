"""Where the time of our train step goes: per-op times of the compiled step on XLA:CPU, by category.

Builds the step official_compare.py times (common.comparison_step: the trainer's own step on the
comparison's shapes), traces a few steps with jax.profiler (XLA:CPU records one event per executed
thunk: a fusion, a dot, a copy, a loop), and maps each thunk to the optimized HLO (hlo_costs.py): its
FLOPs (dots counted inside fusions, loop bodies multiplied by their trip counts), the source line that
made it (the HLO's stack frames) and whether it runs in the forward pass, the backward pass or as a
recomputation of the forward pass (jax.checkpoint's "rematted_computation"). Prints:

  - the step time by category (projections and MLPs, LoRA, attention, attention statistics,
    elementwise work, layout work, losses, optimizer, EMA, NaN guard) and phase;
  - every matmul of the step timed again as a standalone kernel, on XLA:CPU (jax.lax.dot_general) and on
    torch (torch.einsum, the official step's kernels), same shapes, one thread: per category, the step's
    time against the kernels' own time. What the step spends beyond the standalone XLA dots is overhead
    of ours (fusions, layout, the surrounding program); XLA dot time against torch's is kernel speed;
    `--kernels 0` skips this;
  - the most expensive thunks with their GFLOP/s;
  - compiled FLOPs (XLA's cost analysis, which counts a loop body once, and the HLO count with trip
    counts) against the analytic FLOPs of the step (metrics.train_step_flops): the recomputation factor.

  XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" taskset -c 0 \
    python benchmarks/profile_step.py --steps 3 [--official 2.655]

On a shared machine absolute times move with the load: compare proportions within one run.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import tempfile
import time

from common import COMPARISON_SHAPES, comparison_step  # the step the comparison times
from hlo_costs import Hlo, category, phase  # the optimized HLO read back (shared with train_memory.py)


def exclusive_times(trace_path: str) -> dict[str, list[float]]:
  """Thunk name -> exclusive durations (seconds) of every execution in the trace."""
  with gzip.open(trace_path) as f:
    events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
  out = collections.defaultdict(list)
  by_thread = collections.defaultdict(list)
  for e in events:
    by_thread[e["tid"]].append(e)
  for thread_events in by_thread.values():
    thread_events.sort(key=lambda e: (e["ts"], -e["dur"]))
    stack = []  # [end, event, child time]
    def close(entry):
      out[entry[1]["args"]["hlo_op"]].append((entry[1]["dur"] - entry[2]) * 1e-6)
    for e in thread_events:
      while stack and stack[-1][0] <= e["ts"]:
        close(stack.pop())
      if stack:
        stack[-1][2] += e["dur"]
      stack.append([e["ts"] + e["dur"], e, 0.0])
    while stack:
      close(stack.pop())
  return out


def kernel_seconds(signatures, repeats: int = 7) -> dict[tuple, tuple[float, float]]:
  """Signature -> (seconds of the same matmul as a standalone XLA:CPU dot_general, seconds of it as a
  torch.einsum), medians of `repeats` runs on random float32 operands: the kernels' own speed on these
  shapes, with no surrounding step (this process's thread settings; torch gets one thread)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(1)
  rng = np.random.default_rng(0)
  out = {}
  for sig in sorted(set(signatures)):
    lhs_dims, rhs_dims, lb, rb, lc, rc = sig
    lhs = rng.standard_normal(lhs_dims).astype(np.float32)
    rhs = rng.standard_normal(rhs_dims).astype(np.float32)
    dot = jax.jit(lambda a, b, lc=lc, rc=rc, lb=lb, rb=rb: jax.lax.dot_general(a, b, ((lc, rc), (lb, rb))))
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    lhs_spec = [next(letters) for _ in lhs_dims]
    rhs_spec = [next(letters) for _ in rhs_dims]
    for l, r in zip(lb + lc, rb + rc):
      rhs_spec[r] = lhs_spec[l]
    out_spec = ([lhs_spec[d] for d in lb] + [c for d, c in enumerate(lhs_spec) if d not in lb + lc]
                + [c for d, c in enumerate(rhs_spec) if d not in rb + rc])
    spec = f"{''.join(lhs_spec)},{''.join(rhs_spec)}->{''.join(out_spec)}"
    lhs_j, rhs_j = jax.device_put(lhs), jax.device_put(rhs)
    lhs_t, rhs_t = torch.from_numpy(lhs), torch.from_numpy(rhs)
    times = {"xla": [], "torch": []}
    jax.block_until_ready(dot(lhs_j, rhs_j))
    torch.einsum(spec, lhs_t, rhs_t)
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(dot(lhs_j, rhs_j))
      times["xla"].append(time.perf_counter() - start)
      start = time.perf_counter()
      torch.einsum(spec, lhs_t, rhs_t)
      times["torch"].append(time.perf_counter() - start)
    out[sig] = (float(np.median(times["xla"])), float(np.median(times["torch"])))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=3, help="traced steps (after a warm-up)")
  parser.add_argument("--top", type=int, default=25, help="how many of the most expensive thunks to list")
  parser.add_argument("--remat", default=None, help="override the recipe's remat policy")
  parser.add_argument("--hlo_out", default="", help="also write the optimized HLO here")
  parser.add_argument("--kernels", type=int, default=1,
                      help="1: also time every matmul of the step as a standalone XLA dot and torch einsum")
  parser.add_argument("--category", default="", help="list every thunk whose category starts with this")
  parser.add_argument("--official", type=float, default=0.0,
                      help="the official step's median seconds at one thread on the same work (official_compare.py, "
                           "the pairing of this remat policy): prints the lowest ratio these kernels allow")
  args = parser.parse_args()

  import jax  # pylint: disable=import-outside-toplevel
  from mosaic_jax.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel

  compiled, state, base, batch, _, cfg = comparison_step(args.remat)
  text = compiled.as_text()
  if args.hlo_out:
    with open(args.hlo_out, "w") as f:
      f.write(text)
  hlo = Hlo(text)
  state, metrics = compiled(state, base, batch)
  jax.block_until_ready((state, metrics))
  start = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, base, batch)
  jax.block_until_ready((state, metrics))
  plain_s = (time.perf_counter() - start) / args.steps
  trace_dir = tempfile.mkdtemp(prefix="step_trace_")
  jax.profiler.start_trace(trace_dir)
  start = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, base, batch)
    jax.block_until_ready((state, metrics))
  traced_s = (time.perf_counter() - start) / args.steps
  jax.profiler.stop_trace()
  times = exclusive_times(sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1])

  table = collections.defaultdict(lambda: collections.defaultdict(float))
  flops_by = collections.defaultdict(float)
  kernels_by = collections.defaultdict(lambda: [0.0, 0.0])  # category -> standalone [XLA, torch] seconds
  kernels = kernel_seconds([sig for name in times if name in hlo.by_name for sig in hlo.dots_of(name)]) \
      if args.kernels else {}
  rows = []
  for name, durations in times.items():
    if name not in hlo.by_name:
      continue
    info = hlo.describe(name)
    seconds = sum(durations) / args.steps
    runs = len(durations) / args.steps
    cat = category(hlo, info)
    ph = phase(info["key"]["op_name"])
    table[cat][ph] += seconds
    flops_by[cat] += info["flops"] * runs
    for sig in hlo.dots_of(name) if kernels else []:
      kernels_by[cat][0] += kernels[sig][0] * runs
      kernels_by[cat][1] += kernels[sig][1] * runs
    path, line, function = hlo.source(info["key"]["frame"])
    rows.append((seconds, name, runs, info["flops"] * runs, cat, ph,
                 f"{os.path.basename(path)}:{line} {function}" if path else info["key"]["op_name"][-60:],
                 hlo.by_name[name][1]["shape"].split("{")[0]))
  accounted = sum(sum(p.values()) for p in table.values())

  print(f"step {plain_s:.3f} s untraced, {traced_s:.3f} s traced; thunks account for {accounted:.3f} s "
        f"({cfg.remat_policy} remat, {COMPARISON_SHAPES})")
  print(f"\n{'category':<52} {'fwd ms':>8} {'bwd ms':>8} {'remat ms':>8} {'total ms':>9} {'share':>6} "
        f"{'GFLOP':>7} {'GFLOP/s':>8}")
  for cat, phases in sorted(table.items(), key=lambda kv: -sum(kv[1].values())):
    total = sum(phases.values())
    gflop = flops_by[cat] / 1e9
    print(f"{cat:<52} {phases['forward'] * 1e3:>8.1f} {phases['backward'] * 1e3:>8.1f} "
          f"{phases['recompute'] * 1e3:>8.1f} {total * 1e3:>9.1f} {total / accounted:>6.1%} {gflop:>7.2f} "
          f"{(gflop / total if gflop else 0):>8.1f}")
  if kernels:
    xla_total = sum(k[0] for k in kernels_by.values())
    torch_total = sum(k[1] for k in kernels_by.values())
    print("\nthe same matmuls as standalone kernels (each dot of the step timed alone, same shapes, float32, "
          "one thread; compare within this table):")
    print(f"{'category':<52} {'in step ms':>10} {'XLA dot ms':>10} {'torch ms':>9} {'step/XLA':>8} {'XLA/torch':>9}")
    for cat, (xla_s, torch_s) in sorted(kernels_by.items(), key=lambda kv: -kv[1][0]):
      total = sum(table[cat].values())
      print(f"{cat:<52} {total * 1e3:>10.1f} {xla_s * 1e3:>10.1f} {torch_s * 1e3:>9.1f} {total / xla_s:>8.2f} "
            f"{xla_s / torch_s:>9.2f}")
    print(f"{'all matmuls':<52} {sum(sum(table[c].values()) for c in kernels_by) * 1e3:>10.1f} "
          f"{xla_total * 1e3:>10.1f} {torch_total * 1e3:>9.1f}")
    print(f"the step's thunks {accounted * 1e3:.1f} ms = standalone XLA matmuls {xla_total * 1e3:.1f} ms "
          f"({xla_total / accounted:.0%}) + the rest {(accounted - xla_total) * 1e3:.1f} ms; the same matmuls on "
          f"torch's kernels: {torch_total * 1e3:.1f} ms")
    if args.official:
      # A step doing this work cannot take less than its matmuls alone: the ratio of that time to the
      # official step is the floor any implementation on these kernels meets, whatever else it fuses.
      print(f"against the official step's {args.official:.3f} s: this step {plain_s / args.official:.2f}x; its "
            f"matmuls alone {xla_total / args.official:.2f}x on XLA:CPU's kernels, {torch_total / args.official:.2f}x "
            f"on torch's (the lowest ratio a step doing this work reaches on them); what lies between this step and "
            f"the floor is {(plain_s - xla_total) * 1e3:.0f} ms of non-matmul work")
  print(f"\ntop {args.top} thunks (ms per step):")
  print(f"{'ms':>7} {'runs':>5} {'GFLOP':>6} {'GFLOP/s':>8}  {'thunk':<28} {'phase':<9} {'category':<28} source")
  listed = sorted(rows, reverse=True)[:args.top]
  if args.category:
    listed = [r for r in sorted(rows, reverse=True) if r[4].startswith(args.category)]
  for seconds, name, runs, flops, cat, ph, src, shape in listed:
    print(f"{seconds * 1e3:>7.1f} {runs:>5.0f} {flops / 1e9:>6.2f} {flops / 1e9 / seconds if flops else 0:>8.1f}  "
          f"{name:<28} {ph:<9} {cat[:28]:<28} {src}  {shape}")

  c = COMPARISON_SHAPES
  shape = metrics_lib.StepShape(1, c["txt"], c["tgt_hw"] ** 2, c["R"], c["ref_hw"] ** 2)
  analytic = metrics_lib.train_step_flops(cfg, shape, c["rank"], trains_base=False)
  reported = compiled.cost_analysis()
  reported = reported[0] if isinstance(reported, (list, tuple)) else reported
  counted = hlo.total_flops()
  print(f"\nFLOPs per step: analytic (metrics.train_step_flops) {analytic / 1e9:.2f} G; compiled dots with loop "
        f"trip counts {counted / 1e9:.2f} G = {counted / analytic:.2f}x analytic; XLA cost_analysis "
        f"{reported['flops'] / 1e9:.2f} G (loop bodies counted once; includes elementwise)")
  print(f"matmul throughput over the whole step: {counted / plain_s / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
  main()
