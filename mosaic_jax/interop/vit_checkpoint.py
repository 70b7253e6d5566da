"""The key table of a ViT image tower (model/vit.py) in a transformers checkpoint, for the tower loaders
(evaluation/clip_model.py, evaluation/dino.py, correspondence/dinov2.py).

Each loader names its file's keys: the unstacked leaves (patch projection, class token, position
embeddings, final norm...) one by one, and the stacked block leaves through a function of our leaf path
and the layer index. Linear kernels are transposed, the patch kernel is flattened from the conv;
norm leaves and LayerScale vectors are read in float32, everything else in the loader's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mosaic_jax.interop.param_assembly import Target, linear_kernel
from mosaic_jax.model.vit import VitConfig, param_shapes


def _patch_kernel(array):
  """torch Conv2d weight [D, C, P, P] -> our [P*P*C, D] over (row, column, channel)."""
  d = array.shape[0]
  return array.transpose(2, 3, 1, 0).reshape(-1, d)


def _float32_leaf(path: tuple[str, ...]) -> bool:
  return "norm" in path[0] or path[-1] == "scale"


def vit_targets(cfg: VitConfig, top_level: dict, layer_key) -> list:
  """Targets (interop/param_assembly) for a ViT checkpoint.

  top_level: our unstacked leaf path -> (torch key, torch shape); layer_key(our path under `layers`,
  i) -> torch key of layer i.
  """
  shapes = param_shapes(cfg)
  targets = []
  for path, (key, shape) in top_level.items():
    convert = (_patch_kernel if path == ("patch", "kernel") else linear_kernel if path[-1] == "kernel"
               else (lambda a, n=path: a.reshape(shapes[n[0]][n[1]])))
    targets.append(Target(key, path, None, tuple(shape), convert, jnp.float32 if _float32_leaf(path) else None))
  flat, _ = jax.tree_util.tree_flatten_with_path(shapes["layers"], is_leaf=lambda x: isinstance(x, tuple))
  for tree_path, shape in flat:
    names = tuple(p.key for p in tree_path)
    leaf_shape = shape[1:][::-1] if names[-1] == "kernel" else shape[1:]
    for i in range(cfg.num_hidden_layers):
      targets.append(Target(layer_key(names, i), ("layers",) + names, i, tuple(leaf_shape),
                            linear_kernel if names[-1] == "kernel" else None,
                            jnp.float32 if _float32_leaf(names) else None))
  return targets
