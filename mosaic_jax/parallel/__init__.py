"""Device mesh, logical-axis rules and shardings of the parameter, LoRA and optimizer pytrees, and the
activation pins the model applies while a step is traced."""

from mosaic_jax.parallel.sharding import (MESH_AXES, activation_sharding, active_mesh, batch_sharding,
                                          constrain, logical_to_spec, make_mesh, param_logical_axes,
                                          replicated, sharding_for, tree_shardings)

__all__ = ["MESH_AXES", "activation_sharding", "active_mesh", "batch_sharding", "constrain", "logical_to_spec",
           "make_mesh", "param_logical_axes", "replicated", "sharding_for", "tree_shardings"]
