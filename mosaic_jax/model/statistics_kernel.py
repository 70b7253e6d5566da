"""The attention statistics' two passes (attention_stats.py) as Pallas TPU kernels, splash-style.

The XLA path streams reference queries in chunks but still writes each chunk's float32 logits and
probabilities [B, H, C, N] to HBM, several times per pass (logits, log-sum-exp, probabilities, their
column sums; in the backward pass also their cotangents). Here a grid step holds one block of one
reference's queries (one head) against all N target keys in VMEM and writes only what leaves it:

  forward   per query row its log-sum-exp over the target keys, and per reference the column sums over
            its valid rows of the probabilities, summed over this device's heads;
  backward  dq of the block and dk accumulated over every block of the head, from the saved log-sum-exp,
            the rows' log-sum-exp cotangents and the column sums' cotangents (formulas: attention_stats.py).

Layout: heads first, q [B, H, R*M_pad, D] (each reference's rows padded to a whole number of blocks),
k [B, H, N, D]. Per-row values travel broadcast over 128 lanes ([..., rows, 128]): the layout a TPU
holds a column of a block in. Under `jax.set_mesh` the kernels run under shard_map like splash (batch
and heads split by the logical rules); column sums then add up over the heads' shards. Off TPU they run
in Pallas interpret mode (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from mosaic_jax.model.splash_attention import _mesh_axes
from mosaic_jax.parallel.sharding import trace_platform

LANES = 128


def _dot(a, b, contract):
  """a . b over axes `contract` (a's, b's), float32 accumulation. The precision is explicit: Mosaic takes
  "highest" (jax_default_matmul_precision, which the tests set) as an fp32 contraction and rejects it
  for bf16 operands, whose products are exact in the float32 accumulator anyway."""
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
  return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32)


def _logits(q, k, scale):
  """[block, N] float32 logits of a query block [block, D] against the keys [N, D]."""
  return _dot(q, k, ((1,), (1,))) * scale


def _valid_rows(index, block, ref_len):
  """[block, 1]: which rows of query block `index` of a reference are real tokens (not padding)."""
  return index * block + jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0) < ref_len


def _forward_kernel(q_ref, k_ref, lse_ref, col_ref, *, scale, block, ref_len):
  # grid (batch, reference, head, query block): col_ref stays put over the last two axes and sums
  head, index = pl.program_id(2), pl.program_id(3)

  @pl.when((head == 0) & (index == 0))
  def _():
    col_ref[...] = jnp.zeros_like(col_ref)

  logits = _logits(q_ref[...], k_ref[...], scale)
  peak = jnp.max(logits, axis=1, keepdims=True)
  lse = peak + jnp.log(jnp.sum(jnp.exp(logits - peak), axis=1, keepdims=True))
  lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)
  probs = jnp.where(_valid_rows(index, block, ref_len), jnp.exp(logits - lse), 0.0)
  col_ref[...] += jnp.sum(probs, axis=0, keepdims=True)


def _backward_kernel(q_ref, k_ref, lse_ref, g_lse_ref, g_col_ref, dq_ref, dk_ref, *, scale, block, ref_len,
                     col_scale):
  # grid (batch, head, reference, query block): dk_ref stays put over the last two axes and sums
  ref, index = pl.program_id(2), pl.program_id(3)

  @pl.when((ref == 0) & (index == 0))
  def _():
    dk_ref[...] = jnp.zeros_like(dk_ref)

  q, k = q_ref[...], k_ref[...]
  probs = jnp.exp(_logits(q, k, scale) - lse_ref[:, :1])
  dp = jnp.where(_valid_rows(index, block, ref_len), g_col_ref[...] * col_scale, 0.0)
  ds = probs * (g_lse_ref[:, :1] + dp - jnp.sum(probs * dp, axis=1, keepdims=True))
  ds = ds.astype(q.dtype)
  dq_ref[...] = _dot(ds, k, ((1,), (0,))) * scale
  dk_ref[...] += _dot(ds, q, ((0,), (0,))) * scale


def _params(interpret: bool):
  semantics = ("parallel", "parallel", "arbitrary", "arbitrary")
  return {"interpret": True} if interpret else {"compiler_params": pltpu.CompilerParams(dimension_semantics=semantics)}


def _local_forward(q, k, num_refs, ref_len, block, interpret):
  b, h, rows, d = q.shape
  n = k.shape[2]
  per_ref = rows // num_refs // block
  rows_at = lambda b_, r, h_, i: (b_, h_, r * per_ref + i, 0)
  lse, col = pl.pallas_call(
      functools.partial(_forward_kernel, scale=d ** -0.5, block=block, ref_len=ref_len),
      out_shape=(jax.ShapeDtypeStruct((b, h, rows, LANES), jnp.float32),
                 jax.ShapeDtypeStruct((b, num_refs, 1, n), jnp.float32)),
      grid=(b, num_refs, h, per_ref),
      in_specs=[pl.BlockSpec((None, None, block, d), rows_at),
                pl.BlockSpec((None, None, n, d), lambda b_, r, h_, i: (b_, h_, 0, 0))],
      out_specs=(pl.BlockSpec((None, None, block, LANES), rows_at),
                 pl.BlockSpec((None, None, 1, n), lambda b_, r, h_, i: (b_, r, 0, 0))),
      name="mosaic_statistics_fwd", **_params(interpret))(q, k)
  return lse[..., 0], col[:, :, 0]


def _local_backward(q, k, lse, g_lse, g_col, num_refs, ref_len, block, col_scale, interpret):
  b, h, rows, d = q.shape
  n = k.shape[2]
  per_ref = rows // num_refs // block
  rows_at = lambda b_, h_, r, i: (b_, h_, r * per_ref + i, 0)
  keys_at = lambda b_, h_, r, i: (b_, h_, 0, 0)
  lanes = lambda x: jnp.broadcast_to(x[..., None], x.shape + (LANES,))
  return pl.pallas_call(
      functools.partial(_backward_kernel, scale=d ** -0.5, block=block, ref_len=ref_len, col_scale=col_scale),
      out_shape=(jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(k.shape, jnp.float32)),
      grid=(b, h, num_refs, per_ref),
      in_specs=[pl.BlockSpec((None, None, block, d), rows_at), pl.BlockSpec((None, None, n, d), keys_at),
                pl.BlockSpec((None, None, block, LANES), rows_at), pl.BlockSpec((None, None, block, LANES), rows_at),
                pl.BlockSpec((None, None, 1, n), lambda b_, h_, r, i: (b_, r, 0, 0))],
      out_specs=(pl.BlockSpec((None, None, block, d), rows_at), pl.BlockSpec((None, None, n, d), keys_at)),
      name="mosaic_statistics_bwd", **_params(interpret))(q, k, lanes(lse), lanes(g_lse), g_col[:, :, None])


def _placement(logical_rules, batch: int, heads: int):
  """(mesh, batch axes, heads axes, interpret) for the kernels under the mesh set by jax.set_mesh, or
  (None, None, None, interpret) without one."""
  mesh, interpret = jax.sharding.get_abstract_mesh(), trace_platform() != "tpu"
  if mesh.empty:
    return None, None, None, interpret
  batch_axes, heads_axes = (_mesh_axes(name, logical_rules, mesh, size) for name, size in (("batch", batch),
                                                                                         ("heads", heads)))
  return mesh, batch_axes, heads_axes, interpret


def forward_statistics(q, k, num_refs: int, ref_len: int, block: int, logical_rules):
  """q [B, H, R*M_pad, D], k [B, H, N, D] -> (log-sum-exp [B, H, R*M_pad], column sums [B, R, N] over every
  head and reference r's valid rows)."""
  mesh, batch, heads, interpret = _placement(logical_rules, q.shape[0], q.shape[1])
  local = functools.partial(_local_forward, num_refs=num_refs, ref_len=ref_len, block=block, interpret=interpret)
  if mesh is None:
    return local(q, k)

  def sharded(q, k):
    lse, col = local(q, k)
    return lse, (jax.lax.psum(col, heads) if heads else col)

  spec = P(batch, heads, None, None)
  # check_vma=False: the Pallas kernel's outputs carry no varying-axes annotation (as splash)
  return jax.shard_map(sharded, mesh=mesh, in_specs=(spec, spec), out_specs=(P(batch, heads, None), P(batch)),
                       check_vma=False)(q, k)


def statistics_gradients(q, k, lse, g_lse, g_col, num_refs: int, ref_len: int, block: int, col_scale: float,
                         logical_rules):
  """(dq [B, H, R*M_pad, D], dk [B, H, N, D]), float32, of the forward_statistics outputs' cotangents
  g_lse [B, H, R*M_pad] and g_col [B, R, N]; each column sum enters the losses times `col_scale`."""
  mesh, batch, heads, interpret = _placement(logical_rules, q.shape[0], q.shape[1])
  local = functools.partial(_local_backward, num_refs=num_refs, ref_len=ref_len, block=block, col_scale=col_scale,
                            interpret=interpret)
  if mesh is None:
    return local(q, k, lse, g_lse, g_col)
  spec, rows = P(batch, heads, None, None), P(batch, heads, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, rows, rows, P(batch)), out_specs=(spec, spec),
                       check_vma=False)(q, k, lse, g_lse, g_col)
