"""Host-local numpy batches -> global jax arrays with the data sharding.

Each process holds its own slice of the global batch (see `pipeline.py`);
`jax.make_array_from_process_local_data` stitches the slices into one global `jax.Array` per key.
The sharding comes from the caller (the mesh module owns it), either one `jax.sharding.Sharding` for
every array (e.g. `NamedSharding(mesh, PartitionSpec(("data", "fsdp")))`, which shards the batch
axis and replicates the rest) or a mapping from key to sharding. Text arrays (`caption`,
`example_id`) cannot live on a device and stay host-local numpy.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np


def is_device_array(value: np.ndarray) -> bool:
  return isinstance(value, np.ndarray) and value.dtype.kind in "biuf"


def to_global_arrays(batch: Mapping[str, np.ndarray],
                     sharding: jax.sharding.Sharding | Mapping[str, jax.sharding.Sharding]
                     ) -> dict[str, jax.Array | np.ndarray]:
  out = {}
  for key, value in batch.items():
    if not is_device_array(value):
      out[key] = value
      continue
    key_sharding = sharding[key] if isinstance(sharding, Mapping) else sharding
    try:
      out[key] = jax.make_array_from_process_local_data(key_sharding, value)
    except Exception as error:
      raise ValueError(f"batch[{key!r}] with local shape {value.shape} cannot take sharding "
                       f"{key_sharding}: {error}") from error
  return out
