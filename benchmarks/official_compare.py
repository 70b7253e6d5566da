"""Our training step against the official MOSAIC PyTorch step on the same work, interleaved in one run.

The official side is ../shared/bench/official_step.py (see its README for how to get the official
code, a reference that is run, never copied). Ours is the trainer's own step, built and compiled the
way the trainer builds it (common.comparison_step: train/compilation.py's compile_from_shapes with the
recipe config's settings, sharding rules and remat policy, on a one-device mesh), then run on random
weights and a random batch.

Same work on both sides: FLUX scaled to hidden 512 (8 heads x 64), 2 double + 4 single blocks, 64 text
tokens of width 256, pooled 128, a 16x16-token target and 3 references of 16x16 tokens (64 channels
per token), LoRA rank 64 on MOSAIC's targets, 40 correspondence pairs per reference, loss = velocity MSE
+ 0.1 SCAL + 1.0 MDL, backward, grad clip 1.0, AdamW, batch 1, float32. (Ours also updates the EMA and
runs the NaN guard: they are part of the trainer's step.)

Each measurement is one subprocess (official, ours, official, ours, ... at each thread count) pinned
with taskset to the first `threads` cores: torch gets THREADS, XLA its intra-op thread count. Each
prints the median and minimum of `--steps` timed steps after a warm-up (compile excluded); the table
gives, per thread count, the median over rounds of both sides and their ratio.

Pairings (--pairings, see PAIRINGS): "recipe" times both recipes (ours: the recipe's remat policy,
"auto", which on the CPU recomputes nothing; the official: its train.sh's --gradient_checkpointing,
applied to the unchanged bench script by this file's official worker, recomputing every block); "full"
times the same work on both sides, each recomputing every block (ours: remat "full"); "none" times
both without recomputation (ours: remat "none"; the official bench script as shipped); "kept" times
ours with remat "recompute_mlp" (it recomputes only the MLP's hidden layer) against the official's
recipe; "mixed" times ours with the recipe's remat against the official step not recomputing.

  python benchmarks/official_compare.py --official /path/to/MOSAIC --rounds 3 --threads 1,2
  python benchmarks/official_compare.py --only ours --threads 1 --pairings recipe   # ours alone
  python benchmarks/official_compare.py --baseline /tmp/before          # also an older checkout, interleaved
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from common import COMPARISON_SHAPES, LORA_PARAMS, ROOT, comparison_step

# ../shared/bench beside the checkout; OFFICIAL_STEP names it from a checkout elsewhere (a git worktree)
OFFICIAL_SCRIPT = os.environ.get("OFFICIAL_STEP",
                                 os.path.join(os.path.dirname(ROOT), "shared", "bench", "official_step.py"))


def run_ours(threads: int, steps: int, remat: str | None, code: str) -> dict:
  """Times the compiled step in this process (XLA_FLAGS were set by the parent)."""
  import time  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  compiled, state, base, batch, lora_params, cfg = comparison_step(remat, code)
  compile_s = time.perf_counter() - start
  state, metrics = compiled(state, base, batch)  # warm-up
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, base, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  if not bool(metrics["finite"]):
    raise SystemExit("ours: the step reported a non-finite loss or gradient")
  return {"impl": "mosaic_jax", "threads": threads, "remat": cfg.remat_policy, "median_s": float(np.median(times)),
          "min_s": float(min(times)), "compile_s": compile_s, "lora_params": lora_params,
          "loss": float(metrics["loss"])}


def _cores(threads: int) -> str:
  return ",".join(str(i) for i in range(threads))


def _cv2_stand_in() -> str:
  """A folder holding a `cv2` module that fails when used. The official module imports OpenCV at the top
  for its Canny-edge conditions only, which the training step never calls; OpenCV is not a dependency
  of this project. Where OpenCV is installed the stand-in is not used."""
  try:
    import cv2  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    return ""
  except ImportError:
    pass
  folder = tempfile.mkdtemp(prefix="cv2_stand_in_")
  with open(os.path.join(folder, "cv2.py"), "w") as f:
    f.write("def __getattr__(name):\n  raise ImportError(f'cv2.{name}: OpenCV is not installed "
            "(a stand-in for the benchmark)')\n")
  return folder


def run_official_checkpointed() -> None:
  """The official step as the official recipe trains (train.sh passes --gradient_checkpointing, on which
  train.py calls transformer.enable_gradient_checkpointing(), so its forward checkpoints every block):
  ../shared/bench/official_step.py run unchanged, with that call made when the script puts the model in
  training mode. Prints the script's JSON line with the number of checkpointed block calls added (it
  must be nonzero, or the side measured something else)."""
  import contextlib  # pylint: disable=import-outside-toplevel
  import io  # pylint: disable=import-outside-toplevel
  import runpy  # pylint: disable=import-outside-toplevel

  import diffusers  # pylint: disable=import-outside-toplevel
  import torch.utils.checkpoint  # pylint: disable=import-outside-toplevel

  model_class = diffusers.FluxTransformer2DModel
  train = model_class.train

  def train_checkpointed(self, mode=True):
    if mode:
      self.enable_gradient_checkpointing()
    return train(self, mode)

  calls = [0]
  checkpoint = torch.utils.checkpoint.checkpoint

  def counted(*args, **kwargs):
    calls[0] += 1
    return checkpoint(*args, **kwargs)

  model_class.train = train_checkpointed
  torch.utils.checkpoint.checkpoint = counted
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    runpy.run_path(OFFICIAL_SCRIPT, run_name="__main__")
  found = json.loads([l for l in out.getvalue().splitlines() if l.startswith("{")][-1])
  if not calls[0]:
    raise SystemExit("official with checkpointing: no block went through torch.utils.checkpoint")
  print(json.dumps({**found, "checkpointed_block_calls": calls[0]}), flush=True)


def measure(side: dict, threads: int, steps: int, official: str) -> dict:
  """One subprocess of `side` (see sides_of) pinned to the first `threads` cores; its JSON line."""
  env = dict(os.environ)
  if side["impl"] == "official":
    env.update(OFFICIAL=official, THREADS=str(threads), BENCH_CFG=json.dumps({**COMPARISON_SHAPES, "steps": steps}),
               OMP_NUM_THREADS=str(threads))
    stand_in = _cv2_stand_in()
    if stand_in:
      env["PYTHONPATH"] = os.pathsep.join(filter(None, [stand_in, env.get("PYTHONPATH", "")]))
    cmd = ([sys.executable, os.path.abspath(__file__), "--official_checkpointed_worker"] if side["recompute"]
           else [sys.executable, OFFICIAL_SCRIPT])
  else:
    env["XLA_FLAGS"] = (f"{env.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}"
                        f" intra_op_parallelism_threads={threads}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    if side["code"] != ROOT:  # a baseline checkout: its mosaic_jax, not the installed one
      env["PYTHONPATH"] = os.pathsep.join(filter(None, [side["code"], env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--threads", str(threads), "--steps", str(steps),
           "--code", side["code"]]
    if side["remat"]:
      cmd += ["--remat", side["remat"]]
  out = subprocess.run(["taskset", "-c", _cores(threads)] + cmd, env=env, capture_output=True, text=True,
                       check=False)
  lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
  if out.returncode or not lines:
    raise SystemExit(f"{side['name']} at {threads} thread(s) failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
  return json.loads(lines[-1])


# What each pairing compares: both sides do the same work, recomputation included.
PAIRINGS = {
    # The two recipes: ours with the recipe's remat_policy ("auto": the trainer's choice on this machine,
    # "none" on the CPU, train/remat_choice.py), the official train.sh with --gradient_checkpointing
    # (torch.utils.checkpoint around each block).
    "recipe": dict(remat=None, recompute=True),
    # Both recompute every block in the backward pass: ours with remat "full" (the recipe's until issue 25).
    "full": dict(remat="full", recompute=True),
    # Neither recomputes: ours with remat "none", the official step as ../shared/bench ships it.
    "none": dict(remat="none", recompute=False),
    # Both checkpointing, each with its own policy: ours keeps the projections and attention outputs
    # (remat "recompute_mlp": same gradients, less recomputed), the official recomputes every block.
    "kept": dict(remat="recompute_mlp", recompute=True),
    # "mixed": ours with the recipe's remat against the official step without its
    # checkpointing (not the same work: only ours recomputes the forward).
    "mixed": dict(remat=None, recompute=False),
}


def official_name(pairing: str) -> str:
  return "official+ckpt" if PAIRINGS[pairing]["recompute"] else "official"


def ours_names(pairing: str, baseline: str) -> list[tuple[str, str]]:
  """(name, checkout) of our sides in `pairing`: the baseline checkout's, if any, then this one's."""
  policy = PAIRINGS[pairing]["remat"] or "recipe"
  return ([(f"baseline[{policy}]", baseline)] if baseline else []) + [(f"ours[{policy}]", ROOT)]


def sides_of(pairings: list[str], baseline: str, only: str) -> list[dict]:
  """The measured sides in run order, each {name, impl, remat, recompute, code}; a side shared by two
  pairings (the official recipe, say) is measured once."""
  sides = {}
  for pairing in pairings:
    if only != "ours":
      sides[official_name(pairing)] = dict(impl="official", remat=None, recompute=PAIRINGS[pairing]["recompute"],
                                           code="")
    if only != "official":
      for name, code in ours_names(pairing, baseline):
        sides[name] = dict(impl="ours", remat=PAIRINGS[pairing]["remat"], recompute=None, code=code)
  return [dict(name=name, **side) for name, side in sides.items()]


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--official", default=os.environ.get("OFFICIAL", ""),
                      help="a checkout of the official MOSAIC repository, with train.py and src/ (or $OFFICIAL)")
  parser.add_argument("--threads", default="1,2", help="thread counts, comma separated")
  parser.add_argument("--rounds", type=int, default=3, help="rounds of every side per thread count")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (after a warm-up)")
  parser.add_argument("--pairings", default="recipe,none,kept",
                      help="comma separated, from: " + ", ".join(PAIRINGS) + " (see PAIRINGS in this file)")
  parser.add_argument("--only", choices=("both", "ours", "official"), default="both")
  parser.add_argument("--baseline", default="",
                      help="another checkout of this repository (e.g. `git archive` of the commit before a change): "
                           "its step is measured too, interleaved, beside ours in every pairing")
  parser.add_argument("--remat", default=None, help=argparse.SUPPRESS)  # the worker's remat policy
  parser.add_argument("--code", default=ROOT, help=argparse.SUPPRESS)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--official_checkpointed_worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(run_ours(int(args.threads), args.steps, args.remat, args.code)), flush=True)
    return
  if args.official_checkpointed_worker:
    run_official_checkpointed()
    return

  import numpy as np  # pylint: disable=import-outside-toplevel
  pairings = [p for p in args.pairings.split(",") if p]
  unknown = [p for p in pairings if p not in PAIRINGS]
  if unknown:
    raise SystemExit(f"--pairings: {', '.join(unknown)} unknown; expected some of {', '.join(PAIRINGS)}")
  if args.only != "ours" and not os.path.isdir(os.path.join(args.official, "src")):
    raise SystemExit(f"--official {args.official!r}: expected a checkout of the official MOSAIC repository (with "
                     "src/); or --only ours")
  sides = sides_of(pairings, args.baseline, args.only)
  thread_counts = [int(t) for t in args.threads.split(",")]
  results = {}
  for round_index in range(args.rounds):
    for threads in thread_counts:
      for side in sides:
        found = measure(side, threads, args.steps, args.official)
        results.setdefault((side["name"], threads), []).append(found)
        extra = f"  remat {found['remat']}" if "remat" in found else (
            f"  checkpointed block calls {found['checkpointed_block_calls']}" if "checkpointed_block_calls" in found
            else "")
        print(f"round {round_index + 1} threads {threads} {side['name']:<18} median {found['median_s']:.3f} s "
              f"min {found['min_s']:.3f} s  lora params {found['lora_params']:,}{extra}", flush=True)
        if found["lora_params"] != LORA_PARAMS:
          raise SystemExit(f"{side['name']}: {found['lora_params']:,} LoRA parameters, expected {LORA_PARAMS:,}")
  print(f"\nmedians over {args.rounds} round(s) of each run's median of {args.steps} steps (s)")
  names = [s["name"] for s in sides]
  med = {key: float(np.median([r["median_s"] for r in found])) for key, found in results.items()}
  print(f"{'threads':>7} " + " ".join(f"{name:>18}" for name in names))
  for threads in thread_counts:
    print(f"{threads:>7} " + " ".join(f"{med[(name, threads)]:>18.3f}" for name in names))
  if args.only == "both":
    print("\nratios per pairing (ours / official; see PAIRINGS for what each side recomputes)")
    for pairing in pairings:
      theirs = official_name(pairing)
      for name, _ in ours_names(pairing, args.baseline):
        ratios = [f"{threads} thread(s) {med[(name, threads)] / med[(theirs, threads)]:.2f}x"
                  for threads in thread_counts]
        print(f"  {pairing:<7} {name:>22} / {theirs:<14} " + ", ".join(ratios))
  print(f"LoRA parameters: {LORA_PARAMS:,} on every side")


if __name__ == "__main__":
  main()
