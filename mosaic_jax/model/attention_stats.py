"""The attention statistics SCAL and MDL need, exactly, in O(tokens) extra memory, with gradients.

For one double block, per head h, reference query i and target key j:
  p_h(i, j) = softmax_j(q_i . k_j / sqrt(d))      (softmax over the target keys only)
The losses need two things of it (docs/method.md, 'Statistics' and 'Losses'):
  - at each correspondence pair (i, j*):  mean_h p_h(i, j*)                          -> [B, K]
  - for each reference r:  a_r(j) = mean_h mean_{i in r} p_h(i, j)                   -> [B, R, N]
The official code materializes p as [R*M, N] per head. We stream the reference queries in chunks of
C rows: each chunk computes its logits [B, H, C, N], their log-sum-exp over the target keys (kept,
[B, R*M, H]: O(tokens)) and its head-averaged column sums. A custom VJP recomputes one chunk's
probabilities at a time from the saved log-sum-exp in the backward pass, writing dq chunk by chunk and
accumulating dk, so neither pass ever holds more than one chunk of probabilities. The pair
probabilities then need only gathered rows: exp(q_i . k_j* / sqrt(d) - lse_i), by plain autodiff.

With `kernel_rules` (the splash attention configuration, FluxConfig.attention_impl == "splash") the two
chunked passes run as Pallas TPU kernels instead (statistics_kernel.py): same formulas, the logits and
probabilities of a block never leave VMEM. Either way the saved log-sum-exp is tagged "attention"
(model/remat.py): a remat policy that keeps attention outputs keeps it too, and does not rerun the
forward pass of the statistics in the backward pass to get it back.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mosaic_jax.model import statistics_kernel
from mosaic_jax.model.remat import keep


class Correspondences(NamedTuple):
  """Fixed-shape correspondence pairs, so one compiled step serves every sample of a shape.

  ref_index:    [B, K] int  which reference (0-based) the pair's reference token belongs to
  ref_token:    [B, K] int  token index in that reference's grid (row-major)
  target_token: [B, K] int  token index in the target grid (row-major)
  valid:        [B, K] bool padding pairs are False and count for nothing
  """
  ref_index: jax.Array
  ref_token: jax.Array
  target_token: jax.Array
  valid: jax.Array


class AttentionStatistics(NamedTuple):
  """What the losses consume, averaged over heads (and, after the model, over double blocks).

  pair_attention:      [B, K]     A(i, j*) at each correspondence pair (padding pairs: arbitrary)
  reference_attention: [B, R, N]  a_r(j): mean over reference r's tokens of A(i, j)
  """
  pair_attention: jax.Array
  reference_attention: jax.Array


def _chunk_rows(q_rows, index, chunk):
  return jax.lax.dynamic_slice_in_dim(q_rows, index * chunk, chunk, axis=1)


def _chunk_forward(q_c, k, valid_c, scale):
  """Logits of one chunk of reference queries against all target keys, in float32: [B, H, C, N]."""
  logits = jnp.einsum("bchd,bnhd->bhcn", q_c, k, preferred_element_type=jnp.float32) * scale
  lse = jax.nn.logsumexp(logits, axis=-1)  # [B, H, C]
  probs = jnp.where(valid_c[:, None], jnp.exp(logits - lse[..., None]), 0.0)
  return lse, probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _target_softmax_stats(q_rows, k, pair_rows, pair_cols, num_refs, ref_len, chunk, kernel_rules):
  """Softmax over target keys, reduced to what the losses need, never more than a chunk at a time.

  q_rows [B, R*M_pad, H, D] (reference queries, M padded to a multiple of `chunk`), k [B, N, H, D],
  pair_rows / pair_cols [B, K] (query row and target column of each pair) ->
    pair log-probabilities [B, K, H] and column sums [B, R, N] (sum over reference r's valid tokens of
    the head-mean probabilities).
  """
  return _stats_forward(q_rows, k, pair_rows, pair_cols, num_refs, ref_len, chunk, kernel_rules)[0]


def _pair_logits(q_rows, k, pair_rows, pair_cols):
  batch = jnp.arange(q_rows.shape[0])[:, None]
  return jnp.einsum("bkhd,bkhd->bkh", q_rows[batch, pair_rows], k[batch, pair_cols],
                    preferred_element_type=jnp.float32) * q_rows.shape[-1] ** -0.5


def _heads_first(x):
  """[B, T, H, ...] <-> [B, H, T, ...]."""
  return jnp.swapaxes(x, 1, 2)


def _chunked_forward(q_rows, k, num_refs, ref_len, chunk):
  """(log-sum-exp [B, rows, H], column sums [B, R, N] of the head-mean probabilities), chunk by chunk."""
  b, rows, h, d = q_rows.shape
  chunks_per_ref = rows // (num_refs * chunk)

  def one_chunk(index):
    valid_c = (index % chunks_per_ref) * chunk + jnp.arange(chunk) < ref_len
    lse, probs = _chunk_forward(_chunk_rows(q_rows, index, chunk), k, valid_c, d ** -0.5)
    return lse, jnp.mean(jnp.sum(probs, axis=2), axis=1)

  lse, column_sums = jax.lax.map(one_chunk, jnp.arange(rows // chunk))  # [n, B, H, C], [n, B, N]
  lse = jnp.swapaxes(jnp.moveaxis(lse, 0, 1), 2, 3).reshape(b, rows, h)
  return lse, jnp.moveaxis(column_sums.reshape(num_refs, chunks_per_ref, b, -1).sum(1), 0, 1)


def _stats_forward(q_rows, k, pair_rows, pair_cols, num_refs, ref_len, chunk, kernel_rules):
  b, rows, h, d = q_rows.shape
  if kernel_rules is None:
    lse, column_sums = _chunked_forward(q_rows, k, num_refs, ref_len, chunk)
  else:
    lse, column_sums = statistics_kernel.forward_statistics(_heads_first(q_rows), _heads_first(k), num_refs,
                                                            ref_len, chunk, kernel_rules)
    lse, column_sums = _heads_first(lse), column_sums / h
  lse = keep(lse, "attention")
  pair_logp = _pair_logits(q_rows, k, pair_rows, pair_cols) - lse[jnp.arange(b)[:, None], pair_rows]
  return (pair_logp, column_sums), (q_rows, k, lse, pair_rows, pair_cols)


def _stats_backward(num_refs, ref_len, chunk, kernel_rules, residuals, cotangents):
  """Recomputes each chunk's probabilities from the saved log-sum-exp.

  With s = q.k/sqrt(d) and p = softmax_j(s): d lse_i / d s_ij = p_ij and the column sums have
  d col_j / d s_ij' = p_ij (1[j = j'] - p_ij') / H, so the chunk part is
  ds_ij = p_ij (g_lse_i + dp_ij - sum_j' p_ij' dp_ij') with dp_ij = g_col(r(i), j) / H on valid rows,
  where g_lse_i = -(sum of the pair cotangents of row i); each pair adds its own cotangent at (i, j*).
  """
  q_rows, k, lse, pair_rows, pair_cols = residuals
  g_pair, g_col = cotangents
  b, rows, h, d = q_rows.shape
  scale = d ** -0.5
  batch = jnp.arange(b)[:, None]
  g_lse = jnp.zeros((b, rows, h), jnp.float32).at[batch, pair_rows].add(-g_pair)
  if kernel_rules is None:
    dq, dk = _chunked_backward(q_rows, k, lse, g_lse, g_col, num_refs, ref_len, chunk)
  else:
    dq, dk = statistics_kernel.statistics_gradients(
        _heads_first(q_rows), _heads_first(k), _heads_first(lse), _heads_first(g_lse), g_col, num_refs, ref_len,
        chunk, 1.0 / h, kernel_rules)
    dq, dk = _heads_first(dq), _heads_first(dk)
  g = g_pair[..., None] * scale  # the pair logits themselves: s_ij* = q_i . k_j* / sqrt(d)
  dq = dq.at[batch, pair_rows].add(g * k[batch, pair_cols].astype(jnp.float32))
  dk = dk.at[batch, pair_cols].add(g * q_rows[batch, pair_rows].astype(jnp.float32))
  return dq.astype(q_rows.dtype), dk.astype(k.dtype), None, None


def _chunked_backward(q_rows, k, lse, g_lse, g_col, num_refs, ref_len, chunk):
  """(dq [B, rows, H, D], dk [B, N, H, D]), float32, of the chunked part, one chunk at a time."""
  b, rows, h, d = q_rows.shape
  chunks_per_ref = rows // (num_refs * chunk)
  scale = d ** -0.5

  def one_chunk(dk, index):
    q_c = _chunk_rows(q_rows, index, chunk)
    valid_c = (index % chunks_per_ref) * chunk + jnp.arange(chunk) < ref_len
    lse_c = jnp.swapaxes(_chunk_rows(lse, index, chunk), 1, 2)                   # [B, H, C]
    g_lse_c = jnp.swapaxes(_chunk_rows(g_lse, index, chunk), 1, 2)               # [B, H, C]
    logits = jnp.einsum("bchd,bnhd->bhcn", q_c, k, preferred_element_type=jnp.float32) * scale
    probs = jnp.exp(logits - lse_c[..., None])
    dp = jnp.where(valid_c[None, None, :, None], g_col[:, index // chunks_per_ref][:, None, None, :] / h, 0.0)
    ds = probs * (g_lse_c[..., None] + dp - jnp.sum(probs * dp, axis=-1, keepdims=True))
    ds = ds.astype(q_rows.dtype)
    dq_c = jnp.einsum("bhcn,bnhd->bchd", ds, k, preferred_element_type=jnp.float32) * scale
    dk = dk + jnp.einsum("bhcn,bchd->bnhd", ds, q_c, preferred_element_type=jnp.float32) * scale
    return dk, dq_c

  dk, dq = jax.lax.scan(one_chunk, jnp.zeros(k.shape, jnp.float32), jnp.arange(rows // chunk))
  return jnp.moveaxis(dq, 0, 1).reshape(q_rows.shape), dk


_target_softmax_stats.defvjp(_stats_forward, _stats_backward)


def block_statistics(q_ref, k_target, pairs: Correspondences, chunk: int = 256,
                     kernel_rules=None) -> AttentionStatistics:
  """Statistics of one block from q_ref [B, R, M, H, D] and k_target [B, N, H, D] (after RoPE).

  Indices of padding pairs are clipped into range; the losses mask those pairs out. kernel_rules: run
  the Pallas kernels, placed by these logical rules under a mesh (None: the XLA path).
  """
  b, r, m, h, d = q_ref.shape
  c = min(chunk, m)
  m_pad = -(-m // c) * c  # chunks never straddle two references
  q = jnp.pad(q_ref, ((0, 0), (0, 0), (0, m_pad - m), (0, 0), (0, 0))) if m_pad != m else q_ref
  pair_rows = jnp.clip(pairs.ref_index, 0, r - 1) * m_pad + jnp.clip(pairs.ref_token, 0, m - 1)
  pair_cols = jnp.clip(pairs.target_token, 0, k_target.shape[1] - 1)
  pair_logp, column_sums = _target_softmax_stats(q.reshape(b, r * m_pad, h, d), k_target,
                                                 pair_rows.astype(jnp.int32), pair_cols.astype(jnp.int32),
                                                 r, m, c, kernel_rules)
  return AttentionStatistics(jnp.mean(jnp.exp(pair_logp), axis=-1), column_sums / m)


def statistics_from_maps(maps, pairs: Correspondences) -> AttentionStatistics:
  """The same statistics from materialized per-block maps [B, L, R, M, N] (the official way)."""
  a = jnp.mean(maps, axis=1)  # A(i, j): [B, R, M, N]
  r, m, n = a.shape[1:]
  batch = jnp.arange(a.shape[0])[:, None]
  pair = a[batch, jnp.clip(pairs.ref_index, 0, r - 1), jnp.clip(pairs.ref_token, 0, m - 1),
           jnp.clip(pairs.target_token, 0, n - 1)]
  return AttentionStatistics(pair, jnp.mean(a, axis=2))
