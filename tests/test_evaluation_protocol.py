"""The DreamBench protocol on a tiny fixture: scores equal an independent PyTorch computation, skips are
counted with reasons, and the command line runs end to end and refuses bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from evaluation_fixtures import (CASES, CLIP_IMAGE_SIZE, DINO_RESIZE, SEEDS, dreambench_fixture,  # noqa: F401
                                 tiny_clip, tiny_dino)
from test_evaluation_extractors import torchvision_like_dino

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mosaic_jax.evaluation import protocol  # noqa: E402
from mosaic_jax.evaluation.dreambench import EvaluationInputError, read_cases, subject_kind  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def evaluation(tiny_clip, tiny_dino, dreambench_fixture):
  cases, case_format = read_cases(str(dreambench_fixture["cases"]))
  assert case_format == "uno"
  extractors = protocol.load_extractors(tiny_clip[1], tiny_dino[1], batch_size=3)  # 8 images: a padded batch
  lines = []
  result = protocol.evaluate(cases, str(dreambench_fixture["base"] / "dreambooth"),
                             str(dreambench_fixture["generated"]), extractors, log=lines.append)
  return result, lines


def torch_scores(tiny_clip, tiny_dino, fixture):
  """Every image's scores, from transformers' models and processor and the formulas written out here."""
  clip, clip_folder = tiny_clip
  dino = tiny_dino[0]
  processor = transformers.CLIPImageProcessor(size={"shortest_edge": CLIP_IMAGE_SIZE},
                                              crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE})
  tokenizer = transformers.CLIPTokenizer.from_pretrained(clip_folder)
  cos = torch.nn.functional.cosine_similarity

  def features(paths):
    images = [Image.open(p).convert("RGB") for p in paths]
    with torch.no_grad():
      c = clip.get_image_features(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
      c = c if isinstance(c, torch.Tensor) else c.pooler_output
      pixels = np.stack([torchvision_like_dino(im, DINO_RESIZE, 32) for im in images]).transpose(0, 3, 1, 2)
      d = dino(pixel_values=torch.from_numpy(np.ascontiguousarray(pixels))).last_hidden_state[:, 0]
    return c.double(), d.double()

  root = fixture["root"]
  views = {s: features(sorted(str(p) for p in (root / s).iterdir())) for subjects, _ in CASES for s in subjects
           if (root / s).is_dir()}
  scores = {}
  for c, (subjects, prompt) in enumerate(CASES):
    if not all(s in views for s in subjects):
      continue
    ids = tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
      t = clip.get_text_features(input_ids=ids.input_ids)
      t = (t if isinstance(t, torch.Tensor) else t.pooler_output).double()
    for seed in SEEDS:
      gc, gd = features([str(fixture["generated"] / f"{c}_{seed}.png")])
      clip_i = [100 * cos(views[s][0], gc).mean().item() for s in subjects]
      dino_i = [100 * cos(views[s][1], gd).mean().item() for s in subjects]
      scores[(str(c), seed)] = {"clip_t": 100 * cos(t, gc).item(), "clip_i": sum(clip_i) / len(clip_i),
                                "clip_i_min": min(clip_i), "dino": sum(dino_i) / len(dino_i),
                                "dino_min": min(dino_i)}
  return scores


def test_scores_equal_an_independent_torch_computation(evaluation, tiny_clip, tiny_dino, dreambench_fixture):
  result, _ = evaluation
  ref = torch_scores(tiny_clip, tiny_dino, dreambench_fixture)
  ours = {(case["case"], im["seed"]): im for case in result["cases"] for im in case["images"]}
  assert sorted(ours) == sorted(ref) == [(str(c), s) for c in range(3) for s in SEEDS]
  for key, expected in ref.items():
    for metric, value in expected.items():
      assert abs(ours[key][metric] - value) <= 1e-4 * 100, (key, metric, ours[key][metric], value)
  # Groups average their images.
  for name, members in (("all", ["0", "1", "2"]), ("live+object", ["0"]), ("live+live", ["1"]),
                        ("object+object", ["2"]), ("same-class", ["1"])):
    group = result["groups"][name]
    assert group["n_cases"] == len(members) and group["n_images"] == len(members) * len(SEEDS)
    for metric in protocol.METRICS:
      expected = np.mean([ref[(c, s)][metric] for c in members for s in SEEDS])
      assert abs(group[metric] - expected) <= 1e-2, (name, metric)


def test_planted_cases_minimum_and_absent_subject(evaluation):
  result, lines = evaluation
  case0 = next(c for c in result["cases"] if c["case"] == "0")
  planted = case0["images"][0]  # a copy of cat's first view
  assert planted["clip_i_per_subject"]["cat"] > planted["clip_i_per_subject"]["backpack"]
  assert planted["dino_per_subject"]["cat"] > planted["dino_per_subject"]["backpack"]
  assert planted["clip_i_min"] == planted["clip_i_per_subject"]["backpack"] < planted["clip_i"]
  assert planted["dino_min"] == planted["dino_per_subject"]["backpack"] < planted["dino"]
  # Case 3 (backpack + vase, no vase folder) is skipped with its reason and left out of every group.
  assert "3" not in [c["case"] for c in result["cases"]]
  assert [s for s in result["skips"] if s["what"] == "case"] == [
      {"what": "case", "where": "3", "reason": s["reason"]} for s in result["skips"] if s["where"] == "3"]
  assert any(line.startswith("skipped case 3:") and "vase is absent" in line for line in lines)
  assert result["groups"]["object+object"]["n_cases"] == 1
  assert subject_kind(["dog7", "dog8"]) == "live+live" and subject_kind(["teapot"]) == "object"


def test_missing_and_unreadable_images_are_counted_skips(tiny_clip, tiny_dino, dreambench_fixture, tmp_path):
  generated = tmp_path / "generated"
  generated.mkdir()
  for name in ("0_0.png", "1_0.png", "2_0.png"):
    Image.open(dreambench_fixture["generated"] / name).save(generated / name)
  (generated / "1_1.png").write_bytes(b"not a png")
  Image.open(dreambench_fixture["generated"] / "2_1.png").save(generated / "9_0.png")  # no case 9
  cases, _ = read_cases(str(dreambench_fixture["cases"]))
  extractors = protocol.load_extractors(tiny_clip[1], tiny_dino[1], batch_size=3)
  lines = []
  result = protocol.evaluate(cases, str(dreambench_fixture["root"]), str(generated), extractors, seeds=[0, 1],
                             log=lines.append)
  reasons = {(s["what"], os.path.basename(s["where"])): s["reason"] for s in result["skips"]}
  assert reasons[("generated image", "0_1.png")].startswith("missing")
  assert reasons[("generated image", "1_1.png")].startswith("unreadable")
  assert "1 images of 1 case ids not in the cases file" in reasons[("stray images", "generated")]
  assert len(lines) == len(result["skips"]) == 5  # and 2_1 missing, case 3 (no vase folder)
  assert [len(c["images"]) for c in result["cases"]] == [1, 1, 1]
  with pytest.raises(EvaluationInputError, match="nothing to score"):
    protocol.evaluate(cases, str(dreambench_fixture["root"]), str(generated), extractors, seeds=[7],
                      log=lambda line: None)


def test_case_readers(tmp_path):
  mosaic = tmp_path / "cases.json"
  mosaic.write_text(json.dumps([{"index": 7, "prompt": "a cat", "image_paths": ["assets/21_Siamese cat.jpg"],
                                 "subjects": ["cat"]}]))
  (case,), fmt = read_cases(str(mosaic))
  assert (fmt, case.id, case.subjects, case.kind) == ("mosaic", "7", ("cat",), "live")
  for content, message in (("{", "not valid JSON"), ("[]", "non-empty JSON list"),
                           ('[{"prompt": "x"}]', "image_paths"),
                           ('[{"prompt": "x", "image_paths": ["a/b.jpg"], "subjects": ["a", "b"]}]', "subjects"),
                           ('[{"index": 1, "prompt": "x", "image_paths": ["a/b.jpg"]},'
                            ' {"index": 1, "prompt": "y", "image_paths": ["a/b.jpg"]}]', "repeat")):
    mosaic.write_text(content)
    with pytest.raises(EvaluationInputError, match=message):
      read_cases(str(mosaic))


def cli(*args):
  return subprocess.run([sys.executable, os.path.join(REPO, "launch", "evaluate.py"), *args],
                        capture_output=True, text=True, cwd=REPO, timeout=600)


def test_cli_end_to_end_and_bad_input(tiny_clip, tiny_dino, dreambench_fixture, tmp_path):
  f = dreambench_fixture
  common = ["--cases", str(f["cases"]), "--dreambench", str(f["base"] / "dreambooth"), "--clip", tiny_clip[1],
            "--dino", tiny_dino[1]]
  out = tmp_path / "eval"
  done = cli(*common, "--generated", str(f["generated"]), "--output", str(out), "--batch_size", "4")
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  assert results["settings"]["dino_layer_norm_eps"] == 1e-6
  assert results["settings"]["dino_layer_norm_eps_declared_by_checkpoint"] == 1e-6
  assert [c["case"] for c in results["cases"]] == ["0", "1", "2"] and results["seeds"] == list(SEEDS)
  assert "| all | 3 | 6 |" in (out / "results.md").read_text()
  assert "| all | 3 | 6 |" in done.stdout
  assert "skipped case 3:" in done.stderr
  sheets = sorted(p.name for p in out.iterdir() if p.suffix == ".png")
  assert sheets == ["contact_live_live.png", "contact_live_object.png", "contact_object_object.png"]
  assert Image.open(out / "contact_live_object.png").size[1] == 128 + 4

  for args, message in (
      (["--generated", str(tmp_path / "nowhere")], "nowhere: no such folder"),
      (["--generated", str(f["root"] / "cat")], "no generated images named"),
      (["--generated", str(f["generated"]), "--seeds", "0", "0"], "a seed repeats"),
      (["--generated", str(f["generated"]), "--dino_eps", "0"], "--dino_eps 0"),
  ):
    bad = cli(*common, *args, "--output", str(tmp_path / "bad"))
    assert bad.returncode == 2, (args, bad.stderr[-2000:])
    assert bad.stderr.strip().count("\n") == 0 and message in bad.stderr, bad.stderr
  broken = tmp_path / "broken.json"
  broken.write_text("[{")
  bad = cli("--cases", str(broken), *common[2:], "--generated", str(f["generated"]), "--output", str(tmp_path / "b"))
  assert bad.returncode == 2 and "broken.json: not valid JSON" in bad.stderr and not (tmp_path / "b").exists()
