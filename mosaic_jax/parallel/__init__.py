"""Device mesh, logical-axis rules and shardings of the parameter, LoRA and optimizer pytrees, the
activation pins the model applies under `jax.set_mesh`, and the multi-process helpers."""

from mosaic_jax.parallel.sharding import (MESH_AXES, batch_sharding, constrain, create_sharded, hashable_rules,
                                          logical_to_spec, make_mesh, mesh_axes_of, on_mesh, param_logical_axes, place,
                                          replicated, sharding_for, tree_shardings)

__all__ = ["MESH_AXES", "batch_sharding", "constrain", "create_sharded", "hashable_rules", "logical_to_spec",
           "make_mesh", "mesh_axes_of", "on_mesh", "param_logical_axes", "place", "replicated", "sharding_for",
           "tree_shardings"]
