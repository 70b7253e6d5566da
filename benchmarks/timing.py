"""The one timer the benchmarks share: best wall time of repeated calls after a warm-up call."""

import time

import jax


def best_time(fn, *args, repeats: int = 5) -> float:
  """Seconds of the fastest of `repeats` calls of fn(*args), after one warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best
