"""DreamBench inputs: cases files, the local image folder of the 30 subjects, and generated images.

Cases files (JSON lists; one reader for the three formats):
- UNO's `dreambench_singleip.json` / `dreambench_multiip.json`: {"prompt", "image_paths", "image_tgt_path"}
  with paths like `./dreambooth/dataset/<subject>/02.jpg`;
- the official MOSAIC cases format: {"index", "prompt", "image_paths"};
- either with an optional "subjects" list naming each reference's DreamBench subject.
A case's id is its "index" when given, else its position in the list; its subjects are the "subjects"
list or else the folder names holding its reference images.

The DreamBench folder holds one folder per subject with its real views (`backpack/00.jpg`...), directly
or under `dataset/` (the layout of the google/dreambooth repository). Generated images are
`<generated>/<case>_<seed>.png`.

Subject kinds: the live subjects are DreamBench's cats and dogs (class "cat" or "dog" in its
prompts_and_classes.txt); a case's kind is `object+object`, `live+live` or `live+object` (one subject:
`object` or `live`; three or more: the same words for all-object, all-live, mixed). Same-class cases
(cat+cat2, dog7+dog8, duck_toy+robot_toy...) are also reported on their own.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

from mosaic_jax import cli

# DreamBench's prompts_and_classes.txt: subject folder -> class.
DREAMBENCH_CLASSES = {
    "backpack": "backpack", "backpack_dog": "backpack", "bear_plushie": "stuffed animal",
    "berry_bowl": "bowl", "can": "can", "candle": "candle", "cat": "cat", "cat2": "cat", "clock": "clock",
    "colorful_sneaker": "sneaker", "dog": "dog", "dog2": "dog", "dog3": "dog", "dog5": "dog", "dog6": "dog",
    "dog7": "dog", "dog8": "dog", "duck_toy": "toy", "fancy_boot": "boot",
    "grey_sloth_plushie": "stuffed animal", "monster_toy": "toy", "pink_sunglasses": "glasses",
    "poop_emoji": "toy", "rc_car": "toy", "red_cartoon": "cartoon", "robot_toy": "toy",
    "shiny_sneaker": "sneaker", "teapot": "teapot", "vase": "vase", "wolf_plushie": "stuffed animal",
}
LIVE_CLASSES = ("cat", "dog")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class EvaluationInputError(ValueError):
  """Bad user input (a file, folder, key or value); the message is one line naming it."""


@dataclasses.dataclass(frozen=True)
class EvalCase:
  id: str
  prompt: str
  subjects: tuple[str, ...]
  reference_paths: tuple[str, ...]  # the images the model is conditioned on (not used for scoring)

  @property
  def kind(self) -> str:
    return subject_kind(self.subjects)

  @property
  def same_class(self) -> bool:
    classes = {DREAMBENCH_CLASSES.get(s, s) for s in self.subjects}
    return len(self.subjects) > 1 and len(classes) == 1


def is_live(subject: str) -> bool:
  return DREAMBENCH_CLASSES.get(subject) in LIVE_CLASSES


def subject_kind(subjects: Sequence[str]) -> str:
  live = [is_live(s) for s in subjects]
  if len(subjects) == 1:
    return "live" if live[0] else "object"
  if all(live):
    return "live+live"
  return "live+object" if any(live) else "object+object"


def _subject_of(path: str) -> str:
  return os.path.basename(os.path.dirname(os.path.normpath(path)))


def read_cases(path: str) -> tuple[list[EvalCase], str]:
  """(cases, format name) from a UNO or MOSAIC cases file; malformed entries are one-line errors."""
  path = os.fspath(path)
  entries = cli.read_json(path, EvaluationInputError)
  if not isinstance(entries, list) or not entries:
    raise EvaluationInputError(f"{path}: expected a non-empty JSON list of {{\"prompt\", \"image_paths\"}} "
                               "objects (UNO's dreambench_*ip.json or the MOSAIC cases format).")
  base = os.path.dirname(os.path.abspath(path))
  cases, formats = [], set()
  for position, entry in enumerate(entries):
    where = f"{path}: entry {position}"
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
      raise EvaluationInputError(f"{where}: expected an object with a string \"prompt\".")
    paths = entry.get("image_paths")
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
      raise EvaluationInputError(f"{where}: \"image_paths\" must be a non-empty list of strings.")
    subjects = entry.get("subjects")
    if subjects is None:
      subjects = [_subject_of(p) for p in paths]
    elif (not isinstance(subjects, list) or len(subjects) != len(paths)
          or not all(isinstance(s, str) and s for s in subjects)):
      raise EvaluationInputError(f"{where}: \"subjects\" must list one subject name per image path "
                                 f"({len(paths)}).")
    formats.add("uno" if "image_tgt_path" in entry else "mosaic" if "index" in entry else "plain")
    resolved = tuple(p if os.path.isabs(p) or os.path.exists(p) else os.path.join(base, p) for p in paths)
    cases.append(EvalCase(str(entry.get("index", position)), entry["prompt"], tuple(subjects), resolved))
  ids = [c.id for c in cases]
  repeated = sorted({i for i in ids if ids.count(i) > 1})
  if repeated:
    raise EvaluationInputError(f"{path}: case ids {repeated[:5]} repeat; each case needs its own index.")
  return cases, "+".join(sorted(formats))


def subject_root(root: str) -> str:
  """The folder that holds the subject folders: `root` itself, or `root/dataset`."""
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise EvaluationInputError(f"{root}: no such folder (expected the DreamBench images: one folder per "
                               "subject, e.g. backpack/00.jpg).")
  nested = os.path.join(root, "dataset")
  if os.path.isdir(nested) and not any(os.path.isdir(os.path.join(root, s)) for s in DREAMBENCH_CLASSES):
    return nested
  return root


def subject_views(root: str, subject: str) -> list[str]:
  """Sorted image files of one subject's folder; [] when the folder is absent."""
  folder = os.path.join(root, subject)
  if not os.path.isdir(folder):
    return []
  return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


_GENERATED = re.compile(r"^(?P<case>.+)_(?P<seed>-?\d+)\.png$")


def generated_images(folder: str) -> dict[str, dict[int, str]]:
  """{case id: {seed: path}} for the `<case>_<seed>.png` files of a folder."""
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise EvaluationInputError(f"{folder}: no such folder (expected generated images <case>_<seed>.png).")
  found: dict[str, dict[int, str]] = {}
  for name in sorted(os.listdir(folder)):
    match = _GENERATED.match(name)
    if match:
      found.setdefault(match["case"], {})[int(match["seed"])] = os.path.join(folder, name)
  if not found:
    raise EvaluationInputError(f"{folder}: no generated images named <case>_<seed>.png.")
  return found
