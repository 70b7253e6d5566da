"""The optimized HLO of a compiled step, read back: what each op computes, moves and comes from.

Shared by the benchmarks that ask where a step's time goes: profile_step.py (XLA:CPU, per-op times from
a trace) and train_memory.py --topology (the TPU compiler, no device: FLOPs, HBM bytes and an estimated
time per op, summed over the step or by category).

Parses the text of `compiled.as_text()`: instructions per computation, the call graph with how many
times each computation runs per step (a loop body times its trip count: XLA:CPU writes the count, the
TPU compiler does not, so it is read from the loop condition's `i < N`), and the stack-frame tables that
name the source line behind each op. Per op:

  - FLOPs of its matmuls: `dot`, and `convolution`, which is how the TPU compiler writes every matmul
    (batch axes become spatial axes whose window lands on one input element: lhs_dilate = window size);
  - HBM bytes of a top-level op (entry or loop body, not the inside of a fusion): its operands and its
    results, as XLA's cost analysis counts them, except that loop bodies count once per iteration here
    (the cost analysis counts a loop body once);
  - a category (projections, LoRA, attention, attention statistics, elementwise, layout, collectives,
    losses, optimizer...) from the source line of its main instruction, and a phase (forward, backward,
    or the forward recomputed by jax.checkpoint).
"""

from __future__ import annotations

import collections
import math
import os
import re
from typing import NamedTuple

_SHAPE = re.compile(r"^[a-z]\w*\[([0-9,]*)\]")
_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16|f8\w*)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9-]*)\((.*)$")
_CALLED = re.compile(r"(?:calls|body|to_apply|condition)=%([\w.-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_BITS = {"pred": 8, "bf16": 16}
# Ops that only move or view data: a fusion of nothing else is layout work.
_LAYOUT_OPS = {"parameter", "copy", "transpose", "bitcast", "reshape", "concatenate", "slice", "dynamic-slice",
               "dynamic-update-slice", "pad", "broadcast", "tuple", "get-tuple-element", "constant", "iota"}
_CONTROL_OPS = {"while", "call", "conditional"}
_COLLECTIVES = {"all-gather", "all-gather-start", "all-reduce", "all-reduce-start", "reduce-scatter",
                "all-to-all", "collective-permute", "collective-permute-start"}
# Top-level ops that read or write no HBM of their own: views, tuples, control (their bodies count), and
# the second halves of async pairs (the first half carries the transfer).
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "copy-done", "all-gather-done", "all-reduce-done",
               "collective-permute-done", "slice-done", "async-done"}
_MATMULS = ("dot", "convolution")
# Pallas kernels by the name the HLO gives their call -> (how many [Q, K, D] matmuls one call does per
# head, 2 Q K D FLOPs each, and its category; XLA's cost analysis counts nothing inside a kernel, and
# their stack frames stop inside jax). Splash's forward does q.k and p.v; its dq kernel recomputes q.k,
# then do.v and ds.k; its dkv kernel q.k, p.do, do.v and ds.q. The statistics kernels
# (model/statistics_kernel.py): q.k forward; q.k, ds.k and ds.q backward.
KERNELS = {"splash_mha_fwd": (2, "attention"), "splash_mha_dq": (3, "attention"), "splash_mha_dkv": (4, "attention"),
           "mosaic_statistics_fwd": (1, "attention statistics"), "mosaic_statistics_bwd": (3, "attention statistics")}
# In splash's block sizes (the metadata of its kernels): its dk/dv kernel also makes dq
_FUSED_BACKWARD = re.compile(r'use_fused_bwd_kernel\\?": true')


def _dims(shape: str) -> list[int]:
  found = _SHAPE.match(shape)
  return [int(d) for d in found.group(1).split(",") if d] if found else []


def array_bytes(shape: str) -> int:
  """Bytes of an array shape, or of every array of a tuple shape (layouts and memory spaces ignored)."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    bits = _BITS.get(dtype) or int(re.sub(r"\D", "", dtype.split("e")[0]) or 8)
    total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
  return total


def _kernel(instr: dict, fused_backward: bool = False) -> tuple[int, str]:
  """KERNELS' entry for a Pallas kernel call, else (0, ""). fused_backward: splash's block sizes ask
  for its fused backward kernel (its forward kernels' metadata says so), whose dk/dv kernel also makes
  dq (ds.k)."""
  if instr["opcode"] != "custom-call":
    return 0, ""
  matmuls, kind = next((entry for prefix, entry in KERNELS.items() if instr["name"].startswith(prefix)), (0, ""))
  return matmuls + (fused_backward and instr["name"].startswith("splash_mha_dkv")), kind


def _operands(instr: dict) -> list[str]:
  return re.findall(r"%([\w.-]+)", instr["rest"].split("), ")[0])


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
      if current is None:
        continue
      if found:
        root, name, shape, opcode, rest = found.groups()
        self.computations[current].append(dict(name=name, shape=shape, opcode=opcode, rest="", root=bool(root)))
      elif not self.computations[current] or line.rstrip() == "}":
        continue
      else:  # an instruction written over several lines (a Pallas kernel's metadata): the rest of its text
        rest = line
      instr = self.computations[current][-1]
      instr["rest"] += rest
      frame, op_name, trip = (p.search(instr["rest"]) for p in (_FRAME, _OP_NAME, _TRIP))
      instr.update(called=_CALLED.findall(instr["rest"]), frame=int(frame.group(1)) if frame else None,
                   op_name=op_name.group(1) if op_name else "", trip=int(trip.group(1)) if trip else None)
    self.by_name = {i["name"]: (comp, i) for comp, instrs in self.computations.items() for i in instrs}
    self._shapes = {comp: {i["name"]: i["shape"] for i in instrs} for comp, instrs in self.computations.items()}
    self._files = {k: v.strip('"') for k, v in tables["FileNames"].items()}
    self._functions = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
    self._locations = {k: dict(re.findall(r"(\w+)=(\d+)", v)) for k, v in tables["FileLocations"].items()}
    self._frames = {k: dict(re.findall(r"(\w+)=(\d+)", v)) for k, v in tables["StackFrames"].items()}
    self.multiplier = self._multipliers()
    self.fused_backward = bool(_FUSED_BACKWARD.search(text))

  def trip_count(self, instr: dict) -> int:
    """A while loop's iterations: the count XLA wrote, else N of the condition's `counter < N` (lax.scan
    and lax.map loops count from 0 by 1), else 1."""
    if instr["trip"] is not None:
      return instr["trip"]
    condition = re.search(r"condition=%([\w.-]+)", instr["rest"])
    instrs = self.computations.get(condition.group(1), []) if condition else []
    constants = {i["name"]: i for i in instrs if i["opcode"] == "constant"}
    for i in instrs:
      if i["opcode"] == "compare" and "direction=LT" in i["rest"]:
        bound = [constants[o] for o in _operands(i) if o in constants]
        found = re.match(r"([0-9]+)\)", bound[0]["rest"]) if bound else None
        if found:
          return int(found.group(1))
    return 1

  def _multipliers(self) -> dict[str, int]:
    """How many times each computation runs per step (loop bodies times their trip counts)."""
    out = collections.Counter({self.entry: 1})
    order = [self.entry]
    for comp in order:
      for instr in self.computations[comp]:
        factor = self.trip_count(instr) if instr["opcode"] == "while" else 1
        for called in instr["called"]:
          if called not in out:
            order.append(called)
          out[called] += out[comp] * factor
    return out

  def executed(self) -> list[str]:
    """The computations whose ops run as ops of their own (the entry, loop bodies and conditions, called
    computations), not the bodies of fusions or reductions."""
    order = [self.entry]
    for comp in order:
      for instr in self.computations[comp]:
        if instr["opcode"] in _CONTROL_OPS:
          order += [c for c in instr["called"] if c not in order]
    return order

  def dot_flops(self, comp: str, instr: dict) -> float:
    """FLOPs of a matmul instruction (0 for any other): 2 x output elements x contracted size."""
    if instr["opcode"] not in _MATMULS:
      return 0.0
    operands = _operands(instr)
    lhs = _dims(self._shapes[comp].get(operands[0], "")) if operands else []
    out = math.prod(_dims(instr["shape"]))
    if instr["opcode"] == "dot":
      contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instr["rest"])
      k = math.prod(lhs[int(d)] for d in (contracting.group(1).split(",") if contracting and contracting.group(1)
                                          else []))
      return 2.0 * out * k
    labels = re.search(r"dim_labels=(\w+)_", instr["rest"])
    if not (labels and lhs):
      return 0.0
    feature = lhs[labels.group(1).index("f")]
    spatial = [lhs[labels.group(1).index(str(i))] for i in range(len(lhs) - 2)]
    window = re.search(r"window=\{size=([0-9x]+)", instr["rest"])
    dilate = re.search(r"lhs_dilate=([0-9x]+)", instr["rest"])
    sizes = [int(s) for s in window.group(1).split("x")] if window else []
    dilations = [int(s) for s in dilate.group(1).split("x")] if dilate else [1] * len(sizes)
    # input elements under one window position, per spatial axis: never more than the axis holds (an
    # output axis written as a window sliding over a padded axis of 1), nor than the window reaches
    # through the dilation (a batch axis written as a window as wide as its dilation: one element)
    taps = math.prod(min(-(-s // d), n) for s, d, n in zip(sizes, dilations, spatial))
    groups = re.search(r"feature_group_count=(\d+)", instr["rest"])
    return 2.0 * out * feature * taps / (int(groups.group(1)) if groups else 1)

  def kernel_flops(self, comp: str, instr: dict) -> float:
    """FLOPs of a Pallas kernel call named in KERNELS, from its q [..., Q, D] and k [..., K, D] operands
    (the first two floating-point arrays of rank 3 or more); 0 for any other op."""
    matmuls = _kernel(instr, self.fused_backward)[0]
    if not matmuls:
      return 0.0
    arrays = [_dims(self._shapes[comp].get(o, "")) for o in _operands(instr)
              if re.match(r"(bf16|f16|f32)\[", self._shapes[comp].get(o, ""))]
    q, k = [a for a in arrays if len(a) >= 3][:2]
    return 2.0 * matmuls * math.prod(q) * k[-2]

  def dot_signature(self, comp: str, instr: dict) -> tuple:
    """(lhs dims, rhs dims, lhs batch, rhs batch, lhs contracting, rhs contracting) of a dot: what a
    standalone dot_general of the same problem needs (operand layouts are not kept)."""
    shapes = self._shapes[comp]
    operands = _operands(instr)
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

  def traffic(self, comp: str, instr: dict) -> int:
    """HBM bytes one execution of top-level op `instr` reads and writes: its operands and results, as
    XLA's cost analysis counts them (an operand a fusion only slices: the slices; a buffer a fusion
    updates in place: the update, read and written; an async copy's source: read, then written on
    arrival); 0 for views, tuples and control."""
    if instr["opcode"] in _NO_TRAFFIC:
      return 0
    shapes = self._shapes[comp]
    operands = [array_bytes(shapes.get(o, "")) for o in _operands(instr)]
    if instr["opcode"] == "copy-start":
      return 2 * sum(operands)
    written = array_bytes(instr["shape"])
    if instr["opcode"] == "dynamic-update-slice":  # in place: the update is read and written
      return 2 * operands[1]
    if instr["opcode"] in ("dynamic-slice", "slice"):
      return 2 * written
    if instr["opcode"] == "fusion" and instr["called"]:
      used, written_in_place = self._parameter_use(instr["called"][0])
      operands = [used.get(index, size) for index, size in enumerate(operands)]
      written = written_in_place if written_in_place is not None else written
    return sum(operands) + written

  def _parameter_use(self, fused: str) -> tuple[dict[int, int], int | None]:
    """({parameter index: bytes read} for the parameters of fusion body `fused` that are only sliced or
    updated in place, and the bytes its results write when one of them is a dynamic-update-slice of a
    parameter (in place: only the update is written; a multi-output fusion's other results in full), else
    None)."""
    instrs = self.computations.get(fused, [])
    by_name = {i["name"]: i for i in instrs}
    shapes = self._shapes.get(fused, {})
    params = {i["name"]: int(re.match(r"(\d+)", i["rest"]).group(1)) for i in instrs if i["opcode"] == "parameter"}
    users = collections.defaultdict(list)
    for i in instrs:
      for position, o in enumerate(_operands(i)):
        users[o].append((i, position))
    root = next((i for i in instrs if i["root"]), None)
    results = [by_name[o] for o in _operands(root) if o in by_name] if root and root["opcode"] == "tuple" else [root]
    used, written, in_place = {}, 0, False
    for result in results:
      if result is not None and result["opcode"] == "dynamic-update-slice":
        buffer, update = _operands(result)[:2]
        written += array_bytes(shapes.get(update, ""))
        in_place = in_place or buffer in params
        if buffer in params:
          used[params[buffer]] = 0
      elif result is not None:
        written += array_bytes(result["shape"])
    for name, index in params.items():
      uses = users.get(name, [])
      if uses and all(u["opcode"] in ("slice", "dynamic-slice") and position == 0 for u, position in uses):
        used[index] = min(sum(array_bytes(u["shape"]) for u, _ in uses), array_bytes(shapes.get(name, "")))
    return used, (written if in_place else None)

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
      operands = [names[n] for i in frontier for n in _operands(i) if n in names]
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
    dots = [i for i in inner if i["opcode"] in _MATMULS]
    key = max(dots, key=lambda i: self.dot_flops(inner_comp, i)) if dots else instr
    if key["frame"] is None:  # a dot fused without metadata: the fusion's own says where it came from
      key = instr if instr["frame"] is not None else self._borrowed_metadata(comp, instr, key)
    ops = {i["opcode"] for i in inner[1:]} if instr["opcode"] == "fusion" else {instr["opcode"]}
    layout = ops <= _LAYOUT_OPS or instr["opcode"] in ("copy-start", "slice-start")
    flops = (self.flops_inside(inner_comp) if instr["opcode"] == "fusion" else
             self.dot_flops(comp, instr) or self.kernel_flops(comp, instr))
    main_dot = max(dots, key=lambda i: self.dot_flops(inner_comp, i)) if dots else None
    batched = bool(main_dot and ("lhs_batch_dims" in main_dot["rest"] or "lhs_dilate" in main_dot["rest"]))
    return dict(opcode=instr["opcode"], flops=flops, key=key, layout=layout, control=instr["opcode"] in _CONTROL_OPS,
                runs=self.multiplier[comp], batched_dot=batched, dot=main_dot is not None,
                collective=instr["opcode"] in _COLLECTIVES, kernel=_kernel(instr, self.fused_backward)[1])


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
  if info["collective"]:
    return "collectives (fsdp gathers, gradient reductions)"
  if info["layout"]:
    return "layout (copies, transposes, concat/split, slices)"
  path, line, function = hlo.source(info["key"]["frame"])
  text = _line_text(path, line)
  base = os.path.basename(path)
  if info["kernel"]:
    return info["kernel"]
  if info["batched_dot"]:  # the model's only batched matmuls: q.k and p.v
    return "attention statistics" if base == "attention_stats.py" else "attention"
  if base == "embeddings.py" and function == "apply_rope":  # its pair rotation is a small matmul
    return "elementwise (norms, RoPE, GELU, modulation, gates)"
  if info["dot"] and base not in ("layers.py", "attention.py", "attention_stats.py"):
    return "projections and MLPs"
  if base == "layers.py" and function in ("linear", "lora_delta", "_lora_forward", "_lora_backward"):
    if function != "linear" or "lora" in text or "...r" in text or "h.astype" in text:
      return "LoRA matmuls" if info["dot"] else "elementwise (norms, RoPE, GELU, modulation, gates)"
    return "projections and MLPs" if info["dot"] else "elementwise (norms, RoPE, GELU, modulation, gates)"
  if base == "attention_stats.py":
    return "attention statistics"
  if base in ("attention.py", "splash_attention.py"):
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
    if function in ("modulation",) and info["key"]["opcode"] in _MATMULS:
      return "projections and MLPs"
    return "elementwise (norms, RoPE, GELU, modulation, gates)"
  if base == "transformer.py":  # outside layers.py the model only reshapes, concatenates and stacks
    return "layout (copies, transposes, concat/split, slices)"
  if "optax" in info["key"]["op_name"] or base == "":
    return f"other ({info['opcode']}, no source of ours)"
  return f"other ({base}:{line} {function})"


def phase(op_name: str) -> str:
  if "rematted_computation" in op_name:
    return "recompute"
  if "transpose(" in op_name:
    return "backward"
  return "forward"


def breakdown(hlo: Hlo) -> dict[str, dict[str, float]]:
  """{category: {"flops", "bytes", "ops"}} over every top-level op of the step, loop bodies times their
  trip counts: where a step's FLOPs and HBM traffic go, without running it."""
  table = collections.defaultdict(lambda: collections.defaultdict(float))
  for comp in hlo.executed():
    runs = hlo.multiplier[comp]
    for instr in hlo.computations[comp]:
      traffic = hlo.traffic(comp, instr)
      info = hlo.describe(instr["name"])
      if not traffic and not info["flops"]:
        continue
      row = table[category(hlo, info)]
      row["flops"] += info["flops"] * runs
      row["bytes"] += traffic * runs
      row["ops"] += runs
  return table


# Pinned host memory in a TPU layout ({...:S(5)}): where offloading remat policies put what they keep.
_HOST = re.compile(r"\bS\(5\)")


def host_transfers(hlo: Hlo) -> int:
  """Bytes copied between device and pinned host memory per step (both ways): asynchronous copies whose
  source or destination lies in host memory, loop bodies times their trip counts."""
  total = 0
  for comp in hlo.executed():
    shapes = hlo._shapes[comp]
    for instr in hlo.computations[comp]:
      if instr["opcode"] not in ("copy-start", "copy"):
        continue
      source = "".join(shapes.get(o, "") for o in _operands(instr))
      if _HOST.search(instr["shape"]) or _HOST.search(source):
        total += array_bytes(source) * hlo.multiplier[comp]
  return total


class Estimate(NamedTuple):
  """A step's cost per chip from its optimized HLO (see estimate)."""
  flops: float          # matmuls, kernels included, loop bodies times their trip counts
  kernel_flops: float   # the Pallas kernels' share of flops
  bytes: float          # HBM bytes of every top-level op, loop bodies times their trip counts
  seconds: float        # sum over ops of flops / peak + bytes / bandwidth
  compiler_like: float  # the same sum with loop bodies once and no kernels: what libtpu's estimate covers
  host_bytes: float     # device <-> host transfers (offloading policies), not in `seconds`


def estimate(hlo: Hlo, peak_flops: float, hbm_bytes_per_s: float) -> Estimate:
  """Per-op roofline of a compiled step: each top-level op takes its FLOPs at the chip's peak plus its HBM
  traffic at the chip's bandwidth (no overlap within an op). With loop bodies counted once and the
  Pallas kernels left out this reproduces libtpu's own `optimal_seconds` to within a few percent where
  that is positive (`compiler_like`, for the comparison); counted in full it covers what libtpu's does
  not: every iteration of the scanned blocks, and the kernels (their FLOPs from their operand shapes,
  their traffic their operands and results)."""
  flops = kernel = traffic = seconds = compiler_like = 0.0
  for comp in hlo.executed():
    runs = hlo.multiplier[comp]
    for instr in hlo.computations[comp]:
      info = hlo.describe(instr["name"])
      op_bytes = hlo.traffic(comp, instr)
      op_seconds = info["flops"] / peak_flops + op_bytes / hbm_bytes_per_s
      flops += info["flops"] * runs
      kernel += info["flops"] * runs if info["kernel"] else 0.0
      traffic += op_bytes * runs
      seconds += op_seconds * runs
      compiler_like += 0.0 if info["kernel"] else op_seconds
  return Estimate(flops, kernel, traffic, seconds, compiler_like, float(host_transfers(hlo)))
