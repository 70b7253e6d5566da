"""Building a parameter pytree from a checked tensor table, for the encoder loaders (VAE, T5, CLIP).

A loader lists what the model expects as `Target`s (file key, our leaf path, layer index when the
leaf is stacked along a leading layer axis, the shape in the file, how to turn the torch layout into
ours, and an optional dtype override). `assemble` checks the table against that list with
`check_entries` (every missing key, unexpected key and shape mismatch in one `CheckpointError`), then
reads tensor by tensor in the target dtype and hands each finished leaf to `place`, so the host never
holds more than one (stacked) leaf beyond the memory-mapped files.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from mosaic_jax.interop.tensor_table import Entry, check_entries


class Target(NamedTuple):
  key: str                                # name in the file (PyTorch naming)
  path: tuple[str, ...]                   # our leaf path in the parameter pytree
  layer: int | None                       # index along the leaf's leading layer axis; None: not stacked
  shape: tuple[int, ...]                  # shape in the file (PyTorch layout)
  convert: Callable[[np.ndarray], np.ndarray] | None = None  # torch layout -> ours (None: as is)
  dtype: object = None                    # overrides the loader's dtype (norms stay float32)


TORCH_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def torch_leaf_name(leaf: str) -> str:
  """Our leaf name -> the PyTorch parameter name (linear/conv kernels, norm scales, embeddings)."""
  return TORCH_LEAF_NAMES[leaf]


def linear_kernel(array: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> our kernel [in, out]."""
  return array.T


def conv_kernel(array: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [out, in, kh, kw] -> our HWIO kernel [kh, kw, in, out]."""
  return array.transpose(2, 3, 1, 0)


def assemble(entries: Mapping[str, Entry], targets: Sequence[Target], title: str, dtype,
             place: Callable | None = None) -> dict:
  """Checks `entries` against `targets`, then builds the nested-dict pytree leaf by leaf.

  `place(dotted_path, numpy_array)` puts each finished leaf where it belongs (e.g. a sharded
  device_put); by default jnp.asarray on the default device.
  """
  check_entries(entries, {t.key: tuple(t.shape) for t in targets}, title)
  default_dtype = np.dtype(jnp.dtype(dtype))
  place = place or (lambda path, array: jnp.asarray(array))
  by_leaf: dict[tuple[str, ...], list[Target]] = {}
  for target in targets:
    by_leaf.setdefault(target.path, []).append(target)

  params: dict = {}
  for path, parts in by_leaf.items():
    leaf_dtype = np.dtype(jnp.dtype(parts[0].dtype)) if parts[0].dtype is not None else default_dtype

    def read(target: Target) -> np.ndarray:
      array = entries[target.key].read(leaf_dtype)
      return target.convert(array) if target.convert is not None else array

    if parts[0].layer is None:
      if len(parts) != 1:
        raise ValueError(f"{'.'.join(path)}: several unstacked file keys map to one leaf.")
      array = np.ascontiguousarray(read(parts[0]))
    else:
      layers = sorted(t.layer for t in parts)
      if layers != list(range(len(parts))):
        raise ValueError(f"{'.'.join(path)}: stacked layers {layers} are not 0..{len(parts) - 1}.")
      first = read(parts[0])
      array = np.empty((len(parts),) + first.shape, leaf_dtype)
      array[parts[0].layer] = first
      for target in parts[1:]:
        array[target.layer] = read(target)
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = place(".".join(path), array)
    del array
  return params
