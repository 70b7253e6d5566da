"""Reader for the released SemAlign-MS-Subjects200K layout (the `subjects200k` config; its pairs are also
what `subjects200k_multi` composes, composition.py).

Manual directory:
  **/*.parquet                 Subjects200K shards: `image` (1056x528 diptych; a struct with `bytes`,
                               or raw bytes), `description` (struct or JSON: `item`, `description_0`,
                               `description_1`), `collection`, `quality_assessment` (struct with
                               `compositeStructure`, `objectConsistency`, `imageQuality`)
  mask/{uid}.png               target subject mask
  coord/dift/{uid}_ref0.pt     int [4096, 2] (y, x) reference cell per target cell of a 64x64 grid
  coord/geoaware/{uid}_ref0.pt same, second matcher

Official rules reproduced: keep rows of collection "collection_2" whose three quality scores are all
>= 5; target = crop (8, 8, 520, 520), reference = crop (528, 8, 1040, 520);
uid = sha256(f"{item}_{description_0}_{h}") with h the first 8 hex digits of sha256 of the target
crop saved as PNG by PIL (in the image's decoded mode, as the official loader hashes it); a missing
mask means a full mask, a missing coordinate file means no pairs (both counted in the build report).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import os
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from mosaic_jax.data import build_report, schema
from mosaic_jax.data.image_ops import encode_png, to_rgb

PADDING = 8
CROP_SIZE = 512
TARGET_BOX = (PADDING, PADDING, CROP_SIZE + PADDING, CROP_SIZE + PADDING)
REFERENCE_BOX = (CROP_SIZE + 2 * PADDING, PADDING, 2 * CROP_SIZE + 2 * PADDING, CROP_SIZE + PADDING)
QUALITY_KEYS = ("compositeStructure", "objectConsistency", "imageQuality")


def keep_row(collection, quality) -> bool:
  """The official filter."""
  if collection != "collection_2" or not quality:
    return False
  return all((quality.get(key) or 0) >= 5 for key in QUALITY_KEYS)


def image_hash(image: Image.Image) -> str:
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return hashlib.sha256(buffer.getvalue()).hexdigest()[:8]


def sample_uid(item: str, target_caption: str, target_crop: Image.Image) -> str:
  return hashlib.sha256(f"{item}_{target_caption}_{image_hash(target_crop)}".encode("utf-8")).hexdigest()


def _as_dict(value, what: str) -> dict:
  if isinstance(value, dict):
    return value
  if isinstance(value, str):
    return json.loads(value)
  raise ValueError(f"{what}: expected a struct or JSON string, got {type(value).__name__}")


def _image_bytes(value) -> bytes | None:
  if isinstance(value, dict):
    return value.get("bytes")
  return value


def parquet_files(manual_dir: str) -> list[str]:
  files = sorted(glob.glob(os.path.join(manual_dir, "**", "*.parquet"), recursive=True))
  if not files:
    raise FileNotFoundError(
        f"no *.parquet shards under {manual_dir}: put the Subjects200K parquet files there, with the "
        "SemAlign-MS mask/ and coord/ folders beside them")
  return files


@dataclasses.dataclass
class ReleasedPair:
  """One kept row, decoded: the crops, its official uid, and its mask and coordinates as released (None
  where the file is missing)."""
  uid: str
  item: str
  caption: str  # description_0, the target caption
  target: Image.Image  # the target crop, in the diptych's decoded mode
  reference: Image.Image  # the reference crop, same
  mask: Image.Image | None  # mask/{uid}.png as mode "L"
  coords: tuple[np.ndarray, np.ndarray] | None  # (coord_dift, coord_geoaware), uint8 [64, 64, 2]


def image_bytes(row: dict) -> bytes | None:
  """The row's diptych bytes (an `image` struct with `bytes`, or raw bytes)."""
  return _image_bytes(row["image"])


def diptych_crops(data: bytes | None, source: str) -> tuple[Image.Image, Image.Image]:
  """(target crop, reference crop) of a diptych, in its decoded mode. Raises SkipExample when the bytes
  are empty, cannot be decoded, or the image is too small."""
  if not data:
    raise build_report.SkipExample(build_report.CORRUPT_IMAGE, f"{source}: empty image")
  try:
    diptych = Image.open(io.BytesIO(data))
    diptych.load()
  except Exception as error:
    raise build_report.SkipExample(build_report.CORRUPT_IMAGE, f"{source}: {error}") from error
  if diptych.width < REFERENCE_BOX[2] or diptych.height < REFERENCE_BOX[3]:
    raise build_report.SkipExample(
        build_report.CORRUPT_IMAGE,
        f"{source}: diptych is {diptych.width}x{diptych.height}, expected at least "
        f"{REFERENCE_BOX[2]}x{REFERENCE_BOX[3]}")
  return diptych.crop(TARGET_BOX), diptych.crop(REFERENCE_BOX)


def read_pair(row: dict, manual_dir: str, source: str) -> ReleasedPair:
  """One kept row -> its decoded pair. Raises SkipExample for unusable input (a corrupt image or mask, a
  coordinate file of the wrong shape or values)."""
  description = _as_dict(row["description"], f"{source} description")
  target_crop, reference_crop = diptych_crops(image_bytes(row), source)
  item, caption = str(description["item"]), str(description["description_0"])
  uid = sample_uid(item, caption, target_crop)

  mask_path = os.path.join(manual_dir, "mask", f"{uid}.png")
  mask = None
  if os.path.exists(mask_path):
    try:
      mask = Image.open(mask_path).convert("L")
    except Exception as error:
      raise build_report.SkipExample(build_report.CORRUPT_MASK, f"{mask_path}: {error}") from error
  coords = schema.load_coordinate_pair(
      os.path.join(manual_dir, "coord", "dift", f"{uid}_ref0.pt"),
      os.path.join(manual_dir, "coord", "geoaware", f"{uid}_ref0.pt"))
  return ReleasedPair(uid, item, caption, target_crop, reference_crop, mask, coords)


def convert_row(row: dict, manual_dir: str, source: str) -> dict:
  """One kept row -> stored example (the `subjects200k` config). Raises SkipExample for unusable input."""
  pair = read_pair(row, manual_dir, source)
  mask_png = encode_png(pair.mask) if pair.mask is not None else None
  ref = schema.reference(encode_png(to_rgb(pair.reference)), mask_png, pair.coords)
  return schema.example(pair.uid, pair.caption, encode_png(to_rgb(pair.target)), [ref])


def kept_rows(manual_dir: str, report: build_report.BuildReport,
              include: Callable[[str, int], bool] | None = None) -> Iterator[tuple[str, int, dict]]:
  """(shard path relative to manual_dir, row number in the shard, row) of every row the official filter
  keeps, in shard and row order. Filtered rows are counted. `include(shard, row number)`: only these rows
  are read at all (a split of the rows)."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  for path in parquet_files(manual_dir):
    table = pq.ParquetFile(path)
    shard = os.path.relpath(path, manual_dir)
    rows = (row for batch in table.iter_batches(batch_size=64) for row in batch.to_pylist())
    for row_number, row in enumerate(rows):
      if include is not None and not include(shard, row_number):
        continue
      if not keep_row(row.get("collection"), row.get("quality_assessment")):
        report.count(build_report.FILTERED)
        continue
      yield shard, row_number, row


def read_examples(manual_dir: str, report: build_report.BuildReport) -> Iterator[dict]:
  for shard, row_number, row in kept_rows(manual_dir, report):
    source = f"{os.path.basename(shard)} row {row_number}"
    try:
      example = convert_row(row, manual_dir, source)
    except build_report.SkipExample as skip:
      report.count(skip.reason, skip.detail)
      continue
    ref = example["refs"][0]
    if not ref["has_mask"]:
      report.count(build_report.MISSING_MASK, f"{source}: uid {example['id']}")
    if not ref["has_coords"]:
      report.count(build_report.MISSING_COORDS, f"{source}: uid {example['id']}")
    yield example
