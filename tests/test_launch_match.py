"""`launch/match.py` end to end on tiny random weights in the real formats, written by the tests: a FLUX
checkpoint root (tests/flux_root_fixtures.py: diffusers transformer and VAE, transformers T5 and CLIP,
their tokenizers) and a transformers `Dinov2Model` folder; the manifest of tests/test_correspondence_fill.py
(synthetic scenes, one unreadable image, one empty mask, a line with coords, a malformed line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flux_root_fixtures import build_flux_root  # noqa: E402
from test_correspondence_fill import write_manifest_folder  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "launch"))
import match as match_script  # noqa: E402  (launch/match.py)

TINY_DITF = ["--ditf_block", "1", "--ditf_copies", "1", "--ditf_massive_channels", ""]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  root = tmp_path_factory.mktemp("weights")
  build_flux_root(root / "flux", with_transformer=True)
  config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     patch_size=14, image_size=518)
  torch.manual_seed(0)
  transformers.Dinov2Model(config).eval().save_pretrained(str(root / "dinov2"))
  return {"flux": str(root / "flux"), "dinov2": str(root / "dinov2")}


@pytest.fixture(scope="module")
def matched(weights, tmp_path_factory):
  mine = tmp_path_factory.mktemp("mine")
  write_manifest_folder(mine)
  out = tmp_path_factory.mktemp("matched") / "out"
  argv = ["--manual_dir", str(mine), "--out", str(out), "--flux", weights["flux"], "--dinov2", weights["dinov2"],
          "--dinov2_layer", "1", "--dtype", "float32", "--no_progress", *TINY_DITF]
  return {"mine": mine, "out": out, "argv": argv}


def test_the_command_writes_both_grids_and_the_manifest(matched, capsys):
  match_script.main(matched["argv"])
  printed = capsys.readouterr().out
  out = matched["out"]
  for slot in ("dift", "geoaware"):
    assert sorted(os.listdir(out / "coord" / slot)) == ["scene_zero_ref0.npy", "train-2_ref0.npy"]
    grid = np.load(out / "coord" / slot / "train-2_ref0.npy")
    assert grid.shape == (64, 64, 2) and grid.dtype == np.uint8 and len(np.unique(grid.reshape(-1, 2), axis=0)) > 1
  assert "dift grids 2 written, 0 already there, geoaware grids 2 written" in printed
  assert "skipped_corrupt_image: 1" in printed and "refs/1_1.png" in printed
  assert "skipped_empty_mask: 1" in printed and "masks/2_0.png selects no pixel" in printed
  first = json.loads((out / "train.jsonl").read_text().splitlines()[0])
  assert first["coords"][0] == {"dift": "coord/dift/scene_zero_ref0.npy", "geoaware": "coord/geoaware/scene_zero_ref0.npy"}

  # a second run writes nothing
  before = {path: os.stat(path).st_mtime_ns for path in out.rglob("*")}
  match_script.main(matched["argv"])
  assert "dift grids 0 written, 2 already there" in capsys.readouterr().out
  assert {path: os.stat(path).st_mtime_ns for path in out.rglob("*")} == before

  # the folder dataset built from --out reads the grids (pairs from agreeing grids: test_correspondence_fill.py)
  import tensorflow_datasets as tfds
  from mosaic_jax.data.semalign_ms import SemalignMs
  data_dir = str(matched["mine"] / "tfds")
  SemalignMs(config="folder", data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(out)))
  example = tfds.data_source("semalign_ms/folder", data_dir=data_dir)["train"][0]
  assert example["id"] == b"scene/zero" and [bool(x) for x in example["refs"]["has_coords"]] == [True, True]
  for slot in ("dift", "geoaware"):
    np.testing.assert_array_equal(example["refs"][f"coord_{slot}"][0],
                                  np.load(out / "coord" / slot / "scene_zero_ref0.npy"))


def test_the_spair_benchmark_runs_on_real_format_weights(weights, tmp_path, capsys):
  from test_correspondence_pck import write_spair
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import correspondence_pck
  write_spair(tmp_path)
  rows = correspondence_pck.main(["--spair", str(tmp_path), "--dinov2", weights["dinov2"], "--dinov2_layer", "1"])
  assert [(name, result["pairs"], result["points"]) for name, result in rows] == [("dinov2", 2, 6)]
  assert "55.7 (DINOv2-B/14)" in capsys.readouterr().out


def test_bad_input_is_one_line(weights, tmp_path, capsys):
  (tmp_path / "train.jsonl").write_text('{"id": "a", "target": "t.png", "refs": ["r.png"]}\n'
                                        '{"id": "a", "target": "t.png", "refs": ["r.png"]}\n')
  base = ["--manual_dir", str(tmp_path), "--out", str(tmp_path / "o")]
  # the command line's own checks (argparse: one line, status 2)
  for argv, expected in (([*base, "--flux", str(tmp_path / "nope")], f"--flux {tmp_path / 'nope'}: no such directory"),
                         ([*base, "--dinov2", weights["dinov2"], "--ditf_massive_channels", "1,x"],
                          "expected comma-separated channel numbers")):
    with pytest.raises(SystemExit) as exit_info:
      match_script.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
  # a bad manifest, through the real process: one line, no traceback, nothing written
  proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "match.py"), *base, "--dinov2", weights["dinov2"]],
                        capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "PYTHONPATH": REPO})
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "train.jsonl:2: id 'a' names its grid files a_ref*.npy" in lines[0], proc.stderr
  assert not (tmp_path / "o").exists()
