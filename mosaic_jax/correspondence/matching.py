"""MOSAIC's matching rule: how a (target, mask, reference) triple becomes one stored 64x64 coordinate grid.

The released SemAlign-MS correspondences were made by two official scripts
(`preprocess/dift_point_matching.py`, `preprocess/geoaware_point_matching.py`), both reading images through
the `Subjects200K` dataset class built with ref_size = tgt_size = 1024. This module restates their steps on
numpy/PIL (host) and jax (the argmax), so that features from our JAX extractors are matched exactly as the
official features were:

1. Loading: torchvision `Resize(1024, BILINEAR, antialias=True)` (the SHORTER side becomes 1024; on PIL
   images that is PIL's bilinear resize), `ToTensor()` (/255 in float32), `Normalize([0.5], [0.5])`, then
   back to [0, 1] with `(x + 1) / 2`, every step in float32 (so a pixel does not always come back to
   exactly k/255). The mask: `Resize(1024, NEAREST)`, `ToTensor()`, `> 0.5`, uint8 0/1.
2. "feat1", the TARGET: `target * mask` (channel-wise), through torchvision `ToPILImage` (a float array is
   `(x * 255).astype(uint8)`: truncation, not rounding). A mask whose sum is 0 is skipped (no grid).
3. "feat2", the REFERENCE with its white background zeroed, differently per script:
   - DIFT (`dift` slot): in numpy, `a = x * 255` (float32); white where every channel has |a - 255| <= 5;
     `a * keep / 255.0` (float32) goes to ToPILImage.
   - GeoAware (`geoaware` slot): in torch, white where every channel has |x - 1| <= 10/255 (compared in
     float32); `x * keep` goes to ToPILImage.
4. Both images then go through PIL `.resize((1024, 1024))`, PIL's default filter (bicubic; a same-size
   resize is a copy), and into the feature extractor, which yields a 64x64 cell grid.
5. For each target cell (row-major) the argmax over the 4096 reference cells: the DIFT script takes a
   plain dot product of its unnormalized features (`torch.mm`, though named cos_map), the GeoAware script
   L2-normalizes both descriptors first (`desc / (norm + 1e-8)`): cosine. First index wins a tie
   (torch.max and jnp.argmax agree). The grid stores (y, x) of the chosen reference cell.

Our matchers fill the slots (FLUX DiTF features -> `dift`, DINOv2 -> `geoaware`); the preparation is the
slot's script's, the similarity a per-slot setting (`SIMILARITIES`; default cosine for both, see
`DEFAULT_SIMILARITY`). Tested bit for bit against the official functions run on the same images and
feature maps (tests/test_correspondence_matching.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mosaic_jax.data.correspondence import COORD_GRID

MATCH_SIZE = 1024  # the official img_size: both images at 1024 x 1024, 16 px per cell of the 64x64 grid
SLOTS = ("dift", "geoaware")  # the two stored grids (schema.py coord_dift / coord_geoaware), in that order
SIMILARITIES = ("cosine", "dot")
# Cosine for both slots. The GeoAware script is cosine; the DIFT script's raw dot product fitted SD-2.1
# U-Net features, whereas our `dift` slot holds FLUX DiTF features, whose channels (massive activations,
# AdaLN-scaled) make per-cell norms vary widely: a dot product then favours high-norm reference cells over
# similar ones. DiTF and DIFT evaluate with cosine; "dot" stays available to restate the script exactly.
DEFAULT_SIMILARITY = {"dift": "cosine", "geoaware": "cosine"}
COSINE_EPSILON = 1e-8  # the GeoAware script's desc / (norm + 1e-8)


@dataclasses.dataclass(frozen=True)
class WhiteRule:
  """How one official script finds a reference's white background (see the module docstring, step 3)."""
  tolerance: float
  on_255_scale: bool  # DIFT: numpy, |x * 255 - 255| <= 5; GeoAware: torch, |x - 1| <= 10 / 255


WHITE_RULES = {"dift": WhiteRule(tolerance=5.0, on_255_scale=True),
               "geoaware": WhiteRule(tolerance=10 / 255.0, on_255_scale=False)}


def short_side_shape(height: int, width: int, size: int = MATCH_SIZE) -> tuple[int, int]:
  """(height, width) after torchvision `Resize(size)`: the short side becomes `size`, the long side
  `int(size * long / short)` (truncated)."""
  if width <= height:
    return int(size * height / width), size
  return size, int(size * width / height)


def load_image(image: Image.Image, size: int = MATCH_SIZE) -> np.ndarray:
  """RGB PIL image -> float32 [H', W', 3] in [0, 1] as the scripts see it (step 1): short side resized
  bilinearly (no resize when already there), /255, (x - 0.5) / 0.5, then (x + 1) / 2, in float32."""
  height, width = image.height, image.width
  new_h, new_w = short_side_shape(height, width, size)
  if (new_h, new_w) != (height, width):
    image = image.resize((new_w, new_h), Image.BILINEAR)
  pixels = np.asarray(image.convert("RGB"), dtype=np.uint8).astype(np.float32) / np.float32(255)
  normalized = (pixels - np.float32(0.5)) / np.float32(0.5)
  return (normalized + np.float32(1)) / np.float32(2)


def load_mask(mask: Image.Image, shape: tuple[int, int]) -> np.ndarray:
  """Mask (mode L, 0..255) -> uint8 [H', W'] 0/1 at the loaded target's `shape`: nearest resize, /255 > 0.5.

  The official Resize(1024, NEAREST) gives the target's shape whenever mask and target have the same
  aspect; a mask of another aspect (which would not broadcast there) is resized to the target's shape."""
  if (mask.height, mask.width) != tuple(shape):
    mask = mask.resize((shape[1], shape[0]), Image.NEAREST)
  values = np.asarray(mask.convert("L"), dtype=np.uint8).astype(np.float32) / np.float32(255)
  return (values > np.float32(0.5)).astype(np.uint8)


def to_pil_uint8(pixels: np.ndarray) -> np.ndarray:
  """torchvision ToPILImage of a float array: `(x * 255).astype(uint8)` in float32, i.e. truncated."""
  return (np.asarray(pixels, np.float32) * np.float32(255)).astype(np.uint8)


def squash(pixels: np.ndarray, size: int = MATCH_SIZE) -> np.ndarray:
  """`PIL.Image.resize((size, size))` with PIL's default filter (bicubic); unchanged when already square."""
  if pixels.shape[:2] == (size, size):
    return pixels
  return np.asarray(Image.fromarray(pixels).resize((size, size), Image.BICUBIC))


def prepare_target(target: Image.Image, mask: Image.Image | None, size: int = MATCH_SIZE) -> np.ndarray | None:
  """The masked target ("feat1"'s image) as uint8 [size, size, 3]; None when the mask is empty (the scripts
  skip the pair). `mask=None` is the official missing-mask case: a full mask."""
  pixels = load_image(target, size)
  if mask is None:
    binary = np.ones(pixels.shape[:2], np.uint8)
  else:
    binary = load_mask(mask, pixels.shape[:2])
    if not binary.any():
      return None
  return squash(to_pil_uint8(pixels * binary[..., None]), size)


def prepare_reference(reference: Image.Image, slot: str, size: int = MATCH_SIZE) -> np.ndarray:
  """The reference with its white background zeroed by `slot`'s script ("feat2"'s image), uint8 [size, size, 3]."""
  rule = WHITE_RULES[_check_slot(slot)]
  pixels = load_image(reference, size)
  if rule.on_255_scale:
    scaled = pixels * np.float32(255)
    # numpy promotes float32 - int64 to float64 there: an exact difference, compared with the tolerance
    is_white = np.all(np.abs(scaled.astype(np.float64) - 255.0) <= rule.tolerance, axis=-1)
    kept = scaled * (~is_white)[..., None] / np.float32(255.0)
  else:
    is_white = np.all(np.abs(pixels - np.float32(1.0)) <= np.float32(rule.tolerance), axis=-1)
    kept = pixels * (~is_white)[..., None]
  return squash(to_pil_uint8(kept), size)


def _check_slot(slot: str) -> str:
  if slot not in SLOTS:
    raise ValueError(f"matcher slot {slot!r}: expected one of {SLOTS}")
  return slot


def check_similarity(similarity: str) -> str:
  if similarity not in SIMILARITIES:
    raise ValueError(f"similarity {similarity!r}: expected one of {SIMILARITIES}")
  return similarity


def match_cells(target_features: jax.Array, reference_features: jax.Array, similarity: str) -> jax.Array:
  """Per target cell, the best reference cell (step 5): features [B, h, w, D] each -> int32 [B, h, w, 2]
  (y, x). Traceable; float32 with full-precision products whatever the features' dtype."""
  check_similarity(similarity)
  batch, height, width, depth = target_features.shape
  target = jnp.asarray(target_features, jnp.float32).reshape(batch, height * width, depth)
  reference = jnp.asarray(reference_features, jnp.float32).reshape(batch, -1, depth)
  if similarity == "cosine":
    target = target / (jnp.linalg.norm(target, axis=-1, keepdims=True) + COSINE_EPSILON)
    reference = reference / (jnp.linalg.norm(reference, axis=-1, keepdims=True) + COSINE_EPSILON)
  scores = jnp.einsum("bnd,bmd->bnm", target, reference, precision=jax.lax.Precision.HIGHEST)
  best = jnp.argmax(scores, axis=-1).astype(jnp.int32)
  reference_width = reference_features.shape[2]
  return jnp.stack([best // reference_width, best % reference_width], axis=-1).reshape(batch, height, width, 2)


def stored_grid(cells: np.ndarray) -> np.ndarray:
  """A matched grid as stored (schema.py): uint8 [64, 64, 2]."""
  cells = np.asarray(cells)
  if cells.shape != (COORD_GRID, COORD_GRID, 2):
    raise ValueError(f"matched grid of shape {cells.shape}: expected ({COORD_GRID}, {COORD_GRID}, 2); a "
                     f"feature extractor must give a {COORD_GRID}x{COORD_GRID} cell grid at {MATCH_SIZE} px")
  return cells.astype(np.uint8)
