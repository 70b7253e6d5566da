"""Reader for the user's own data (the `folder` config): JSON-lines manifests next to the images.

Each `{split}.jsonl` in the manual directory becomes a split. One line per example, paths relative
to the manifest:

  {"id": "cat-hat-0",                       # optional; defaults to "{split}-{line number}"
   "target": "images/0.jpg",
   "refs": ["refs/cat.png", "refs/hat.png"],
   "caption": "a cat wearing a hat",
   "masks": ["masks/0_cat.png", null],       # optional, per reference: its subject in the target
   "mask": "masks/0.png",                    # optional alternative: one mask for every reference
   "coords": [{"dift": "coord/dift/0_ref0.pt", "geoaware": "coord/geoaware/0_ref0.pt"}, null]}

Coordinate files use the released format ([4096, 2] or [64, 64, 2] (y, x) cells; `.pt` needs torch,
`.npy` does not). A missing mask or coordinate file behaves as in the released data (full mask / no
pairs) and is counted; a bad line, a missing or corrupt image is skipped and counted. Each line is
checked before any file is read: a line that is not JSON, lacks `target` or `refs` (or a `coords`
entry's `dift`/`geoaware`), has a value of the wrong type (`"refs": "a.png"`, `"target": null`,
`"coords": [[1, 2]]`) or lists masks/coords that do not pair up with its refs is skipped and counted
under its reason with `manifest:line` and the offending key.
"""

from __future__ import annotations

import glob
import io
import json
import os
from typing import Iterator

from PIL import Image

from mosaic_jax.data import build_report, schema
from mosaic_jax.data.image_ops import encode_png, to_rgb


def manifest_splits(manual_dir: str) -> dict[str, str]:
  manifests = sorted(glob.glob(os.path.join(manual_dir, "*.jsonl")))
  if not manifests:
    raise FileNotFoundError(
        f"no *.jsonl manifest in {manual_dir}: write one line per example, e.g. train.jsonl with "
        '{"target": ..., "refs": [...], "caption": ...}')
  return {os.path.splitext(os.path.basename(path))[0]: path for path in manifests}


def _read_image(path: str, missing_reason: str, source: str) -> bytes:
  """Original bytes when they are RGB PNG/JPEG (no re-encoding loss); otherwise an RGB PNG."""
  if not os.path.exists(path):
    raise build_report.SkipExample(missing_reason, f"{source}: {path} does not exist")
  with open(path, "rb") as handle:
    data = handle.read()
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except Exception as error:
    raise build_report.SkipExample(build_report.CORRUPT_IMAGE, f"{source}: {path}: {error}") from error
  if image.mode == "RGB" and image.format in ("PNG", "JPEG"):
    return data
  return encode_png(to_rgb(image))


def _read_mask(path: str | None, source: str) -> bytes | None:
  if path is None or not os.path.exists(path):
    return None
  try:
    return encode_png(Image.open(path).convert("L"))
  except Exception as error:
    raise build_report.SkipExample(build_report.CORRUPT_MASK, f"{source}: {path}: {error}") from error


_JSON_TYPES = {type(None): "null", str: "a string", list: "a list", dict: "an object", bool: "a boolean",
               int: "a number", float: "a number"}


def _type_name(value) -> str:
  return _JSON_TYPES.get(type(value), type(value).__name__)


def _is_path(value) -> bool:
  return isinstance(value, str) and bool(value)


def check_line(entry, where: str) -> None:
  """Raises SkipExample naming the key and what was expected when a manifest line is malformed."""
  def fail(reason, message):
    raise build_report.SkipExample(reason, f"{where}: {message}")

  if not isinstance(entry, dict):
    fail(build_report.MANIFEST_WRONG_TYPE, f"a line must be a JSON object, got {_type_name(entry)}")
  for key in ("target", "refs"):
    if key not in entry:
      fail(build_report.MANIFEST_MISSING_KEY, f"no '{key}'")
  if not _is_path(entry["target"]):
    fail(build_report.MANIFEST_WRONG_TYPE, f"'target' must be a path, got {_type_name(entry['target'])}")
  refs = entry["refs"]
  if not isinstance(refs, list) or not all(_is_path(path) for path in refs):
    shown = _type_name(refs) if not isinstance(refs, list) else "a list holding " + ", ".join(
        sorted({_type_name(path) for path in refs if not _is_path(path)}))
    fail(build_report.MANIFEST_WRONG_TYPE, f"'refs' must be a list of paths, got {shown}")
  if not refs:
    fail(build_report.MANIFEST_WRONG_LENGTH, "'refs' is empty")
  for key in ("caption", "mask"):
    if entry.get(key) is not None and not isinstance(entry[key], str):
      fail(build_report.MANIFEST_WRONG_TYPE, f"'{key}' must be a string, got {_type_name(entry[key])}")
  if "id" in entry and (isinstance(entry["id"], bool) or not isinstance(entry["id"], (str, int))):
    fail(build_report.MANIFEST_WRONG_TYPE, f"'id' must be a string or an integer, got {_type_name(entry['id'])}")
  for key, wanted in (("masks", "a path or null"), ("coords", '{"dift": path, "geoaware": path} or null')):
    values = entry.get(key)
    if values is None:
      continue
    if not isinstance(values, list):
      fail(build_report.MANIFEST_WRONG_TYPE, f"'{key}' must be a list (one per ref), got {_type_name(values)}")
    if len(values) != len(refs):
      fail(build_report.MANIFEST_WRONG_LENGTH, f"{len(refs)} refs but {len(values)} '{key}'")
    for index, value in enumerate(values):
      if value is None or (key == "masks" and _is_path(value)):
        continue
      if key == "masks" or not isinstance(value, dict):
        fail(build_report.MANIFEST_WRONG_TYPE, f"'{key}'[{index}] must be {wanted}, got {_type_name(value)}")
      for matcher in ("dift", "geoaware"):
        if matcher not in value:
          fail(build_report.MANIFEST_MISSING_KEY, f"'coords'[{index}] has no '{matcher}'")
        if not _is_path(value[matcher]):
          fail(build_report.MANIFEST_WRONG_TYPE,
               f"'coords'[{index}]['{matcher}'] must be a path, got {_type_name(value[matcher])}")


def convert_line(entry: dict, base_dir: str, source: str, report: build_report.BuildReport) -> dict:
  """One checked manifest line (see check_line) -> stored example."""
  def resolve(path):
    return None if path is None else os.path.join(base_dir, path)

  refs_paths = entry["refs"]
  masks = entry.get("masks") or [entry.get("mask")] * len(refs_paths)
  coords = entry.get("coords") or [None] * len(refs_paths)
  target = _read_image(resolve(entry["target"]), build_report.MISSING_IMAGE, source)
  refs, notes = [], []
  for index, path in enumerate(refs_paths):
    image = _read_image(resolve(path), build_report.MISSING_REFERENCE, source)
    mask = _read_mask(resolve(masks[index]), source)
    if mask is None:
      notes.append((build_report.MISSING_MASK, f"{source}: ref {index}"))
    pair = None
    if coords[index] is not None:
      pair = schema.load_coordinate_pair(resolve(coords[index]["dift"]),
                                         resolve(coords[index]["geoaware"]))
    if pair is None:
      notes.append((build_report.MISSING_COORDS, f"{source}: ref {index}"))
    refs.append(schema.reference(image, mask, pair))
  for reason, detail in notes:  # counted only once the example is known to be kept
    report.count(reason, detail)
  return schema.example(str(entry.get("id", source)), str(entry.get("caption", "")), target, refs)


def read_examples(manifest_path: str, split: str, report: build_report.BuildReport
                  ) -> Iterator[dict]:
  base_dir = os.path.dirname(os.path.abspath(manifest_path))
  with open(manifest_path, encoding="utf-8") as handle:
    for line_number, line in enumerate(handle, start=1):
      if not line.strip():
        continue
      source = f"{split}-{line_number}"
      try:
        entry = json.loads(line)
        check_line(entry, f"{manifest_path}:{line_number}")
        yield convert_line(entry, base_dir, source, report)
      except json.JSONDecodeError as error:
        report.count(build_report.BAD_MANIFEST_LINE, f"{manifest_path}:{line_number}: {error}")
      except build_report.SkipExample as skip:
        report.count(skip.reason, skip.detail)
