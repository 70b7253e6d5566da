"""Step time of the trainer with on-the-fly encoders against cached features, in one run.

The demo config (its dataset built in a temporary folder, its encoder features cached there by the
same code as launch/encode_dataset.py), trained `--steps` steps per run with no checkpoints, samples or
evaluation; runs alternate (on the fly, cached, on the fly, cached, ...) so that both see the same
machine load. Per run the median wall time between consecutive steps after `--warmup` steps; printed:
both medians over the runs and their ratio (1.0 = encoding on the fly costs nothing beyond cached
features).

  python benchmarks/trainer_encoders.py [--steps 60] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from mosaic_jax.configs import flux_ms
from mosaic_jax.settings import settings_from_config
from mosaic_jax.train import train_and_evaluate
from mosaic_jax.train.encode_features import encode_dataset


def demo_config(data_dir: str, steps: int, cached: str = ""):
  config = flux_ms.get_config("demo")
  config.dataset.data_dir = data_dir
  config.dataset.cached_features = cached
  config.total_steps = steps
  config.checkpoint_every = 10 * steps
  config.sample_every = 0
  config.eval_examples = 0
  config.log_every = steps
  return config


def median_step_time(config, workdir: str, warmup: int) -> float:
  stamps = []
  train_and_evaluate(config, workdir, on_step=lambda step, metrics: stamps.append(time.perf_counter()))
  return float(np.median(np.diff(stamps[warmup:])))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--warmup", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    data_dir, cache = os.path.join(tmp, "tfds"), os.path.join(tmp, "features")
    config = demo_config(data_dir, args.steps)
    encode_dataset(settings_from_config(config), cache, splits=[config.dataset.train_split])
    times = {"on the fly": [], "cached": []}
    for repeat in range(args.repeats):
      for mode, cached in (("on the fly", ""), ("cached", cache)):
        workdir = os.path.join(tmp, f"run_{mode.replace(' ', '_')}_{repeat}")
        times[mode].append(median_step_time(demo_config(data_dir, args.steps, cached), workdir, args.warmup))
        print(f"{mode:>10}: {1000 * times[mode][-1]:.1f} ms/step", flush=True)
  fly, cached = (float(np.median(times[m])) for m in ("on the fly", "cached"))
  print(f"median ms/step: on the fly {1000 * fly:.1f}, cached {1000 * cached:.1f}; ratio {fly / cached:.2f}")


if __name__ == "__main__":
  main()
