"""Filling a `folder` manifest's missing correspondences (correspondence/fill_manifest.py, matchers.py).

A small manifest of synthetic scenes (data/synthetic.py) with planted bad input: an unreadable image, an
empty mask, a line that already has coordinates, a malformed line. The matchers here are small traceable
feature functions (the real extractors are tested in tests/test_launch_match.py); what is checked is the
command's contract: the files in the released layout, the summary, resumption, nothing overwritten, and a
`folder` dataset built from the result that has pairs.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mosaic_jax.correspondence import fill_manifest, matchers, matching
from mosaic_jax.data import build_report, synthetic


def colour_features(params, images):
  """[N, 1024, 1024, 3] in [-1, 1] -> [N, 64, 64, D]: mean colour of each 16 px cell, projected."""
  cells = images.reshape(images.shape[0], 64, 16, 64, 16, 3).mean(axis=(2, 4))
  return jnp.einsum("nhwc,cd->nhwd", cells, params["projection"]) + params["position"]


def toy_matcher(slot: str, seed: int) -> matchers.MeshMatcher:
  rng = np.random.default_rng(seed)
  params = {"projection": rng.standard_normal((3, 16)).astype(np.float32),
            "position": 0.05 * rng.standard_normal((64, 64, 16)).astype(np.float32)}
  return matchers.MeshMatcher(matchers.Matcher(f"toy-{slot}", slot, params, colour_features), batch_size=2)


def write_manifest_folder(root) -> dict:
  """train.jsonl: 3 scenes (2 + 2 + 1 references) and planted trouble; returns what was planted."""
  rng = np.random.default_rng(5)
  for sub in ("images", "refs", "masks", "given"):
    os.makedirs(root / sub, exist_ok=True)
  lines = []
  for number in range(3):
    scene = synthetic.make_scene(rng, 2 if number < 2 else 1, 128)
    Image.fromarray(scene.target).save(root / "images" / f"{number}.png")
    refs, masks = [], []
    for k, (ref, mask) in enumerate(zip(scene.refs, scene.masks)):
      Image.fromarray(ref).save(root / "refs" / f"{number}_{k}.png")
      Image.fromarray(mask).save(root / "masks" / f"{number}_{k}.png")
      refs.append(f"refs/{number}_{k}.png")
      masks.append(f"masks/{number}_{k}.png")
    lines.append({"target": f"images/{number}.png", "refs": refs, "masks": masks, "caption": scene.caption})
  lines[0]["id"] = "scene/zero"  # a name that is not a file name: stored as scene_zero
  # line 2: ref 1 is unreadable; line 3: its mask selects nothing
  (root / "refs" / "1_1.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
  Image.fromarray(np.zeros((128, 128), np.uint8)).save(root / "masks" / "2_0.png")
  # line 1 ref 1 already has coordinates: kept, not recomputed
  given = np.zeros((64, 64, 2), np.uint8)
  np.save(root / "given" / "dift.npy", given)
  np.save(root / "given" / "geoaware.npy", given)
  lines[0]["coords"] = [None, {"dift": "given/dift.npy", "geoaware": "given/geoaware.npy"}]
  with open(root / "train.jsonl", "w", encoding="utf-8") as handle:
    for line in lines:
      handle.write(json.dumps(line) + "\n")
    handle.write("\n")  # blank lines are skipped, as the folder builder does
    handle.write('{"target": "images/0.png"}\n')  # no refs: copied unchanged, counted
  return {"matched": [("scene_zero", 0), ("train-2", 0)], "unreadable": "refs/1_1.png", "empty": "masks/2_0.png"}


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
  root = tmp_path_factory.mktemp("mine")
  planted = write_manifest_folder(root)
  out = tmp_path_factory.mktemp("matched") / "out"
  calls = []

  def factory(slot, seed):
    def make():
      calls.append(slot)
      return toy_matcher(slot, seed)
    return make
  runners = {"dift": factory("dift", 0), "geoaware": factory("geoaware", 0)}
  first = fill_manifest.fill(str(root), str(out), runners, progress=False)
  return {"root": root, "out": out, "planted": planted, "first": first, "runners": runners, "calls": calls}


def test_grids_are_written_in_the_released_layout(filled):
  out = filled["out"]
  for slot in matching.SLOTS:
    names = sorted(os.listdir(out / "coord" / slot))
    assert names == ["scene_zero_ref0.npy", "train-2_ref0.npy"], names  # no temporary file left behind
    grid = np.load(out / "coord" / slot / "scene_zero_ref0.npy", allow_pickle=False)
    assert grid.shape == (64, 64, 2) and grid.dtype == np.uint8
  assert filled["first"].written == {"dift": 2, "geoaware": 2}


def test_the_summary_counts_and_names_what_was_skipped(filled):
  summary = filled["first"]
  counts = summary.report.counts
  assert counts[build_report.CORRUPT_IMAGE] == 1 and counts[fill_manifest.EMPTY_MASK] == 1
  assert counts[build_report.MANIFEST_MISSING_KEY] == 1
  text = summary.format()
  assert "train.jsonl:2 ref 1" in text and "refs/1_1.png" in text
  assert "train.jsonl:3 ref 0" in text and "masks/2_0.png selects no pixel" in text
  assert "train.jsonl:5: no 'refs'" in text
  # each skipped reference is counted once, not once per slot
  assert sum(counts.values()) == 3


def test_the_new_manifest_fills_coords_and_keeps_everything_else(filled):
  root, out = filled["root"], filled["out"]
  lines = (out / "train.jsonl").read_text().splitlines()
  assert len(lines) == 4 and lines[-1] == '{"target": "images/0.png"}'
  first, second, third = (json.loads(line) for line in lines[:3])
  assert first["id"] == "scene/zero" and second["id"] == "train-2" and third["id"] == "train-3"
  assert first["coords"][0] == {"dift": "coord/dift/scene_zero_ref0.npy",
                                "geoaware": "coord/geoaware/scene_zero_ref0.npy"}
  assert os.path.normpath(out / first["coords"][1]["dift"]) == str(root / "given" / "dift.npy")
  assert second["coords"] == [{"dift": "coord/dift/train-2_ref0.npy", "geoaware": "coord/geoaware/train-2_ref0.npy"},
                              None]  # ref 1 unreadable: no pairs
  assert third.get("coords") is None  # empty mask: no pairs
  for key in ("target",):
    assert os.path.normpath(out / first[key]) == str(root / "images" / "0.png")
  assert os.path.normpath(out / first["masks"][1]) == str(root / "masks" / "0_1.png")
  # the user's manifest is untouched
  assert "coord/dift" not in (root / "train.jsonl").read_text()


def test_a_second_run_writes_nothing_and_loads_no_weights(filled):
  out = filled["out"]
  before = {path: os.stat(path).st_mtime_ns for path in out.rglob("*")}
  calls = len(filled["calls"])
  again = fill_manifest.fill(str(filled["root"]), str(out), filled["runners"], progress=False)
  assert again.written == {"dift": 0, "geoaware": 0} and again.already == {"dift": 2, "geoaware": 2}
  assert list(again.manifests.values()) == ["unchanged"]
  assert {path: os.stat(path).st_mtime_ns for path in out.rglob("*")} == before
  # the unreadable and empty references were tried again (the user may have fixed them), but no matcher
  # was loaded for them
  assert len(filled["calls"]) == calls == 2
  assert again.report.counts[build_report.CORRUPT_IMAGE] == 1


def test_a_differing_manifest_in_out_is_left_alone(filled, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "train.jsonl").write_text("mine\n")
  summary = fill_manifest.fill(str(filled["root"]), str(out), filled["runners"], progress=False)
  assert (out / "train.jsonl").read_text() == "mine\n"
  assert "differs" in summary.manifests[str(out / "train.jsonl")]
  assert summary.written == {"dift": 2, "geoaware": 2}


def test_a_missing_matcher_is_counted_and_nothing_half_filled(filled, tmp_path):
  summary = fill_manifest.fill(str(filled["root"]), str(tmp_path / "out"), {"dift": filled["runners"]["dift"]},
                               progress=False)
  assert summary.report.counts[fill_manifest.NO_MATCHER] == 1
  first = json.loads((tmp_path / "out" / "train.jsonl").read_text().splitlines()[0])
  assert first["coords"][0] is None  # one grid of two is not a correspondence


def test_duplicate_ids_and_a_missing_manifest_are_one_line_errors(tmp_path):
  with pytest.raises(fill_manifest.MatchInputError, match="no \\*.jsonl manifest"):
    fill_manifest.fill(str(tmp_path), str(tmp_path / "out"), {}, progress=False)
  (tmp_path / "train.jsonl").write_text('{"id": "a b", "target": "t.png", "refs": ["r.png"]}\n'
                                        '{"id": "a_b", "target": "t.png", "refs": ["r.png"]}\n')
  with pytest.raises(fill_manifest.MatchInputError, match=r"train.jsonl:2: id 'a_b' .* as .*train.jsonl:1"):
    fill_manifest.fill(str(tmp_path), str(tmp_path / "out"), {}, progress=False)


def test_the_filled_folder_builds_a_dataset_with_pairs(filled, tmp_path):
  from mosaic_jax.data import correspondence
  from mosaic_jax.data.semalign_ms import SemalignMs
  builder = SemalignMs(config="folder", data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(filled["out"])))
  train = tfds.data_source("semalign_ms/folder", data_dir=str(tmp_path / "tfds"))["train"]
  example = train[0]
  assert example["id"] == b"scene/zero"
  assert [bool(x) for x in example["refs"]["has_coords"]] == [True, True]
  mask = correspondence.mask_token_cells(example["refs"]["target_mask"][0], 512, 32)
  refs, targets = correspondence.derive_token_pairs(example["refs"]["coord_dift"][0],
                                                    example["refs"]["coord_geoaware"][0], mask, 32)
  assert len(refs) > 10


def test_lower_grids_compiles_from_shapes_the_program_mesh_matcher_runs():
  """matchers.lower_grids (what the TPU estimates compile) from ShapeDtypeStructs alone: run on real params it
  gives MeshMatcher's grids."""
  import jax
  runner = toy_matcher("dift", 3)
  shapes = jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), runner.matcher.params)
  shape_only = matchers.Matcher("toy", "dift", shapes, colour_features)
  compiled = matchers.lower_grids(shape_only, runner.mesh, (2, 1024, 1024, 3)).compile()
  rng = np.random.default_rng(0)
  targets, references = (rng.integers(0, 256, (2, 1024, 1024, 3), dtype=np.uint8) for _ in range(2))
  with jax.set_mesh(runner.mesh):
    cells = compiled(runner.params, runner.device_inputs(targets), runner.device_inputs(references))
  np.testing.assert_array_equal(np.asarray(cells), runner(targets, references))
