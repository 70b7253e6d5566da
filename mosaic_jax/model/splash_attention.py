"""Dense attention through the Pallas TPU splash-attention kernel, for attention.py's two groups.

The groups are dense (the MOSAIC mask is handled by how attention.py forms them), so the kernel gets
a full mask. Pallas kernels are not partitioned automatically: when a mesh is set (`jax.set_mesh`) the
call runs under `jax.shard_map` with the batch and the heads split over the mesh axes that the logical
rules give "batch" and "heads" (by default (data, fsdp) and tensor). Off TPU the kernel runs in Pallas interpret mode (slow; for tests only).
Sequence lengths must be multiples of 128 (FLUX's 512 text, 1024-token 512 px grids are).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from mosaic_jax.parallel.sharding import DEFAULT_LOGICAL_RULES, mesh_axes_of


def _block(length: int) -> int:
  for block in (512, 256, 128):
    if length % block == 0:
      return block
  raise ValueError(f"splash attention needs sequence lengths that are multiples of 128; got {length}. "
                   "Use attention_impl='xla' or 'cudnn' for this shape.")


def _kernel(heads: int, q_len: int, kv_len: int, interpret: bool):
  """A fresh kernel per trace: not cached, since its mask arrays belong to the trace (and the shard_map
  mesh) they were built in; a cached one fails in a second jit or on another mesh."""
  bq, bkv = _block(q_len), _block(kv_len)
  sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                            block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
  mask = splash.MultiHeadMask([splash.FullMask((q_len, kv_len)) for _ in range(heads)])
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local_splash(q, k, v):
  """[B, T, H, D] in, [B, T, H, D] out, on this device's shard."""
  interpret = jax.devices()[0].platform != "tpu"
  kernel = _kernel(q.shape[2], q.shape[1], k.shape[1], interpret)
  scale = q.shape[-1] ** -0.5
  to_heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  out = jax.vmap(kernel)(to_heads_first(q * jnp.asarray(scale, q.dtype)), to_heads_first(k),
                         to_heads_first(v))
  return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def splash_dense(q, k, v, logical_rules=DEFAULT_LOGICAL_RULES):
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return _local_splash(q, k, v)
  spec = P(mesh_axes_of("batch", logical_rules, mesh) or None, None,
           mesh_axes_of("heads", logical_rules, mesh) or None, None)
  # check_vma=False: the Pallas kernel's outputs carry no varying-axes annotation; each shard's
  # attention is independent (no collectives), so there is nothing for the check to catch.
  return jax.shard_map(_local_splash, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)
