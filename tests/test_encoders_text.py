"""T5 and CLIP text encoders against transformers' T5EncoderModel and CLIPTextModel (tiny random
configs), loaded from the files that transformers' save_pretrained wrote; loader conventions and errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaic_jax.interop.safetensors_io import SafetensorsFile, save_safetensors
from mosaic_jax.interop.tensor_table import CheckpointError
from mosaic_jax.interop.text_encoder_checkpoint import load_clip_text_encoder, load_t5_encoder
from mosaic_jax.model import clip, t5

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

T5_TINY = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
               feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
               relative_attention_max_distance=20, dropout_rate=0.0)
CLIP_TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
                 bos_token_id=62, pad_token_id=63)


def randomize_(module, seed):
  """Every weight random and non-zero, norms included, scaled to keep activations O(1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in module.named_parameters():
      noise = torch.randn(param.shape, generator=gen)
      if "norm" in name:
        param.copy_((1.0 + 0.3 * noise) if name.endswith("weight") else 0.2 * noise)
      elif "embed" in name or "relative_attention_bias" in name:
        param.copy_(noise)
      elif param.ndim == 1:
        param.copy_(0.1 * noise)
      else:
        param.copy_(noise * (param.shape[1] ** -0.5))


def assert_close(ours, ref, what):
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  scale = max(float(np.max(np.abs(ref))), 1e-6)
  err = float(np.max(np.abs(ours - ref)))
  assert err <= 1e-4 * scale, f"{what}: max abs error {err:.3g} > 1e-4 x output scale {scale:.3g}"


# ---- T5 -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_t5(tmp_path_factory):
  model = transformers.T5EncoderModel(transformers.T5Config(**T5_TINY)).eval()
  randomize_(model, seed=0)
  root = tmp_path_factory.mktemp("flux_ckpt")
  model.save_pretrained(str(root / "text_encoder_2"))
  # The same weights as shards + index, the way T5-XXL ships.
  model.save_pretrained(str(root / "t5_sharded"), max_shard_size="20KB")
  return model, root


@pytest.fixture(scope="module")
def t5_encode():
  return jax.jit(t5.encode, static_argnums=1)


def test_t5_buckets_match_transformers():
  bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
  for length, num_buckets, max_distance in ((512, 32, 128), (40, 32, 20), (64, 16, 32)):
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    ref = bucket(relative, bidirectional=True, num_buckets=num_buckets, max_distance=max_distance).numpy()
    np.testing.assert_array_equal(t5.relative_position_buckets(length, num_buckets, max_distance), ref)


def test_t5_matches_transformers(saved_t5, t5_encode):
  model, root = saved_t5
  cfg, params = load_t5_encoder(str(root), dtype=jnp.float32)  # the checkpoint root: finds text_encoder_2/
  assert cfg == t5.T5Config(**{k: T5_TINY[k] for k in T5_TINY if k != "dropout_rate"})
  ids = np.random.default_rng(0).integers(0, 64, (2, 40)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 25:] = 0
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids).long()).last_hidden_state.numpy()
    ref_masked = model(input_ids=torch.from_numpy(ids).long(),
                       attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
  assert_close(t5_encode(params, cfg, ids), ref, "T5 hidden states (no mask, as FLUX)")
  assert_close(t5_encode(params, cfg, ids, mask), ref_masked, "T5 hidden states (masked)")


def test_t5_sharded_and_tied_spellings_load_the_same(saved_t5, tmp_path):
  model, root = saved_t5
  assert (root / "t5_sharded" / "model.safetensors.index.json").is_file()
  _, single = load_t5_encoder(str(root / "text_encoder_2"), dtype=jnp.float32)
  _, sharded = load_t5_encoder(str(root / "t5_sharded"), dtype=jnp.float32)
  jax.tree_util.tree_map(np.testing.assert_array_equal, single, sharded)

  # Older files store the tied table as encoder.embed_tokens.weight (alone or next to shared.weight).
  src = SafetensorsFile(str(root / "text_encoder_2" / "model.safetensors"))
  tensors = {k: np.array(src.read(k)) for k in src.keys()}
  src.close()
  tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
  tensors["decoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((32, 32), np.float32)  # skipped
  folder = tmp_path / "old_t5"
  folder.mkdir()
  save_safetensors(str(folder / "model.safetensors"), tensors)
  (folder / "config.json").write_text((root / "text_encoder_2" / "config.json").read_text())
  _, old = load_t5_encoder(str(folder), dtype=jnp.float32)
  jax.tree_util.tree_map(np.testing.assert_array_equal, single, old)


def test_t5_bf16_params_and_float32_norms(saved_t5, t5_encode):
  _, root = saved_t5
  cfg, params = load_t5_encoder(str(root / "text_encoder_2"))  # default dtype: bf16
  blocks = params["encoder"]["block"]["layer"]
  assert blocks["0"]["SelfAttention"]["q"]["kernel"].dtype == jnp.bfloat16
  assert blocks["0"]["SelfAttention"]["q"]["kernel"].shape == (2, 32, 32)  # stacked layers, [in, out]
  assert blocks["1"]["layer_norm"]["scale"].dtype == jnp.float32
  assert params["encoder"]["relative_attention_bias"]["embedding"].dtype == jnp.float32
  ids = np.arange(40, dtype=np.int32).reshape(2, 20)
  out = t5_encode(params, cfg, ids)
  _, params32 = load_t5_encoder(str(root / "text_encoder_2"), dtype=jnp.float32)
  ref = t5_encode(params32, cfg, ids)
  assert out.dtype == jnp.bfloat16
  assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 0.1 * float(jnp.max(jnp.abs(ref)))


def test_t5_checkpoint_errors(saved_t5, tmp_path):
  _, root = saved_t5
  src = SafetensorsFile(str(root / "text_encoder_2" / "model.safetensors"))
  tensors = {k: np.array(src.read(k)) for k in src.keys()}
  src.close()
  del tensors["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
  tensors["encoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((32, 31), np.float32)
  tensors["encoder.block.2.layer.0.layer_norm.weight"] = np.zeros((32,), np.float32)
  folder = tmp_path / "text_encoder_2"
  folder.mkdir()
  save_safetensors(str(folder / "model.safetensors"), tensors)
  (folder / "config.json").write_text((root / "text_encoder_2" / "config.json").read_text())
  with pytest.raises(CheckpointError) as info:
    load_t5_encoder(str(folder))
  message = str(info.value)
  assert "encoder.block.1.layer.1.DenseReluDense.wo.weight" in message
  assert "encoder.block.2.layer.0.layer_norm.weight" in message
  assert "encoder.block.0.layer.0.SelfAttention.q.weight: file (32, 31), model (32, 32)" in message
  (folder / "model.safetensors").unlink()
  with pytest.raises(CheckpointError, match="model.safetensors"):
    load_t5_encoder(str(folder))


# ---- CLIP -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[2, 5], ids=["legacy_eos_id_2_argmax", "eos_id_5_first_match"])
def saved_clip(request, tmp_path_factory):
  model = transformers.CLIPTextModel(
      transformers.CLIPTextConfig(**CLIP_TINY, eos_token_id=request.param)).eval()
  randomize_(model, seed=1)
  root = tmp_path_factory.mktemp("flux_ckpt")
  model.save_pretrained(str(root / "text_encoder"))
  return model, root


@pytest.fixture(scope="module")
def clip_encode():
  return jax.jit(clip.encode, static_argnums=1)


def clip_ids():
  # bos, words, eos (5), then padding with the largest id (63): the argmax rule and the eos rule
  # pick different positions, and a larger word id (60) precedes the eos in row 0.
  ids = np.full((2, 16), 63, np.int32)
  ids[:, 0] = 62
  ids[0, 1:6] = [10, 60, 11, 12, 5]
  ids[1, 1:9] = [3, 4, 6, 7, 8, 9, 10, 5]
  return ids


def test_clip_matches_transformers(saved_clip, clip_encode):
  model, root = saved_clip
  cfg, params = load_clip_text_encoder(str(root), dtype=jnp.float32)
  assert cfg.eos_token_id == model.config.eos_token_id
  ids = clip_ids()
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long())
  hidden, pooled = clip_encode(params, cfg, ids)
  assert_close(hidden, out.last_hidden_state.numpy(), "CLIP hidden states")
  assert_close(pooled, out.pooler_output.numpy(), "CLIP pooled output")
  # eos_token_id 2: first position of the largest id (the first padding 63); else the first eos (5).
  expected_positions = [6, 9] if cfg.eos_token_id == 2 else [5, 8]
  np.testing.assert_array_equal(clip.eos_positions(cfg, jnp.asarray(ids)), expected_positions)

  mask = (np.arange(16)[None] < np.array([[6], [9]])).astype(np.int32)
  with torch.no_grad():
    masked = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask))
  hidden, pooled = clip_encode(params, cfg, ids, mask)
  assert_close(pooled, masked.pooler_output.numpy(), "CLIP pooled output (masked)")


def test_clip_old_prefixed_files_load(saved_clip, tmp_path):
  """FLUX.1's text_encoder/ was written by older transformers: `text_model.` keys + position_ids buffer."""
  model, root = saved_clip
  src = SafetensorsFile(str(root / "text_encoder" / "model.safetensors"))
  tensors = {f"text_model.{k}": np.array(src.read(k)) for k in src.keys()}
  src.close()
  tensors["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
  folder = tmp_path / "text_encoder"
  folder.mkdir()
  save_safetensors(str(folder / "model.safetensors"), tensors)
  (folder / "config.json").write_text((root / "text_encoder" / "config.json").read_text())
  cfg, old = load_clip_text_encoder(str(folder), dtype=jnp.float32)
  _, new = load_clip_text_encoder(str(root / "text_encoder"), dtype=jnp.float32)
  jax.tree_util.tree_map(np.testing.assert_array_equal, old, new)

  cfg_bf16, bf16 = load_clip_text_encoder(str(folder))
  assert bf16["encoder"]["layers"]["mlp"]["fc1"]["kernel"].dtype == jnp.bfloat16
  assert bf16["encoder"]["layers"]["layer_norm1"]["bias"].dtype == jnp.float32
  assert bf16["final_layer_norm"]["scale"].dtype == jnp.float32

  config = json.loads((folder / "config.json").read_text())
  config["num_hidden_layers"] = 3
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r"encoder\.layers\.2\.self_attn\.q_proj\.weight"):
    load_clip_text_encoder(str(folder))


def test_clip_rejects_too_many_tokens():
  cfg = clip.tiny()
  params = clip.init_params(jax.random.key(0), cfg)
  with pytest.raises(ValueError, match="max_position_embeddings=16"):
    clip.encode(params, cfg, jnp.zeros((1, 17), jnp.int32))
