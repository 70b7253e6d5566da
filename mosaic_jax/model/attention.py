"""MOSAIC's masked multi-branch attention, without ever computing the ref_i x ref_j blocks.

The packed sequence is [main | ref_1 | ... | ref_R] where main = [text | target]. Main queries attend
to every key; ref_i queries attend to main keys and ref_i keys only. We compute it as two groups:

  main queries  x  [main keys, all reference keys]          (plain attention)
  ref_i queries x  [main keys, ref_i keys], for all i at once

so the cost is what the mask allows and nothing more. With `independent_refs` (the OminiControl2 idea)
ref_i queries see ref_i keys only, so reference keys and values never depend on the target and can be
cached across sampling steps (main queries then attend to cached reference keys). Layout: q, k, v are [B, T, H, D] for main and
[B, R, M, H, D] for references. Logits and softmax in float32.

Implementations (FluxConfig.attention_impl):
  xla     portable einsums, heads first; the reference group reads the shared main keys without
          copying them (one joint softmax over two logit blocks, never concatenated, normalized on
          the output rather than on the logits). With a query chunk, queries go through in
          chunks, each rematerialized in the backward pass: the float32 logits of one chunk are
          live at a time instead of all of them (the kernels below never hold them at all).
  cudnn   jax.nn.dot_product_attention(implementation="cudnn") on each group (NVIDIA GPUs, bf16/fp16);
          the reference group is one call over B*R sequences [main keys, ref_i keys].
  splash  the Pallas TPU splash-attention kernel on the same two groups (splash_attention.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mosaic_jax.model.remat import keep
from mosaic_jax.parallel.sharding import DEFAULT_LOGICAL_RULES


def _softmax_attend(blocks, out_dtype):
  """Joint softmax over the key axis of several (logits [..., Q, K_i], values, einsum spec) blocks.

  No block is concatenated and no probability is normalized: each block's exp(logits - max) multiplies
  its values, and the summed output [..., Q, D] is divided by the softmax denominator once, instead of
  dividing every logit. The max is a constant to autodiff (stop_gradient): the result does not depend
  on it, so the gradients stay exact and its backward pass costs nothing.
  """
  peak = jax.lax.stop_gradient(functools.reduce(jnp.maximum, [jnp.max(logits, axis=-1, keepdims=True)
                                                              for logits, _, _ in blocks]))
  out, total = 0.0, 0.0
  for logits, values, spec in blocks:
    weights = jnp.exp(logits - peak)
    total = total + jnp.sum(weights, axis=-1, keepdims=True)
    out = out + jnp.einsum(spec, weights.astype(values.dtype), values, preferred_element_type=jnp.float32)
  return (out / total).astype(out_dtype)


def _over_query_chunks(attend, q, axis: int, chunk: int):
  """attend(q) computed `chunk` queries at a time along `axis`, each chunk under jax.checkpoint: only
  one chunk's float32 logits are ever live, forward or backward (the backward pass recomputes them
  chunk by chunk). The query count is padded to a whole number of chunks; padded rows are dropped."""
  n = q.shape[axis]
  if not chunk or n <= chunk:
    return attend(q)
  pad = -n % chunk
  q = jnp.pad(q, [(0, pad if a == axis else 0) for a in range(q.ndim)])
  chunks = jnp.moveaxis(q.reshape(q.shape[:axis] + (-1, chunk) + q.shape[axis + 1:]), axis, 0)
  out = jax.lax.map(jax.checkpoint(attend), chunks)  # [chunks, ..., chunk, ...] with the query axis at axis + 1
  out = jnp.moveaxis(out, 0, axis)
  out = out.reshape(out.shape[:axis] + (-1,) + out.shape[axis + 2:])
  return jax.lax.slice_in_dim(out, 0, n, axis=axis)


def _heads_first(x):
  """[B, ..., H, D] -> [B, H, ..., D]."""
  return None if x is None else jnp.moveaxis(x, -2, 1)


def _xla_multi_branch(q_main, k_main, v_main, q_ref, k_ref, v_ref, independent_refs, chunk=0):
  # Heads first, so that every matmul below is a plain batched matmul over (B, H): its operands and
  # result need no transposes (the six moves here are per token, the logits per query-key pair).
  scale = q_main.shape[-1] ** -0.5
  dtype = q_main.dtype
  k_main, v_main, k_ref, v_ref = (_heads_first(x) for x in (k_main, v_main, k_ref, v_ref))
  logits = lambda spec, q, k: jnp.einsum(spec, q, k, preferred_element_type=jnp.float32) * scale
  if k_ref is not None:
    b, h, r, m, d = k_ref.shape
    k_ref_flat, v_ref_flat = k_ref.reshape(b, h, r * m, d), v_ref.reshape(b, h, r * m, d)

  def attend_main(q):  # [B, H, T, D]: main queries see main keys and every reference's keys
    blocks = [(logits("bhqd,bhkd->bhqk", q, k_main), v_main, "bhqk,bhkd->bhqd")]
    if k_ref is not None:  # all references' keys as one block
      blocks.append((logits("bhqd,bhkd->bhqk", q, k_ref_flat), v_ref_flat, "bhqk,bhkd->bhqd"))
    return _softmax_attend(blocks, dtype)

  def attend_ref(q):  # [B, H, R, M, D]: ref_i queries see [main keys,] ref_i keys
    blocks = [(logits("bhrqd,bhrkd->bhrqk", q, k_ref), v_ref, "bhrqk,bhrkd->bhrqd")]
    if not independent_refs:
      blocks.append((logits("bhrqd,bhkd->bhrqk", q, k_main), v_main, "bhrqk,bhkd->bhrqd"))
    return _softmax_attend(blocks, dtype)

  out_main = jnp.moveaxis(_over_query_chunks(attend_main, _heads_first(q_main), 2, chunk), 1, -2)
  if q_ref is None:  # no references, or their keys and values came from a cache
    return out_main, None
  return out_main, jnp.moveaxis(_over_query_chunks(attend_ref, _heads_first(q_ref), 3, chunk), 1, -2)


def _grouped_multi_branch(dense, q_main, k_main, v_main, q_ref, k_ref, v_ref, independent_refs):
  """The two groups as plain dense attentions [B, T, H, D] for kernels without custom masks."""
  if k_ref is None:
    return dense(q_main, k_main, v_main), None
  b, r, m = k_ref.shape[:3]
  flat = lambda x: x.reshape(b, r * m, *x.shape[3:])
  out_main = dense(q_main, jnp.concatenate([k_main, flat(k_ref)], 1),
                   jnp.concatenate([v_main, flat(v_ref)], 1))
  if q_ref is None:
    return out_main, None
  per_seq = lambda x: x.reshape(b * r, m, *x.shape[3:])
  if independent_refs:
    return out_main, dense(per_seq(q_ref), per_seq(k_ref), per_seq(v_ref)).reshape(q_ref.shape)
  # Each reference sequence is [main keys, its own keys]: main keys are broadcast, never ref_j's.
  per_ref = lambda main, own: jnp.concatenate(
      [jnp.broadcast_to(main[:, None], (b, r) + main.shape[1:]), own], axis=2).reshape(
          b * r, main.shape[1] + m, *main.shape[2:])
  out_ref = dense(per_seq(q_ref), per_ref(k_main, k_ref), per_ref(v_main, v_ref))
  return out_main, out_ref.reshape(q_ref.shape)


def _cudnn_dense(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


def multi_branch_attention(q_main, k_main, v_main, q_ref=None, k_ref=None, v_ref=None, impl="xla",
                           independent_refs=False, query_chunk=0, logical_rules=None):
  """Returns (out_main [B, T, H, D], out_ref [B, R, M, H, D] or None).

  k_ref / v_ref without q_ref: reference keys and values from a cache (main queries only).
  independent_refs: reference queries see their own reference's keys only (not text or target).
  query_chunk (xla only; 0: all at once): queries per chunk, which bounds the float32 logits held.
  logical_rules (splash only): how batch and heads map to the axes of the mesh set by `jax.set_mesh`.
  """
  args = (q_main, k_main, v_main, q_ref, k_ref, v_ref, independent_refs)
  # the outputs tagged for the remat policies that keep them (model/remat.py); the splash kernel tags
  # what it keeps itself (its output and softmax statistics, splash_attention.py)
  kept = lambda outs: tuple(keep(o, "attention") for o in outs)
  if impl == "xla":
    return kept(_xla_multi_branch(*args, chunk=query_chunk))
  if impl == "cudnn":
    return kept(_grouped_multi_branch(_cudnn_dense, *args))
  if impl == "splash":
    from mosaic_jax.model.splash_attention import splash_dense  # Pallas: imported only when used
    dense = functools.partial(splash_dense, logical_rules=logical_rules or DEFAULT_LOGICAL_RULES)
    return _grouped_multi_branch(dense, *args)
  raise ValueError(f"attention impl {impl!r}; expected 'xla', 'cudnn' or 'splash'.")


def dense_masked_attention(q_main, k_main, v_main, q_ref, k_ref, v_ref, independent_refs=False):
  """The naive way, for tests and benchmarks: one packed sequence and a [T, T] mask (all blocks computed)."""
  b, r, m = q_ref.shape[:3]
  t = q_main.shape[1]
  cat = lambda main, ref: jnp.concatenate([main, ref.reshape(b, r * m, *ref.shape[3:])], 1)
  branch = jnp.concatenate([jnp.zeros(t, jnp.int32), jnp.repeat(jnp.arange(1, r + 1), m)])
  same = branch[:, None] == branch[None, :]
  mask = (branch[:, None] == 0) | same if independent_refs else (
      (branch[:, None] == 0) | (branch[None, :] == 0) | same)
  out = jax.nn.dot_product_attention(cat(q_main, q_ref), cat(k_main, k_ref), cat(v_main, v_ref),
                                     mask=mask[None, None], implementation="xla")
  return out[:, :t], out[:, t:].reshape(q_ref.shape)


def reference_target_attention_map(q_ref, k_target):
  """A block's map (docs/method.md, 'Statistics'): softmax over target keys of each reference query, head mean.

  q_ref [B, R, M, H, D], k_target [B, N, H, D] -> [B, R, M, N] float32. This materializes the full
  map: it is the plain reference path for tests and inspection; training uses attention_stats.py.
  """
  scale = q_ref.shape[-1] ** -0.5
  logits = jnp.einsum("brqhd,bkhd->brhqk", q_ref, k_target, preferred_element_type=jnp.float32) * scale
  return jnp.mean(jax.nn.softmax(logits, axis=-1), axis=2)
