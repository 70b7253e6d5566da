"""The `subjects200k` config on a small released-layout directory written by the test."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import tensorflow_datasets as tfds

pytest.importorskip("torch")  # the fixture writes .pt files

import data_fixtures  # noqa: E402
from mosaic_jax.data import build_report, pipeline, schema  # noqa: E402


@pytest.fixture(scope="module")
def released():
  layout = data_fixtures.released_layout()
  data_dir, printed, metadata = data_fixtures.build(
      "subjects200k", manual_dir=layout["dir"])
  return layout, data_dir, printed, metadata


def _records_by_id(data_dir):
  source = tfds.data_source("semalign_ms/subjects200k", data_dir=data_dir)["train"]
  return {record["id"].decode(): (index, record) for index, record in enumerate(source)}


def test_build_report_counts_every_planted_case(released):
  _, _, printed, metadata = released
  counts = metadata["build_report"]["train"]["counts"]
  assert counts == {
      build_report.WRITTEN: 3,
      build_report.FILTERED: 3,
      build_report.CORRUPT_IMAGE: 1,
      build_report.BAD_COORD_SHAPE: 1,
      build_report.BAD_COORD_VALUES: 1,
      build_report.MISSING_MASK: 1,
      build_report.MISSING_COORDS: 1,
  }
  assert "build report for split 'train': 3 written, 3 skipped" in printed
  assert "skipped_coord_wrong_shape: 1" in printed


def test_official_uids_crops_and_fallbacks(released):
  layout, data_dir, _, metadata = released
  records = _records_by_id(data_dir)
  uids = layout["uids"]
  assert set(records) == {uids["planted"], uids["missing_mask"], uids["missing_coords"]}
  assert metadata["num_refs"]["train"] == [1, 1, 1]
  _, planted = records[uids["planted"]]
  assert planted["target"].shape == (512, 512, 3) and planted["refs"]["image"][0].shape == (512, 512, 3)
  assert planted["caption"] == b"a photo of item 0"
  assert planted["refs"]["has_mask"][0] and planted["refs"]["has_coords"][0]
  _, no_mask = records[uids["missing_mask"]]
  assert not no_mask["refs"]["has_mask"][0] and no_mask["refs"]["has_coords"][0]
  _, no_coords = records[uids["missing_coords"]]
  assert no_coords["refs"]["has_mask"][0] and not no_coords["refs"]["has_coords"][0]
  dift, geoaware = data_fixtures.planted_grids()
  np.testing.assert_array_equal(planted["refs"]["coord_dift"][0], dift)
  np.testing.assert_array_equal(planted["refs"]["coord_geoaware"][0], geoaware)


@pytest.mark.parametrize("size", [512, 256])
def test_derived_pairs_equal_the_planted_ones(released, size):
  layout, data_dir, _, _ = released
  source, num_refs = pipeline.open_split("semalign_ms/subjects200k", "train", data_dir)
  config = pipeline.PipelineConfig(target_size=size, ref_size=size, max_pairs=4096, dropout=False)
  ids = {pipeline._text(source[i]["id"]): i for i in range(len(source))}
  grid = size // 16

  def pairs_of(case):
    example = pipeline.prepare_example(source[ids[layout["uids"][case]]], config,
                                       np.random.default_rng(0))
    valid = example["pair_valid"]
    assert (example["pair_ref"][valid] == 0).all()
    return set(zip(example["pair_ref_token"][valid].tolist(),
                   example["pair_target_token"][valid].tolist()))

  planted = pairs_of("planted")
  assert planted == data_fixtures.expected_planted_pairs(grid)
  # disagreement and mask cells really removed something, and duplicates collapsed
  assert len(planted) < len(data_fixtures.expected_planted_pairs(grid, use_mask=False))
  assert pairs_of("missing_mask") == data_fixtures.expected_planted_pairs(grid, use_mask=False)
  assert pairs_of("missing_coords") == set()


def test_pt_coordinates_without_torch_name_the_missing_package(tmp_path, monkeypatch):
  path = tmp_path / "x_ref0.pt"
  path.write_bytes(b"whatever")
  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == "torch":
      raise ImportError("No module named 'torch'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_torch)
  with pytest.raises(ImportError, match="needs the 'torch' package"):
    schema.load_coordinate_file(str(path))


def test_coordinate_validation_names_file_and_shape():
  with pytest.raises(build_report.SkipExample, match=r"f\.pt: shape \(10, 3\)"):
    schema.validate_coordinates(np.zeros((10, 3)), "f.pt")
  good = schema.validate_coordinates(np.arange(8192).reshape(4096, 2) % 64, "g.pt")
  assert good.shape == (64, 64, 2) and good.dtype == np.uint8
