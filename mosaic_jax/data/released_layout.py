"""Reader for the released SemAlign-MS-Subjects200K layout (the `subjects200k` config).

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

import glob
import hashlib
import io
import json
import os
from typing import Iterator

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


def convert_row(row: dict, manual_dir: str, source: str) -> dict:
  """One kept row -> stored example. Raises SkipExample for unusable input."""
  description = _as_dict(row["description"], f"{source} description")
  data = _image_bytes(row["image"])
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
  target_crop = diptych.crop(TARGET_BOX)
  reference_crop = diptych.crop(REFERENCE_BOX)
  item, caption = str(description["item"]), str(description["description_0"])
  uid = sample_uid(item, caption, target_crop)

  mask_path = os.path.join(manual_dir, "mask", f"{uid}.png")
  mask_png = None
  if os.path.exists(mask_path):
    try:
      mask_png = encode_png(Image.open(mask_path).convert("L"))
    except Exception as error:
      raise build_report.SkipExample(build_report.CORRUPT_MASK, f"{mask_path}: {error}") from error
  coords = schema.load_coordinate_pair(
      os.path.join(manual_dir, "coord", "dift", f"{uid}_ref0.pt"),
      os.path.join(manual_dir, "coord", "geoaware", f"{uid}_ref0.pt"))
  ref = schema.reference(encode_png(to_rgb(reference_crop)), mask_png, coords)
  return schema.example(uid, caption, encode_png(to_rgb(target_crop)), [ref])


def read_examples(manual_dir: str, report: build_report.BuildReport) -> Iterator[dict]:
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  for path in parquet_files(manual_dir):
    table = pq.ParquetFile(path)
    row_number = 0
    for batch in table.iter_batches(batch_size=64):
      for row in batch.to_pylist():
        source = f"{os.path.basename(path)} row {row_number}"
        row_number += 1
        if not keep_row(row.get("collection"), row.get("quality_assessment")):
          report.count(build_report.FILTERED)
          continue
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
