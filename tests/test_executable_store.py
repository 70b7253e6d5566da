"""The executable store (train/executable_store.py): a stored step runs as the compiled one did, its
key moves with anything the trace sees and not with the run's cadence, a damaged entry is reported and
compiled again, and an executable jax loaded from its own cache is not stored."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaic_jax.configs import flux_ms
from mosaic_jax.train import executable_store
from mosaic_jax.settings import settings_from_config


def _step(state, batch, scale):
  return {"w": state["w"] * scale + batch.sum()}, jnp.sum(state["w"] ** 2)


@pytest.fixture
def store(tmp_path):
  previous = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  yield executable_store.directory(jax.devices())
  jax.config.update("jax_compilation_cache_dir", previous[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])


def _lowered(scale=2.0, width=4):
  jitted = jax.jit(functools.partial(_step, scale=scale), donate_argnums=(0,))
  args = ({"w": jax.ShapeDtypeStruct((width, width), jnp.float32)}, jax.ShapeDtypeStruct((3,), jnp.float32))
  return jitted.lower(*args), args


def _run(compiled, width=4):
  state = {"w": jnp.arange(width * width, dtype=jnp.float32).reshape(width, width)}
  out, norm = compiled(state, jnp.arange(3, dtype=jnp.float32))
  return np.asarray(out["w"]), float(norm)


def test_a_stored_step_loads_and_computes_what_the_compiled_one_did(store):
  lowered, args = _lowered()
  compiled, fresh = executable_store.compile_fresh(lowered)
  assert fresh  # an empty jax cache: compiled here
  name = executable_store.key("scale 2", args, None)
  assert executable_store.load(store, name, print) is None
  executable_store.save(store, name, compiled)
  loaded = executable_store.load(store, name, print)
  assert loaded is not None
  expected = _run(compiled)
  np.testing.assert_array_equal(_run(loaded)[0], expected[0])
  assert _run(loaded)[1] == expected[1]
  # The second compile of the same program comes from jax's cache: not stored (on XLA:CPU such an
  # executable serializes without its kernels).
  assert executable_store.compile_fresh(_lowered()[0])[1] is False


def test_a_damaged_entry_is_reported_and_not_used(store, capsys):
  lowered, args = _lowered(width=5)
  compiled, _ = executable_store.compile_fresh(lowered)
  name = executable_store.key("width 5", args, None)
  executable_store.save(store, name, compiled)
  path = store / f"{name}.exe"
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF  # one flipped byte inside the executable
  path.write_bytes(bytes(data))
  assert executable_store.load(store, name, print) is None
  assert f"{path}: the stored compiled step does not match its checksum" in capsys.readouterr().out
  path.write_bytes(bytes(data[:100]))  # cut short
  assert executable_store.load(store, name, print) is None


def test_the_key_follows_the_trace_and_not_the_runs_cadence(store):
  settings = settings_from_config(flux_ms.get_config("demo"), check_files=False)
  args = ({"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)},)
  key = lambda s, a=args: executable_store.key(s.for_step(), a, None)
  base = key(settings)
  # The run's cadence, reporting and data location are not seen by the step.
  assert key(dataclasses.replace(settings, log_every=7, checkpoint_every=3, sample_every=0)) == base
  assert key(dataclasses.replace(settings, dataset=dataclasses.replace(settings.dataset, data_dir="/elsewhere"))) == base
  # What the step computes with is.
  assert key(dataclasses.replace(settings, total_steps=settings.total_steps + 1)) != base
  assert key(dataclasses.replace(settings, lora_rank=settings.lora_rank * 2)) != base
  assert key(dataclasses.replace(settings, losses=dataclasses.replace(settings.losses, scal_weight=0.5))) != base
  assert key(settings, ({"w": jax.ShapeDtypeStruct((4, 4), jnp.bfloat16)},)) != base
  assert key(settings, ({"w": jax.ShapeDtypeStruct((4, 5), jnp.float32)},)) != base
  # and jax's flags
  with jax.default_matmul_precision("bfloat16"):
    assert key(settings) != base
