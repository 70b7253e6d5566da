"""Small datasets written by the data tests: the released layout with planted pairs, tiny synthetic
builds, and a user folder. Built once per session (module-level cache) and shared by test modules."""

from __future__ import annotations

import atexit
import hashlib
import io
import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

_CACHE: dict[str, object] = {}
_ROOT = tempfile.mkdtemp(prefix="mosaic_data_tests_")
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)

# Planted correspondence design on 4x4 blocks of the 64x64 grids (so that the bilinear resize to
# 32 or 16 cells reproduces the block values exactly).
DISAGREE_BLOCKS = {(2, 3), (5, 5), (10, 1)}  # DIFT and GeoAware differ here
DUPLICATE_ROW = 8  # blocks (8, 0..5) all match one reference cell: only the first target token stays


def block_outside_mask(bi: int, bj: int) -> bool:
  return bj >= 12 or (bi, bj) == (0, 0)


def planted_reference_cell(bi: int, bj: int) -> tuple[int, int]:
  if bi == DUPLICATE_ROW and bj <= 5:
    return 44, 8
  return 4 * ((bi + 3) % 16), 4 * (15 - bj)


def planted_grids() -> tuple[np.ndarray, np.ndarray]:
  dift = np.zeros((64, 64, 2), np.int64)
  for bi in range(16):
    for bj in range(16):
      dift[4 * bi:4 * bi + 4, 4 * bj:4 * bj + 4] = planted_reference_cell(bi, bj)
  geoaware = dift.copy()
  for bi, bj in DISAGREE_BLOCKS:
    geoaware[4 * bi:4 * bi + 4, 4 * bj:4 * bj + 4, 0] = (dift[4 * bi, 4 * bj, 0] + 4) % 64
  return dift, geoaware


def planted_mask() -> np.ndarray:
  mask = np.full((512, 512), 255, np.uint8)
  for bi in range(16):
    for bj in range(16):
      if block_outside_mask(bi, bj):
        mask[32 * bi:32 * bi + 32, 32 * bj:32 * bj + 32] = 0
  return mask


def expected_planted_pairs(grid: int, use_mask: bool = True) -> set[tuple[int, int]]:
  """(reference token, target token) by the rule, written out on the planted blocks."""
  pairs, seen = set(), set()
  for target_token in range(grid * grid):
    row, col = divmod(target_token, grid)
    bi, bj = row * 16 // grid, col * 16 // grid
    if (bi, bj) in DISAGREE_BLOCKS or (use_mask and block_outside_mask(bi, bj)):
      continue
    y, x = planted_reference_cell(bi, bj)
    ref_token = (y * grid // 64) * grid + x * grid // 64
    if ref_token not in seen:
      seen.add(ref_token)
      pairs.add((ref_token, target_token))
  return pairs


def official_uid(item: str, caption: str, diptych: Image.Image) -> str:
  buffer = io.BytesIO()
  diptych.crop((8, 8, 520, 520)).save(buffer, format="PNG")
  short = hashlib.sha256(buffer.getvalue()).hexdigest()[:8]
  return hashlib.sha256(f"{item}_{caption}_{short}".encode("utf-8")).hexdigest()


def _diptych(seed: int) -> Image.Image:
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, size=(11, 22, 3), dtype=np.uint8)
  return Image.fromarray(small).resize((1056, 528), Image.BILINEAR)


def _jpeg(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def released_layout() -> dict:
  """Writes the released layout once; returns {dir, uids by case, expected counts}."""
  if "released" in _CACHE:
    return _CACHE["released"]
  import pyarrow as pa
  import pyarrow.parquet as pq
  import torch

  root = os.path.join(_ROOT, "released")
  for sub in ("data", "mask", "coord/dift", "coord/geoaware"):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  good_quality = {"compositeStructure": 5, "objectConsistency": 5, "imageQuality": 5}
  cases = [  # (case, collection, quality)
      ("planted", "collection_2", good_quality),
      ("missing_mask", "collection_2", good_quality),
      ("missing_coords", "collection_2", good_quality),
      ("corrupt_image", "collection_2", good_quality),
      ("wrong_shape", "collection_2", good_quality),
      ("out_of_range", "collection_2", good_quality),
      ("other_collection", "collection_1", good_quality),
      ("low_quality", "collection_2", {**good_quality, "objectConsistency": 4}),
      ("no_quality", "collection_2", None),
  ]
  dift, geoaware = planted_grids()

  def save_pt(array, path):
    torch.save(torch.from_numpy(np.asarray(array).reshape(-1, 2)).long(), path)

  rows, uids = [], {}
  for index, (case, collection, quality) in enumerate(cases):
    item, caption = f"item {index}", f"a photo of item {index}"
    image = _diptych(index)
    data = b"\xff\xd8 not a jpeg" if case == "corrupt_image" else _jpeg(image)
    rows.append({
        "image": {"bytes": data, "path": f"{index}.jpg"},
        "description": {"item": item, "description_0": caption, "description_1": "ref caption",
                        "category": "test"},
        "collection": collection,
        "quality_assessment": quality,
    })
    if case == "corrupt_image":
      continue
    # the uid of the decoded JPEG, as the converter will see it
    uid = official_uid(item, caption, Image.open(io.BytesIO(data)))
    uids[case] = uid
    if case != "missing_mask":
      Image.fromarray(planted_mask()).save(os.path.join(root, "mask", f"{uid}.png"))
    if case == "missing_coords":
      continue
    dift_case = dift
    if case == "wrong_shape":
      dift_case = np.zeros((100, 2), np.int64)
    if case == "out_of_range":
      dift_case = dift.copy()
      dift_case[0, 0] = (70, 3)
    save_pt(dift_case, os.path.join(root, "coord", "dift", f"{uid}_ref0.pt"))
    save_pt(geoaware, os.path.join(root, "coord", "geoaware", f"{uid}_ref0.pt"))
  table = pa.Table.from_pylist(rows)
  # two shards, to exercise the shard loop
  pq.write_table(table.slice(0, 4), os.path.join(root, "data", "train-00000.parquet"))
  pq.write_table(table.slice(4), os.path.join(root, "data", "train-00001.parquet"))
  result = {"dir": root, "uids": uids}
  _CACHE["released"] = result
  return result


def build(config, manual_dir: str | None = None) -> tuple[str, str, dict]:
  """Builds a config (name or SemalignMsConfig) once; returns (data_dir, printed report, metadata)."""
  import tensorflow_datasets as tfds
  from mosaic_jax.data.semalign_ms import SemalignMs

  name = config if isinstance(config, str) else config.name
  key = f"build/{name}"
  if key not in _CACHE:
    data_dir = os.path.join(_ROOT, "tfds", name)
    builder = SemalignMs(config=config, data_dir=data_dir)
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    import contextlib
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      builder.download_and_prepare(download_config=download_config)
    _CACHE[key] = (data_dir, printed.getvalue(), dict(builder.info.metadata))
  return _CACHE[key]


def tiny_synthetic():
  """12 train / 4 validation scenes at 128 px with 1..4 references."""
  from mosaic_jax.data.semalign_ms import SemalignMsConfig
  return build(SemalignMsConfig(name="synthetic_tiny", source="synthetic", image_size=128,
                                max_refs=4, num_train=12, num_validation=4, seed=3))


# Malformed manifest lines appended to write_folder's train.jsonl (lines 7...): (line, reason, message).
# Each names files that exist, so only the line's own shape can make it skip.
_GOOD_COORDS = {"dift": "coords/dift.npy", "geoaware": "coords/geoaware.npy"}
MALFORMED_FOLDER_LINES = [
    ({"target": "images/a.png", "refs": ["refs/b0.png"], "coords": [{"geoaware": "coords/geoaware.npy"}]},
     "skipped_manifest_line_missing_key", "'coords'[0] has no 'dift'"),
    ({"refs": ["refs/b0.png"], "caption": "no target"}, "skipped_manifest_line_missing_key", "no 'target'"),
    ({"target": "images/a.png", "refs": ["refs/b0.png"], "coords": [[1, 2]]},
     "skipped_manifest_line_wrong_type", "'coords'[0] must be {\"dift\": path, \"geoaware\": path} or null, got a list"),
    ({"target": None, "refs": ["refs/b0.png"]}, "skipped_manifest_line_wrong_type", "'target' must be a path, got null"),
    ({"target": "images/a.png", "refs": "refs/b0.png"},
     "skipped_manifest_line_wrong_type", "'refs' must be a list of paths, got a string"),
    ([{"target": "images/a.png", "refs": ["refs/b0.png"]}],
     "skipped_manifest_line_wrong_type", "a line must be a JSON object, got a list"),
    ({"target": "images/a.png", "refs": ["refs/b0.png", "refs/a0.png"], "coords": [_GOOD_COORDS]},
     "skipped_manifest_line_wrong_length", "2 refs but 1 'coords'"),
    ({"target": "images/a.png", "refs": []}, "skipped_manifest_line_wrong_length", "'refs' is empty"),
]


def write_folder() -> str:
  """A user folder: good multi-reference lines plus planted bad input."""
  if "folder" in _CACHE:
    return _CACHE["folder"]
  root = os.path.join(_ROOT, "folder")
  for sub in ("images", "refs", "masks", "coords"):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  rng = np.random.default_rng(7)

  def image(path, size=(96, 96), mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4}[mode]
    Image.fromarray(rng.integers(0, 256, (*size, channels), dtype=np.uint8), mode).save(
        os.path.join(root, path))
    return path

  dift, geoaware = planted_grids()
  np.save(os.path.join(root, "coords", "dift.npy"), dift.reshape(-1, 2))
  np.save(os.path.join(root, "coords", "geoaware.npy"), geoaware.reshape(-1, 2))
  Image.fromarray(planted_mask()).save(os.path.join(root, "masks", "m.png"))
  with open(os.path.join(root, "images", "corrupt.png"), "wb") as handle:
    handle.write(b"\x89PNG\r\n\x1a\n garbage")
  coords = {"dift": "coords/dift.npy", "geoaware": "coords/geoaware.npy"}
  lines = [
      {"id": "two", "target": image("images/a.png"), "refs": [image("refs/a0.png", mode="RGBA"),
                                                              image("refs/a1.jpg", (64, 80))],
       "caption": "two things", "masks": ["masks/m.png", None], "coords": [coords, None]},
      {"id": "one", "target": image("images/b.jpg"), "refs": [image("refs/b0.png")],
       "caption": "one thing", "mask": "masks/missing.png", "coords": [coords]},
      {"id": "missing_ref", "target": "images/a.png", "refs": ["refs/nope.png"], "caption": "x"},
      {"id": "corrupt", "target": "images/corrupt.png", "refs": ["refs/b0.png"], "caption": "x"},
      "this line is not json",
      {"id": "three", "target": "images/a.png", "refs": ["refs/a0.png", "refs/b0.png", "refs/a1.jpg"],
       "caption": "three things"},
  ] + [line for line, _, _ in MALFORMED_FOLDER_LINES]
  with open(os.path.join(root, "train.jsonl"), "w", encoding="utf-8") as handle:
    for line in lines:
      handle.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
  _CACHE["folder"] = root
  return root


# ---- a released layout of many pairs, for the composed config (subjects200k_multi) -------------------

# Each good pair's grids plant an affine field, one symmetry of the square per pair: target cell (i, j)
# matches reference cell SYMMETRIES[k % 8](i, j), both matchers alike. Composed coordinates can then be
# predicted from a pair's provenance alone, and a coordinate carried from the wrong pair or through the
# wrong placement shows.
SYMMETRIES = [
    lambda i, j: (i, j), lambda i, j: (j, i), lambda i, j: (63 - i, j), lambda i, j: (i, 63 - j),
    lambda i, j: (63 - i, 63 - j), lambda i, j: (j, 63 - i), lambda i, j: (63 - j, i), lambda i, j: (63 - j, 63 - i),
]
MULTI_GOOD_PAIRS = 28
# Rows that cannot be composed, after the good ones: (case, the build report reason that counts it).
MULTI_BAD_ROWS = [
    ("missing_mask", "skipped_pair_missing_mask"),
    ("missing_coords", "skipped_pair_missing_coords"),
    ("empty_mask", "skipped_pair_empty_mask"),
    ("speck_mask", "skipped_pair_too_few_token_pairs"),
    ("corrupt_image", "skipped_corrupt_image"),
    ("other_collection", "filtered_by_official_rule"),
]


def symmetry_grid(k: int) -> np.ndarray:
  i, j = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
  y, x = SYMMETRIES[k % 8](i, j)
  return np.stack([y, x], axis=-1).astype(np.uint8)


def ellipse_mask(rng: np.random.Generator, size: int = 512) -> np.ndarray:
  """A subject blob covering about 8 to 25% of the crop, somewhere near the middle."""
  ry, rx = rng.uniform(0.16, 0.3, 2) * size
  cy, cx = rng.uniform(0.35, 0.65, 2) * size
  y, x = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
  return ((((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2) < 1).astype(np.uint8) * 255


def _flat_diptych_png(rng: np.random.Generator) -> bytes:
  """A 1056x528 diptych of a few flat rectangles, as PNG: cheap to decode and re-encode (the composer
  encodes every image it writes), and each crop still unique."""
  image = np.full((528, 1056, 3), rng.integers(0, 256, 3), np.uint8)
  for _ in range(6):
    top, left = rng.integers(0, 480), rng.integers(0, 1000)
    image[top:top + rng.integers(20, 200), left:left + rng.integers(20, 300)] = rng.integers(0, 256, 3)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def released_multi_layout() -> dict:
  """Writes MULTI_GOOD_PAIRS composable pairs (items "thing 0"...; pairs 4 and 5 share an item name up to
  case) and the MULTI_BAD_ROWS once; returns {dir, pairs: {uid: {k, item, caption, mask, grid, diptych,
  shard, row}}, bad: {case: uid}}."""
  if "released_multi" in _CACHE:
    return _CACHE["released_multi"]
  import pyarrow as pa
  import pyarrow.parquet as pq
  import torch

  root = os.path.join(_ROOT, "released_multi")
  for sub in ("shards/a", "shards/b", "mask", "coord/dift", "coord/geoaware"):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  quality = {"compositeStructure": 9, "objectConsistency": 8, "imageQuality": 7}
  rng = np.random.default_rng(11)
  rows, pairs, bad = [], {}, {}
  cases = [("good", k) for k in range(MULTI_GOOD_PAIRS)] + [(case, None) for case, _ in MULTI_BAD_ROWS]
  half = len(cases) // 2  # two shards in two folders, to exercise relative shard paths
  for index, (case, k) in enumerate(cases):
    item = {4: "Mug", 5: "mug"}.get(k, f"thing {index}")
    caption = f"The {item} on a table in a sunny room."
    data = b"\xff\xd8 not a jpeg" if case == "corrupt_image" else _flat_diptych_png(rng)
    rows.append({"image": {"bytes": data, "path": f"{index}.jpg"},
                 "description": {"item": item, "description_0": caption, "description_1": "elsewhere"},
                 "collection": "collection_1" if case == "other_collection" else "collection_2",
                 "quality_assessment": quality})
    if case == "corrupt_image":
      continue
    uid = official_uid(item, caption, Image.open(io.BytesIO(data)))
    mask = ellipse_mask(rng)
    if case == "empty_mask":
      mask[:] = 0
    if case == "speck_mask":  # 3x3 px: no token of a 32x32 grid samples it
      mask[:] = 0
      mask[260:263, 260:263] = 255
    if case != "missing_mask":
      Image.fromarray(mask).save(os.path.join(root, "mask", f"{uid}.png"))
    grid = symmetry_grid(k if k is not None else index)
    if case != "missing_coords":
      for matcher in ("dift", "geoaware"):
        torch.save(torch.from_numpy(grid.reshape(-1, 2).astype(np.int64)),
                   os.path.join(root, "coord", matcher, f"{uid}_ref0.pt"))
    if case == "good":
      pairs[uid] = {"k": k, "item": item, "caption": caption, "mask": mask > 127, "grid": grid, "diptych": data,
                    "shard": "shards/a/train-00000.parquet" if index < half else "shards/b/train-00001.parquet",
                    "row": index if index < half else index - half}
    else:
      bad[case] = uid
  table = pa.Table.from_pylist(rows)
  pq.write_table(table.slice(0, half), os.path.join(root, "shards", "a", "train-00000.parquet"))
  pq.write_table(table.slice(half), os.path.join(root, "shards", "b", "train-00001.parquet"))
  result = {"dir": root, "pairs": pairs, "bad": bad}
  _CACHE["released_multi"] = result
  return result
