"""Kill soak: launch/train.py on the tiny config, killed with SIGKILL at random moments (after a random
number of logged steps plus a random fraction of a step, so kills land in steps, in saves and in LoRA
exports) and restarted each time, until it finishes; then its losses (the last logged value of every
step) and its final LoRA files are compared with an uninterrupted run's.

  python benchmarks/kill_soak.py --kills 50 --steps 200 [--seed 0] [--workdir /tmp/soak]

Prints the kills, how many landed while a save was in flight (a *.orbax-checkpoint-tmp folder on
disk), the resumes, the steps compared and whether everything is bit-identical; exits 1 if not.
tests/test_kill_soak.py runs a short soak (10 kills) with the same function.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

from mosaic_jax.train import inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path: str, name: str):
  """The module at path (the tests' tiny training command, which this soak shares)."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


_train_fixtures = _load(os.path.join(ROOT, "tests", "train_fixtures.py"), "train_fixtures")
tensorboard_scalars, tiny_config, train_command = (_train_fixtures.tensorboard_scalars, _train_fixtures.tiny_config,
                                                   _train_fixtures.train_command)


def _environment(cache_dir: str) -> dict:
  """Every restart reuses the compiled step through jax's persistent cache."""
  return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache_dir,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "PYTHONUNBUFFERED": "1"}


def _run_once(command, env, kill_after_steps: int | None, kill_fraction: float, workdir: str):
  """Runs the command; with kill_after_steps, SIGKILLs it kill_fraction of a step after that many new
  step lines. Returns (exit status or "killed", whether a save was in flight at the kill)."""
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
  step_times: list[float] = []
  lines: list[str] = []

  def read():
    for line in process.stdout:
      lines.append(line)
      if line.startswith("step "):
        step_times.append(time.perf_counter())

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  if kill_after_steps is None:
    status = process.wait()
    reader.join()
    if status != 0:
      raise RuntimeError(f"the final run failed ({status}):\n{''.join(lines[-40:])}")
    return status, False
  while process.poll() is None and len(step_times) < kill_after_steps + 1:
    time.sleep(0.005)
  if process.poll() is not None:  # finished (or failed) before the kill
    reader.join()
    if process.returncode != 0:
      raise RuntimeError(f"a run failed ({process.returncode}):\n{''.join(lines[-40:])}")
    return process.returncode, False
  step_time = (step_times[-1] - step_times[0]) / max(len(step_times) - 1, 1) if len(step_times) > 1 else 0.2
  time.sleep(kill_fraction * step_time)
  during_save = bool(glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*")))
  process.send_signal(signal.SIGKILL)
  process.wait()
  reader.join()
  return "killed", during_save


def last_losses(workdir: str) -> dict[int, float]:
  """step -> the loss the last (surviving) run logged for it."""
  return dict(tensorboard_scalars(os.path.join(workdir, "tensorboard")).get("loss", []))


def soak(data_dir: str, root: str, kills: int, steps: int, seed: int = 0, cache_dir: str | None = None) -> dict:
  cache_dir = cache_dir or os.path.join(root, "jax_cache")
  env = _environment(cache_dir)
  settings = dict(total_steps=steps, checkpoint_every=1, keep_checkpoints=2, log_every=1)
  reference = os.path.join(root, "uninterrupted")
  # The uninterrupted run goes on beside the soak: a restart is mostly single-threaded Python (imports,
  # tracing), so on two cores the two overlap. Its steps and LoRA do not depend on timing.
  reference_s: list[float] = []

  def run_reference():
    begin = time.perf_counter()
    _run_once(train_command(data_dir, reference, **settings), env, None, 0.0, reference)
    reference_s.append(time.perf_counter() - begin)

  # A synthetic dataset is built on first use: here, once, before the two runs start side by side.
  config = tiny_config(data_dir, **settings)
  inputs.open_dataset(config, config.dataset.train_split)
  reference_thread = threading.Thread(target=run_reference)
  reference_thread.start()
  workdir = os.path.join(root, "killed")
  rng = random.Random(seed)
  done_kills = during_saves = runs = 0
  start = time.perf_counter()
  while True:
    runs += 1
    if done_kills < kills:
      status, during_save = _run_once(train_command(data_dir, workdir, **settings), env, rng.randint(0, 2),
                                      rng.random(), workdir)
    else:
      status, during_save = _run_once(train_command(data_dir, workdir, **settings), env, None, 0.0, workdir)
    if status == "killed":
      done_kills += 1
      during_saves += during_save
      continue
    break
  soak_s = time.perf_counter() - start
  reference_thread.join()
  if not reference_s:
    raise RuntimeError("the uninterrupted run failed (its output is above)")
  expected, got = last_losses(reference), last_losses(workdir)
  lora = {}
  for name in ("lora.safetensors", "lora_ema.safetensors"):
    with open(os.path.join(reference, "lora", str(steps), name), "rb") as a, \
         open(os.path.join(workdir, "lora", str(steps), name), "rb") as b:
      lora[name] = a.read() == b.read()
  return dict(kills=done_kills, kills_during_saves=during_saves, runs=runs, steps=steps,
              losses_compared=len(expected), losses_identical=got == expected and len(expected) == steps,
              lora_identical=all(lora.values()), uninterrupted_s=reference_s[0], soak_s=soak_s)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--kills", type=int, default=50)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default="", help="default: a new temporary folder")
  args = parser.parse_args()
  root = args.workdir or tempfile.mkdtemp(prefix="kill_soak_")
  result = soak(os.path.join(root, "tfds"), root, args.kills, args.steps, args.seed)
  print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
  sys.exit(0 if result["losses_identical"] and result["lora_identical"] else 1)


if __name__ == "__main__":
  main()
