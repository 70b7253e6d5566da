"""launch/sample.py end to end on a tiny random FLUX checkpoint root (diffusers layout) with a MOSAIC LoRA:
the files it writes, its reference preprocessing, and the bad inputs it refuses before any compile."""

from __future__ import annotations

import importlib.util
import json
import logging
import os

import jax
import numpy as np
import pytest
from PIL import Image

from mosaic_jax import images, model, sampling
from mosaic_jax.sampling import sampler as sampler_lib
from mosaic_jax.interop import LoraFileError, save_lora

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from flux_root_fixtures import TINY_ROOT_TRANSFORMER, build_flux_root  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--size", "32", "--ref_size", "32", "--steps", "3", "--t5_max_length", "16", "--dtype", "float32",
         "--no_progress"]


def load_launcher():
  spec = importlib.util.spec_from_file_location("launch_sample", os.path.join(REPO, "launch", "sample.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def write_lora(path, cfg, seed, rank=2):
  """A random MOSAIC LoRA file for cfg (B non-zero, so it changes the references)."""
  params = model.init_params(jax.random.key(seed), cfg)
  lora = model.init_lora(jax.random.key(seed), params, cfg, rank)
  lora = jax.tree_util.tree_map(lambda a: a + 0.05, lora)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  save_lora(str(path), lora, cfg)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A checkpoint root, a training workdir with two LoRA exports, two reference images, a cases file."""
  root = tmp_path_factory.mktemp("flux_root")
  build_flux_root(root, with_transformer=True)
  cfg = model.FluxConfig(**TINY_ROOT_TRANSFORMER)
  work = tmp_path_factory.mktemp("work")
  write_lora(work / "workdir" / "lora" / "50" / "lora_ema.safetensors", cfg, seed=1)
  write_lora(work / "workdir" / "lora" / "100" / "lora_ema.safetensors", cfg, seed=2)
  write_lora(work / "workdir" / "lora" / "100" / "lora.safetensors", cfg, seed=4)
  # A transparent RGBA cat-ish blob and an opaque JPEG with a white margin.
  rgba = np.zeros((40, 60, 4), np.uint8)
  rgba[10:30, 5:45] = (200, 40, 40, 255)
  Image.fromarray(rgba, "RGBA").save(work / "cat.png")
  rgb = np.full((50, 30, 3), 255, np.uint8)
  rgb[5:45, 10:20] = (30, 90, 200)
  Image.fromarray(rgb).save(work / "hat.jpg", quality=95)
  cases = [{"index": 7, "prompt": "a cat wearing a hat", "image_paths": ["cat.png", "hat.jpg"]},
           {"index": "b/2", "prompt": "", "image_paths": [str(work / "hat.jpg"), str(work / "cat.png")]}]
  (work / "cases.json").write_text(json.dumps(cases))
  return root, work


def test_cases_file_with_two_references_writes_every_file(setup, monkeypatch, tmp_path):
  root, work = setup
  launcher = load_launcher()
  monkeypatch.chdir(tmp_path)  # the cases file's relative paths resolve against its own folder
  argv = ["--cases", str(work / "cases.json"), "--checkpoint", str(root), "--lora", str(work / "workdir"),
          "--output", str(tmp_path / "out"), "--seeds", "0", "1", "--batch_size", "2",
          "--independent_refs"] + SMALL
  written = launcher.main(argv)

  run_dir = os.path.dirname(written[0])
  names = sorted(os.path.basename(w) for w in written)
  assert names == sorted(f"{case}_seed{seed}{suffix}.png" for case in ("7", "b_2") for seed in (0, 1)
                         for suffix in ("", "_panel"))
  assert sorted(os.listdir(run_dir)) == sorted(names + ["run.json"])
  settings = json.load(open(os.path.join(run_dir, "run.json")))
  assert settings["ref_cache"] is True and settings["independent_refs"] is True
  images = {n: np.asarray(Image.open(os.path.join(run_dir, n))) for n in names}
  for case in ("7", "b_2"):
    result = images[f"{case}_seed0.png"]
    panel = images[f"{case}_seed0_panel.png"]
    assert result.shape == (32, 32, 3)
    assert panel.shape == (32, 3 * 32 + 2 * 8, 3)  # two references, then the result, 8 px gaps
    np.testing.assert_array_equal(panel[:, -32:], result)
    assert not np.array_equal(images[f"{case}_seed0.png"], images[f"{case}_seed1.png"])
  assert not np.array_equal(images["7_seed0.png"], images["b_2_seed0.png"])

  # A rerun writes a new run folder and leaves the first one as it was.
  before = {n: open(os.path.join(run_dir, n), "rb").read() for n in names}
  again = launcher.main(argv)
  assert os.path.dirname(again[0]) != run_dir
  assert {n: open(os.path.join(run_dir, n), "rb").read() for n in names} == before
  np.testing.assert_array_equal(np.asarray(Image.open(again[0])),
                                images[os.path.basename(again[0])])  # deterministic


def test_save_attention_writes_heatmap_panels_named_in_run_json(setup, tmp_path):
  """--save_attention through the command line, with the cache asked for: the run drops the cache,
  writes per case a panel (references framed on top; result, all heatmaps, each heatmap below) and the
  maps, each summing to 1 over the 4x4 target tokens, different between the two references."""
  root, work = setup
  written = load_launcher().main(
      ["--cases", str(work / "cases.json"), "--checkpoint", str(root), "--lora", str(work / "workdir"),
       "--output", str(tmp_path / "out"), "--independent_refs", "--ref_cache", "on", "--save_attention"]
      + SMALL + ["--size", "64"])
  run_dir = os.path.dirname(written[0])
  settings = json.load(open(os.path.join(run_dir, "run.json")))
  assert settings["ref_cache"] is False and settings["attention"]["ref_cache_dropped"] is True
  assert settings["attention"]["steps"] == [0, 1, 2]
  files = [f"{case}_seed0_attention{x}" for case in ("7", "b_2") for x in (".png", ".npy")]
  assert settings["attention"]["files"] == files
  assert sorted(os.listdir(run_dir)) == sorted(files + ["run.json"] + [f"{case}_seed0{x}.png" for case in ("7", "b_2")
                                                                       for x in ("", "_panel")])
  for case in ("7", "b_2"):
    panel = np.asarray(Image.open(os.path.join(run_dir, f"{case}_seed0_attention.png")))
    assert panel.shape == (2 * 128, 4 * 128, 3)  # 128 px tiles: 2 references + result + overlay, 2 rows
    result = np.asarray(Image.open(os.path.join(run_dir, f"{case}_seed0.png")))
    np.testing.assert_array_equal(panel[128:, :128], np.repeat(np.repeat(result, 2, 0), 2, 1))
    assert np.all(panel[:128, :256] == 255)  # no references above the result and the overlay
    maps = np.load(os.path.join(run_dir, f"{case}_seed0_attention.npy"))
    assert maps.shape == (2, 4, 4) and maps.dtype == np.float32
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    assert np.abs(maps[0] - maps[1]).max() > 1e-3
    for r in range(2):  # each reference's own heatmap tile differs from the plain result
      assert np.abs(panel[128:, (2 + r) * 128:(3 + r) * 128].astype(int) - panel[128:, :128]).max() > 10


def test_reference_preprocessing(setup):
  """Transparency on white, cropped to the subject, both sides scaled by 0.9 * size / long side, centred."""
  _, work = setup
  ref = sampling.load_reference(str(work / "cat.png"), 32)
  assert ref.shape == (32, 32, 3) and ref.dtype == np.float32 and ref.min() >= -1 and ref.max() <= 1
  rows, cols = np.nonzero(np.any(ref < 0.9, axis=-1))  # the 40x20 red box -> 28x14, centred
  assert cols.max() - cols.min() + 1 == int(0.9 * 32)
  assert abs((rows.max() - rows.min() + 1) - 14) <= 1
  assert abs((cols.min() + cols.max()) / 2 - 15.5) <= 1 and abs((rows.min() + rows.max()) / 2 - 15.5) <= 1
  assert np.all(ref[0] == 1.0)  # white padding, where the source was transparent black


@pytest.fixture
def no_compiles(monkeypatch):
  """Fails the test if the sampler reaches any jitted function."""
  def refuse(*args, **kwargs):
    raise AssertionError("compiled before refusing the input")
  for name in ("denoise", "_encode_references"):
    monkeypatch.setattr(sampler_lib, name, refuse)
  monkeypatch.setattr(images, "decode_tokens", refuse)


@pytest.mark.parametrize("case", ["missing", "unreadable", "too_many", "bad_size", "empty"])
def test_bad_inputs_are_refused_before_any_compile(setup, tmp_path, no_compiles, case):
  root, work = setup
  launcher = load_launcher()
  base = ["--checkpoint", str(root), "--output", str(tmp_path / "out")] + SMALL
  cat = str(work / "cat.png")
  if case == "missing":
    argv, message = ["--prompt", "a cat", "--ref", cat, "--ref", str(tmp_path / "nope.png")], "nope.png"
  elif case == "unreadable":
    (tmp_path / "broken.png").write_bytes(b"not a png")
    argv, message = ["--prompt", "a cat", "--ref", str(tmp_path / "broken.png")], "broken.png: not a readable"
  elif case == "too_many":
    argv, message = ["--prompt", "x"] + ["--ref", cat] * 7, "7 references, but the model supports at most 6"
  elif case == "bad_size":
    argv = ["--prompt", "x", "--ref", cat, "--size", "40"]
    message = "height=40: expected a positive multiple of 16"
  else:
    (tmp_path / "empty.json").write_text("[]")
    argv, message = ["--cases", str(tmp_path / "empty.json")], "the prompt list is empty"
  with pytest.raises(sampling.SampleInputError, match=message):
    launcher.main(base + argv)  # later flags win: the bad value comes last
  assert not (tmp_path / "out").exists()


def test_a_lora_that_does_not_fit_is_refused_before_any_compile(setup, tmp_path, no_compiles):
  root, work = setup
  other = model.FluxConfig(**dict(TINY_ROOT_TRANSFORMER, num_layers=2))  # one double block too many
  write_lora(tmp_path / "wrong.safetensors", other, seed=3)
  with pytest.raises(LoraFileError, match="transformer_blocks.1.attn.to_q.lora_A.weight"):
    load_launcher().main(["--prompt", "x", "--ref", str(work / "cat.png"), "--checkpoint", str(root),
                          "--lora", str(tmp_path / "wrong.safetensors"), "--output", str(tmp_path)] + SMALL)


def test_workdir_lora_is_the_latest_export_and_cache_warns_when_approximate(setup, caplog):
  root, work = setup
  assert sampling.resolve_lora_file(str(work / "workdir")).endswith(os.path.join("100", "lora_ema.safetensors"))
  with caplog.at_level(logging.WARNING):
    sampler = sampling.load_sampler(str(root), str(work / "workdir"), sampling.SampleOptions(ref_cache=True),
                                  dtype="float32", t5_max_length=16)
  assert sampler.use_ref_cache and not sampler.cfg.independent_refs
  assert "approximation" in caplog.text
