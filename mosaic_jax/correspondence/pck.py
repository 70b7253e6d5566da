"""Correspondence accuracy: PCK@alpha of a matcher's cell grids, on the synthetic scenes and on SPair-71k.

PCK@alpha counts a predicted point as correct when it lies within alpha * (the longer side of the object's
bounding box) of the true point. Matchers see images at 1024 px as 64x64 cells (matching.MATCH_SIZE): a
source point maps to its cell, the cell's best match (argmax of the matcher's similarity over the other
image's cells, matching.match_cells) is the prediction, and its centre is the predicted point.

- Synthetic scenes (data/synthetic.py) know their exact correspondence of every target cell
  (`Scene.coords`); `grid_hits` scores a matched grid against it inside the reference's visible mask, with
  the threshold taken from the reference subject's bounding box, in cells.
- SPair-71k, its released layout: `JPEGImages/{category}/{name}.jpg` and `PairAnnotation/{split}/*.json`
  with `src_imname`, `trg_imname`, `category`, `src_kps`, `trg_kps` ([x, y] per keypoint, pixels) and
  `trg_bndbox` ([x1, y1, x2, y2]); threshold 0.1 * max(box width, box height) of the target box, the
  standard protocol. Images are squashed to 1024x1024 (PIL bicubic, as MOSAIC's matcher prepares them,
  without masks or white removal) and points scaled with them; predictions are scored in the target's own
  pixels. Reported per image (the mean over pairs of each pair's fraction, the figure papers quote) and
  per point.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Callable

import numpy as np
from PIL import Image

from mosaic_jax.correspondence import matching
from mosaic_jax.data.correspondence import COORD_GRID

ALPHA = 0.1


class PckInputError(ValueError):
  """A dataset folder or annotation that is not what the evaluation expects (one line naming it)."""


# ---- the synthetic scenes ------------------------------------------------------------------------

def grid_hits(predicted: np.ndarray, exact: np.ndarray, mask_cells: np.ndarray, reference_box_cells: float,
              alpha: float = ALPHA) -> np.ndarray:
  """bool [K]: for the K target cells inside `mask_cells` (bool [64, 64]), whether the predicted reference
  cell (grid [64, 64, 2], (y, x)) is within alpha * reference_box_cells of the exact one (cell units)."""
  distance = np.linalg.norm(predicted[mask_cells].astype(np.float64) - exact[mask_cells].astype(np.float64), axis=-1)
  return distance <= alpha * reference_box_cells


def box_side_cells(silhouette: np.ndarray) -> float:
  """The longer side of a bool [S, S] silhouette's bounding box, in cells of the 64x64 grid."""
  rows, cols = np.nonzero(silhouette)
  if not len(rows):
    return 0.0
  side = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
  return side * COORD_GRID / silhouette.shape[0]


def mask_cells_64(mask: np.ndarray) -> np.ndarray:
  """A uint8 [S, S] 0/255 target mask -> bool [64, 64]: cells whose centre pixel is inside."""
  size = mask.shape[0]
  centres = ((np.arange(COORD_GRID) + 0.5) * size / COORD_GRID).astype(int)
  return mask[centres][:, centres] > 127


# ---- SPair-71k -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Pair:
  name: str
  category: str
  source: str  # image paths
  target: str
  source_points: np.ndarray  # [K, 2] (x, y) pixels
  target_points: np.ndarray
  target_box: np.ndarray  # [4] x1, y1, x2, y2


def spair_pairs(root: str, split: str = "test", limit: int = 0) -> list[Pair]:
  """The pairs of SPair-71k's `split` (trn, val, test), sorted by file name; `limit` > 0 keeps the first."""
  folder = os.path.join(root, "PairAnnotation", split)
  files = sorted(glob.glob(os.path.join(folder, "*.json")))
  if not files:
    raise PckInputError(f"{folder}: no *.json pair annotation; expected SPair-71k's layout "
                        "(JPEGImages/{category}/*.jpg, PairAnnotation/{trn,val,test}/*.json)")
  pairs = []
  for path in files[:limit or None]:
    try:
      with open(path, encoding="utf-8") as handle:
        note = json.load(handle)
      category = note["category"]
      pair = Pair(os.path.splitext(os.path.basename(path))[0], category,
                  os.path.join(root, "JPEGImages", category, note["src_imname"]),
                  os.path.join(root, "JPEGImages", category, note["trg_imname"]),
                  np.asarray(note["src_kps"], np.float64).reshape(-1, 2),
                  np.asarray(note["trg_kps"], np.float64).reshape(-1, 2),
                  np.asarray(note["trg_bndbox"], np.float64).reshape(4))
    except (OSError, ValueError, KeyError, TypeError) as error:
      raise PckInputError(f"{path}: not an SPair-71k pair annotation ({type(error).__name__}: {error}); expected "
                          "src_imname, trg_imname, category, src_kps, trg_kps, trg_bndbox") from error
    if len(pair.source_points) != len(pair.target_points):
      raise PckInputError(f"{path}: {len(pair.source_points)} src_kps but {len(pair.target_points)} trg_kps")
    pairs.append(pair)
  return pairs


def squashed(path: str) -> tuple[np.ndarray, tuple[int, int]]:
  """An image as the matcher sees it: uint8 [1024, 1024, 3], and its original (width, height)."""
  try:
    with Image.open(path) as image:
      rgb = image.convert("RGB")
  except OSError as error:
    raise PckInputError(f"{path}: cannot read the image ({error})") from error
  return matching.squash(np.asarray(rgb)), rgb.size


def transfer_points(source_features: np.ndarray, target_features: np.ndarray, source_points: np.ndarray,
                    source_size: tuple[int, int], target_size: tuple[int, int], similarity: str) -> np.ndarray:
  """[K, 2] (x, y) source pixels -> predicted (x, y) target pixels: cell -> best target cell -> its centre."""
  grid_h, grid_w = source_features.shape[:2]
  (source_w, source_h), (target_w, target_h) = source_size, target_size
  cols = np.clip((source_points[:, 0] * grid_w / source_w).astype(int), 0, grid_w - 1)
  rows = np.clip((source_points[:, 1] * grid_h / source_h).astype(int), 0, grid_h - 1)
  chosen = source_features[rows, cols][:, None, :]  # [K, 1, D]: a K x 1 "image"
  cells = np.asarray(matching.match_cells(chosen[None], target_features[None], similarity))[0, :, 0]
  target_grid_h, target_grid_w = target_features.shape[:2]
  return np.stack([(cells[:, 1] + 0.5) * target_w / target_grid_w, (cells[:, 0] + 0.5) * target_h / target_grid_h],
                  axis=-1)


def point_hits(predicted: np.ndarray, truth: np.ndarray, box: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
  threshold = alpha * max(box[2] - box[0], box[3] - box[1])
  return np.linalg.norm(predicted - truth, axis=-1) <= threshold


def evaluate_pairs(pairs: list[Pair], image_features: Callable[[np.ndarray], np.ndarray], similarity: str,
                   batch_size: int = 1, progress: Callable | None = None) -> dict:
  """PCK@0.1 of `image_features` (uint8 [N, 1024, 1024, 3] -> [N, 64, 64, D]) over `pairs`.

  Returns {"per_image", "per_point", "pairs", "points", "by_category": {category: per-image PCK}}."""
  per_pair, by_category, points, hits_total = [], {}, 0, 0
  for start in range(0, len(pairs), batch_size):
    batch = pairs[start:start + batch_size]
    loaded = [(squashed(pair.source), squashed(pair.target)) for pair in batch]
    images = np.stack([image for source, target in loaded for image, _ in (source, target)])
    features = np.asarray(image_features(images))
    for index, (pair, ((_, source_size), (_, target_size))) in enumerate(zip(batch, loaded)):
      predicted = transfer_points(features[2 * index], features[2 * index + 1], pair.source_points, source_size,
                                  target_size, similarity)
      hits = point_hits(predicted, pair.target_points, pair.target_box)
      fraction = float(hits.mean()) if len(hits) else 0.0
      per_pair.append(fraction)
      by_category.setdefault(pair.category, []).append(fraction)
      points += len(hits)
      hits_total += int(hits.sum())
    if progress is not None:
      progress(len(batch))
  return {"per_image": float(np.mean(per_pair)) if per_pair else 0.0,
          "per_point": hits_total / points if points else 0.0, "pairs": len(per_pair), "points": points,
          "by_category": {name: float(np.mean(values)) for name, values in sorted(by_category.items())}}
