"""Fills in the missing correspondences of `folder` manifests (data/folder.py): what `launch/match.py` runs.

For every manifest line whose `coords` are absent or null for a reference, both stored grids are made by
MOSAIC's rule (matching.py) with the matchers given (matchers.py; one per slot) and written in the
released layout as `.npy` (readable by numpy and by PyTorch users alike):

  OUT/coord/dift/{id}_ref{k}.npy, OUT/coord/geoaware/{id}_ref{k}.npy   uint8 [64, 64, 2], (y, x)
  OUT/{split}.jsonl   the manifest with those coords filled in, every path rewritten relative to OUT (absolute
                      paths stay absolute) and every line's `id` written out (the default `{split}-{line}` when
                      it had none), so `build_dataset.py --config folder --manual_dir OUT` builds the same
                      examples, now with pairs.

`{id}` is the line's id with characters outside [A-Za-z0-9._-] replaced by "_"; two lines giving the same
name are bad input. Nothing is overwritten: a grid file already there is kept and not recomputed (a run
stopped half way resumes where it stopped; a second run writes nothing), files are written under a temporary
name and linked into place, and an existing OUT/{split}.jsonl that differs from the new one is left alone and
reported (remove it to write the new one). Coordinates the manifest already gives are kept as they are.
A reference whose images cannot be read or whose mask is empty (the official scripts skip those) gets no
grids and keeps `null` coords (no pairs, as in the released data); each is counted and named in the summary,
and so are lines that are not valid manifest lines (copied unchanged).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import tempfile
from typing import Callable

import numpy as np
from PIL import Image

from mosaic_jax.correspondence import matching
from mosaic_jax.data import build_report, folder
from mosaic_jax.data.image_ops import ImageDecodeError, decode_rgb
from mosaic_jax.parallel import distributed

EMPTY_MASK = "skipped_empty_mask"
NO_MATCHER = "not_made_no_matcher_given"
GRID_DIR = "coord"


class MatchInputError(ValueError):
  """Bad input to launch/match.py; the message names the file or line and what was expected."""


@dataclasses.dataclass(frozen=True)
class Reference:
  """One reference of one manifest line that has no coordinates yet."""
  split: str
  line: int
  stem: str
  index: int
  target: str  # absolute paths
  image: str
  mask: str | None

  @property
  def where(self) -> str:
    return f"{self.split}.jsonl:{self.line} ref {self.index}"

  def grid_path(self, slot: str) -> str:
    return os.path.join(GRID_DIR, slot, f"{self.stem}_ref{self.index}.npy")


@dataclasses.dataclass
class Line:
  number: int
  raw: str
  entry: dict | None  # None: not a valid manifest line (copied unchanged)
  stem: str = ""


@dataclasses.dataclass
class Manifest:
  split: str
  path: str
  lines: list[Line]


def file_stem(example_id) -> str:
  return re.sub(r"[^A-Za-z0-9._-]", "_", str(example_id))


def read_manifests(manual_dir: str, report: build_report.BuildReport) -> list[Manifest]:
  """Every `{split}.jsonl` of `manual_dir`, each line checked as the folder builder checks it."""
  try:
    splits = folder.manifest_splits(manual_dir)
  except FileNotFoundError as error:
    raise MatchInputError(str(error)) from error
  manifests, seen = [], {}
  for split, path in splits.items():
    lines = []
    with open(path, encoding="utf-8") as handle:
      for number, raw in enumerate(handle, start=1):
        if not raw.strip():
          continue
        where = f"{path}:{number}"
        try:
          entry = json.loads(raw)
          folder.check_line(entry, where)
        except json.JSONDecodeError as error:
          report.count(build_report.BAD_MANIFEST_LINE, f"{where}: {error}")
          lines.append(Line(number, raw, None))
          continue
        except build_report.SkipExample as skip:
          report.count(skip.reason, skip.detail)
          lines.append(Line(number, raw, None))
          continue
        entry = dict(entry)
        entry.setdefault("id", f"{split}-{number}")  # folder.py's default id, made explicit
        stem = file_stem(entry["id"])
        if stem in seen:
          raise MatchInputError(
              f"{where}: id {entry['id']!r} names its grid files {stem}_ref*.npy, as {seen[stem]} does; give "
              "each line its own id")
        seen[stem] = where
        lines.append(Line(number, raw, entry, stem))
    manifests.append(Manifest(split, path, lines))
  return manifests


def missing_references(manifests: list[Manifest]) -> list[Reference]:
  out = []
  for manifest in manifests:
    base = os.path.dirname(os.path.abspath(manifest.path))
    for line in manifest.lines:
      if line.entry is None:
        continue
      entry = line.entry
      coords = entry.get("coords") or [None] * len(entry["refs"])
      masks = entry.get("masks") or [entry.get("mask")] * len(entry["refs"])
      for index, (ref, given, mask) in enumerate(zip(entry["refs"], coords, masks)):
        if given is None:
          out.append(Reference(manifest.split, line.number, line.stem, index, os.path.join(base, entry["target"]),
                               os.path.join(base, ref), None if mask is None else os.path.join(base, mask)))
  return out


# ---- preparing one reference's pair of images --------------------------------------------------------

class _Skip(Exception):
  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason, self.detail = reason, detail


def _open_rgb(path: str, missing_reason: str, where: str) -> Image.Image:
  if not os.path.exists(path):
    raise _Skip(missing_reason, f"{where}: {path} does not exist")
  with open(path, "rb") as handle:
    data = handle.read()
  try:
    return decode_rgb(data, path)
  except ImageDecodeError as error:
    raise _Skip(build_report.CORRUPT_IMAGE, f"{where}: {error}") from error


def _open_mask(path: str | None, where: str) -> Image.Image | None:
  if path is None or not os.path.exists(path):
    return None  # the official full mask, as the folder builder does
  try:
    with Image.open(path) as image:
      return image.convert("L")
  except Exception as error:  # PIL raises many types for bad bytes
    raise _Skip(build_report.CORRUPT_MASK, f"{where}: {path}: cannot decode mask ({error})") from error


def prepare(reference: Reference, slot: str) -> tuple[np.ndarray, np.ndarray]:
  """(prepared target, prepared reference) for `slot`; raises _Skip naming the file and what is wrong."""
  target = _open_rgb(reference.target, build_report.MISSING_IMAGE, reference.where)
  mask = _open_mask(reference.mask, reference.where)
  image = _open_rgb(reference.image, build_report.MISSING_REFERENCE, reference.where)
  prepared_target = matching.prepare_target(target, mask)
  if prepared_target is None:
    raise _Skip(EMPTY_MASK, f"{reference.where}: {reference.mask} selects no pixel of the target")
  return prepared_target, matching.prepare_reference(image, slot)


# ---- writing without overwriting --------------------------------------------------------------------

def write_new(path: str, data: bytes) -> bool:
  """Writes `data` at `path` unless a file is there (True when written); never a partial file."""
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  handle, temporary = tempfile.mkstemp(dir=directory, prefix=".partial-")
  try:
    with os.fdopen(handle, "wb") as out:
      out.write(data)
    os.link(temporary, path)  # fails, leaving the file there alone, when one exists
    return True
  except FileExistsError:
    return False
  finally:
    os.unlink(temporary)


def npy_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array, allow_pickle=False)
  return buffer.getvalue()


# ---- the run ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Summary:
  report: build_report.BuildReport
  written: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(matching.SLOTS, 0))
  already: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(matching.SLOTS, 0))
  manifests: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> written | unchanged | differs

  def format(self) -> str:
    lines = ["match summary: " + ", ".join(
        f"{slot} grids {self.written[slot]} written, {self.already[slot]} already there" for slot in matching.SLOTS)]
    for reason, number in sorted(self.report.counts.items()):
      lines.append(f"  {reason}: {number}")
      lines.extend(f"    {detail}" for detail in self.report.details.get(reason, []))
    for path, state in self.manifests.items():
      lines.append(f"  manifest {path}: {state}")
    return "\n".join(lines)


def fill(manual_dir: str, out_dir: str, matchers: dict[str, Callable], progress: bool = True,
         max_details: int = 20) -> Summary:
  """Makes the missing grids of every manifest in `manual_dir` and writes the filled manifests into `out_dir`.

  matchers: slot -> a callable returning a MeshMatcher (called only when that slot has grids to make, so a
  finished run loads no weights).
  """
  manual_dir, out_dir = os.path.abspath(manual_dir), os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise MatchInputError(f"--out {out_dir}: a file is there; expected a directory (new or from an earlier run)")
  summary = Summary(build_report.BuildReport("match", max_details=max_details))
  manifests = read_manifests(manual_dir, summary.report)
  references = missing_references(manifests)
  skipped: set[Reference] = set()
  for slot in matching.SLOTS:
    todo = []
    for reference in references:
      if os.path.exists(os.path.join(out_dir, reference.grid_path(slot))):
        summary.already[slot] += 1
      elif reference not in skipped:
        todo.append(reference)
    if not todo:
      continue
    if slot not in matchers:
      summary.report.count(NO_MATCHER, f"{len(todo)} references have no {slot} grid yet (its matcher was not given)")
      continue
    bar = _progress(len(todo), f"{slot} grids", progress)
    runner, ready = None, []
    for reference in todo:
      try:
        ready.append((reference, *prepare(reference, slot)))
      except _Skip as skip:
        skipped.add(reference)
        summary.report.count(skip.reason, skip.detail)
        bar.update(1)
        continue
      if runner is None:  # the weights load only once there is something to match
        runner = matchers[slot]()
      if len(ready) == runner.batch_size:
        _match_and_write(runner, ready, slot, out_dir, summary)
        bar.update(len(ready))
        ready = []
    if ready:
      _match_and_write(runner, ready, slot, out_dir, summary)
      bar.update(len(ready))
    bar.close()
  if distributed.is_leader():
    for manifest in manifests:
      _write_manifest(manifest, out_dir, summary)
  return summary


def _match_and_write(runner, ready: list, slot: str, out_dir: str, summary: Summary) -> None:
  references, targets, images = zip(*ready)
  grids = runner(np.stack(targets), np.stack(images))
  if not distributed.is_leader():
    return
  for reference, grid in zip(references, grids):
    if write_new(os.path.join(out_dir, reference.grid_path(slot)), npy_bytes(grid)):
      summary.written[slot] += 1
    else:
      summary.already[slot] += 1


def _progress(total: int, what: str, enabled: bool):
  import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm.tqdm(total=total, desc=what, unit="ref", disable=not (enabled and distributed.is_leader()))


def _relative(path: str, base: str, out_dir: str) -> str:
  if os.path.isabs(path):
    return path
  return os.path.relpath(os.path.join(base, path), out_dir)


def filled_line(entry: dict, stem: str, base: str, out_dir: str) -> dict:
  """A checked manifest entry with its paths relative to `out_dir` and the grids found there filled in."""
  out = dict(entry)
  out["target"] = _relative(entry["target"], base, out_dir)
  out["refs"] = [_relative(path, base, out_dir) for path in entry["refs"]]
  if entry.get("mask") is not None:
    out["mask"] = _relative(entry["mask"], base, out_dir)
  if entry.get("masks") is not None:
    out["masks"] = [None if path is None else _relative(path, base, out_dir) for path in entry["masks"]]
  coords = list(entry.get("coords") or [None] * len(entry["refs"]))
  for index, given in enumerate(coords):
    if given is not None:
      coords[index] = {slot: _relative(given[slot], base, out_dir) for slot in matching.SLOTS}
      continue
    paths = {slot: os.path.join(GRID_DIR, slot, f"{stem}_ref{index}.npy") for slot in matching.SLOTS}
    if all(os.path.exists(os.path.join(out_dir, path)) for path in paths.values()):
      coords[index] = paths
  if any(value is not None for value in coords) or "coords" in entry:
    out["coords"] = coords
  return out


def _write_manifest(manifest: Manifest, out_dir: str, summary: Summary) -> None:
  base = os.path.dirname(os.path.abspath(manifest.path))
  text = []
  for line in manifest.lines:
    if line.entry is None:
      text.append(line.raw if line.raw.endswith("\n") else line.raw + "\n")
    else:
      text.append(json.dumps(filled_line(line.entry, line.stem, base, out_dir), ensure_ascii=False) + "\n")
  data = "".join(text).encode("utf-8")
  path = os.path.join(out_dir, os.path.basename(manifest.path))
  if write_new(path, data):
    summary.manifests[path] = "written"
  else:
    with open(path, "rb") as handle:
      same = handle.read() == data
    summary.manifests[path] = "unchanged" if same else (
        "exists and differs from this run's result: left as it is (remove it and run again to write the new one)")
