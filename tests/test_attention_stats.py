"""The O(tokens) attention statistics and the SCAL/MDL losses against the materialized official way."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaic_jax import losses, model
from mosaic_jax.model.attention import reference_target_attention_map
from mosaic_jax.model.attention_stats import Correspondences, block_statistics, statistics_from_maps
from mosaic_jax.parallel.sharding import DEFAULT_LOGICAL_RULES

CFG = model.tiny(num_layers=2, num_single_layers=0)  # statistics live in the double blocks


def _pairs(rng, b, k, r, m, n, valid_fraction=0.7):
  valid = rng.uniform(size=(b, k)) < valid_fraction
  valid[0, 0] = True
  return Correspondences(
      ref_index=rng.integers(0, r, (b, k)).astype(np.int32),
      ref_token=rng.integers(0, m, (b, k)).astype(np.int32),
      target_token=rng.integers(0, n, (b, k)).astype(np.int32),
      valid=valid)


def test_block_statistics_equal_materialized_maps():
  """Chunked statistics == full maps, with a chunk that does not divide the reference length."""
  rng = np.random.default_rng(0)
  b, r, m, n, h, d = 2, 3, 10, 12, 2, 8
  q = jnp.asarray(rng.standard_normal((b, r, m, h, d)) * 2, jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, n, h, d)) * 2, jnp.float32)
  pairs = _pairs(rng, b, 9, r, m, n)
  stats = block_statistics(q, k, pairs, chunk=4)
  expected = statistics_from_maps(reference_target_attention_map(q, k)[:, None], pairs)
  np.testing.assert_allclose(stats.pair_attention, expected.pair_attention, rtol=1e-5)
  np.testing.assert_allclose(stats.reference_attention, expected.reference_attention, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(stats.reference_attention).sum(-1), 1.0, rtol=1e-5)


def test_pallas_kernels_equal_the_xla_path_in_interpret_mode():
  """The statistics' Pallas kernels (Pallas interpret mode on the CPU) against the chunked XLA path:
  values and both gradients, 3 references of 10 tokens in blocks of 4 (padded rows), 2 heads."""
  rng = np.random.default_rng(1)
  b, r, m, n, h, d = 2, 3, 10, 12, 2, 8
  q = jnp.asarray(rng.standard_normal((b, r, m, h, d)) * 2, jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, n, h, d)) * 2, jnp.float32)
  pairs = _pairs(rng, b, 9, r, m, n)

  def loss(q, k, rules):
    stats = block_statistics(q, k, pairs, chunk=4, kernel_rules=rules)
    # weights that differ per column, so the column sums' gradient is not a constant
    return (jnp.sum(jnp.log(stats.pair_attention) * pairs.valid) + jnp.sum(jnp.sin(7 * stats.reference_attention)),
            stats)

  (value, stats), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(q, k, DEFAULT_LOGICAL_RULES)
  (expected_value, expected), expected_grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(q, k, None)
  np.testing.assert_allclose(stats.pair_attention, expected.pair_attention, rtol=1e-5)
  np.testing.assert_allclose(stats.reference_attention, expected.reference_attention, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  for g, e in zip(grads, expected_grads):
    assert float(jnp.abs(e).max()) > 1e-2
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * float(jnp.abs(e).max()))


def _lora(params):
  lora = model.init_lora(jax.random.key(1), params, CFG, rank=4)
  leaves, treedef = jax.tree_util.tree_flatten(lora)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [jax.random.normal(k, x.shape) * 0.2
                                                for k, x in zip(keys, leaves)])


def _inputs(rng, num_refs, b=2):
  c = CFG.in_channels
  return model.FluxInputs(
      target=rng.standard_normal((b, 12, c)).astype(np.float32), target_ids=model.image_ids(3, 4),
      text=rng.standard_normal((b, 4, CFG.joint_attention_dim)).astype(np.float32),
      text_ids=model.text_ids(4), pooled=rng.standard_normal((b, CFG.pooled_projection_dim)).astype(np.float32),
      timestep=np.array([0.2, 0.7][:b], np.float32), guidance=np.ones(b, np.float32),
      refs=rng.standard_normal((b, num_refs, 9, c)).astype(np.float32),
      ref_ids=model.reference_ids(num_refs, 3, 3))


def _loss_terms(params, cfg, inputs, pairs, efficient):
  def terms(lora):
    if efficient:
      _, aux = model.forward(params, lora, cfg, inputs, correspondences=pairs)
      stats = aux["attention_statistics"]
    else:
      _, aux = model.forward(params, lora, cfg, inputs, return_attention_maps=True)
      stats = statistics_from_maps(aux["attention_maps"], pairs)
    return jnp.stack([jnp.mean(losses.scal_loss(stats.pair_attention, pairs.valid)),
                      jnp.mean(losses.mdl_loss(stats.reference_attention))])
  return terms


@pytest.mark.parametrize("num_refs", [1, 2, 4])
def test_losses_and_lora_gradients_match_materialized(num_refs):
  params = model.init_params(jax.random.key(0), CFG)
  # Sharper attention than the default init, so the losses and gradients are far from trivial.
  params["transformer_blocks"]["attn"]["norm_q"]["scale"] *= 3.0
  lora = _lora(params)
  rng = np.random.default_rng(num_refs)
  inputs = _inputs(rng, num_refs)
  pairs = _pairs(rng, 2, 16, num_refs, 9, 12)
  cfg = CFG.__class__(**{**CFG.__dict__, "stats_chunk": 4})  # chunks that do not divide M = 9
  results = []
  for efficient in (True, False):
    fn = _loss_terms(params, cfg, inputs, pairs, efficient)
    results.append(jax.jit(lambda l, fn=fn: (fn(l), jax.jacrev(fn)(l)))(lora))
  (values, jac), (ref_values, ref_jac) = results
  np.testing.assert_allclose(values, ref_values, rtol=1e-5)
  assert float(values[0]) > 0.5
  if num_refs == 1:
    assert float(values[1]) == 0.0
  else:
    assert float(values[1]) < -1e-3
  flat, ref_flat = jax.tree_util.tree_leaves(jac), jax.tree_util.tree_leaves(ref_jac)
  scale = max(float(jnp.abs(x).max()) for x in ref_flat)
  assert scale > 1e-3
  for g, e in zip(flat, ref_flat):
    assert float(jnp.abs(g - e).max()) <= 1e-5 * scale


def test_one_hot_attention_gives_zero_scal_and_minus_log2_mdl():
  """Reference queries that point exactly at one target key each: A is one-hot."""
  n, d = 8, 8
  k = jnp.eye(n, d)[None, :, None, :] * 20.0           # [1, N, 1, D], target key j = 20 e_j
  # ref 0 tokens look at target tokens 0..3, ref 1 tokens at 4..7: disjoint supports.
  targets = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
  q = jnp.eye(n, d)[targets][None, :, :, None, :] * 20.0  # [1, 2, M, 1, D]; logits 141 vs 0
  pairs = Correspondences(ref_index=np.array([[0, 0, 1, 1]]), ref_token=np.array([[0, 3, 0, 2]]),
                          target_token=np.array([[0, 3, 4, 6]]), valid=np.ones((1, 4), bool))
  stats = block_statistics(q, k, pairs, chunk=2)
  # Exact up to float32 rounding of logits this large (one ulp of 141 is 1.5e-5).
  np.testing.assert_allclose(stats.pair_attention, 1.0, rtol=1e-4)
  assert abs(float(losses.scal_loss(stats.pair_attention, pairs.valid)[0])) < 1e-4
  np.testing.assert_allclose(losses.mdl_loss(stats.reference_attention), [-math.log(2)], rtol=1e-4)
  # A wrong target token gets the 1e-9 floor: -log(1e-9).
  wrong = pairs._replace(target_token=np.array([[1, 3, 4, 6]]))
  wrong_stats = block_statistics(q, k, wrong, chunk=2)
  np.testing.assert_allclose(losses.scal_loss(wrong_stats.pair_attention, wrong.valid),
                             [-math.log(1e-9) / 4], rtol=1e-5)


def test_loss_masks_and_schedule():
  att = jnp.array([[0.5, 0.25, 0.1], [0.9, 0.9, 0.9]])
  valid = jnp.array([[True, True, False], [False, False, False]])
  scal = losses.scal_loss(att, valid)
  np.testing.assert_allclose(scal, [-(math.log(0.5) + math.log(0.25)) / 2, 0.0], rtol=1e-6)
  # Padding references count for nothing; a sample with one valid reference has MDL 0.
  a = jnp.array([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]] * 2)
  mdl = losses.mdl_loss(a, ref_valid=jnp.array([[True, True, False], [True, False, False]]))
  np.testing.assert_allclose(mdl, [-math.log(2), 0.0], rtol=1e-6)
  assert np.isfinite(np.asarray(losses.mdl_loss(jnp.zeros((1, 3, 4))))).all()
  w = [float(losses.ramp_weight(s, 10_000, 11_000)) for s in (0, 9_999, 10_000, 10_500, 11_000, 50_000)]
  assert w == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
  np.testing.assert_allclose(
      losses.flow_matching_loss(jnp.ones((2, 3, 4)), jnp.full((2, 3, 4), 3.0), jnp.ones((2, 3, 4))), [1.0, 1.0])


def _temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_statistics_temporary_memory_does_not_grow_with_the_maps():
  """Loss-and-gradient temp memory at two sizes: the maps grow 4x, our temporaries ~2x (tokens)."""
  def loss_fn(efficient, pairs):
    def f(q, k):
      stats = (block_statistics(q, k, pairs, chunk=64) if efficient else
               statistics_from_maps(reference_target_attention_map(q, k)[:, None], pairs))
      return jnp.mean(losses.scal_loss(stats.pair_attention, pairs.valid)) + \
          jnp.mean(losses.mdl_loss(stats.reference_attention))
    return jax.value_and_grad(f, argnums=(0, 1))

  sizes = {}
  for tokens in (512, 1024):
    rng = np.random.default_rng(0)
    r, h, d = 2, 4, 16
    q = jax.ShapeDtypeStruct((1, r, tokens, h, d), jnp.float32)
    k = jax.ShapeDtypeStruct((1, tokens, h, d), jnp.float32)
    pairs = _pairs(rng, 1, 64, r, tokens, tokens)
    sizes[tokens] = (_temp_bytes(loss_fn(True, pairs), q, k), _temp_bytes(loss_fn(False, pairs), q, k))
  (ours_small, maps_small), (ours_big, maps_big) = sizes[512], sizes[1024]
  assert maps_big / maps_small > 3.5, sizes   # the materialized path grows with R*M*N*H
  assert ours_big / ours_small < 2.5, sizes   # ours with the tokens only
  assert ours_big < maps_big / 10, sizes
