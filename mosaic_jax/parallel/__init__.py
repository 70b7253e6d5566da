"""Device mesh, logical-axis rules and shardings of the parameter, LoRA and optimizer pytrees."""

from mosaic_jax.parallel.sharding import (MESH_AXES, batch_sharding, logical_to_spec, make_mesh,
                                          param_logical_axes, replicated, sharding_for,
                                          tree_shardings)

__all__ = ["MESH_AXES", "batch_sharding", "logical_to_spec", "make_mesh", "param_logical_axes",
           "replicated", "sharding_for", "tree_shardings"]
