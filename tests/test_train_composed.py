"""End to end on composed data: the planted released layout (data_fixtures.released_multi_layout) composed
into 6-reference examples (subjects200k_multi under a custom name, read by the trainer by name), read
through the pipeline and through a cache of encoder features, then a few demo-sized training steps with
SCAL and MDL both on from the first step. Every reference count is one more compile of the train step:
the data tests (test_data_composition.py) cover R = 2 to 6 through the pipeline, this one trains at 6."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

pytest.importorskip("torch")  # the fixture writes .pt files, as released

import data_fixtures  # noqa: E402
from train_fixtures import compilation_cache, tiny_config  # noqa: E402,F401
from mosaic_jax.data import cached_features  # noqa: E402
from mosaic_jax.data.composition import CompositionSettings  # noqa: E402
from mosaic_jax.data.pipeline import make_iterator  # noqa: E402
from mosaic_jax.data.semalign_ms import SemalignMs, SemalignMsConfig  # noqa: E402
from mosaic_jax.train import settings_from_config, train_and_evaluate  # noqa: E402
from mosaic_jax.train.datasets import open_raw_dataset, pipeline_config  # noqa: E402
from mosaic_jax.train.encode_features import encode_dataset  # noqa: E402
from mosaic_jax.train.fingerprint import cache_fingerprint  # noqa: E402

# Pairs checked on the training grid: 64 px with 8 px tokens (the demo's pixel autoencoder with patch 4),
# 8x8 tokens.
SETTINGS = CompositionSettings(refs=(6,), min_pairs=1, min_pairs_at=((64, 8),), max_uses=3,
                               validation_fraction=0.0)
NAME = "multi_train_test"
CHANGES = {"dataset.name": f"semalign_ms/{NAME}", "resolution": 64, "ref_resolution": 64, "pixel_patch_size": 4,
           "model_overrides.in_channels": 4 * 3 * 4 * 4, "dataset.max_pairs": 64, "batch_size": 2,
           "total_steps": 4, "checkpoint_every": 4, "losses.mdl_ramp_start": 0, "losses.mdl_ramp_end": 0}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tfds"))
  builder = SemalignMs(config=SemalignMsConfig(name=NAME, source="subjects200k_multi", seed=1, composition=SETTINGS),
                       data_dir=directory)
  with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=data_fixtures.released_multi_layout()["dir"]))
  return directory


def test_a_few_steps_at_six_references_with_scal_and_mdl(data_dir, tmp_path):
  config = tiny_config(data_dir, **CHANGES)
  settings = settings_from_config(config, check_files=False)
  # The trainer's batches, replayed (the pipeline is deterministic): every reference of every example has
  # token pairs.
  iterator = make_iterator(*open_raw_dataset(settings.dataset, "train"), pipeline_config(settings))
  assert iterator.reference_counts == [6]
  for _ in range(settings.total_steps):
    batch = next(iterator)
    assert batch["refs"].shape[1] == 6
    for pair_ref, valid in zip(batch["pair_ref"], batch["pair_valid"]):
      per_reference = np.bincount(pair_ref[valid], minlength=6)
      assert len(per_reference) == 6 and per_reference.min() > 0, per_reference

  # The cached-features reader on composed records: a cache of the split yields the same pairs.
  out = str(tmp_path / "features")
  encode_dataset(settings, out, splits=["train"], batch_size=8)
  cached = make_iterator(*cached_features.open_split(out, "train", cache_fingerprint(settings)),
                         pipeline_config(settings))
  raw = make_iterator(*open_raw_dataset(settings.dataset, "train"), pipeline_config(settings))
  for _ in range(settings.total_steps):
    from_cache, from_records = next(cached), next(raw)
    for key in ("pair_ref", "pair_ref_token", "pair_target_token", "pair_valid", "record_index"):
      np.testing.assert_array_equal(from_cache[key], from_records[key])
    assert from_cache["ref_means"].shape[1] == from_records["refs"].shape[1]

  steps = []
  result = train_and_evaluate(config, str(tmp_path), on_step=lambda step, metrics: steps.append(metrics))
  assert result["status"] == "done" and sorted(result["losses"]) == [1, 2, 3, 4]
  assert all(np.isfinite(v) for v in result["losses"].values())
  for metrics in steps:  # MDL weighted 1 from the first step, and a real (negative) term every step
    assert float(metrics["weight_mdl"]) == 1.0 and float(metrics["loss_mdl"]) < 0.0
    assert float(metrics["loss_scal"]) > 0.0 and np.isfinite(float(metrics["loss_mse"]))
