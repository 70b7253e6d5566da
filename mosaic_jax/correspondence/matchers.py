"""A feature extractor bound to a stored grid: the `Matcher`, and `MeshMatcher`, which runs it over a device mesh.

A Matcher is what `launch/match.py` and the accuracy benchmarks need of a feature extractor, and nothing
more: prepared 1024 px images (matching.prepare_target / prepare_reference, uint8) go through
`host_inputs` on the host (e.g. DINOv2's resize to 896 px and ImageNet normalization) and then through
`features(params, inputs) -> [N, 64, 64, D]`, a traceable function; the slot says which stored grid it
fills (`dift` or `geoaware`) and so which script's white rule prepares its references, and `similarity`
how cells are compared.

MeshMatcher jits "features of the targets, features of the references, per-pair argmax" as one program:
the image batch split over the mesh's batch axes (data, fsdp), the parameters placed by the same rules
as training (a 12B FLUX transformer is split over fsdp rather than copied to every device), the grids
(a few KiB) replicated, so process 0 can write them. Every process reads and prepares the whole host
batch (images are cheap next to the model) and hands the devices it owns their slices.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import jax
import numpy as np

from mosaic_jax.correspondence import matching
from mosaic_jax.parallel.sharding import (DEFAULT_LOGICAL_RULES, DEFAULT_PARAM_RULES, batch_sharding, make_mesh,
                                          place, replicated, tree_shardings)


def unit_range(images: np.ndarray) -> np.ndarray:
  """uint8 [N, H, W, 3] -> float32 in [-1, 1], as DIFT's `(PILToTensor()(image) / 255.0 - 0.5) * 2`."""
  return (np.asarray(images, np.float32) / np.float32(255.0) - np.float32(0.5)) * np.float32(2)


@dataclasses.dataclass(frozen=True)
class Matcher:
  name: str  # for people: "ditf", "dinov2"
  slot: str  # matching.SLOTS: the stored grid it fills
  params: Any  # pytree handed to `features` (placed on the mesh by MeshMatcher)
  features: Callable[[Any, jax.Array], jax.Array]  # (params, inputs [N, ...]) -> [N, 64, 64, D]; traceable
  host_inputs: Callable[[np.ndarray], np.ndarray] = unit_range  # uint8 [N, 1024, 1024, 3] -> inputs
  similarity: str = ""  # "" -> matching.DEFAULT_SIMILARITY[slot]

  def __post_init__(self):
    if self.slot not in matching.SLOTS:
      raise ValueError(f"matcher {self.name!r}: slot {self.slot!r}, expected one of {matching.SLOTS}")
    object.__setattr__(self, "similarity", matching.check_similarity(
        self.similarity or matching.DEFAULT_SIMILARITY[self.slot]))

  def grids(self, params: Any, targets: jax.Array, references: jax.Array) -> jax.Array:
    """Traceable: inputs of the prepared targets and references [B, ...] -> int32 [B, 64, 64, 2].

    The references' features start only once the targets' are done (an optimization barrier ties them):
    left free, the compiler interleaves the two extractions block by block and holds both sets of
    activations (FLUX.1-dev DiTF on v5e-8, one pair per chip: 17.1 GiB of temporaries, over the 16 GiB)."""
    target_features = self.features(params, targets)
    target_features, references = jax.lax.optimization_barrier((target_features, references))
    return matching.match_cells(target_features, self.features(params, references), self.similarity)


def lower_grids(matcher: Matcher, mesh: jax.sharding.Mesh, input_shape: tuple[int, ...], input_dtype=np.float32,
                param_rules: Iterable = DEFAULT_PARAM_RULES, logical_rules: Iterable = DEFAULT_LOGICAL_RULES):
  """The grids program lowered from shapes alone (`matcher.params` may be ShapeDtypeStructs, e.g. from
  jax.eval_shape): inputs [batch, ...] = `input_shape` for targets and references, split and placed as
  MeshMatcher places them. `.compile()` it for a TPU topology's devices to read memory and time."""
  param_rules, logical_rules = tuple(param_rules), tuple(logical_rules)
  shardings = tree_shardings(matcher.params, mesh, param_rules, logical_rules)
  params = jax.tree_util.tree_map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                                  matcher.params, shardings)
  data = batch_sharding(mesh, logical_rules)
  inputs = jax.ShapeDtypeStruct(tuple(input_shape), input_dtype, sharding=data)
  with jax.set_mesh(mesh):
    return jax.jit(matcher.grids, in_shardings=(shardings, data, data), out_shardings=replicated(mesh)).lower(
        params, inputs, inputs)


class MeshMatcher:
  """`matcher` jitted over `mesh` for batches of exactly `batch_size` (the last batch is padded)."""

  def __init__(self, matcher: Matcher, mesh: jax.sharding.Mesh | None = None, batch_size: int | None = None,
               param_rules: Iterable = DEFAULT_PARAM_RULES, logical_rules: Iterable = DEFAULT_LOGICAL_RULES):
    self.matcher = matcher
    self.mesh = mesh if mesh is not None else make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    self.data_sharding = batch_sharding(self.mesh, logical_rules)
    axes = self.data_sharding.spec[0] if len(self.data_sharding.spec) else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    batch_devices = int(np.prod([self.mesh.shape[name] for name in axes]))
    self.batch_size = batch_size or batch_devices
    if self.batch_size % batch_devices:
      raise ValueError(f"batch size {self.batch_size} must be a multiple of the {batch_devices} devices the "
                       "batch is split over")
    param_rules, logical_rules = tuple(param_rules), tuple(logical_rules)
    with jax.set_mesh(self.mesh):
      self.params = place(matcher.params, self.mesh, param_rules, logical_rules)
    param_shardings = tree_shardings(matcher.params, self.mesh, param_rules, logical_rules)
    self._grids = jax.jit(matcher.grids, in_shardings=(param_shardings, self.data_sharding, self.data_sharding),
                          out_shardings=replicated(self.mesh))
    self._features = jax.jit(matcher.features, in_shardings=(param_shardings, self.data_sharding),
                             out_shardings=replicated(self.mesh))

  def _global(self, host: np.ndarray) -> jax.Array:
    return jax.make_array_from_callback(host.shape, self.data_sharding, lambda index: host[index])

  def device_inputs(self, images: np.ndarray) -> jax.Array:
    """uint8 images [n, 1024, 1024, 3], n <= batch_size, padded by repeating the last -> global inputs."""
    images = np.asarray(images)
    if not 0 < len(images) <= self.batch_size:
      raise ValueError(f"{len(images)} images for a batch of {self.batch_size}")
    pad = self.batch_size - len(images)
    if pad:
      images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
    return self._global(np.asarray(self.matcher.host_inputs(images)))

  def __call__(self, targets: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Prepared uint8 images [n, 1024, 1024, 3] each (n <= batch_size) -> stored grids uint8 [n, 64, 64, 2]."""
    if len(references) != len(targets):
      raise ValueError(f"{len(targets)} targets but {len(references)} references")
    with jax.set_mesh(self.mesh):
      cells = self._grids(self.params, self.device_inputs(targets), self.device_inputs(references))
    return np.stack([matching.stored_grid(grid) for grid in np.asarray(jax.device_get(cells))[:len(targets)]])

  def image_features(self, images: np.ndarray) -> np.ndarray:
    """uint8 images [n, 1024, 1024, 3] -> float32 feature grids [n, 64, 64, D], batch_size at a time."""
    out = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      with jax.set_mesh(self.mesh):
        features = self._features(self.params, self.device_inputs(chunk))
      out.append(np.asarray(jax.device_get(features), np.float32)[:len(chunk)])
    return np.concatenate(out)
