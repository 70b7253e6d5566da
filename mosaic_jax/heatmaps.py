"""Per-reference attention over the target, drawn over the generated image: one colour per reference.

Input: a_r(j), reference r's attention over the target tokens j (the attention A averaged over r's
tokens: `aux["attention_statistics"].reference_attention` [B, R, N] from `forward(...,
correspondences=...)`, or `reference_attention_from_maps` of `return_attention_maps`), for one sample:
[R, N], N = h * w target tokens in row-major order. This module draws; it imports nothing of the
package, so that images.py (the trainer's sheets) and the sampler's driver both stand above it.

How a map tints. a_r is a distribution over the N tokens: a reference that looks everywhere alike
gives each token 1/N. The tint's strength at a token is how far its share rises above that even
share, full at FULL_TINT_RATIO times it: s_r(j) = clip((N a_r(j) - 1) / (FULL_TINT_RATIO - 1), 0, 1).
So a reference that spreads its attention leaves the image as it is, and one that looks at a subject
paints it in its colour, on the same scale for every map and every model (a map scaled to its own
maximum tints a nearly even map everywhere, which reads as the plain image with a colour cast). The
strengths are enlarged to the image bilinearly and each pixel moves toward the colour by alpha * s;
where maps overlap, the colours mix in proportion to their strengths and the largest strength counts.
Two subjects that merge show as one mixed-colour blob; a reference that is lost leaves no tint.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Distinct colours (Okabe-Ito, then a few more) for up to 10 references.
COLOURS = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
           (204, 121, 167), (120, 120, 120), (160, 60, 200), (60, 200, 60))
FULL_TINT_RATIO = 4.0  # a token holding this many times the even share 1/N is tinted fully
PANEL_ALPHA = 0.8  # the panel's tint at full strength: a pixel moves 80% of the way to the colour


def reference_attention_from_maps(attention_maps) -> np.ndarray:
  """`aux["attention_maps"]` [B, layers, R, M, N] -> a_r(j) [B, R, N] (mean over blocks and r's tokens)."""
  maps = np.asarray(attention_maps, np.float32)
  return maps.mean(axis=(1, 3))


def tint_strengths(reference_attention, grid_hw: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
  """float32 [R, H, W] in [0, 1]: each map's tint strength (module docstring) enlarged to size (W, H)."""
  maps = np.asarray(reference_attention, np.float32)
  h, w = grid_hw
  if maps.ndim != 2 or maps.shape[1] != h * w:
    raise ValueError(f"reference attention of shape {maps.shape}: expected [R, {h * w}] for a {h}x{w} target grid.")
  if len(maps) > len(COLOURS):
    raise ValueError(f"{len(maps)} references: at most {len(COLOURS)} colours are defined.")
  shares = maps / np.maximum(maps.sum(axis=1, keepdims=True), 1e-12)
  strengths = np.clip((h * w * shares - 1) / (FULL_TINT_RATIO - 1), 0, 1)
  return np.stack([np.asarray(Image.fromarray(s.reshape(h, w)).resize(size, Image.BILINEAR)) for s in strengths])


def attention_overlay(image, reference_attention, grid_hw: tuple[int, int], alpha: float = 0.6,
                      only: int | None = None) -> np.ndarray:
  """uint8 [H, W, 3]: the image tinted by every reference's map (or by reference `only`'s alone)."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"image of shape {image.shape}: expected [H, W, 3].")
  strengths = tint_strengths(reference_attention, grid_hw, (image.shape[1], image.shape[0]))
  colours = np.asarray(COLOURS[:len(strengths)], np.float32)
  if only is not None:
    strengths = strengths[only:only + 1]
    colours = colours[only:only + 1]
  weights = strengths.sum(axis=0)
  colour = np.einsum("rhw,rc->hwc", strengths, colours) / np.maximum(weights, 1e-6)[..., None]
  tint = alpha * strengths.max(axis=0)[..., None]
  return np.round((1 - tint) * image.astype(np.float32) + tint * colour).clip(0, 255).astype(np.uint8)


def attention_panel(image, reference_attention, grid_hw: tuple[int, int],
                    reference_images: Sequence | None = None, tile: int = 128) -> np.ndarray:
  """uint8 panel of tile x tile pictures. Top row (when given): each reference framed in its colour,
  above its own heatmap. Bottom row: the image as it is, all references' overlay, then each reference's
  overlay alone. The legend: along the bottom of the overlay of all, every reference's colour with its
  number; along the bottom of each reference's overlay, its colour with "ref <number>"."""
  def fit(array):
    return Image.fromarray(np.asarray(array)).resize((tile, tile), Image.NEAREST if np.asarray(array).shape[0] < tile
                                                     else Image.BILINEAR)

  num_refs = np.asarray(reference_attention).shape[0]
  overlay = lambda only=None: attention_overlay(image, reference_attention, grid_hw, PANEL_ALPHA, only)
  tiles = [fit(image), fit(overlay())] + [fit(overlay(r)) for r in range(num_refs)]
  rows = 2 if reference_images is not None else 1
  panel = Image.new("RGB", (len(tiles) * tile, rows * tile), "white")
  draw = ImageDraw.Draw(panel)
  if reference_images is not None:
    for r, ref in enumerate(reference_images):
      x = (2 + r) * tile
      panel.paste(fit(ref), (x, 0))
      draw.rectangle([x, 0, x + tile - 1, tile - 1], outline=COLOURS[r], width=max(2, tile // 32))
  y = (rows - 1) * tile
  for i, t in enumerate(tiles):
    panel.paste(t, (i * tile, y))
  _legend(draw, tile, y + tile, num_refs)
  return np.asarray(panel)


def _legend(draw: ImageDraw.ImageDraw, tile: int, bottom: int, num_refs: int) -> None:
  """The legend bars along the bottom edge (y = bottom) of the overlay tiles (panel columns 1, 2, ...)."""
  height = max(10, tile // 9)
  font = ImageFont.load_default(size=max(8, height - 3))
  top = bottom - height

  def label(box, colour, text):
    draw.rectangle(box, fill=colour)
    ink = (0, 0, 0) if sum(c * w for c, w in zip(colour, (0.299, 0.587, 0.114))) > 140 else (255, 255, 255)
    left, top_, right, bottom_ = draw.textbbox((0, 0), text, font=font)  # centred in the box
    draw.text(((box[0] + box[2] + 1 - right - left) / 2, (box[1] + box[3] + 1 - bottom_ - top_) / 2), text,
              fill=ink, font=font)

  width = tile / num_refs
  for r in range(num_refs):  # the overlay of all: every colour, numbered
    label([round(tile + r * width), top, round(tile + (r + 1) * width) - 1, bottom - 1], COLOURS[r], str(r + 1))
  for r in range(num_refs):  # each reference's own overlay
    x = (2 + r) * tile
    label([x, top, x + tile - 1, bottom - 1], COLOURS[r], f"ref {r + 1}")
