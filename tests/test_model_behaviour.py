"""Properties of the multi-branch model that need no reference implementation: where the LoRA acts,
what references can see, reference counts 0..8, batch > 1, and bf16 against fp32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import relative_error
from mosaic_jax import model
from mosaic_jax.model import embeddings, transformer
from mosaic_jax.train import tpu_compile  # its compile report reads XLA's cost analysis

CFG = model.tiny(num_layers=2, num_single_layers=2)


@pytest.fixture(scope="module")
def params_and_lora():
  params = model.init_params(jax.random.key(0), CFG)
  lora = model.init_lora(jax.random.key(1), params, CFG, rank=4)
  # Non-zero B so the LoRA changes something (init leaves B at zero).
  leaves, treedef = jax.tree_util.tree_flatten_with_path(lora)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  lora = jax.tree_util.tree_unflatten(treedef, [
      jax.random.normal(k, x.shape) * 0.3 if path[-1].key == "lora_B" else x
      for k, (path, x) in zip(keys, leaves)])
  return params, lora


def _first_block(params, lora, txt, img, refs, num_refs, ref_hw=(3, 3)):
  """Outputs of the first double block for the given branch states."""
  batch = img.shape[0]
  layer = lambda tree: None if tree is None else jax.tree_util.tree_map(lambda x: x[0], tree)
  temb = jnp.ones((batch, CFG.hidden_size)) * 0.1
  temb_ref = jnp.ones((batch, CFG.hidden_size)) * -0.2
  rope_main = embeddings.rope(jnp.concatenate([model.text_ids(txt.shape[1]), model.image_ids(2, 3)]),
                              CFG.axes_dims_rope, CFG.rope_theta)
  rope_ref = embeddings.rope(jnp.asarray(model.reference_ids(num_refs, *ref_hw)), CFG.axes_dims_rope,
                             CFG.rope_theta)
  (t, i, r), _ = transformer.double_block(
      layer(params["transformer_blocks"]), layer(None if lora is None else lora["transformer_blocks"]),
      CFG, txt, img, refs, temb, temb_ref, rope_main, rope_ref, False)
  return t, i, r


def _branch_states(seed, num_refs=2, batch=2):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  d = CFG.hidden_size
  return (jax.random.normal(k1, (batch, 4, d)), jax.random.normal(k2, (batch, 6, d)),
          jax.random.normal(k3, (batch, num_refs, 9, d)))


def test_lora_changes_reference_tokens_only(params_and_lora):
  """Text and target tokens never pass through LoRA weights.

  Text and target queries attend to reference keys, which the LoRA does change, so their first-block
  outputs move with a full LoRA. To isolate the token-wise path we use a LoRA that is non-zero only
  after the attention (to_out.0, ff.net.2): reference keys and values are then untouched, so text and
  target outputs must be bit-identical while reference outputs change. And with no references at all,
  the full LoRA changes nothing anywhere.
  """
  params, lora = params_and_lora
  post_attention = {"attn.to_out.0", "ff.net.2"}
  lora_post = {"transformer_blocks": {}}
  for name in model.lora.DOUBLE_TARGETS:
    module = model.lora.get_path(lora["transformer_blocks"], name)
    if name not in post_attention:
      module = jax.tree_util.tree_map(jnp.zeros_like, module)
    model.lora.set_path(lora_post["transformer_blocks"], name, module)
  txt, img, refs = _branch_states(0)
  t0, i0, r0 = _first_block(params, None, txt, img, refs, 2)
  t1, i1, r1 = _first_block(params, lora_post, txt, img, refs, 2)
  np.testing.assert_array_equal(t0, t1)
  np.testing.assert_array_equal(i0, i1)
  assert float(jnp.abs(r0 - r1).max()) > 1e-2

  no_refs = _inputs(np.random.default_rng(3), 0)
  np.testing.assert_array_equal(model.forward(params, None, CFG, no_refs)[0],
                                model.forward(params, lora, CFG, no_refs)[0])


def test_references_do_not_see_each_other(params_and_lora):
  params, lora = params_and_lora
  txt, img, refs = _branch_states(1, num_refs=3)
  changed = refs.at[:, 2].set(jax.random.normal(jax.random.key(9), refs[:, 2].shape))
  _, i_a, r_a = _first_block(params, lora, txt, img, refs, 3)
  _, i_b, r_b = _first_block(params, lora, txt, img, changed, 3)
  np.testing.assert_array_equal(r_a[:, :2], r_b[:, :2])  # ref_1, ref_2 untouched by ref_3
  assert float(jnp.abs(r_a[:, 2] - r_b[:, 2]).max()) > 1e-2
  assert float(jnp.abs(i_a - i_b).max()) > 1e-4  # while the target does attend to ref_3


def _inputs(rng, num_refs, batch=2, dtype=np.float32):
  c = CFG.in_channels
  return model.FluxInputs(
      target=rng.standard_normal((batch, 6, c)).astype(dtype), target_ids=model.image_ids(2, 3),
      text=rng.standard_normal((batch, 4, CFG.joint_attention_dim)).astype(dtype),
      text_ids=model.text_ids(4), pooled=rng.standard_normal((batch, CFG.pooled_projection_dim)).astype(dtype),
      timestep=rng.uniform(size=batch).astype(np.float32), guidance=np.full(batch, 3.5, np.float32),
      refs=rng.standard_normal((batch, num_refs, 4, c)).astype(dtype) if num_refs else None,
      ref_ids=model.reference_ids(num_refs, 2, 2) if num_refs else None)


def test_zero_to_eight_references(params_and_lora):
  params, lora = params_and_lora
  forward = jax.jit(model.forward, static_argnums=(2, 4))
  rng = np.random.default_rng(0)
  base = _inputs(rng, 8, batch=3)
  no_refs = base._replace(refs=None, ref_ids=None)
  pred0, _ = forward(params, lora, CFG, no_refs, False)
  for num_refs in (1, 8):
    inputs = base._replace(refs=base.refs[:, :num_refs], ref_ids=base.ref_ids[:num_refs])
    pred, aux = forward(params, lora, CFG, inputs, True)
    assert pred.shape == (3, 6, CFG.in_channels) and np.isfinite(np.asarray(pred)).all()
    assert aux["attention_maps"].shape == (3, CFG.num_layers, num_refs, 4, 6)
    assert float(jnp.abs(pred - pred0).max()) > 1e-3  # references influence the target
  # An empty reference axis is plain FLUX, like no references at all.
  empty = base._replace(refs=base.refs[:, :0], ref_ids=base.ref_ids[:0])
  np.testing.assert_allclose(forward(params, lora, CFG, empty, False)[0], pred0, rtol=1e-6, atol=1e-6)
  # Samples of a batch are independent.
  single = base._replace(
      target=base.target[1:2], text=base.text[1:2], pooled=base.pooled[1:2], timestep=base.timestep[1:2],
      guidance=base.guidance[1:2], refs=base.refs[1:2])
  np.testing.assert_allclose(forward(params, lora, CFG, single, False)[0][0],
                             forward(params, lora, CFG, base, False)[0][1], rtol=1e-5, atol=1e-5)


def test_bfloat16_forward_is_close_to_float32(params_and_lora):
  params, lora = params_and_lora
  forward = jax.jit(model.forward, static_argnums=(2, 4))
  inputs = _inputs(np.random.default_rng(2), 2)
  pred32, _ = forward(params, lora, CFG, inputs, False)
  params16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
  pred16, _ = forward(params16, lora, CFG, inputs, False)
  assert pred16.dtype == jnp.bfloat16
  assert relative_error(pred16.astype(jnp.float32), pred32) < 0.03


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rope_quarter_turn_is_the_same_on_every_platform(dtype):
  """RoPE's pair rotation as TPU compiles it (a matmul with a signed permutation) and as other platforms
  do (a reshape to pairs) gives the same numbers, bit for bit (embeddings.apply_rope)."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 16), jnp.float32).astype(dtype) * 7
  by_matmul = np.asarray(embeddings._quarter_turn_by_matmul(x))
  assert by_matmul.dtype == np.float32 and np.abs(by_matmul).max() > 1
  np.testing.assert_array_equal(by_matmul, np.asarray(embeddings._quarter_turn_by_reshape(x)))


def test_bfloat16_lora_gradients_are_close_to_float32(params_and_lora):
  """The recipe's gradients (diffusion, SCAL and MDL losses; the LoRA's) with the base in bf16, as in
  training, against float32: each LoRA leaf within 5% of its float32 gradient's largest entry (seen:
  2.7% at most, 1.4% typical, rounding as torch's bf16 autocast does, layers.py; 2.5% when each projection
  and its LoRA were rounded once together)."""
  from mosaic_jax import losses
  params, lora = params_and_lora
  rng = np.random.default_rng(3)
  inputs = _inputs(rng, 2)
  pairs = model.Correspondences(rng.integers(0, 2, (2, 8)), rng.integers(0, 4, (2, 8)), rng.integers(0, 6, (2, 8)),
                                rng.uniform(size=(2, 8)) < 0.8)

  def loss(lora, params):
    pred, aux = model.forward(params, lora, CFG, inputs, correspondences=pairs)
    stats = aux["attention_statistics"]
    return (jnp.mean(jnp.square(pred.astype(jnp.float32) - 0.3)) + jnp.mean(losses.mdl_loss(stats.reference_attention))
            + 0.1 * jnp.mean(losses.scal_loss(stats.pair_attention, pairs.valid)))

  grad = jax.jit(jax.grad(loss))
  expected = grad(lora, params)
  got = grad(lora, jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params))
  for g, e in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
    assert g.dtype == jnp.float32 and float(jnp.abs(e).max()) > 0
    assert relative_error(g, e) < 0.05


def test_reference_kv_cache_is_exact_with_independent_refs(params_and_lora):
  """With independent_refs, reference keys/values do not depend on the target or t: a cache taken at
  one step reproduces the uncached prediction at another step."""
  import dataclasses
  params, lora = params_and_lora
  cfg = dataclasses.replace(CFG, independent_refs=True)
  forward = jax.jit(model.forward, static_argnums=(2, 4, 6))
  rng = np.random.default_rng(5)
  step_a = _inputs(rng, 3)
  step_b = step_a._replace(target=rng.standard_normal(step_a.target.shape).astype(np.float32),
                           timestep=np.array([0.9, 0.1], np.float32))
  _, aux = forward(params, lora, cfg, step_a, False, None, True)
  cache = aux["ref_kv"]
  assert cache["double"][0].shape == (CFG.num_layers, 2, 3, 4, CFG.num_attention_heads,
                                      CFG.attention_head_dim)
  expected, _ = forward(params, lora, cfg, step_b, False)
  cached, _ = jax.jit(lambda p, l, i, kv: model.forward(p, l, cfg, i, ref_kv=kv))(
      params, lora, step_b._replace(refs=None, ref_ids=None), cache)
  np.testing.assert_allclose(cached, expected, rtol=1e-5, atol=1e-5)
  # Without independent_refs the references see the target, so the same cache is only approximate.
  plain, _ = forward(params, lora, CFG, step_b, False)
  approx, _ = jax.jit(lambda p, l, i, kv: model.forward(p, l, CFG, i, ref_kv=kv))(
      params, lora, step_b._replace(refs=None, ref_ids=None), cache)
  assert float(jnp.abs(approx - plain).max()) > 1e-3
  with pytest.raises(ValueError, match="either inputs.refs or a ref_kv cache"):
    model.forward(params, lora, cfg, step_b, ref_kv=cache)


def test_per_block_remat_gives_the_same_gradients(params_and_lora):
  import dataclasses
  params, lora = params_and_lora
  inputs = _inputs(np.random.default_rng(7), 2)
  grads, flops = {}, {}
  for policy in model.config.REMAT_POLICIES:
    cfg = dataclasses.replace(CFG, remat_policy=policy)
    loss = lambda l, cfg=cfg: jnp.sum(jnp.square(model.forward(params, l, cfg, inputs)[0]))
    compiled = jax.jit(jax.grad(loss)).lower(lora).compile()
    grads[policy] = compiled(lora)
    flops[policy] = tpu_compile.report(compiled).flops
  for policy in model.config.REMAT_POLICIES:
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           grads["none"], grads[policy])
  # What each policy recomputes: "keep_attention" keeps the attention that "full" redoes, "recompute_mlp"
  # the gated projections' outputs too, "keep_all" the MLP's hidden layer and LoRA x A too (only
  # elementwise work is left to redo).
  assert flops["none"] < flops["keep_all"] < flops["recompute_mlp"] < flops["keep_attention"] < flops["full"], flops
  # Offloading moves what a policy keeps, not what it recomputes (XLA:CPU has no separate host memory:
  # where the tensors go is checked on a TPU compile, test_tpu_compile.py).
  assert flops["offload_mlp"] < flops["recompute_mlp"] and flops["offload_kept"] < flops["full"], flops
  with pytest.raises(ValueError, match="remat_policy"):
    dataclasses.replace(CFG, remat_policy="sometimes")


def test_unrolled_blocks_give_the_same_prediction(params_and_lora):
  """unroll_layers (straight-line blocks, for XLA's cost analysis) changes how the blocks run, not what."""
  import dataclasses
  params, lora = params_and_lora
  inputs = _inputs(np.random.default_rng(8), 2)
  scanned = jax.jit(lambda p, l: model.forward(p, l, CFG, inputs)[0])(params, lora)
  unrolled = jax.jit(lambda p, l: model.forward(p, l, dataclasses.replace(CFG, unroll_layers=True), inputs)[0])(
      params, lora)
  np.testing.assert_allclose(unrolled, scanned, rtol=1e-5, atol=1e-6)
