"""The stored SemAlign-MS example (one schema for every config) and helpers that fill it.

Example (TFDS FeaturesDict):
  id:        Text, sample id (the official uid for the released layout)
  caption:   Text, the target caption
  target:    Image [H, W, 3] (PNG, or the user's own JPEG/PNG bytes for `folder`)
  num_refs:  int32, R (also in `metadata.json` per split, for bucketing without reading records)
  refs:      Sequence of R dicts:
    image:          Image [H_r, W_r, 3]
    target_mask:    Image [H, W, 1], this reference's subject in the target (0/255); a 1x1 255
                    placeholder when `has_mask` is False (the official full mask)
    has_mask:       bool
    coord_dift:     uint8 [64, 64, 2], (y, x) reference cell for each target cell (row-major)
    coord_geoaware: uint8 [64, 64, 2], same from the second matcher
    has_coords:     bool; False means the example has no pairs for this reference (official rule)
    provenance:     composed configs only (`subjects200k_multi`; see composition.py), where this
                    reference's subject comes from:
      source_id:        the released pair's uid
      source_row:       its parquet shard (relative to the manual directory) and row
      role:             "scene" (the pair whose target is the composite's background; reference 0) or
                        "pasted"
      stack_order:      0 for the scene, k for the k-th subject pasted (later ones cover earlier ones)
      scale, offset:    float32, float32 [2] (y, x): composite = scale * source + offset, in continuous
                        pixel coordinates of the 512 px target crops (pixel centres at +0.5)
      visible_fraction: float32, the share of the placed mask left visible by later subjects

No pair at a target cell: released grids and `folder` grids may hold any value where the mask excludes
a cell. Composed grids mark every cell without a pair by disagreement, NO_PAIR_DIFT (0, 0) against
NO_PAIR_GEOAWARE (63, 63), as well as by the mask: the loader's bilinear resize (`correspondence.py`)
mixes neighbouring cells, and a token whose footprint puts weight w on such cells has grids 63 * w apart
in both channels, so the agreement rule drops it whenever w >= 1/63 (on token grids that divide 64, as
4, 8, 16 and 32, w is a multiple of 1/4; 64 is not resized); below that its coordinate moves by less
than one cell.

Pairs for any training resolution are derived at load time (see `correspondence.py`).
"""

from __future__ import annotations

import io
import os

import numpy as np
import tensorflow_datasets as tfds

from mosaic_jax.data import build_report
from mosaic_jax.data.correspondence import COORD_GRID
from mosaic_jax.data.image_ops import encode_png

FULL_MASK_PNG = encode_png(np.full((1, 1), 255, np.uint8))
NO_COORDS = np.zeros((COORD_GRID, COORD_GRID, 2), np.uint8)
NO_PAIR_DIFT = (0, 0)
NO_PAIR_GEOAWARE = (COORD_GRID - 1, COORD_GRID - 1)


def features(provenance: bool = False) -> tfds.features.FeaturesDict:
  """The stored example; `provenance` adds each reference's provenance (composed configs only)."""
  refs = {
      "image": tfds.features.Image(shape=(None, None, 3)),
      "target_mask": tfds.features.Image(shape=(None, None, 1)),
      "has_mask": np.bool_,
      "coord_dift": tfds.features.Tensor(shape=(COORD_GRID, COORD_GRID, 2), dtype=np.uint8),
      "coord_geoaware": tfds.features.Tensor(shape=(COORD_GRID, COORD_GRID, 2), dtype=np.uint8),
      "has_coords": np.bool_,
  }
  if provenance:
    refs["provenance"] = tfds.features.FeaturesDict({
        "source_id": tfds.features.Text(),
        "source_row": tfds.features.Text(),
        "role": tfds.features.Text(),
        "stack_order": np.int32,
        "scale": np.float32,
        "offset": tfds.features.Tensor(shape=(2,), dtype=np.float32),
        "visible_fraction": np.float32,
    })
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "caption": tfds.features.Text(),
      "target": tfds.features.Image(shape=(None, None, 3)),
      "num_refs": np.int32,
      "refs": tfds.features.Sequence(refs),
  })


def reference(image_bytes: bytes, mask_png: bytes | None, coords: tuple[np.ndarray, np.ndarray] | None,
              provenance: dict | None = None) -> dict:
  """One stored reference; `None` mask / coords mean missing (official full mask / no pairs)."""
  dift, geoaware = coords if coords is not None else (NO_COORDS, NO_COORDS)
  out = {
      "image": image_bytes,
      "target_mask": mask_png if mask_png is not None else FULL_MASK_PNG,
      "has_mask": mask_png is not None,
      "coord_dift": dift,
      "coord_geoaware": geoaware,
      "has_coords": coords is not None,
  }
  if provenance is not None:
    out["provenance"] = provenance
  return out


def example(example_id: str, caption: str, target_bytes: bytes, refs: list[dict]) -> dict:
  return {"id": example_id, "caption": caption, "target": target_bytes, "num_refs": len(refs),
          "refs": refs}


def validate_coordinates(raw, source: str) -> np.ndarray:
  """Released matcher output ([4096, 2] or [64, 64, 2], integer (y, x) in 0..63) -> uint8 [64, 64, 2].

  Raises SkipExample naming `source` for a wrong shape or out-of-range values.
  """
  array = np.asarray(raw)
  if array.shape not in ((COORD_GRID * COORD_GRID, 2), (COORD_GRID, COORD_GRID, 2)):
    raise build_report.SkipExample(
        build_report.BAD_COORD_SHAPE,
        f"{source}: shape {tuple(array.shape)}, expected ({COORD_GRID * COORD_GRID}, 2) or "
        f"({COORD_GRID}, {COORD_GRID}, 2)")
  if array.dtype.kind == "f":
    if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
      raise build_report.SkipExample(build_report.BAD_COORD_VALUES,
                                     f"{source}: non-integer coordinates")
  if array.size and (array.min() < 0 or array.max() >= COORD_GRID):
    raise build_report.SkipExample(
        build_report.BAD_COORD_VALUES,
        f"{source}: values in [{array.min()}, {array.max()}], expected 0..{COORD_GRID - 1}")
  return array.reshape(COORD_GRID, COORD_GRID, 2).astype(np.uint8)


def load_coordinate_file(path: str) -> np.ndarray:
  """Reads a `.pt` (torch, needed only here) or `.npy` coordinate file, validated."""
  if path.endswith(".npy"):
    try:
      raw = np.load(path, allow_pickle=False)
    except Exception as error:
      raise build_report.SkipExample(build_report.UNREADABLE_COORD, f"{path}: {error}") from error
    return validate_coordinates(raw, path)
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError(
        f"reading the coordinate file {path} (PyTorch format) needs the 'torch' package, which is "
        "not installed: pip install torch (CPU build is enough), or convert the files to .npy"
    ) from error
  try:
    with open(path, "rb") as handle:
      raw = torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=True)
    raw = raw.numpy() if hasattr(raw, "numpy") else np.asarray(raw)
  except Exception as error:
    raise build_report.SkipExample(build_report.UNREADABLE_COORD, f"{path}: {error}") from error
  return validate_coordinates(raw, path)


def load_coordinate_pair(dift_path: str, geoaware_path: str
                         ) -> tuple[np.ndarray, np.ndarray] | None:
  """Both matcher grids, or None when either file is missing (official: no pairs)."""
  if not (os.path.exists(dift_path) and os.path.exists(geoaware_path)):
    return None
  return load_coordinate_file(dift_path), load_coordinate_file(geoaware_path)
