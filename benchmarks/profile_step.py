"""Where the time of our train step goes: per-op times of the compiled step on XLA:CPU, by category.

Builds the step official_compare.py times (common.comparison_step: the trainer's own step on the
comparison's shapes), traces a few steps with jax.profiler (XLA:CPU records one event per executed
thunk: a fusion, a dot, a copy, a loop), and maps each thunk to the optimized HLO: its FLOPs (dots
counted inside fusions, loop bodies multiplied by their trip counts), the source line that made it (the
HLO's stack frames) and whether it runs in the forward pass, the backward pass or as a recomputation of
the forward pass (jax.checkpoint's "rematted_computation"). Prints:

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
import re
import tempfile
import time

from common import COMPARISON_SHAPES, comparison_step

_SHAPE = re.compile(r"^[a-z]\w*\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9-]*)\((.*)$")
_CALLED = re.compile(r"(?:calls|body|to_apply|condition)=%([\w.-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Ops that only move or view data: a fusion of nothing else is layout work.
_LAYOUT_OPS = {"parameter", "copy", "transpose", "bitcast", "reshape", "concatenate", "slice", "dynamic-slice",
               "dynamic-update-slice", "pad", "broadcast", "tuple", "get-tuple-element", "constant", "iota"}
_CONTROL_OPS = {"while", "call", "conditional"}


def _dims(shape: str) -> list[int]:
  found = _SHAPE.match(shape)
  return [int(d) for d in found.group(1).split(",") if d] if found else []


class Hlo:
  """The optimized HLO text of one module: instructions per computation, call graph, stack frames."""

  def __init__(self, text: str):
    self.computations: dict[str, list[dict]] = {}
    self.entry = None
    tables = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {}, "StackFrames": {}}
    current, table = None, None
    for line in text.splitlines():
      if line in tables:
        table = tables[line]
        continue
      if table is not None:
        found = re.match(r"^(\d+) (.*)$", line)
        if found:
          table[int(found.group(1))] = found.group(2)
          continue
        table = None
      header = re.match(r"^(ENTRY )?%([\w.-]+) .*\{$", line)
      if header:
        current = header.group(2)
        self.computations[current] = []
        if header.group(1):
          self.entry = current
        continue
      found = _INSTRUCTION.match(line)
      if found and current is not None:
        name, shape, opcode, rest = found.groups()
        frame = _FRAME.search(rest)
        op_name = _OP_NAME.search(rest)
        trip = _TRIP.search(rest)
        self.computations[current].append(dict(
            name=name, shape=shape, opcode=opcode, rest=rest, called=_CALLED.findall(rest),
            frame=int(frame.group(1)) if frame else None, op_name=op_name.group(1) if op_name else "",
            trip=int(trip.group(1)) if trip else 1))
    self.by_name = {i["name"]: (comp, i) for comp, instrs in self.computations.items() for i in instrs}
    self._files = {k: v.strip('"') for k, v in tables["FileNames"].items()}
    self._functions = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
    self._locations = {k: dict(re.findall(r"(\w+)=(\d+)", v)) for k, v in tables["FileLocations"].items()}
    self._frames = {k: dict(re.findall(r"(\w+)=(\d+)", v)) for k, v in tables["StackFrames"].items()}
    self.multiplier = self._multipliers()

  def _multipliers(self) -> dict[str, int]:
    """How many times each computation runs per step (loop bodies times their trip counts)."""
    out = collections.Counter({self.entry: 1})
    order = [self.entry]
    for comp in order:
      for instr in self.computations[comp]:
        for called in instr["called"]:
          factor = instr["trip"] if instr["opcode"] == "while" else 1
          if called not in out:
            order.append(called)
          out[called] += out[comp] * factor
    return out

  def dot_flops(self, comp: str, instr: dict) -> float:
    if instr["opcode"] != "dot":
      return 0.0
    shapes = {i["name"]: i["shape"] for i in self.computations[comp]}
    operands = re.findall(r"%([\w.-]+)", instr["rest"].split(")")[0])
    lhs = _dims(shapes.get(operands[0], "")) if operands else []
    contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instr["rest"])
    k = 1
    for d in (contracting.group(1).split(",") if contracting and contracting.group(1) else []):
      k *= lhs[int(d)]
    out = 1
    for d in _dims(instr["shape"]):
      out *= d
    return 2.0 * out * k

  def dot_signature(self, comp: str, instr: dict) -> tuple:
    """(lhs dims, rhs dims, lhs batch, rhs batch, lhs contracting, rhs contracting) of a dot: what a
    standalone dot_general of the same problem needs (operand layouts are not kept)."""
    shapes = {i["name"]: i["shape"] for i in self.computations[comp]}
    operands = re.findall(r"%([\w.-]+)", instr["rest"].split(")")[0])
    axes = lambda key: tuple(int(d) for d in (re.search(key + r"=\{([0-9,]*)\}", instr["rest"]) or [0, ""])[1]
                             .split(",") if d)
    return (tuple(_dims(shapes[operands[0]])), tuple(_dims(shapes[operands[1]])), axes("lhs_batch_dims"),
            axes("rhs_batch_dims"), axes("lhs_contracting_dims"), axes("rhs_contracting_dims"))

  def dots_of(self, name: str) -> list[tuple]:
    """Signatures of the dots thunk `name` runs: its own, or those inside its fusion."""
    comp, instr = self.by_name[name]
    if instr["opcode"] == "dot":
      return [self.dot_signature(comp, instr)]
    if instr["opcode"] != "fusion":
      return []
    return [self.dot_signature(called, i) for called in instr["called"] for i in self.computations.get(called, [])
            if i["opcode"] == "dot"]

  def flops_inside(self, comp: str) -> float:
    """FLOPs of one execution of `comp` and the fusions it calls (not its loops: they are thunks)."""
    total = 0.0
    for instr in self.computations.get(comp, []):
      total += self.dot_flops(comp, instr)
      if instr["opcode"] == "fusion":
        for called in instr["called"]:
          total += self.flops_inside(called)
    return total

  def total_flops(self) -> float:
    return sum(self.dot_flops(comp, i) * self.multiplier[comp] for comp, instrs in self.computations.items()
               for i in instrs)

  def source(self, frame_id):
    """(file, line, function) of the innermost frame of ours (a path under mosaic_jax/)."""
    seen = set()
    while frame_id and frame_id in self._frames and frame_id not in seen:
      seen.add(frame_id)
      frame = self._frames[frame_id]
      location = self._locations.get(int(frame["file_location_id"]), {})
      path = self._files.get(int(location.get("file_name_id", 0)), "")
      if "mosaic_jax" in path:
        return (path, int(location.get("line", 0)),
                self._functions.get(int(location.get("function_name_id", 0)), ""))
      frame_id = int(frame.get("parent_frame_id", 0))
    return ("", 0, "")

  def _borrowed_metadata(self, comp: str, instr: dict, key: dict) -> dict:
    """`key` with the frame and op name of the nearest operand that has them (XLA drops the metadata of
    some batched dots, e.g. attention's; their operands still say which source line feeds them)."""
    names = {i["name"]: i for i in self.computations[comp]}
    frontier = [instr]
    for _ in range(4):
      operands = [names[n] for i in frontier for n in re.findall(r"%([\w.-]+)", i["rest"].split("), ")[0])
                  if n in names]
      for operand in operands:
        if operand["frame"] is not None:
          return {**key, "frame": operand["frame"], "op_name": operand["op_name"]}
      frontier = operands
    return key

  def describe(self, name: str) -> dict:
    """The thunk `name`: opcode, FLOPs per execution, the instruction that says what it is."""
    comp, instr = self.by_name[name]
    inner = [instr]
    for called in instr["called"] if instr["opcode"] == "fusion" else []:
      inner += [(i) for i in self.computations.get(called, [])]
    inner_comp = instr["called"][0] if instr["opcode"] == "fusion" and instr["called"] else comp
    dots = [i for i in inner if i["opcode"] == "dot"]
    key = max(dots, key=lambda i: self.dot_flops(inner_comp, i)) if dots else instr
    if key["frame"] is None:  # a dot fused without metadata: the fusion's own says where it came from
      key = instr if instr["frame"] is not None else self._borrowed_metadata(comp, instr, key)
    ops = {i["opcode"] for i in inner[1:]} if instr["opcode"] == "fusion" else {instr["opcode"]}
    layout = ops <= _LAYOUT_OPS
    flops = (self.flops_inside(inner_comp) if instr["opcode"] == "fusion" else self.dot_flops(comp, instr))
    main_dot = max(dots, key=lambda i: self.dot_flops(inner_comp, i)) if dots else None
    return dict(opcode=instr["opcode"], flops=flops, key=key, layout=layout, control=instr["opcode"] in _CONTROL_OPS,
                runs=self.multiplier[comp], batched_dot=bool(main_dot and "lhs_batch_dims" in main_dot["rest"]),
                dot=main_dot is not None)


_LINES: dict[str, list[str]] = {}


def _line_text(path: str, line: int) -> str:
  if path not in _LINES:
    try:
      with open(path) as f:
        _LINES[path] = f.read().splitlines()
    except OSError:
      _LINES[path] = []
  lines = _LINES[path]
  return lines[line - 1] if 0 < line <= len(lines) else ""


def category(hlo: Hlo, info: dict) -> str:
  if info["control"]:
    return "loop control"
  if info["layout"]:
    return "layout (copies, transposes, concat/split, slices)"
  path, line, function = hlo.source(info["key"]["frame"])
  text = _line_text(path, line)
  base = os.path.basename(path)
  if info["batched_dot"]:  # the model's only batched matmuls: q.k and p.v
    return "attention statistics" if base == "attention_stats.py" else "attention"
  if info["dot"] and base not in ("layers.py", "attention.py", "attention_stats.py"):
    return "projections and MLPs"
  if base == "layers.py" and function == "linear":
    return "LoRA matmuls" if ("lora" in text or "...r" in text or "h.astype" in text) else "projections and MLPs"
  if base == "attention_stats.py":
    return "attention statistics"
  if base == "attention.py":
    return "attention"
  if base == "step.py":
    if "ema" in text:
      return "EMA"
    if "where(finite" in text or "isfinite" in text:
      return "NaN guard"
    if any(w in text for w in ("optimizer.update", "apply_updates", "global_norm")):
      return "optimizer"
    return "losses and inputs"
  if base == "losses.py":
    return "losses and inputs"
  if base in ("layers.py", "embeddings.py"):
    if function in ("modulation",) and info["key"]["opcode"] == "dot":
      return "projections and MLPs"
    return "elementwise (norms, RoPE, GELU, modulation, gates)"
  if base == "transformer.py":  # outside layers.py the model only reshapes, concatenates and stacks
    return "layout (copies, transposes, concat/split, slices)"
  return f"other ({base}:{line} {function})" if base else "other (no source)"


def phase(op_name: str) -> str:
  if "rematted_computation" in op_name:
    return "recompute"
  if "transpose(" in op_name:
    return "backward"
  return "forward"


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
