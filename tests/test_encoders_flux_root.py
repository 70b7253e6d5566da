"""All encoders from one FLUX checkpoint layout (vae/, text_encoder/, text_encoder_2/, tokenizer/,
tokenizer_2/), written by diffusers/transformers/tokenizers, against the PyTorch models end to end."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data_fixtures  # tests/ is on sys.path under pytest
from mosaic_jax.data import cached_features, make_iterator, open_split
from mosaic_jax.data.pipeline import PipelineConfig
from mosaic_jax.encoders import FEATURE_KEYS, load_flux_encoders, run_in_batches, training_latents
from mosaic_jax.interop.safetensors_io import SafetensorsFile
from mosaic_jax.model import pixel_autoencoder
from mosaic_jax.configs import flux_ms
from mosaic_jax.train import settings_from_config
from mosaic_jax.train.batches import step_batch

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


def test_cached_dataset_gives_the_training_inputs_of_on_the_fly_encoding(flux_root, tmp_path):
  """The FLUX VAE (a real posterior std) and bf16 T5/CLIP with the real tokenizers: a cached split
  (data/cached_features.py) yields the same step batches, and so the same training latents for a given
  key, as encoding each pipeline batch on the fly."""
  root, _ = flux_root
  encoders = load_flux_encoders(str(root), t5_max_length=32)  # bf16 text encoders, as in training
  data_dir = data_fixtures.tiny_synthetic()[0]
  raw = open_split("semalign_ms/synthetic_tiny", "train", data_dir=data_dir)
  config = PipelineConfig(target_size=64, ref_size=32, global_batch_size=2, max_pairs=8, seed=1,
                          read_threads=1, num_epochs=1)
  cached_features.encode_dataset({"train": raw}, str(tmp_path / "cache"), encoders, config, {}, batch_size=4)
  with SafetensorsFile(str(tmp_path / "cache" / "captions" / "t5.safetensors")) as f:
    assert f.dtype("t5") == jnp.bfloat16  # stored as the encoder made it: no float32 copy
  cached = cached_features.open_split(str(tmp_path / "cache"), "train")
  cfg = encoders.autoencoder.config
  run = flux_ms.get_config("demo")  # the trainer's settings for this pipeline's sizes and this autoencoder
  run.update(dict(resolution=64, ref_resolution=32, batch_size=2))
  run.dataset.max_pairs = 8
  run.model_overrides.in_channels = 4 * encoders.autoencoder.latent_channels
  settings = settings_from_config(run, encoders.autoencoder, check_files=False)
  batches = 0
  for raw_batch, cached_batch in zip(make_iterator(*raw, config), make_iterator(*cached, config), strict=True):
    expected, got = step_batch(raw_batch, encoders, settings), step_batch(cached_batch, encoders, settings)
    assert set(FEATURE_KEYS) <= set(got) and sorted(got) == sorted(expected)
    assert np.all(got["target_std"] > 0)
    key = jax.random.key(batches)
    from_cache = training_latents(got, cfg.scaling_factor, cfg.shift_factor, key)
    on_the_fly = training_latents(expected, cfg.scaling_factor, cfg.shift_factor, key)
    for name in ("target", "refs", "text", "pooled"):
      ref = np.asarray(on_the_fly[name])
      # The text encoders run in bf16, and XLA:CPU's bf16 matmuls are not bitwise reproducible between
      # the cache's batches of 4 and these of 2 (seen: 22 of 2048 T5 values off by up to 3 bf16 ulps, in
      # one run of three): a few ulps there; the float32 VAE's latents to 1e-5.
      tolerance = 1e-5 if name in ("target", "refs") else 2 ** -5
      np.testing.assert_allclose(np.asarray(from_cache[name]), ref, rtol=tolerance,
                                 atol=tolerance * np.max(np.abs(ref)), err_msg=name)
    for name in ("pair_ref", "pair_ref_token", "pair_target_token", "pair_valid", "drop_refs"):
      np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    batches += 1
  assert batches >= 3


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
