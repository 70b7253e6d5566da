"""The mesh from the config and the logical-axis sharding of parameter, LoRA and optimizer pytrees."""

from __future__ import annotations

import jax
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from mosaic_jax import model, parallel
from mosaic_jax.parallel import sharding


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
    parallel.logical_to_spec(("heads",))


def test_dimensions_the_mesh_does_not_divide_stay_replicated():
  mesh = AbstractMesh((1, 2, 4), ("data", "fsdp", "tensor"))
  spec = PartitionSpec(None, "fsdp", "tensor")
  assert sharding._fit_to_shape(spec, (3, 64, 128), mesh) == PartitionSpec(None, "fsdp", "tensor")
  assert sharding._fit_to_shape(spec, (3, 63, 6), mesh) == PartitionSpec(None, None, None)


def test_optimizer_moments_and_ema_follow_their_parameters():
  cfg = model.tiny()
  params = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0), cfg))
  lora = jax.eval_shape(lambda: model.init_lora(jax.random.PRNGKey(1), model.init_params(jax.random.PRNGKey(0), cfg),
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
  params = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0), cfg))
  lora = jax.eval_shape(lambda: model.init_lora(jax.random.PRNGKey(1), params, cfg, 4))
  mesh = AbstractMesh((1, 4, 1), ("data", "fsdp", "tensor"))
  specs = jax.tree_util.tree_flatten_with_path(parallel.tree_shardings(lora, mesh))[0]
  assert specs
  for path, leaf_sharding in specs:
    assert "fsdp" in tuple(leaf_sharding.spec), jax.tree_util.keystr(path)
