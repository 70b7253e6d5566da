"""Token correspondences from stored 64x64 matcher grids, by the official SemAlign-MS rule.

Every reference of a stored example carries two coordinate grids (`coord_dift`, `coord_geoaware`,
uint8 [64, 64, 2]): for each cell (row-major) of a 64x64 grid over the *target*, the (y, x) cell of a
64x64 grid over the *reference* that matches it; and a target mask (the subject's pixels in the
target). For a training resolution with target token grid G (target_size // 16) and reference token
grid G_r (reference_size // 16) the official loader derives token pairs as follows, and so do we,
bit for bit (tests compare against PyTorch). 16 px per token is FLUX's; other autoencoders (the demo's
pixel autoencoder) give other token sizes (`token_grid(size, token_pixels)`), and the rule is the same:

1. both coordinate grids are resized from 64x64 to GxG with PyTorch's bilinear interpolation
   (`align_corners=False`, float32) and truncated to integers (`.long()`);
2. a target token is kept where the two resized grids agree and the mask, resized to the target size
   with PIL nearest (torchvision `Resize(int)`), thresholded at > 0.5, then resized to GxG with
   PyTorch's legacy nearest rule, is set;
3. the kept reference coordinates map to reference tokens by `(c * G_r) // 64`, token = y * G_r + x;
4. each reference token keeps only the first (lowest) target token that maps to it.

Token index = row * grid + col everywhere. `pack_pairs` turns the per-reference pairs into the
fixed-shape arrays the trainer jits over.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

COORD_GRID = 64  # the released matchers' grid (1024 px images with 16 px patches)
TOKEN_PIXELS = 16  # FLUX: VAE /8 then 2x2 packing


def token_grid(image_size: int, token_pixels: int = TOKEN_PIXELS) -> int:
  """Token grid side for a square image of `token_pixels` px per token: 512 px -> 32 with FLUX's 16.

  token_pixels is twice the autoencoder's downsample factor (2x2 latent patches form a token).
  """
  if token_pixels < 1 or image_size % token_pixels:
    raise ValueError(f"image size {image_size} must be a multiple of {token_pixels} px (one token).")
  return image_size // token_pixels


def _fma32(a, b, c) -> np.ndarray:
  """float32 fused multiply-add: the product of two float32 is exact in float64, rounded once."""
  return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(np.float32)


def _linear_source(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """PyTorch's source index and lambda (`area_pixel_compute_source_index`, float32, fused as built)."""
  scale = np.float32(in_size) / np.float32(out_size)
  half_shifted = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
  src = _fma32(scale, half_shifted, np.float32(-0.5))
  src = np.maximum(src, np.float32(0.0))
  index0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  lam = np.clip(src - index0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
  index1 = np.minimum(index0 + 1, in_size - 1)
  return index0, index1, lam


def resize_coordinate_grid(coords: np.ndarray, size: int) -> np.ndarray:
  """[64, 64, 2] integer grid -> [size, size, 2] int64, as `F.interpolate(bilinear).long()`.

  For size <= 64 (token grids up to 1024 px) PyTorch's CPU kernel is the channels-last one (the
  official `reshape(1, 64, 64, 2).permute(0, 3, 1, 2)` tensor is channels-last); its float32 rounding,
  fused multiply-adds included, is reproduced exactly (tested against torch). Larger grids use plain
  float32 bilinear weights, which can differ from PyTorch's generic kernel in rare truncation ties.
  """
  coords = np.asarray(coords)
  grid_h, grid_w = coords.shape[:2]
  if (grid_h, grid_w) == (size, size):
    return coords.astype(np.int64)
  values = coords.astype(np.float32)
  one = np.float32(1)
  h0, h1, h_lam = _linear_source(grid_h, size)
  w0, w1, w_lam = _linear_source(grid_w, size)
  v00, v01 = values[h0][:, w0], values[h0][:, w1]
  v10, v11 = values[h1][:, w0], values[h1][:, w1]
  weight = lambda hw, ww: np.broadcast_to((hw[:, None] * ww[None, :])[..., None], v00.shape)
  w00, w01 = weight(one - h_lam, one - w_lam), weight(one - h_lam, w_lam)
  w10, w11 = weight(h_lam, one - w_lam), weight(h_lam, w_lam)
  if size <= 64:
    out = _fma32(v11, w11, _fma32(v10, w10, _fma32(v00, w00, v01 * w01)))
  else:
    out = ((v00 * w00 + v01 * w01) + v10 * w10) + v11 * w11
  return np.trunc(out).astype(np.int64)


def _torchvision_int_resize_shape(height: int, width: int, size: int) -> tuple[int, int]:
  """torchvision `Resize(size: int)`: the short side becomes `size`, the long side scales (int)."""
  if height <= width:
    return size, int(size * width / height)
  return int(size * height / width), size


def _nearest_source(in_size: int, out_size: int) -> np.ndarray:
  """PyTorch's legacy `nearest` index rule."""
  if in_size == out_size:
    return np.arange(out_size)
  if out_size == 2 * in_size:
    return np.arange(out_size) >> 1
  scale = np.float32(in_size) / np.float32(out_size)
  index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(index, in_size - 1)


def mask_token_cells(mask: np.ndarray, target_size: int, grid: int) -> np.ndarray:
  """Target mask (uint8 [H, W] or [H, W, 1], 0..255) -> bool [grid, grid], as the official loader."""
  mask = np.asarray(mask)
  if mask.ndim == 3:
    mask = mask[..., 0]
  height, width = mask.shape
  new_h, new_w = _torchvision_int_resize_shape(height, width, target_size)
  if (new_h, new_w) != (height, width):
    mask = np.asarray(Image.fromarray(mask).resize((new_w, new_h), Image.NEAREST))
  binary = mask > 127.5  # ToTensor() / 255 > 0.5
  rows = _nearest_source(new_h, grid)
  cols = _nearest_source(new_w, grid)
  return binary[rows][:, cols]


def derive_token_pairs(
    coord_dift: np.ndarray,
    coord_geoaware: np.ndarray,
    mask_cells: np.ndarray,
    reference_grid: int,
    reference_token_of_cells: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Official pair rule for one reference.

  Args:
    coord_dift, coord_geoaware: [64, 64, 2] (y, x) reference cells per target cell.
    mask_cells: bool [G, G], target tokens inside the subject mask (see `mask_token_cells`).
    reference_grid: G_r, reference token grid side.
    reference_token_of_cells: maps [P, 2] reference 64-grid cells to reference token indices when the
      reference image was transformed (padding to a square); default: the official `(c * G_r) // 64`.

  Returns:
    (reference_tokens, target_tokens), int32 [P] each, ordered by target token.
  """
  grid = mask_cells.shape[0]
  dift = resize_coordinate_grid(coord_dift, grid).reshape(-1, 2)
  geoaware = resize_coordinate_grid(coord_geoaware, grid).reshape(-1, 2)
  keep = np.all(dift == geoaware, axis=1) & mask_cells.reshape(-1)
  target_tokens = np.nonzero(keep)[0]
  if reference_token_of_cells is None:
    ref_cells = (dift[target_tokens] * reference_grid) // COORD_GRID
    ref_tokens = ref_cells[:, 0] * reference_grid + ref_cells[:, 1]
  else:
    ref_tokens = np.asarray(reference_token_of_cells(dift[target_tokens]), np.int64)
  # First target token per reference token: np.unique's first-occurrence indices, re-sorted by target.
  _, first = np.unique(ref_tokens, return_index=True)
  first = np.sort(first)
  return ref_tokens[first].astype(np.int32), target_tokens[first].astype(np.int32)


def pack_pairs(
    per_reference: list[tuple[np.ndarray, np.ndarray]],
    max_pairs: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
  """Concatenate the pairs of all references into fixed [max_pairs] arrays with a validity mask.

  When a sample has more than `max_pairs` pairs, a uniform subset (drawn from `rng`, so it is
  reproducible) is kept; SCAL is a mean over pairs, so the subset is an unbiased estimate.
  """
  refs = [np.full(len(r), index, np.int32) for index, (r, _) in enumerate(per_reference)]
  pair_ref = np.concatenate(refs) if refs else np.zeros(0, np.int32)
  ref_tok = np.concatenate([r for r, _ in per_reference]) if refs else np.zeros(0, np.int32)
  tgt_tok = np.concatenate([t for _, t in per_reference]) if refs else np.zeros(0, np.int32)
  total = len(pair_ref)
  if total > max_pairs:
    chosen = np.sort(rng.choice(total, size=max_pairs, replace=False))
    pair_ref, ref_tok, tgt_tok = pair_ref[chosen], ref_tok[chosen], tgt_tok[chosen]
  count = len(pair_ref)
  out = {
      "pair_ref": np.zeros(max_pairs, np.int32),
      "pair_ref_token": np.zeros(max_pairs, np.int32),
      "pair_target_token": np.zeros(max_pairs, np.int32),
      "pair_valid": np.zeros(max_pairs, bool),
  }
  out["pair_ref"][:count] = pair_ref
  out["pair_ref_token"][:count] = ref_tok
  out["pair_target_token"][:count] = tgt_tok
  out["pair_valid"][:count] = True
  return out
