"""The mesh from the config, the logical-axis sharding of parameter, LoRA and optimizer pytrees, and the
activation pins that keep fsdp devices on their own examples."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from mosaic_jax import model, parallel
from mosaic_jax.parallel import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mesh_from_config_has_explicit_axis_types_and_fills_minus_one():
  mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
  assert mesh.axis_types == (AxisType.Auto,) * 3
  with pytest.raises(ValueError, match="unknown axes"):
    parallel.make_mesh({"data": -1, "pipeline": 1})
  with pytest.raises(ValueError, match="needs"):
    parallel.make_mesh({"data": jax.device_count() + 1})


def test_rules_give_column_and_row_parallel_kernels_with_a_layer_axis():
  assert parallel.param_logical_axes("transformer_blocks/attn/to_q/kernel", 3) == ("layers", "embed", "mlp")
  assert parallel.param_logical_axes("transformer_blocks/attn/to_out/0/kernel", 3) == ("layers", "mlp", "embed")
  assert parallel.param_logical_axes("single_transformer_blocks/proj_out/lora_A", 3) == ("layers", "mlp", "lora_rank_split")
  assert parallel.param_logical_axes("x_embedder/lora_B", 2) == ("lora_rank_split", "mlp")
  assert parallel.param_logical_axes("x_embedder/bias", 1) == (None,)
  assert parallel.logical_to_spec(("layers", "embed", "mlp")) == PartitionSpec(None, "fsdp", "tensor")
  with pytest.raises(ValueError, match="no entry"):
    parallel.logical_to_spec(("sequence",))


def test_dimensions_the_mesh_does_not_divide_stay_replicated():
  mesh = AbstractMesh((1, 2, 4), ("data", "fsdp", "tensor"))
  spec = PartitionSpec(None, "fsdp", "tensor")
  assert sharding._fit_to_shape(spec, (3, 64, 128), mesh) == PartitionSpec(None, "fsdp", "tensor")
  assert sharding._fit_to_shape(spec, (3, 63, 6), mesh) == PartitionSpec(None, None, None)


def test_optimizer_moments_and_ema_follow_their_parameters():
  cfg = model.tiny()
  params = jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg))
  lora = jax.eval_shape(lambda: model.init_lora(jax.random.key(1), model.init_params(jax.random.key(0), cfg),
                                                cfg, 4))
  opt_state = jax.eval_shape(optax.adamw(1e-3).init, lora)
  mesh = AbstractMesh((1, 2, 2), ("data", "fsdp", "tensor"))  # shapes only: no devices needed
  paths = lambda tree: {jax.tree_util.keystr(p): l for p, l in jax.tree_util.tree_flatten_with_path(tree)[0]}
  specs = {k: s.spec for k, s in paths(parallel.tree_shardings({"trainable": lora, "opt": opt_state}, mesh)).items()}
  q_a = [k for k in specs if k.endswith("['transformer_blocks']['attn']['to_q']['lora_A']")]
  assert len(q_a) == 3  # the LoRA leaf, Adam's mu and nu
  assert {specs[k] for k in q_a} == {PartitionSpec(None, "fsdp", None)}
  full = parallel.tree_shardings(params, mesh)
  assert full["transformer_blocks"]["ff"]["net"]["2"]["kernel"].spec == PartitionSpec(None, "tensor", "fsdp")


def test_every_lora_factor_is_split_over_fsdp():
  """Both factors (and so their Adam moments and EMA copies) divide over fsdp alone: one by its embed
  dimension, the other by its rank dimension."""
  cfg = model.tiny()
  params = jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg))
  lora = jax.eval_shape(lambda: model.init_lora(jax.random.key(1), params, cfg, 4))
  mesh = AbstractMesh((1, 4, 1), ("data", "fsdp", "tensor"))
  specs = jax.tree_util.tree_flatten_with_path(parallel.tree_shardings(lora, mesh))[0]
  assert specs
  for path, leaf_sharding in specs:
    assert "fsdp" in tuple(leaf_sharding.spec), jax.tree_util.keystr(path)


def _fsdp_flops_child() -> dict:
  """In a 4-CPU-device process: per-device FLOPs of the recipe's step (a narrow FLUX, 2 references)
  on an fsdp=4 mesh and on one device, for the same global batch of 4."""
  import dataclasses
  from mosaic_jax.configs import flux_ms
  from mosaic_jax.model.autoencoder import Autoencoder
  from mosaic_jax.model.vae import VaeConfig
  from mosaic_jax.settings import settings_from_config
  from mosaic_jax.train import compilation

  config = flux_ms.get_config("default")
  config.batch_size, config.lora_rank, config.resolution, config.ref_resolution = 4, 16, 256, 256
  config.text_len, config.dataset.max_pairs = 64, 256
  cfg = dataclasses.replace(model.config.flux1_dev(), num_layers=1, num_single_layers=1, attention_head_dim=64,
                            num_attention_heads=4, axes_dims_rope=(8, 28, 28), remat_policy="full")
  out = {}
  for name, sizes, devices in (("fsdp4", (1, 4, 1), jax.devices()), ("one", (1, 1, 1), jax.devices()[:1])):
    mesh = parallel.make_mesh(dict(zip(("data", "fsdp", "tensor"), sizes)), devices=devices)
    settings = settings_from_config(config, Autoencoder("vae", VaeConfig(), {}), check_files=False)
    compiled = compilation.compile_from_shapes(settings, cfg, mesh, [2], ((64, 4096), (768,)))[2]
    cost = compiled.cost_analysis()  # counts a scan's body once: exact here, with one block of each kind
    out[name] = (cost[0] if isinstance(cost, list) else cost)["flops"]
  return out


def test_fsdp_devices_compute_their_own_examples_only():
  """Activation pins: on fsdp=4 each device does a quarter of the step's arithmetic. Without them the
  compiler kept the fsdp-sharded weights in place and gathered activations instead (measured 0.39 of
  the one-device step here; at FLUX.1-dev scale [8, ...] attention scores on each of 8 devices)."""
  flags = [os.environ.get("XLA_FLAGS"), "--xla_force_host_platform_device_count=4"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(filter(None, flags)))
  child = subprocess.run([sys.executable, os.path.abspath(__file__), "fsdp_flops"], env=env, capture_output=True,
                         text=True, timeout=600)
  assert child.returncode == 0 and "RESULT " in child.stdout, child.stdout[-3000:] + child.stderr[-3000:]
  flops = json.loads(child.stdout.rsplit("RESULT ", 1)[1])
  assert flops["fsdp4"] <= 0.27 * flops["one"], flops


def test_a_jit_traced_under_one_mesh_or_rule_table_is_never_reused_under_another():
  """The mesh (jax.set_mesh) and the logical rules (in the static FluxConfig) are part of every jit's
  cache key, module-level jits like the sampler's included: a trace is reused only under the same pair."""
  import contextlib
  import dataclasses
  import numpy as np
  from mosaic_jax import sampling
  cfg = model.tiny(1, 1)
  params = model.init_params(jax.random.key(0), cfg)
  rng = np.random.default_rng(0)
  inputs = model.FluxInputs(target=rng.standard_normal((2, 4, 16), np.float32), target_ids=model.image_ids(2, 2),
                            text=rng.standard_normal((2, 3, 24), np.float32), text_ids=model.text_ids(3),
                            pooled=rng.standard_normal((2, 12), np.float32), timestep=None, guidance=np.float32(3.5))
  args = (params, None, cfg, inputs, sampling.flow_sigmas(2, 4))
  mesh_a = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
  mesh_b = jax.make_mesh((1,), ("replica",), axis_types=(AxisType.Auto,))
  sizes, outputs = [], []
  for mesh, rules in ((None, cfg.logical_rules), (mesh_a, cfg.logical_rules), (mesh_b, cfg.logical_rules),
                      (mesh_a, (("batch", "data"), ("heads", None), ("mlp", None))), (mesh_a, cfg.logical_rules)):
    call_args = args[:2] + (dataclasses.replace(cfg, logical_rules=rules),) + args[3:]
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
      outputs.append(np.asarray(sampling.denoise(*call_args).tokens))
    sizes.append(sampling.denoise._cache_size())  # pylint: disable=protected-access
  # No mesh, mesh A, mesh B, mesh A with other rules: four traces; mesh A with its first rules again: reused.
  assert [s - sizes[0] for s in sizes] == [0, 1, 2, 3, 3], sizes
  for out in outputs[1:]:
    np.testing.assert_allclose(out, outputs[0], rtol=1e-5, atol=1e-5)


def test_a_large_dimension_the_mesh_cannot_split_is_a_warning_naming_the_parameter(caplog):
  mesh = AbstractMesh((1, 3, 1), ("data", "fsdp", "tensor"))
  with caplog.at_level("WARNING", logger="mosaic_jax"):
    parallel.sharding_for("transformer_blocks/attn/to_q/kernel", (2, 3072, 3072), mesh)  # divisible: quiet
    assert not caplog.records
    parallel.sharding_for("transformer_blocks/attn/to_q/kernel", (2, 3070, 3072), mesh)
  assert len(caplog.records) == 1
  message = caplog.records[0].getMessage()
  assert "transformer_blocks/attn/to_q/kernel" in message and "(2, 3070, 3072)" in message and "fsdp" in message


if __name__ == "__main__":  # the child process of the fsdp test
  if sys.argv[1:2] == ["fsdp_flops"]:
    print("RESULT " + json.dumps(_fsdp_flops_child()), flush=True)
