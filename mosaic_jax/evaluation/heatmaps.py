"""Per-reference attention over the target, drawn over the generated image: one colour per reference.

Input: a_r(j), reference r's attention over the target tokens j (DESIGN's A averaged over r's tokens:
`aux["attention_statistics"].reference_attention` [B, R, N] from `forward(..., correspondences=...)`,
or `reference_attention_from_maps` of `return_attention_maps`), for one sample: [R, N], N = h * w
target tokens in row-major order. Each map is scaled to its own maximum (a map shows where that
reference looks, whatever its total mass), enlarged to the image bilinearly, and tinted with the
reference's colour; where maps overlap the colours mix in proportion, and the tint's strength is the
largest scaled map at that pixel. Two subjects that merge show as one mixed-colour blob; a reference
that is lost shows as a faint, spread-out tint.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

# Distinct colours (Okabe-Ito, then a few more) for up to 10 references.
COLOURS = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
           (204, 121, 167), (120, 120, 120), (160, 60, 200), (60, 200, 60))


def reference_attention_from_maps(attention_maps) -> np.ndarray:
  """`aux["attention_maps"]` [B, layers, R, M, N] -> a_r(j) [B, R, N] (mean over blocks and r's tokens)."""
  maps = np.asarray(attention_maps, np.float32)
  return maps.mean(axis=(1, 3))


def _scaled_maps(reference_attention, grid_hw: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
  maps = np.asarray(reference_attention, np.float32)
  h, w = grid_hw
  if maps.ndim != 2 or maps.shape[1] != h * w:
    raise ValueError(f"reference attention of shape {maps.shape}: expected [R, {h * w}] for a {h}x{w} target grid.")
  if len(maps) > len(COLOURS):
    raise ValueError(f"{len(maps)} references: at most {len(COLOURS)} colours are defined.")
  maps = maps / np.maximum(maps.max(axis=1, keepdims=True), 1e-12)
  return np.stack([np.asarray(Image.fromarray(m.reshape(h, w)).resize(size, Image.BILINEAR)) for m in maps])


def attention_overlay(image, reference_attention, grid_hw: tuple[int, int], alpha: float = 0.6,
                      only: int | None = None) -> np.ndarray:
  """uint8 [H, W, 3]: the image tinted by every reference's map (or by reference `only`'s alone)."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"image of shape {image.shape}: expected [H, W, 3].")
  maps = np.clip(_scaled_maps(reference_attention, grid_hw, (image.shape[1], image.shape[0])), 0, 1)
  colours = np.asarray(COLOURS[:len(maps)], np.float32)
  if only is not None:
    maps = maps[only:only + 1]
    colours = colours[only:only + 1]
  weights = maps.sum(axis=0)
  colour = np.einsum("rhw,rc->hwc", maps, colours) / np.maximum(weights, 1e-6)[..., None]
  strength = alpha * maps.max(axis=0)[..., None]
  return np.round((1 - strength) * image.astype(np.float32) + strength * colour).clip(0, 255).astype(np.uint8)


def attention_panel(image, reference_attention, grid_hw: tuple[int, int],
                    reference_images: Sequence | None = None, tile: int = 128) -> np.ndarray:
  """uint8 panel. Top row (when given): each reference framed in its colour. Bottom row: the image, all
  references' overlay, then each reference's overlay alone."""
  def fit(array):
    return Image.fromarray(np.asarray(array)).resize((tile, tile), Image.NEAREST if np.asarray(array).shape[0] < tile
                                                     else Image.BILINEAR)

  num_refs = np.asarray(reference_attention).shape[0]
  tiles = [fit(image), fit(attention_overlay(image, reference_attention, grid_hw))]
  tiles += [fit(attention_overlay(image, reference_attention, grid_hw, only=r)) for r in range(num_refs)]
  width = len(tiles) * tile
  rows = 2 if reference_images is not None else 1
  panel = Image.new("RGB", (width, rows * tile), "white")
  if reference_images is not None:
    draw = ImageDraw.Draw(panel)
    for r, ref in enumerate(reference_images):
      x = (2 + r) * tile
      panel.paste(fit(ref), (x, 0))
      draw.rectangle([x, 0, x + tile - 1, tile - 1], outline=COLOURS[r], width=max(2, tile // 32))
  for i, t in enumerate(tiles):
    panel.paste(t, (i * tile, (rows - 1) * tile))
  return np.asarray(panel)
