"""PCK@0.1 (correspondence/pck.py, benchmarks/correspondence_pck.py) on a tiny SPair-71k-format fixture whose
answers are known: coloured blobs that a colour-matching feature must find, and one keypoint whose true
position was planted away from its blob, which it must miss."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from mosaic_jax.correspondence import matchers, pck
from test_correspondence_fill import colour_features

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def blob_image(path, size, centres, radius):
  width, height = size
  image = np.full((height, width, 3), 128, np.uint8)
  ys, xs = np.mgrid[0:height, 0:width]
  for colour, (x, y) in centres.items():
    image[(xs - x) ** 2 + (ys - y) ** 2 < radius ** 2] = COLOURS[colour]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(image).save(path, quality=95)


def write_spair(root) -> None:
  """Two test pairs: cat (4 keypoints, the yellow one's truth moved off its blob: 3/4) and dog (2/2)."""
  source = {"red": (60, 50), "green": (230, 60), "blue": (80, 150), "yellow": (220, 160)}
  target = {"red": (180, 300), "green": (50, 280), "blue": (170, 70), "yellow": (60, 90)}
  blob_image(str(root / "JPEGImages" / "cat" / "a.jpg"), (300, 200), source, 28)
  blob_image(str(root / "JPEGImages" / "cat" / "b.jpg"), (240, 360), target, 30)
  blob_image(str(root / "JPEGImages" / "dog" / "c.jpg"), (256, 256), {"red": (60, 60), "blue": (190, 190)}, 30)
  blob_image(str(root / "JPEGImages" / "dog" / "d.jpg"), (320, 240), {"red": (260, 180), "blue": (70, 60)}, 30)
  truth = dict(target, yellow=(200, 330))  # 240 px from the yellow blob; the threshold is 36 px
  notes = {
      "000001-a-b:cat": {"src_imname": "a.jpg", "trg_imname": "b.jpg", "category": "cat",
                         "src_kps": [list(source[c]) for c in COLOURS], "trg_kps": [list(truth[c]) for c in COLOURS],
                         "src_bndbox": [0, 0, 300, 200], "trg_bndbox": [0, 0, 240, 360]},
      "000002-c-d:dog": {"src_imname": "c.jpg", "trg_imname": "d.jpg", "category": "dog",
                         "src_kps": [[60, 60], [190, 190]], "trg_kps": [[260, 180], [70, 60]],
                         "src_bndbox": [0, 0, 256, 256], "trg_bndbox": [20, 20, 300, 220]},
  }
  folder = root / "PairAnnotation" / "test"
  folder.mkdir(parents=True)
  for name, note in notes.items():
    (folder / f"{name}.json").write_text(json.dumps(note))


@pytest.fixture(scope="module")
def colour_matcher():
  rng = np.random.default_rng(1)
  params = {"projection": rng.standard_normal((3, 16)).astype(np.float32),
            "position": np.zeros((64, 64, 16), np.float32)}
  return matchers.MeshMatcher(matchers.Matcher("colour", "geoaware", params, colour_features), batch_size=2)


def test_pck_on_an_spair_fixture_with_known_answers(tmp_path, colour_matcher):
  write_spair(tmp_path)
  pairs = pck.spair_pairs(str(tmp_path), "test")
  assert [pair.category for pair in pairs] == ["cat", "dog"]
  result = pck.evaluate_pairs(pairs, colour_matcher.image_features, "cosine", batch_size=1)
  assert result["by_category"] == {"cat": 0.75, "dog": 1.0}
  assert result["per_image"] == pytest.approx(0.875) and result["per_point"] == pytest.approx(5 / 6)
  assert (result["pairs"], result["points"]) == (2, 6)


def test_the_benchmark_script_prints_the_table(tmp_path, colour_matcher, monkeypatch, capsys):
  """The script's table from the library's numbers; a bad layout is one line naming the folder."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
  import correspondence_pck
  text = correspondence_pck.table([("dinov2", {"pairs": 2, "points": 6, "per_image": 0.875, "per_point": 5 / 6})])
  assert "dinov2" in text and "87.5" in text and "83.3" in text and "55.7 (DINOv2-B/14)" in text
  with pytest.raises(pck.PckInputError, match="PairAnnotation/test: no \\*.json"):
    pck.spair_pairs(str(tmp_path), "test")
  bad = tmp_path / "PairAnnotation" / "test"
  bad.mkdir(parents=True)
  (bad / "x:cat.json").write_text('{"src_imname": "a.jpg"}')
  with pytest.raises(pck.PckInputError, match="x:cat.json: not an SPair-71k pair annotation"):
    pck.spair_pairs(str(tmp_path), "test")


def test_grid_hits_score_a_matched_grid_against_the_exact_one():
  exact = np.stack(np.meshgrid(np.arange(64), np.arange(64), indexing="ij"), axis=-1).astype(np.uint8)
  mask = np.zeros((64, 64), bool)
  mask[10:20, 10:20] = True
  assert pck.grid_hits(exact, exact, mask, 40.0).all()
  shifted = exact.copy()
  shifted[10:15, 10:20, 1] += 5  # half the masked cells 5 cells off; threshold 0.1 * 40 = 4 cells
  hits = pck.grid_hits(shifted, exact, mask, 40.0)
  assert hits.shape == (100,) and hits.mean() == 0.5
  silhouette = np.zeros((128, 128), bool)
  silhouette[20:100, 30:70] = True
  assert pck.box_side_cells(silhouette) == 40.0
