"""Running a feature extractor over many inputs: one jitted fixed-size batch, the last batch padded.

With more than one device the batch is split over a mesh's data axis (the parameters replicated), as
the sampler splits its batch; the batch size is rounded up to a multiple of the device count.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mosaic_jax.parallel.sharding import make_mesh, replicated


class BatchedEmbedder:
  """`embedder(inputs [N, ...]) -> float32 [N, D]` through `fn(params, batch)` compiled once."""

  def __init__(self, fn: Callable, params, batch_size: int, devices: Sequence[jax.Device] | None = None):
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size}: expected at least 1.")
    devices = list(devices if devices is not None else jax.devices())
    self.num_devices = len(devices)
    self.batch_size = -(-batch_size // self.num_devices) * self.num_devices
    if self.num_devices > 1:
      mesh = make_mesh({"data": -1}, devices)
      self.params = jax.device_put(params, replicated(mesh))
      self._fn = jax.jit(fn, in_shardings=(replicated(mesh), NamedSharding(mesh, PartitionSpec("data"))),
                         out_shardings=replicated(mesh))
    else:
      self.params = params
      self._fn = jax.jit(fn)

  def __call__(self, inputs: np.ndarray) -> np.ndarray:
    inputs = np.asarray(inputs)
    outputs = []
    for start in range(0, len(inputs), self.batch_size):
      chunk = inputs[start:start + self.batch_size]
      padding = np.repeat(chunk[-1:], self.batch_size - len(chunk), axis=0)
      outputs.append(np.asarray(self._fn(self.params, np.concatenate([chunk, padding])))[:len(chunk)])
    if not outputs:
      raise ValueError("BatchedEmbedder: no inputs.")
    return np.concatenate(outputs).astype(np.float32)
