"""The `folder` config: users' JSON-lines manifests, multi-reference lines and planted bad input."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow_datasets as tfds

import data_fixtures
from mosaic_jax.data import build_report, pipeline


@pytest.fixture(scope="module")
def built():
  return data_fixtures.build("folder", manual_dir=data_fixtures.write_folder())


def test_bad_lines_are_skipped_and_counted_by_reason(built):
  _, printed, metadata = built
  counts = metadata["build_report"]["train"]["counts"]
  assert counts[build_report.WRITTEN] == 3
  assert counts[build_report.MISSING_REFERENCE] == 1
  assert counts[build_report.CORRUPT_IMAGE] == 1
  assert counts[build_report.BAD_MANIFEST_LINE] == 1
  # masks: "two" ref 1 has none, "one" names a missing file, "three" has none for 3 refs
  assert counts[build_report.MISSING_MASK] == 5
  # coords: "two" ref 1 and "three" x3 have none
  assert counts[build_report.MISSING_COORDS] == 4
  assert "refs/nope.png does not exist" in printed
  assert metadata["num_refs"]["train"] == [2, 1, 3]


def test_malformed_manifest_lines_are_skipped_with_line_number_and_reason(built):
  _, printed, metadata = built
  report = metadata["build_report"]["train"]
  expected = collections.Counter(reason for _, reason, _ in data_fixtures.MALFORMED_FOLDER_LINES)
  for reason, number in expected.items():
    assert report["counts"][reason] == number, reason
  for offset, (_, reason, message) in enumerate(data_fixtures.MALFORMED_FOLDER_LINES):
    detail = f"train.jsonl:{7 + offset}: {message}"  # after the six lines of the base fixture
    assert any(d.endswith(detail) for d in report["examples"][reason]), (detail, report["examples"][reason])
    assert detail in printed
  # "refs": "refs/b0.png" is not read as the references 'r', 'e', 'f', ...: nothing else was skipped.
  assert report["counts"][build_report.MISSING_REFERENCE] == 1


def test_records_keep_images_masks_and_coordinates(built):
  data_dir, _, _ = built
  train = tfds.data_source("semalign_ms/folder", data_dir=data_dir)["train"]
  two = train[0]
  assert two["id"] == b"two" and two["caption"] == b"two things"
  assert two["refs"]["image"][0].shape == (96, 96, 3)  # RGBA composited onto white, stored RGB
  assert two["refs"]["image"][1].shape == (64, 80, 3)
  assert [bool(x) for x in two["refs"]["has_mask"]] == [True, False]
  assert [bool(x) for x in two["refs"]["has_coords"]] == [True, False]
  dift, _ = data_fixtures.planted_grids()
  np.testing.assert_array_equal(two["refs"]["coord_dift"][0], dift)


def test_pipeline_derives_planted_pairs_for_folder_data(built):
  data_dir, _, _ = built
  source, num_refs = pipeline.open_split("semalign_ms/folder", "train", data_dir)
  config = pipeline.PipelineConfig(target_size=256, ref_size=256, max_pairs=2048, dropout=False)
  example = pipeline.prepare_example(source[0], config, np.random.default_rng(0))
  assert example["refs"].shape == (2, 256, 256, 3)
  valid = example["pair_valid"]
  assert (example["pair_ref"][valid] == 0).all()  # only reference 0 has coordinates
  pairs = set(zip(example["pair_ref_token"][valid].tolist(),
                  example["pair_target_token"][valid].tolist()))
  assert pairs == data_fixtures.expected_planted_pairs(16)
