"""Where a (re)start of the trainer spends compiling its step: tracing, lowering, the XLA compile, and,
warm, the load from jax's persistent compilation cache; the recipe's step at FLUX.1-dev scale.

The step is the trainer's own (train/compilation.py's compile_from_shapes, as train_memory.py compiles
it: the recipe config, its sharding rules and remat policy, abstract weights). Each phase is read from jax's own
duration events (jax.monitoring): the step's trace (jaxpr_trace_duration), its lowering to StableHLO
(jaxpr_to_mlir_module_duration) and the backend's compile (backend_compile_duration: with the cache
on, the cache key's hash plus either the XLA compile or the cache read, cache_retrieval_time_sec).
Two fresh processes share one new cache folder, as a first start and a restart would: cold (an empty
cache: trace + lower + XLA compile, written to the cache) and warm (trace + lower + the cache's load).
jax's cache keys on the lowered program, so a restart always traces and lowers: that is the most a
cache of traced steps could save beyond jax's own.

With --topology the TPU compiler compiles for a slice's compile-only devices (libtpu, no TPU); jax
cannot load an executable onto those devices, so there only the cold start is measured. Scanned
blocks are traced and lowered once whatever their number, so --layers (fewer blocks) leaves the trace
and lowering times as they are and shortens the XLA compile.

  python benchmarks/compile_phases.py --topology v5p-8 --refs 6             # FLUX.1-dev recipe, TPU compiler
  python benchmarks/compile_phases.py --cpu_devices 4 --layers 2,2 --refs 6  # XLA:CPU, cold and warm
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import common

# jax.monitoring's duration events, by the phase they time
EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
          "/jax/core/compile/backend_compile_duration": "backend_s",
          "/jax/compilation_cache/cache_retrieval_time_sec": "cache_load_s"}
STEP = "train_step"  # the name jax gives the step's trace, lowering and compile events


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--topology", default="", help="compile for this TPU slice (a key of tpu_compile.SLICES; "
                      "needs libtpu, no TPU): the cold start only")
  parser.add_argument("--cpu_devices", type=int, default=0, help="fake this many CPU devices (0: real devices)")
  parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (-1: the remaining devices)")
  parser.add_argument("--batch", type=int, default=0, help="global batch (0: one per device)")
  parser.add_argument("--refs", type=int, default=6, help="reference count the step is compiled for")
  parser.add_argument("--remat", default="full", help="remat policy")
  parser.add_argument("--attention", default=None, help="attention_impl (default splash with --topology, else xla)")
  parser.add_argument("--layers", default="", help="double,single blocks instead of FLUX.1-dev's 19,38")
  parser.add_argument("--cache", default="", help="jax's cache folder, kept (default: a new one, removed at the end)")
  parser.add_argument("--worker", default="", help=argparse.SUPPRESS)  # "cold" or "warm": one start, JSON out
  return parser.parse_args()


def start(args) -> dict:
  """One start in this process: compiles the step with jax's cache in args.cache; seconds per phase."""
  if args.topology or args.cpu_devices:  # before jax starts
    os.environ["JAX_PLATFORMS"] = "cpu"
  if args.cpu_devices:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.cpu_devices}"
  import jax  # pylint: disable=import-outside-toplevel
  from mosaic_jax.train import tpu_compile  # pylint: disable=import-outside-toplevel

  jax.config.update("jax_compilation_cache_dir", args.cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  seconds = dict.fromkeys(EVENTS.values(), 0.0)

  def listener(event, duration, **kwargs):
    if event in EVENTS and STEP in str(kwargs.get("fun_name", STEP)):
      seconds[EVENTS[event]] += duration
  jax.monitoring.register_event_duration_secs_listener(listener)
  devices = tpu_compile.slice_devices(args.topology) if args.topology else None
  config, mesh = common.flux_recipe(args.mesh, args.batch, devices)
  layers = tuple(int(n) for n in args.layers.split(",")) if args.layers else None
  attention = args.attention or ("splash" if args.topology else "xla")
  cfg = common.flux_transformer(args.remat, attention, layers)
  begin = time.perf_counter()
  common.compile_recipe_step(config, cfg, mesh, [args.refs], common.flux_vae(), common.FLUX_TEXT_SHAPES)
  seconds["total_s"] = time.perf_counter() - begin
  seconds["devices"] = f"{len(mesh.devices.flat)} x {mesh.devices.flat[0].device_kind}"
  seconds["blocks"] = f"{cfg.num_layers}+{cfg.num_single_layers}"
  return seconds


def run_worker(args, kind: str) -> dict:
  """A start in a fresh process (a restart does not share jax's in-memory caches)."""
  argv = [a for a in sys.argv[1:] if not a.startswith("--cache") and not a.startswith("--worker")]
  out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--cache", args.cache, "--worker", kind],
                       capture_output=True, text=True, check=False)
  lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
  if out.returncode or not lines:
    raise SystemExit(f"the {kind} start failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
  return json.loads(lines[-1])


def main():
  args = parse_args()
  if args.worker:
    print(json.dumps(start(args)), flush=True)
    return
  if not args.cache:  # a new cache folder, removed at the end
    with tempfile.TemporaryDirectory(prefix="compile_phases_cache_") as args.cache:
      measure(args)
  else:
    measure(args)


def measure(args) -> None:
  """The cold start, then (on devices that run here) the warm one, each printed as a line."""
  for kind in ["cold"] if args.topology else ["cold", "warm"]:
    s = run_worker(args, kind)
    other = s["total_s"] - s["trace_s"] - s["lower_s"] - s["backend_s"]
    compile_or_load = (f"cache load {s['cache_load_s']:.2f} s" if s["cache_load_s"] else
                       f"XLA compile {s['backend_s']:.1f} s")
    print(f"{kind} start, {args.topology or 'local'} ({s['devices']}), {s['blocks']} blocks, {args.refs} "
          f"reference(s), remat {args.remat}: trace {s['trace_s']:.2f} s, lower {s['lower_s']:.2f} s, "
          f"{compile_or_load} (backend total {s['backend_s']:.2f} s), other {other:.2f} s; "
          f"total {s['total_s']:.1f} s; trace + lower = {100 * (s['trace_s'] + s['lower_s']) / s['total_s']:.1f}% "
          f"of the total", flush=True)
  size = sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(args.cache) for name in names)
  print(f"jax's cache after these starts: {size / 2 ** 20:.1f} MiB")


if __name__ == "__main__":
  main()
