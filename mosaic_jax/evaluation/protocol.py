"""The DreamBench scores, x100, as the papers define them, plus what no peer reports.

Per generated image g of a case with prompt p and subjects S (all embeddings unit-normalized):
- CLIP-T = 100 cos(text(p), clip(g));
- CLIP-I_s = 100 mean over the real views v of s of cos(clip(g), clip(v)); DINO_s the same with DINO;
- CLIP-I and DINO = the mean over s in S; CLIP-I min and DINO min = the minimum over s in S (a subject
  lost in the image shows there while the mean hides it).
Case scores average its images; group scores average all images of the group's cases (the papers'
averages over every generated image). Groups: all, each subject kind, same-class cases.

Nothing is dropped silently: a missing or unreadable generated image, an unreadable real view, a
subject whose folder is absent or holds no readable view (its case is skipped), generated images of
no listed case: each is one `Skip` with its reason, printed and kept in the results.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from mosaic_jax.evaluation import preprocess
from mosaic_jax.evaluation.clip_model import ClipModel, load_clip_model, text_embeddings
from mosaic_jax.evaluation.dino import DEFAULT_DINO_EPS, DinoModel, load_dino
from mosaic_jax.evaluation.dreambench import (EvalCase, EvaluationInputError, generated_images, subject_root,
                                              subject_views)
from mosaic_jax.evaluation.embedder import BatchedEmbedder
from mosaic_jax.model.vit import encode_images

METRICS = ("clip_t", "clip_i", "clip_i_min", "dino", "dino_min")


@dataclasses.dataclass(frozen=True)
class Skip:
  what: str    # "generated image", "real view", "case", "stray images"
  where: str   # the case id, file or folder
  reason: str

  def line(self) -> str:
    return f"skipped {self.what} {self.where}: {self.reason}"


class Extractors:
  """CLIP (both towers, its tokenizer) and DINO, each behind a fixed-batch jitted embedder."""

  def __init__(self, clip: ClipModel, dino: DinoModel, tokenizer, batch_size: int = 32):
    self.clip, self.dino, self.tokenizer = clip, dino, tokenizer
    vision_cfg, text_cfg, dino_cfg = clip.config.vision, clip.config.text, dino.config
    self.clip_images = BatchedEmbedder(lambda p, x: encode_images(p, vision_cfg, x), clip.vision_params, batch_size)
    self.clip_texts = BatchedEmbedder(lambda p, ids: text_embeddings(p, text_cfg, ids), clip.text_params, batch_size)
    self.dino_images = BatchedEmbedder(lambda p, x: encode_images(p, dino_cfg, x), dino.params, batch_size)
    self.clip_size = vision_cfg.image_size
    self.dino_crop = dino_cfg.image_size
    self.dino_resize = round(dino_cfg.image_size * preprocess.DINO_RESIZE / preprocess.DINO_CROP)

  def image_features(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """(unit CLIP features, unit DINO features) of PIL images."""
    clip = self.clip_images(np.stack([preprocess.clip_pixels(im, self.clip_size) for im in images]))
    dino = self.dino_images(np.stack([preprocess.dino_pixels(im, self.dino_resize, self.dino_crop) for im in images]))
    return unit(clip), unit(dino)

  def text_features(self, prompts: Sequence[str]) -> np.ndarray:
    from mosaic_jax.text import token_ids
    length = self.clip.config.text.max_position_embeddings
    return unit(self.clip_texts(token_ids(self.tokenizer, list(prompts), length)))

  def settings(self) -> dict:
    dino_declared = None
    try:
      with open(os.path.join(self.dino.folder, "config.json")) as f:
        dino_declared = json.load(f).get("layer_norm_eps")
    except (OSError, ValueError):
      pass
    return {
        "clip_model": os.path.abspath(self.clip.folder), "clip_image_size": self.clip_size,
        "clip_projection_dim": self.clip.config.projection_dim,
        "clip_preprocessing": f"shortest side {self.clip_size} bicubic, center crop {self.clip_size} "
                              "(floor offset, as CLIPImageProcessor), CLIP mean/std",
        "dino_model": os.path.abspath(self.dino.folder), "dino_layer_norm_eps": self.dino.config.layer_norm_eps,
        "dino_layer_norm_eps_declared_by_checkpoint": dino_declared,
        "dino_preprocessing": f"shortest side {self.dino_resize} bicubic, center crop {self.dino_crop} "
                              "(rounded offset, as torchvision), ImageNet mean/std",
        "batch_size": self.clip_images.batch_size, "devices": self.clip_images.num_devices,
    }


def load_extractors(clip_folder: str, dino_folder: str, dino_eps: float = DEFAULT_DINO_EPS,
                    batch_size: int = 32) -> Extractors:
  from mosaic_jax.text import load_clip_tokenizer
  return Extractors(load_clip_model(clip_folder), load_dino(dino_folder, dino_eps),
                    load_clip_tokenizer(clip_folder), batch_size)


def unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def read_image(path: str) -> Image.Image | str:
  """The RGB image, or the reason it cannot be read."""
  try:
    with Image.open(path) as image:
      return image.convert("RGB")
  except FileNotFoundError:
    return "missing"
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    return f"unreadable ({type(e).__name__}: {e})"


def evaluate(cases: Sequence[EvalCase], dreambench: str, generated: str, extractors: Extractors,
             seeds: Sequence[int] | None = None, log: Callable[[str], None] = print) -> dict:
  """Scores every case; returns {"cases": [...], "groups": {...}, "skips": [...], "seeds": [...]}."""
  found = generated_images(generated)
  skips = _stray_images(cases, found, generated)
  if seeds is None:
    seeds = sorted({s for c in cases for s in found.get(c.id, {})})
  seeds = list(seeds)
  views, absent = _real_views(cases, subject_root(dreambench), extractors, skips)
  scored, images = _generated_images(cases, seeds, found, generated, absent, skips)
  for skip in skips:
    log(skip.line())
  if not scored:
    raise EvaluationInputError(f"nothing to score: every case was skipped ({len(skips)} skips; first: "
                               f"{skips[0].line() if skips else 'none'}).")
  gen_clip, gen_dino = extractors.image_features(images)
  text = extractors.text_features([case.prompt for case, _ in scored])
  results = _case_results(scored, views, gen_clip, gen_dino, text)
  return {"seeds": seeds, "cases": results, "groups": group_scores(results),
          "skips": [dataclasses.asdict(s) for s in skips], "subject_views": {s: len(v[0]) for s, v in views.items()}}


def _stray_images(cases: Sequence[EvalCase], found: dict, generated: str) -> list[Skip]:
  """A Skip for the generated images of case ids the cases file does not list, if any."""
  stray = sorted(set(found) - {c.id for c in cases})
  if not stray:
    return []
  return [Skip("stray images", generated, f"{sum(len(found[c]) for c in stray)} images of "
               f"{len(stray)} case ids not in the cases file (e.g. {stray[:3]})")]


def _real_views(cases: Sequence[EvalCase], root: str, extractors: Extractors,
                skips: list[Skip]) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, str]]:
  """({subject: (CLIP, DINO) features of its readable real views}, {subject: why it has none}), each
  subject read once; unreadable views are added to skips."""
  views: dict[str, tuple[np.ndarray, np.ndarray]] = {}
  absent: dict[str, str] = {}
  for subject in sorted({s for c in cases for s in c.subjects}):
    paths = subject_views(root, subject)
    images = []
    for path in paths:
      image = read_image(path)
      if isinstance(image, str):
        skips.append(Skip("real view", path, image))
      else:
        images.append(image)
    if not images:
      absent[subject] = (f"subject folder {os.path.join(root, subject)} is absent" if not paths
                         else f"subject folder {os.path.join(root, subject)} holds no readable image")
      continue
    views[subject] = extractors.image_features(images)
  return views, absent


def _generated_images(cases: Sequence[EvalCase], seeds: list[int], found: dict, generated: str,
                      absent: dict[str, str], skips: list[Skip]) -> tuple[list, list[Image.Image]]:
  """([(case, [(seed, path)...]) of the cases that can be scored], their images in that order); a case
  with an absent subject or no readable image, and each unreadable image, are added to skips."""
  scored, images = [], []
  for case in cases:
    missing_subjects = [s for s in case.subjects if s in absent]
    if missing_subjects:
      skips.append(Skip("case", case.id, "; ".join(absent[s] for s in missing_subjects)))
      continue
    kept = []
    for seed in seeds:
      path = found.get(case.id, {}).get(seed) or os.path.join(generated, f"{case.id}_{seed}.png")
      image = read_image(path)
      if isinstance(image, str):
        skips.append(Skip("generated image", path, f"{image} (case {case.id}, seed {seed})"))
        continue
      kept.append((seed, path))
      images.append(image)
    if kept:
      scored.append((case, kept))
    else:
      skips.append(Skip("case", case.id, "no readable generated image"))
  return scored, images


def _case_results(scored: list, views: dict, gen_clip: np.ndarray, gen_dino: np.ndarray,
                  text: np.ndarray) -> list[dict]:
  """Per scored case its scores (the mean over its images) and each image's; features row by row in
  the order of scored's images."""
  results, row = [], 0
  for index, (case, kept) in enumerate(scored):
    per_image = []
    for seed, path in kept:
      clip_i = {s: 100 * float(np.mean(views[s][0] @ gen_clip[row])) for s in case.subjects}
      dino = {s: 100 * float(np.mean(views[s][1] @ gen_dino[row])) for s in case.subjects}
      per_image.append({"seed": seed, "file": path, "clip_t": 100 * float(text[index] @ gen_clip[row]),
                        "clip_i": float(np.mean(list(clip_i.values()))), "clip_i_min": min(clip_i.values()),
                        "dino": float(np.mean(list(dino.values()))), "dino_min": min(dino.values()),
                        "clip_i_per_subject": clip_i, "dino_per_subject": dino})
      row += 1
    results.append({"case": case.id, "prompt": case.prompt, "subjects": list(case.subjects), "kind": case.kind,
                    "same_class": case.same_class, "references": list(case.reference_paths),
                    **{m: float(np.mean([im[m] for im in per_image])) for m in METRICS},
                    "images": per_image})
  return results


def group_scores(case_results: Sequence[dict]) -> dict:
  """{group: {n_cases, n_images, metric: mean over the group's images}} for all, each kind, same-class."""
  groups: dict[str, list[dict]] = {"all": list(case_results)}
  for result in case_results:
    groups.setdefault(result["kind"], []).append(result)
    if result["same_class"]:
      groups.setdefault("same-class", []).append(result)
  out = {}
  for name, members in groups.items():
    images = [im for r in members for im in r["images"]]
    out[name] = {"n_cases": len(members), "n_images": len(images),
                 **{m: float(np.mean([im[m] for im in images])) for m in METRICS}}
  return out
