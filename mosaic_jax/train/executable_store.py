"""Compiled train steps kept beside jax's compilation cache, so that a restart skips tracing too.

jax's persistent cache saves the XLA compile, but its key is the lowered program: every restart still
traces and lowers the step first (seconds on the tiny config, most of a resume there; tens of seconds
at FLUX scale). This store keys the serialized executable by everything the trace depends on instead:
the source of this package, the versions of the libraries the trace runs through, jax's flags and
XLA's environment, the step's static arguments (transformer config, settings) and the abstract
inputs with their shardings and devices. A changed byte in any of them is a different key, so an
entry is never used for another program; each entry carries the SHA-256 of its payload, and one that
does not match (a corrupt or cut-short file) is reported, ignored and written again.

The store is on exactly when jax's compilation cache is (`JAX_COMPILATION_CACHE_DIR` or
`jax_compilation_cache_dir`), in its `mosaic_jax_steps/` folder, only for a single process (a
multi-process executable is loaded per process onto global devices; not done until it is tested on a
pod) and only for devices that run here (not for the compile-only devices of tpu_compile.py). An executable that jax itself loaded from its cache is not stored: on XLA:CPU it serializes
without its kernels (jaxlib 0.10), so only fresh compiles are kept.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import pathlib
import pickle
from typing import Any

import jax
from etils import epath
from jax.experimental import serialize_executable

FORMAT = b"mosaic_jax compiled step v1\n"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_LIBRARIES = ("jax", "jaxlib", "numpy", "optax", "einops", "ml_collections")
_ENVIRONMENT = ("XLA_FLAGS", "LIBTPU_INIT_ARGS", "JAX_PLATFORMS", "JAX_NUM_CPU_DEVICES")
_source_digest: str | None = None


def directory(devices) -> epath.Path | None:
  """Where the store is for a step on `devices`, or None when it is off: no compilation cache, several
  processes, or devices this process does not run (compile-only TPU devices, tpu_compile.py)."""
  cache = jax.config.jax_compilation_cache_dir
  if not cache or jax.process_count() > 1 or not set(devices) <= set(jax.local_devices()):
    return None
  return epath.Path(cache) / "mosaic_jax_steps"


def _package_source() -> str:
  """SHA-256 of every Python file of this package, read once per process."""
  global _source_digest
  if _source_digest is None:
    digest = hashlib.sha256()
    root = pathlib.Path(__file__).resolve().parents[1]
    for path in sorted(root.rglob("*.py")):
      digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    _source_digest = digest.hexdigest()
  return _source_digest


def key(static: Any, abstract_args: Any, shardings: Any) -> str:
  """The entry name for a step with these static arguments (their repr), abstract inputs and
  shardings, on this machine's devices, code, libraries and flags."""
  versions = {}
  for name in _LIBRARIES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  devices = [(d.id, d.platform, d.device_kind, d.process_index) for d in jax.devices()]
  parts = (FORMAT, _package_source(), versions, sorted((k, repr(v)) for k, v in jax.config.values.items()),
           {name: os.environ.get(name) for name in _ENVIRONMENT}, devices, repr(static),
           repr(jax.tree_util.tree_map(lambda x: (x.shape, x.dtype, getattr(x, "sharding", None)), abstract_args)),
           repr(shardings))
  return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def load(folder: epath.Path, name: str, report) -> Any | None:
  """The compiled step stored as `name`, or None (not stored; a damaged entry is reported)."""
  path = folder / f"{name}.exe"
  if not path.exists():
    return None
  data = path.read_bytes()
  digest, payload = data[len(FORMAT):len(FORMAT) + 32], data[len(FORMAT) + 32:]
  if not data.startswith(FORMAT) or hashlib.sha256(payload).digest() != digest:
    report(f"{path}: the stored compiled step does not match its checksum (corrupt or cut short); "
           f"compiling again")
    return None
  executable, in_tree, out_tree = pickle.loads(payload)
  return serialize_executable.deserialize_and_load(executable, in_tree, out_tree,
                                                   execution_devices=jax.devices())


def save(folder: epath.Path, name: str, compiled) -> None:
  """Stores `compiled` as `name` (written to a temporary name and renamed, so a reader never sees
  half a file)."""
  payload = pickle.dumps(serialize_executable.serialize(compiled))
  folder.mkdir(parents=True, exist_ok=True)
  temporary = folder / f"{name}.exe.tmp{os.getpid()}"
  temporary.write_bytes(FORMAT + hashlib.sha256(payload).digest() + payload)
  temporary.rename(folder / f"{name}.exe")


def compile_fresh(lowered) -> tuple[Any, bool]:
  """(lowered.compile(), whether it was compiled here rather than loaded from jax's cache)."""
  hits = []
  listener = lambda event, **kwargs: hits.append(event) if event == _CACHE_HIT_EVENT else None
  jax.monitoring.register_event_listener(listener)
  try:
    compiled = lowered.compile()
  finally:
    jax.monitoring.unregister_event_listener(listener)
  return compiled, not hits
