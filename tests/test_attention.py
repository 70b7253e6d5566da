"""Multi-branch attention implementations against a dense masked attention over the packed sequence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaic_jax.model import attention


def _qkv(seed, b, t, r, m, h, d, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 6)
  main = [jax.random.normal(k, (b, t, h, d), dtype) for k in keys[:3]]
  refs = [jax.random.normal(k, (b, r, m, h, d), dtype) for k in keys[3:]]
  return (*main, *refs)


@pytest.mark.parametrize("num_refs,independent", [(1, False), (3, False), (3, True)])
def test_xla_multi_branch_equals_dense_masked(num_refs, independent):
  q, k, v, qr, kr, vr = _qkv(0, 2, 11, num_refs, 7, 2, 8)
  out_main, out_ref = attention.multi_branch_attention(q, k, v, qr, kr, vr, "xla", independent)
  exp_main, exp_ref = attention.dense_masked_attention(q, k, v, qr, kr, vr, independent)
  np.testing.assert_allclose(out_main, exp_main, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out_ref, exp_ref, rtol=1e-5, atol=1e-5)
  # Cached reference keys and values: the main queries' output is the same.
  cached, none = attention.multi_branch_attention(q, k, v, None, kr, vr, "xla", independent)
  assert none is None
  np.testing.assert_allclose(cached, out_main, rtol=1e-6, atol=1e-6)
  # Without references it is plain attention.
  plain, none = attention.multi_branch_attention(q, k, v, impl="xla")
  assert none is None
  np.testing.assert_allclose(plain, jax.nn.dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("independent", [False, True])
def test_query_chunks_give_the_same_values_and_gradients(independent):
  """Chunks of 4 queries (dividing neither the 11 main nor the 7 reference queries) against dense
  masked attention; also with cached reference keys and without references."""
  q, k, v, qr, kr, vr = _qkv(1, 2, 11, 3, 7, 2, 8)
  weights = jax.random.normal(jax.random.key(5), (2, 11 + 3 * 7, 2, 8))

  def projected(fn):
    def loss(*args):
      out_main, out_ref = fn(*args)
      return jnp.sum(jnp.concatenate([out_main, out_ref.reshape(2, -1, 2, 8)], 1) * weights)
    return jax.value_and_grad(loss, argnums=tuple(range(6)))(q, k, v, qr, kr, vr)

  chunked = projected(lambda *a: attention.multi_branch_attention(*a, impl="xla", independent_refs=independent,
                                                                  query_chunk=4))
  dense = projected(lambda *a: attention.dense_masked_attention(*a, independent_refs=independent))
  np.testing.assert_allclose(chunked[0], dense[0], rtol=1e-5)
  for got, want in zip(chunked[1], dense[1]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  cached, _ = attention.multi_branch_attention(q, k, v, None, kr, vr, "xla", independent, query_chunk=4)
  whole, _ = attention.multi_branch_attention(q, k, v, None, kr, vr, "xla", independent)
  np.testing.assert_allclose(cached, whole, rtol=1e-5, atol=1e-6)
  plain, _ = attention.multi_branch_attention(q, k, v, impl="xla", query_chunk=4)
  np.testing.assert_allclose(plain, jax.nn.dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_query_chunks_bound_the_logits_held_in_the_backward_pass():
  q, k, v, qr, kr, vr = _qkv(2, 1, 512, 2, 256, 4, 16)

  def temp_bytes(chunk):
    loss = lambda *a: sum(jnp.sum(o) for o in attention.multi_branch_attention(*a, impl="xla", query_chunk=chunk))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 3))).lower(q, k, v, qr, kr, vr).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  whole, chunked = temp_bytes(0), temp_bytes(64)
  main_logits = 4 * 512 * (512 + 2 * 256) * 4  # one float32 [H, T, T + R M] block: 8 MiB
  assert whole > 2 * main_logits and chunked < main_logits, (whole, chunked)


def test_splash_groups_equal_dense_masked_in_interpret_mode():
  """The Pallas splash path (interpret mode off TPU) on 128-aligned shapes, values and gradients."""
  q, k, v, qr, kr, vr = _qkv(1, 1, 256, 2, 128, 2, 128)
  loss = lambda impl: lambda *a: sum(jnp.sum(jnp.sin(o)) for o in (
      attention.multi_branch_attention(*a, impl) if impl else attention.dense_masked_attention(*a)))
  args = (q, k, v, qr, kr, vr)
  out = attention.multi_branch_attention(*args, "splash")
  exp = attention.dense_masked_attention(*args)
  for o, e in zip(out, exp):
    np.testing.assert_allclose(o, e, rtol=2e-5, atol=2e-5)
  out = attention.multi_branch_attention(*args, "splash", independent_refs=True)
  exp = attention.dense_masked_attention(*args, independent_refs=True)
  for o, e in zip(out, exp):
    np.testing.assert_allclose(o, e, rtol=2e-5, atol=2e-5)
  grads = jax.grad(loss("splash"), argnums=(0, 3))(*args)
  expected = jax.grad(loss(None), argnums=(0, 3))(*args)
  for g, e in zip(grads, expected):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_cudnn_equals_dense_masked():
  if jax.devices()[0].platform != "gpu":
    pytest.skip("needs an NVIDIA GPU")
  q, k, v, qr, kr, vr = _qkv(2, 2, 256, 3, 128, 4, 64, jnp.bfloat16)
  out = attention.multi_branch_attention(q, k, v, qr, kr, vr, "cudnn")
  exp = attention.dense_masked_attention(*(x.astype(jnp.float32) for x in (q, k, v, qr, kr, vr)))
  for o, e in zip(out, exp):
    np.testing.assert_allclose(np.asarray(o, np.float32), e, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("independent", [False, True])
def test_cudnn_gradients_equal_the_float32_xla_path(independent):
  """What training differentiates: cudnn's backward (bf16) against xla's in float32."""
  if jax.devices()[0].platform != "gpu":
    pytest.skip("needs an NVIDIA GPU")
  inputs = _qkv(3, 2, 256, 3, 128, 4, 64, jnp.bfloat16)
  weights = jax.random.normal(jax.random.key(4), (2, 256 + 3 * 128, 4, 64))

  def grads(impl, args):
    def loss(*a):
      out_main, out_ref = attention.multi_branch_attention(*a, impl=impl, independent_refs=independent)
      out = jnp.concatenate([out_main, out_ref.reshape(2, -1, 4, 64)], 1).astype(jnp.float32)
      return jnp.sum(out * weights)
    return jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*args)

  got = grads("cudnn", inputs)
  want = grads("xla", [x.astype(jnp.float32) for x in inputs])
  for g, w in zip(got, want):
    g, w = np.asarray(g, np.float32), np.asarray(w)
    assert np.abs(g - w).max() <= 3e-2 * np.abs(w).max(), (np.abs(g - w).max(), np.abs(w).max())


_SHARDED_SPLASH = r'''
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from mosaic_jax.model import attention
mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(AxisType.Explicit, AxisType.Explicit))
keys = jax.random.split(jax.random.key(0), 6)
main = [jax.random.normal(k, (2, 256, 2, 128)) for k in keys[:3]]
refs = [jax.random.normal(k, (2, 2, 128, 2, 128)) for k in keys[3:]]
expected = attention.dense_masked_attention(*main, *refs)
with jax.set_mesh(mesh):
  main = [jax.device_put(x, NamedSharding(mesh, P("data", None, "tensor", None))) for x in main]
  refs = [jax.device_put(x, NamedSharding(mesh, P("data", None, None, "tensor", None))) for x in refs]
  out = jax.jit(lambda *a: attention.multi_branch_attention(*a, impl="splash"))(*main, *refs)
assert out[0].sharding.spec == P("data", None, "tensor", None), out[0].sharding
for o, e in zip(out, expected):
  np.testing.assert_allclose(np.asarray(o), np.asarray(e), rtol=2e-5, atol=2e-5)
# The trainer's mesh (Auto axes) with its own rule table: splash splits by the rules' axis names.
from mosaic_jax import parallel
mesh = parallel.make_mesh({"data": 1, "fsdp": 2, "tensor": 2})
rules = (("batch", ("fsdp",)), ("heads", "tensor"))
main = [jax.device_put(x, NamedSharding(mesh, P("fsdp", None, "tensor", None))) for x in main]
refs = [jax.device_put(x, NamedSharding(mesh, P("fsdp", None, None, "tensor", None))) for x in refs]
step = jax.jit(lambda *a: attention.multi_branch_attention(*a, impl="splash", logical_rules=rules))
with jax.set_mesh(mesh):
  text = step.lower(*main, *refs).as_text()
  out = step(*main, *refs)
assert "shard_map" in text or "manual_computation" in text, "splash was not placed under shard_map"
assert out[0].sharding.spec == P("fsdp", None, "tensor", None), out[0].sharding
for o, e in zip(out, expected):
  np.testing.assert_allclose(np.asarray(o), np.asarray(e), rtol=2e-5, atol=2e-5)
# The attention statistics' kernels placed the same way: heads split over "tensor", so each device's
# column sums cover half of the heads and add up across it; values and gradients as without a mesh.
from mosaic_jax.model.attention_stats import Correspondences, block_statistics
pairs = Correspondences(*(np.array([[0, 1, 1], [1, 0, 1]]) for _ in range(2)),
                        target_token=np.array([[3, 200, 17], [0, 5, 255]]), valid=np.ones((2, 3), bool))
def statistics_loss(q, k, rules):
  stats = block_statistics(q, k, pairs, chunk=64, kernel_rules=rules)
  return jnp.sum(jnp.log(stats.pair_attention)) + jnp.sum(jnp.sin(300 * stats.reference_attention))
q_ref, k_target = refs[0], main[1]
expected = jax.value_and_grad(statistics_loss, argnums=(0, 1))(q_ref, k_target, None)
with jax.set_mesh(mesh):
  got = jax.jit(jax.value_and_grad(statistics_loss, argnums=(0, 1)), static_argnums=2)(q_ref, k_target, rules)
np.testing.assert_allclose(np.asarray(got[0]), np.asarray(expected[0]), rtol=1e-5)
for g, e in zip(got[1], expected[1]):
  np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-4 * float(np.abs(e).max()))
print("sharded splash ok")
'''


def test_splash_runs_under_shard_map_on_a_sharded_batch_and_heads():
  """4 CPU devices as a (data 2, tensor 2) mesh, in a fresh process (device count is fixed at start)."""
  import os
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _SHARDED_SPLASH], env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "sharded splash ok" in result.stdout
