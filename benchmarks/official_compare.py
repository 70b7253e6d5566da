"""Our training step against the official MOSAIC PyTorch step on the same work, interleaved in one run.

The official side is ../shared/bench/official_step.py (see its README for how to get the official
code, a reference that is run, never copied). Ours is the trainer's own step, built and compiled the
way the trainer builds it (trainer.compile_from_shapes: the recipe config's settings, sharding rules
and remat policy, on a one-device mesh), then run on random weights and a random batch.

Same work on both sides: FLUX scaled to hidden 512 (8 heads x 64), 2 double + 4 single blocks, 64 text
tokens of width 256, pooled 128, a 16x16-token target and 3 references of 16x16 tokens (64 channels
per token), LoRA rank 64 on MOSAIC's targets, 40 correspondence pairs per reference, loss = velocity MSE
+ 0.1 SCAL + 1.0 MDL, backward, grad clip 1.0, AdamW, batch 1, float32. (Ours also updates the EMA and
runs the NaN guard: they are part of the trainer's step.)

Each measurement is one subprocess (official, ours, official, ours, ... at each thread count) pinned
with taskset to the first `threads` cores: torch gets THREADS, XLA its intra-op thread count. Each
prints the median and minimum of `--steps` timed steps after a warm-up (compile excluded); the table
gives, per thread count, the median over rounds of both sides and their ratio.

  python benchmarks/official_compare.py --official /work/official_mosaic --rounds 3 --threads 1,2
  python benchmarks/official_compare.py --only ours --threads 1        # ours alone (profiling loop)
  python benchmarks/official_compare.py --baseline /tmp/before          # also an older checkout, interleaved
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL_SCRIPT = os.path.join(os.path.dirname(ROOT), "shared", "bench", "official_step.py")
# The comparison's shapes, in official_step.py's keys (its BENCH_CFG).
SHAPES = dict(hidden_heads=8, head_dim=64, double=2, single=4, txt=64, tgt_hw=16, ref_hw=16, R=3, rank=64)
PAIRS_PER_REF = 40
TEXT_WIDTH, POOLED_WIDTH = 256, 128
LORA_PARAMS = 4_100_096  # both sides must train exactly this many


def _recipe_config(code: str):
  """The recipe config of checkout `code`, read from its configs/flux_ms.py as `--config` reads it (a
  baseline checkout may predate the config's move into the package)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("flux_ms", os.path.join(code, "configs", "flux_ms.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("default")


def build_ours(threads: int, remat: str | None = None, code: str = ROOT):
  """(compiled step, state, base, batch, lora parameter count, model config) of the trainer's step on
  SHAPES, with the recipe config of checkout `code` (whose mosaic_jax this process imports: the
  installed one, or the baseline's that `measure` puts on PYTHONPATH)."""
  import dataclasses  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from mosaic_jax import model, parallel  # pylint: disable=import-outside-toplevel
  from mosaic_jax.model.autoencoder import Autoencoder  # pylint: disable=import-outside-toplevel
  from mosaic_jax.model.vae import VaeConfig  # pylint: disable=import-outside-toplevel
  from mosaic_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  from mosaic_jax.train import trainer  # pylint: disable=import-outside-toplevel
  from mosaic_jax.train.settings import settings_from_config  # pylint: disable=import-outside-toplevel

  c = SHAPES
  config = _recipe_config(code)  # the recipe: remat policy, optimizer, EMA, loss weights
  config.dtype = "float32"
  config.lora_rank = c["rank"]
  config.batch_size = 1
  config.mesh.update(dict(data=1, fsdp=1, tensor=1))
  vae = Autoencoder("vae", VaeConfig(), {})  # FLUX's latent geometry: 16 px per token, 64 channels
  token_px = 2 * vae.downsample_factor
  config.resolution, config.ref_resolution = c["tgt_hw"] * token_px, c["ref_hw"] * token_px
  config.dataset.max_pairs = PAIRS_PER_REF * c["R"]
  config.text_len = c["txt"]
  # The official step weighs MDL 1.0 from the first step; the recipe ramps it in from step 10,000.
  config.losses.mdl_ramp_start = config.losses.mdl_ramp_end = 0
  if remat is not None:
    config.remat_policy = remat
  head_dim = c["head_dim"]
  cfg = dataclasses.replace(
      model.config.flux1_dev(), num_layers=c["double"], num_single_layers=c["single"], attention_head_dim=head_dim,
      num_attention_heads=c["hidden_heads"], joint_attention_dim=TEXT_WIDTH, pooled_projection_dim=POOLED_WIDTH,
      axes_dims_rope=(8, (head_dim - 8) // 2, (head_dim - 8) // 2), remat_policy=config.remat_policy)
  mesh = parallel.make_mesh(config.mesh.to_dict(), jax.devices()[:1])
  text_shapes = ((c["txt"], TEXT_WIDTH), (POOLED_WIDTH,))
  compiled = trainer.compile_from_shapes(config, cfg, mesh, [c["R"]], vae, text_shapes)[c["R"]]

  # Real values with the shapes compile_from_shapes used, placed as the executable expects.
  settings = settings_from_config(config, vae, check_files=False)  # the trainer's own
  base = model.init_params(jax.random.key(0), cfg, jnp.float32)
  lora = model.init_lora(jax.random.key(1), base, cfg, c["rank"])
  state = step_lib.init_state({"lora": lora}, step_lib.make_optimizer(settings.optimizer, settings.total_steps))
  shardings = compiled.input_shardings[0]
  state, base = jax.device_put((state, base), (shardings[0], shardings[1]))
  rng = np.random.default_rng(0)
  latent = lambda *s: rng.standard_normal(s).astype(np.float32)
  h, hr, ch = 2 * c["tgt_hw"], 2 * c["ref_hw"], vae.latent_channels
  n_t, n_r = c["tgt_hw"] ** 2, c["ref_hw"] ** 2
  pair_ref = np.repeat(np.arange(c["R"]), PAIRS_PER_REF)[None].astype(np.int32)
  pair_ref_token = np.concatenate([rng.choice(n_r, PAIRS_PER_REF, replace=False) for _ in range(c["R"])])
  batch = {"target_mean": latent(1, h, h, ch), "target_std": np.zeros((1, h, h, ch), np.float32),
           "ref_means": latent(1, c["R"], hr, hr, ch), "t5": latent(1, c["txt"], TEXT_WIDTH),
           "pooled": latent(1, POOLED_WIDTH), "pair_ref": pair_ref,
           "pair_ref_token": pair_ref_token[None].astype(np.int32),
           "pair_target_token": rng.integers(0, n_t, (1, pair_ref.shape[1])).astype(np.int32),
           "pair_valid": np.ones(pair_ref.shape, bool), "drop_refs": np.zeros((1,), bool)}
  batch = jax.device_put(batch, shardings[2])
  lora_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(lora))
  return compiled, state, base, batch, lora_params, cfg


def run_ours(threads: int, steps: int, remat: str | None, code: str) -> dict:
  """Times the compiled step in this process (XLA_FLAGS were set by the parent)."""
  import time  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  compiled, state, base, batch, lora_params, cfg = build_ours(threads, remat, code)
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


def measure(side: str, threads: int, steps: int, official: str, remat: str | None, code: str = ROOT) -> dict:
  """One subprocess of `side` ("official", or ours from checkout `code`) pinned to the first `threads`
  cores; its JSON line."""
  env = dict(os.environ)
  if side == "official":
    env.update(OFFICIAL=official, THREADS=str(threads), BENCH_CFG=json.dumps({**SHAPES, "steps": steps}),
               OMP_NUM_THREADS=str(threads))
    stand_in = _cv2_stand_in()
    if stand_in:
      env["PYTHONPATH"] = os.pathsep.join(filter(None, [stand_in, env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, OFFICIAL_SCRIPT]
  else:
    env["XLA_FLAGS"] = (f"{env.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}"
                        f" intra_op_parallelism_threads={threads}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    if code != ROOT:  # a baseline checkout: its mosaic_jax, not the installed one
      env["PYTHONPATH"] = os.pathsep.join(filter(None, [code, env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--threads", str(threads), "--steps", str(steps),
           "--code", code]
    if remat:
      cmd += ["--remat", remat]
  out = subprocess.run(["taskset", "-c", _cores(threads)] + cmd, env=env, capture_output=True, text=True,
                       check=False)
  lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
  if out.returncode or not lines:
    raise SystemExit(f"{side} at {threads} thread(s) failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
  return json.loads(lines[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--official", default=os.environ.get("OFFICIAL", "/work/official_mosaic"),
                      help="folder with the official train.py and src/ (see ../shared/bench/README.md)")
  parser.add_argument("--threads", default="1,2", help="thread counts, comma separated")
  parser.add_argument("--rounds", type=int, default=3, help="official/ours pairs per thread count")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (after a warm-up)")
  parser.add_argument("--remat", default=None, help="override the recipe's remat policy (ours)")
  parser.add_argument("--only", choices=("both", "ours", "official"), default="both")
  parser.add_argument("--baseline", default="",
                      help="another checkout of this repository (e.g. `git archive` of the commit before a change): "
                           "its step is measured too, interleaved, as the 'baseline' side")
  parser.add_argument("--code", default=ROOT, help=argparse.SUPPRESS)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(run_ours(int(args.threads), args.steps, args.remat, args.code)), flush=True)
    return

  import numpy as np  # pylint: disable=import-outside-toplevel
  sides = {"both": ["official", "ours"], "ours": ["ours"], "official": ["official"]}[args.only]
  if args.baseline:
    sides.insert(sides.index("ours"), "baseline")
  thread_counts = [int(t) for t in args.threads.split(",")]
  results = {}
  for round_index in range(args.rounds):
    for threads in thread_counts:
      for side in sides:
        code = args.baseline if side == "baseline" else ROOT
        found = measure("ours" if side == "baseline" else side, threads, args.steps, args.official, args.remat, code)
        results.setdefault((side, threads), []).append(found)
        print(f"round {round_index + 1} threads {threads} {side:<8} median {found['median_s']:.3f} s "
              f"min {found['min_s']:.3f} s  lora params {found['lora_params']:,}", flush=True)
        if found["lora_params"] != LORA_PARAMS:
          raise SystemExit(f"{side}: {found['lora_params']:,} LoRA parameters, expected {LORA_PARAMS:,}")
  print(f"\nmedians over {args.rounds} round(s) of each run's median of {args.steps} steps (s); ratios to official")
  print(f"{'threads':>7} " + " ".join(f"{side:>9}" for side in sides) + "".join(
      f" {side + '/official':>18}" for side in sides if side != "official" and "official" in sides))
  for threads in thread_counts:
    med = {side: float(np.median([r["median_s"] for r in results[(side, threads)]])) for side in sides}
    ratios = "".join(f" {med[side] / med['official']:>18.2f}" for side in sides
                     if side != "official" and "official" in sides)
    print(f"{threads:>7} " + " ".join(f"{med[side]:>9.3f}" for side in sides) + ratios)
  print(f"LoRA parameters: {LORA_PARAMS:,} on every side")

if __name__ == "__main__":
  main()
