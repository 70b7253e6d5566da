"""All encoders from one FLUX checkpoint layout (vae/, text_encoder/, text_encoder_2/, tokenizer/,
tokenizer_2/), written by diffusers/transformers/tokenizers, against the PyTorch models end to end."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaic_jax.interop.safetensors_io import SafetensorsFile, save_safetensors
from mosaic_jax.encoders import FEATURE_KEYS, load_flux_encoders, run_in_batches, training_latents
from mosaic_jax.model import pixel_autoencoder
from mosaic_jax.model.autoencoder import sample_posterior, to_model_latents

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from flux_root_fixtures import build_flux_root  # noqa: E402  (tests/ is on sys.path under pytest)

CAPTIONS = ["a photo of a cat", "", "the dog plays the guitar on a red sofa"]


@pytest.fixture(scope="module")
def flux_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("flux_ckpt")
  return root, build_flux_root(root)


def test_captions_and_images_match_pytorch(flux_root):
  root, models = flux_root
  encoders = load_flux_encoders(str(root), t5_dtype="float32", clip_dtype="float32", t5_max_length=32)
  t5_states, pooled = encoders.encode_captions(CAPTIONS, batch_size=2)  # 2 batches, the last padded
  assert t5_states.shape == (3, 32, 32) and pooled.shape == (3, 32)

  clip_tok = transformers.CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
  t5_tok = transformers.T5Tokenizer.from_pretrained(str(root / "tokenizer_2"))
  with torch.no_grad():  # diffusers' FluxPipeline: max_length padding, truncation, no attention mask
    clip_ids = clip_tok(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ref_pooled = models["text_encoder"](clip_ids.input_ids).pooler_output.numpy()
    t5_ids = t5_tok(CAPTIONS, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    ref_states = models["text_encoder_2"](t5_ids.input_ids).last_hidden_state.numpy()
  for ours, ref in ((t5_states, ref_states), (pooled, ref_pooled)):
    assert np.max(np.abs(ours - ref)) <= 1e-4 * np.max(np.abs(ref))

  images = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  posterior = encoders.encode_images(images, batch_size=2)
  with torch.no_grad():
    ref_mean = models["vae"].encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist.mean
  ref_mean = ref_mean.permute(0, 2, 3, 1).numpy()
  assert np.max(np.abs(posterior.mean - ref_mean)) <= 1e-4 * np.max(np.abs(ref_mean))


def test_stored_features_give_the_training_inputs_of_on_the_fly_encoding(flux_root, tmp_path):
  """A stand-in for the cached dataset: features written to a file and read back give the same latents
  and embeddings (same key, so the same target sample) as encoding the batch on the fly. (safetensors,
  not .npz: numpy's format cannot hold the bf16 T5 states.)"""
  root, _ = flux_root
  encoders = load_flux_encoders(str(root), t5_max_length=32)  # bf16 text encoders, as in training
  rng = np.random.default_rng(2)
  batch = {"target": rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32),
           "refs": rng.uniform(-1, 1, (2, 3, 8, 8, 3)).astype(np.float32),
           "caption": np.array(["a photo of a cat", ""], object)}
  features = encoders.batch_features(batch, batch_size=4)
  assert set(features) == set(FEATURE_KEYS)
  assert features["ref_means"].shape == (2, 3, 1, 1, 16) and features["t5"].shape == (2, 32, 32)
  assert features["t5"].dtype == jnp.bfloat16
  save_safetensors(str(tmp_path / "cache.safetensors"), features)
  with SafetensorsFile(str(tmp_path / "cache.safetensors")) as f:
    cached = {name: np.array(f.read(name)) for name in f.keys()}
  key = jax.random.PRNGKey(7)
  cfg = encoders.autoencoder.config
  from_cache = training_latents(cached, cfg.scaling_factor, cfg.shift_factor, key)

  # On the fly, piece by piece: each reference encoded alone, captions through the encoders.
  target_post = encoders.encode_images(batch["target"], batch_size=4)
  ref_means = [encoders.encode_images(batch["refs"][:, r], batch_size=4).mean for r in range(3)]
  on_the_fly = {
      "target": to_model_latents(sample_posterior(target_post, key), cfg.scaling_factor, cfg.shift_factor),
      "refs": to_model_latents(np.stack(ref_means, 1), cfg.scaling_factor, cfg.shift_factor),
  }
  on_the_fly["text"], on_the_fly["pooled"] = encoders.encode_captions(list(batch["caption"]))
  for name in ("target", "refs", "text", "pooled"):
    ours, ref = np.asarray(from_cache[name], np.float32), np.asarray(on_the_fly[name], np.float32)
    assert ours.shape == ref.shape, name
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.max(np.abs(ref)), err_msg=name)


def test_pixel_autoencoder_needs_no_vae_folder(tmp_path):
  encoders = load_flux_encoders(str(tmp_path), autoencoder="pixel", text_encoders=False)
  images = np.random.default_rng(1).uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
  posterior = encoders.encode_images(images, batch_size=2)
  np.testing.assert_array_equal(
      pixel_autoencoder.decode({}, encoders.autoencoder.config, posterior.mean), images)


def test_run_in_batches_pads_and_trims():
  calls = []
  def fn(batch):
    calls.append(batch.shape)
    return batch * 2, batch.sum(axis=1)
  doubled, sums = run_in_batches(fn, np.arange(10, dtype=np.float32).reshape(5, 2), batch_size=2)
  assert calls == [(2, 2)] * 3
  np.testing.assert_array_equal(doubled, np.arange(10).reshape(5, 2) * 2)
  np.testing.assert_array_equal(sums, [1, 5, 9, 13, 17])
  assert jax.tree_util.tree_structure((doubled, sums)).num_leaves == 2
