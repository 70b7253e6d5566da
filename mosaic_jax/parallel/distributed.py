"""Several processes as one job (a TPU pod slice, a multi-node GPU job): joining, who speaks, and
bringing the whole job down when one process fails.

- `initialize(force)`: `jax.distributed.initialize()` exactly when jax's own cluster detection finds a
  multi-process environment (SLURM, Open MPI, a Cloud TPU VM slice, a GKE TPU job, or an explicit
  JAX_COORDINATOR_ADDRESS), or when `force` says so; one process otherwise.
- `is_leader()` / `say(...)`: process 0 prints, writes config.json, events and images; every process
  still takes part in every collective.
- `exit_on_failure(...)`: a process that raises must not wait for the others in jax's shutdown
  barrier (up to `shutdown_timeout` s) or leave them blocked in a collective: it prints its traceback
  and exits at once, and the survivors are stopped by the coordination service when its heartbeats
  stop (`HEARTBEAT_TIMEOUT_S`), each with a non-zero status.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

import jax

# Seconds after which the coordination service declares a silent process dead and stops the others
# (jax's default is 100). Overridable where a slow filesystem or a long compile stalls heartbeats.
HEARTBEAT_TIMEOUT_S = int(os.environ.get("MOSAIC_HEARTBEAT_TIMEOUT_S", "30"))


def detected_cluster() -> str | None:
  """The cluster environment jax's auto-detection would join (its class name), or None."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  # jax has no public "is there a cluster?" query; its detection lives in jax._src.clusters (checked
  # on jax 0.10 and 0.12). Should that move, `force` (--distributed) still joins through jax itself.
  try:
    from jax._src import clusters
    environments = list(clusters.ClusterEnv._cluster_types)  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    return None
  for env in environments:
    if not getattr(env, "opt_in_only_method", False) and env.is_env_present():
      return env.__name__
  return None


def initialize(force: bool = False) -> str | None:
  """Joins the job when there is one (or when forced); returns the cluster name or None (one process).
  Must run before anything touches the devices."""
  cluster = detected_cluster()
  if cluster is None and not force:
    return None
  try:
    jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
  except ValueError as error:  # forced, but nothing tells jax the coordinator or the process count
    raise SystemExit(f"--distributed: jax could not find the job's coordinator ({error}); set "
                     "JAX_COORDINATOR_ADDRESS (host:port of process 0) and run under a scheduler jax "
                     "detects (SLURM, Open MPI, Cloud TPU, GKE), or drop --distributed.") from error
  return cluster or "forced"


def is_leader() -> bool:
  return jax.process_index() == 0


def say(*args, **kwargs) -> None:
  """print(), on process 0 only (the console is for people: one copy of each line)."""
  if is_leader():
    print(*args, **{"flush": True, **kwargs})


@contextlib.contextmanager
def exit_on_failure():
  """Around a multi-process program: an exception prints its traceback and ends this process at once
  with status 1, skipping the shutdown barrier that would wait for processes still blocked in a
  collective with this one. Single-process programs raise as usual."""
  try:
    yield
  except (KeyboardInterrupt, SystemExit):
    raise
  except BaseException as error:  # pylint: disable=broad-except
    from mosaic_jax import cli  # pylint: disable=import-outside-toplevel
    if jax.process_count() <= 1 or cli.is_user_error(error):  # cli.guarded prints one line, exits at once
      raise
    print(f"process {jax.process_index()} of {jax.process_count()} failed:", file=sys.stderr)
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access
