"""Cached encoder features (launch/encode_dataset.py): the cache yields exactly the batches that encoding on
the fly gives (same dropout, pairs, latents and text embeddings), training from it reproduces the
on-the-fly losses, and a cache that does not fit the config is refused with the field to fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mosaic_jax.data import cached_features, make_iterator
from mosaic_jax.data.pipeline import PipelineConfig
from mosaic_jax.encoders import demo_encoders
from mosaic_jax.settings import config_fields
from mosaic_jax.interop.safetensors_io import SafetensorsFile
from mosaic_jax.train import ConfigError, settings_from_config, train_and_evaluate
from mosaic_jax.train.batches import step_batch
from mosaic_jax.train.datasets import open_dataset, open_raw_dataset
from mosaic_jax.train.encode_features import encode_dataset
from mosaic_jax.train.fingerprint import cache_fingerprint
from test_train import compilation_cache, data_dir, tiny_config  # noqa: F401  # pylint: disable=unused-import  # the same tiny run, one compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache(data_dir, tmp_path_factory):  # noqa: F811
  """The tiny dataset's train and validation splits, encoded through the command-line entry point."""
  out = str(tmp_path_factory.mktemp("features") / "cache")
  config = tiny_config(data_dir)
  open_raw_dataset(settings_from_config(config).dataset, "train")  # build the dataset first (as training would)
  # batch 3 does not divide 16 examples or 32 references: the padded last encoder batch is covered
  subprocess.run([sys.executable, os.path.join(ROOT, "launch", "encode_dataset.py"),
                  f"--config={os.path.join(ROOT, 'configs', 'flux_ms.py')}:demo", f"--out={out}", "--batch_size=3",
                  *[f"--config.{k}={v}" for k, v in _overrides(config).items()]],
                 check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  return config, out


def _overrides(config) -> dict:
  """tiny_config as --config. overrides (the command line builds its config from the file)."""
  base = config_fields(tiny_config.__globals__["flux_ms"].get_config("demo"))
  return {k: v for k, v in config_fields(config).items() if base.get(k) != v}


def test_cache_stores_each_caption_once_with_the_empty_caption_first(cache):
  config, out = cache
  spec = cached_features.read_spec(out)
  assert spec["splits"] == {"train": 16, "validation": 4}
  assert spec["captions"][0] == "" and len(set(spec["captions"])) == len(spec["captions"])
  with SafetensorsFile(os.path.join(out, "captions", "t5.safetensors")) as t5:
    assert t5.shape("t5") == (len(spec["captions"]), config.text_len, 32)
  source, num_refs = cached_features.open_split(out, "train", cache_fingerprint(settings_from_config(config)))
  raw_source, raw_num_refs = open_raw_dataset(settings_from_config(config).dataset, "train")
  np.testing.assert_array_equal(num_refs, raw_num_refs)
  assert [source[i]["example_id"] for i in range(len(source))] == [
      raw_source[i]["id"].decode() for i in range(len(raw_source))]


def test_cached_batches_equal_on_the_fly_encoding(cache):
  """Every field the train step reads, for 3 epochs with dropout on and pairs subsampled."""
  config, out = cache
  settings = settings_from_config(config)
  encoders = demo_encoders(settings, config.seed)
  pipeline = PipelineConfig(target_size=config.resolution, ref_size=config.ref_resolution, global_batch_size=4,
                            max_pairs=4, token_pixels=settings.token_pixels, seed=3, read_threads=1,
                            num_epochs=3)
  raw = make_iterator(*open_raw_dataset(settings.dataset, "train"), pipeline)
  cached = make_iterator(*cached_features.open_split(out, "train"), pipeline)
  dropped_captions = subsampled = 0
  for raw_batch, cached_batch in zip(raw, cached, strict=True):
    assert list(raw_batch["example_id"]) == list(cached_batch["example_id"])
    assert list(raw_batch["caption"]) == list(cached_batch["caption"])
    expected, got = step_batch(raw_batch, encoders, settings), step_batch(cached_batch, encoders, settings)
    assert sorted(expected) == sorted(got)
    for key, value in expected.items():
      if value.dtype == np.float32:
        # not bitwise: the cache was encoded in batches of 3, the on-the-fly side in batches of 4, and
        # XLA's float32 kernels round differently per shape (about 1e-6 here)
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-5, err_msg=key)
      else:
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    dropped_captions += int(raw_batch["drop_caption"].sum())
    subsampled += int(raw_batch["pair_valid"].all(axis=1).sum())
  assert dropped_captions > 0 and subsampled > 0  # both random paths were exercised


def test_training_from_the_cache_reproduces_on_the_fly_losses(cache, data_dir, tmp_path):  # noqa: F811
  config, out = cache
  on_the_fly = train_and_evaluate(tiny_config(data_dir, total_steps=2), str(tmp_path / "raw"))
  from_cache = train_and_evaluate(tiny_config(data_dir, total_steps=2, **{"dataset.cached_features": out,
                                                                          "dataset.data_dir": ""}),
                                  str(tmp_path / "cached"))
  assert set(from_cache["losses"]) == {1, 2}
  for step, loss in on_the_fly["losses"].items():
    assert from_cache["losses"][step] == pytest.approx(loss, rel=1e-5), step


def test_a_cache_for_other_settings_names_the_field(cache, data_dir, tmp_path):  # noqa: F811
  _, out = cache
  config = tiny_config(data_dir, resolution=128, **{"dataset.cached_features": out})
  with pytest.raises(ConfigError, match=r"resolution: cache 64, config 128.*--config\.dataset\.cached_features"):
    open_dataset(settings_from_config(config), "train")


def test_an_unfinished_cache_is_refused_and_an_existing_one_never_overwritten(cache, tmp_path):
  config, out = cache
  unfinished = tmp_path / "unfinished"
  os.makedirs(unfinished / "train")
  with pytest.raises(cached_features.CacheError, match=r"cache\.json not found \(an unfinished"):
    cached_features.open_split(str(unfinished), "train")
  with open(os.path.join(out, "cache.json")) as f:
    before = json.load(f)
  with pytest.raises(cached_features.CacheError, match="exists and is not empty"):
    encode_dataset(settings_from_config(config), out)
  with open(os.path.join(out, "cache.json")) as f:
    assert json.load(f) == before
