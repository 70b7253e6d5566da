"""Kill soak: launch/train.py on the tiny config, saving every step, killed with SIGKILL at random
moments (a random fraction of a step after its first step line or its first newly committed step, so
kills land in steps, in saves and in LoRA exports) and restarted each time, until it finishes; then its
losses (the last logged value of every step) and its final LoRA files are compared with an
uninterrupted run's (a plain `python launch/train.py` beside it).

  python tests/kill_soak.py --kills 50 --steps 60 [--seed 0] [--workdir /tmp/soak]

Prints the kills, how many landed while a save was in flight (the killed run left a step folder that
orbax never committed, *.orbax-checkpoint-tmp, on disk), how many before a run's first step, the runs,
the steps the last run still had to do, the steps compared and whether everything is bit-identical;
exits 1 if not. Each run's output is in WORKDIR/logs. tests/test_kill_soak.py runs a short soak (10
kills) with the same function.
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from fork_server import ForkServer
from mosaic_jax.settings import settings_from_config
from mosaic_jax.train.datasets import open_dataset
from train_fixtures import tensorboard_scalars, tiny_config, train_command

# What launch/train.py imports, loaded once by the fork server that starts each run of the soak.
TRAINER_MODULES = ["absl.app", "absl.flags", "ml_collections.config_flags", "mosaic_jax.cli",
                   "mosaic_jax.parallel.distributed", "mosaic_jax.train", "mosaic_jax.configs.flux_ms",
                   "mosaic_jax.data.semalign_ms", "mosaic_jax.data.pipeline", "orbax.checkpoint",
                   "tensorflow_datasets", "grain", "tensorboardX", "PIL.Image"]
COMPILED = "compiled the train step"  # the trainer's line once the step is compiled (and cached)
TEMPORARY_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step folder whose save has not committed


def _environment(cache_dir: str) -> dict:
  """Every restart reuses the compiled step through jax's persistent cache."""
  return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache_dir,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "PYTHONUNBUFFERED": "1"}


def _tail(log: str, lines: int = 40) -> str:
  with open(log, errors="replace") as f:
    return "".join(f.readlines()[-lines:])


def _step_line_times(log: str, seen: list[float], offset: int) -> int:
  """Appends the arrival time of every new complete "step " line of log to seen; the new offset."""
  with open(log, "rb") as f:
    f.seek(offset)
    data = f.read()
  complete = data[:data.rfind(b"\n") + 1]
  now = time.perf_counter()
  seen.extend(now for line in complete.split(b"\n") if line.startswith(b"step "))
  return offset + len(complete)


def _saves_cut_short(workdir: str, since: float) -> list[str]:
  """The step folders a run started after `since` left uncommitted (orbax renames a step folder to its
  final name when its save commits): proof that the run was killed while that save was in flight."""
  folders = glob.glob(os.path.join(workdir, "checkpoints", f"*{TEMPORARY_SUFFIX}*"))
  return sorted(os.path.basename(f) for f in folders if os.stat(f).st_mtime >= since)


def committed_steps(workdir: str) -> list[int]:
  folder = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def _killed_run(server, command, log: str, workdir: str, commits: int | None, delay_s: float):
  """Starts a run through the fork server and SIGKILLs it delay_s after its first step line once it has
  committed `commits` new steps, or, with commits None, delay_s after its start (before its first
  step, if delay_s is short enough). Returns (None, the save folders it left uncommitted, the seconds
  between its step lines, seconds from its start to its first step line or None), or (exit status, ...)
  when it ended before the kill."""
  since = time.time()
  base = (committed_steps(workdir) or [0])[-1]
  pid = server.start(command[1], command[2:], log)
  started = ready = time.perf_counter()  # ready: when the commits were last still missing
  step_times: list[float] = []
  offset = 0
  while server.poll(pid) is None:
    now = time.perf_counter()
    if commits is None:
      if now - started >= delay_s:
        break
    elif step_times and (committed_steps(workdir) or [0])[-1] - base >= commits:
      if now - max(step_times[0], ready) >= delay_s:
        break
    else:
      ready = now
    time.sleep(0.005)
    offset = _step_line_times(log, step_times, offset)
  first_step_s = step_times[0] - started if step_times else None
  intervals = [b - a for a, b in zip(step_times, step_times[1:])]
  if server.poll(pid) is not None:
    return server.poll(pid), [], intervals, first_step_s
  os.kill(pid, signal.SIGKILL)
  status = server.wait(pid)
  if status != -signal.SIGKILL:  # it ended on its own just before the signal
    return status, [], intervals, first_step_s
  return None, _saves_cut_short(workdir, since), intervals, first_step_s


def last_losses(workdir: str) -> dict[int, float]:
  """step -> the loss the last (surviving) run logged for it."""
  return dict(tensorboard_scalars(os.path.join(workdir, "tensorboard")).get("loss", []))


def soak(data_dir: str, root: str, kills: int, steps: int, seed: int = 0, cache_dir: str | None = None) -> dict:
  """Each kill lands a random fraction of a step period (the median time between step lines; a save
  every step) after a run's first step line, or after its first newly committed step: with a save every
  step, in a step, in a save (orbax's commit), or in the LoRA export and pruning that follow a commit.
  Half the runs commit a step before their kill, so the soak resumes from ever later steps. A kill
  there lets a run commit at most two steps more, so once fewer steps remain a run is killed at a
  random moment of its start instead (restore, compilation): the soak never runs out of steps before its
  last kill, whatever the timing. The runs start from a fork server that has imported the trainer's
  libraries once (fork_server.py), each a new process."""
  if steps < 4:
    raise ValueError(f"steps={steps}: the soak needs 4 or more (a kill in the steps may let two more commit)")
  cache_dir = cache_dir or os.path.join(root, "jax_cache")
  env = _environment(cache_dir)
  settings = dict(total_steps=steps, checkpoint_every=1, keep_checkpoints=2, log_every=1)
  reference = os.path.join(root, "uninterrupted")
  logs = os.path.join(root, "logs")
  os.makedirs(logs, exist_ok=True)
  # The uninterrupted run is a plain `python launch/train.py` beside the soak: a restart is mostly
  # single-threaded Python (tracing), so on two cores the two overlap. Its losses and LoRA do not
  # depend on timing, nor on when checkpoints are written: it saves only its last step (the
  # comparison also checks that saving every step changes nothing), and so takes less of the soak's time.
  config = tiny_config(data_dir, **settings)
  open_dataset(settings_from_config(config), config.dataset.train_split)  # built once, before the runs start side by side
  reference_log = os.path.join(logs, "uninterrupted.log")
  reference_s: list[float] = []
  with open(reference_log, "w") as out:
    begin = time.perf_counter()
    reference_run = subprocess.Popen(train_command(data_dir, reference, **{**settings, "checkpoint_every": steps}),
                                     stdout=out, stderr=subprocess.STDOUT, env=env)
  waiter = threading.Thread(target=lambda: (reference_run.wait(), reference_s.append(time.perf_counter() - begin)))
  waiter.start()
  workdir = os.path.join(root, "killed")
  command = train_command(data_dir, workdir, **settings)
  rng = random.Random(seed)
  done_kills = runs = startup_kills = during_saves = 0
  startup_s = None
  intervals: list[float] = []  # seconds between step lines (a save every step): what a kill's delay spans
  start = time.perf_counter()
  server = None
  try:
    server = ForkServer(TRAINER_MODULES, env)  # its imports overlap the reference's compilation
    # The soak's runs start once the uninterrupted run has compiled the step into the shared persistent
    # cache (its settings differ only in checkpoint_every, which the step does not see): every run of
    # the soak then finds it there (two cold compilations side by side take twice as long on two cores).
    while reference_run.poll() is None and COMPILED not in open(reference_log, errors="replace").read():
      time.sleep(0.05)
    while done_kills < kills:
      runs += 1
      log = os.path.join(logs, f"run_{runs}.log")
      remaining = steps - (committed_steps(workdir) or [0])[-1]
      # A kill delay_s after the commits lands at most two steps later: those must not finish the run.
      commits = rng.randint(0, 1) if remaining >= 4 or startup_s is None else None
      if commits is not None and remaining < commits + 3:
        commits = 0 if remaining >= 3 else None
      fraction = rng.random()
      if commits is None:
        startup_kills += 1
        delay_s = fraction * startup_s
      else:
        delay_s = fraction * (statistics.median(intervals) if intervals else 1.0)
      status, cut_short, run_intervals, first_step_s = _killed_run(server, command, log, workdir, commits, delay_s)
      if status is not None:
        raise RuntimeError(f"run {runs} ended ({status}) before its kill:\n{_tail(log)}")
      intervals += run_intervals
      startup_s = first_step_s or startup_s  # the latest restart's
      done_kills += 1
      during_saves += bool(cut_short)
    runs += 1
    final_run_steps = steps - (committed_steps(workdir) or [0])[-1]
    final_log = os.path.join(logs, f"run_{runs}.log")
    status = server.wait(server.start(command[1], command[2:], final_log))
    if status != 0:
      raise RuntimeError(f"the final run failed ({status}):\n{_tail(final_log)}")
  except BaseException:
    reference_run.kill()
    raise
  finally:
    if server is not None:
      server.close()
    waiter.join()
  soak_s = time.perf_counter() - start
  if reference_run.returncode != 0:
    raise RuntimeError(f"the uninterrupted run failed ({reference_run.returncode}):\n{_tail(reference_log)}")
  expected, got = last_losses(reference), last_losses(workdir)
  lora = {}
  for name in ("lora.safetensors", "lora_ema.safetensors"):
    with open(os.path.join(reference, "lora", str(steps), name), "rb") as a, \
         open(os.path.join(workdir, "lora", str(steps), name), "rb") as b:
      lora[name] = a.read() == b.read()
  return dict(kills=done_kills, kills_during_saves=during_saves, kills_before_first_step=startup_kills,
              runs=runs, steps=steps, final_run_steps=final_run_steps, losses_compared=len(expected),
              losses_identical=got == expected and len(expected) == steps, lora_identical=all(lora.values()),
              uninterrupted_s=reference_s[0], soak_s=soak_s)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--kills", type=int, default=50)
  parser.add_argument("--steps", type=int, default=60, help="about one step per kill: a kill commits 0.5 on average")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default="", help="default: a new temporary folder")
  args = parser.parse_args()
  root = args.workdir or tempfile.mkdtemp(prefix="kill_soak_")
  result = soak(os.path.join(root, "tfds"), root, args.kills, args.steps, args.seed)
  print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
  sys.exit(0 if result["losses_identical"] and result["lora_identical"] else 1)


if __name__ == "__main__":
  main()
