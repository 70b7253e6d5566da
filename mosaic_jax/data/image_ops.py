"""Image decoding and resizing shared by the dataset builder and the input pipeline.

Resizing follows the official training loader (torchvision `Resize` on PIL images, i.e. PIL's
bilinear filter, which antialiases when it shrinks) and normalizes to [-1, 1] like
`Normalize([0.5], [0.5])`. `pad_to_square_on_white` is the sampling-time reference preprocessing
(docs/method.md, 'Sampling') and returns the pixel transform it applied, so correspondences can follow it.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image


class ImageDecodeError(ValueError):
  """Raised for bytes that PIL cannot decode; the message names what was being decoded."""


def decode_rgb(data: bytes, what: str) -> Image.Image:
  """Decodes image bytes to an RGB PIL image; transparent pixels are composited onto white."""
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except Exception as error:  # PIL raises many types for bad bytes
    raise ImageDecodeError(f"{what}: cannot decode image ({type(error).__name__}: {error})") from error
  return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
  if image.mode == "RGB":
    return image
  if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return image.convert("RGB")


def encode_png(array_or_image) -> bytes:
  image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(
      np.asarray(array_or_image))
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def resize_normalize(image: Image.Image, size: int) -> np.ndarray:
  """PIL image -> float32 [size, size, 3] in [-1, 1] (bilinear, antialiased when shrinking)."""
  if image.size != (size, size):
    image = image.resize((size, size), Image.BILINEAR)
  return np.asarray(image, dtype=np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


@dataclasses.dataclass(frozen=True)
class PixelTransform:
  """new = old * scale + offset, per axis, in continuous pixel coordinates (pixel centres at +0.5)."""
  scale_y: float = 1.0
  scale_x: float = 1.0
  offset_y: float = 0.0
  offset_x: float = 0.0

  def apply(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return y * self.scale_y + self.offset_y, x * self.scale_x + self.offset_x

  def invert(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The old coordinates of new ones (apply's inverse)."""
    return (y - self.offset_y) / self.scale_y, (x - self.offset_x) / self.scale_x


def pad_to_square_on_white(image: Image.Image, size: int,
                           fill_fraction: float = 0.9) -> tuple[Image.Image, PixelTransform]:
  """Sampling preprocessing: crop to the non-white bounding box, Lanczos-resize both sides by one factor
  f = size * fill_fraction / long_side, each truncated (the official `process_image`), paste centred on a
  white size x size square."""
  array = np.asarray(image)
  rows, cols = np.nonzero(np.any(array < 255, axis=-1))
  if len(rows):
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
  else:
    top, bottom, left, right = 0, array.shape[0], 0, array.shape[1]
  crop = image.crop((int(left), int(top), int(right), int(bottom)))
  crop_w, crop_h = crop.size
  # The official order of float operations, so every truncation lands on the same pixel: scaling by
  # int(fill_fraction * size) / long_side instead makes some short sides 1 px smaller (300x299 at 512:
  # 460x458, not 460x459).
  factor = (size * fill_fraction) / max(crop_w, crop_h)
  new_w, new_h = max(1, int(crop_w * factor)), max(1, int(crop_h * factor))
  resized = crop.resize((new_w, new_h), Image.LANCZOS)
  canvas = Image.new("RGB", (size, size), (255, 255, 255))
  paste_x, paste_y = (size - new_w) // 2, (size - new_h) // 2
  canvas.paste(resized, (paste_x, paste_y))
  scale_y, scale_x = new_h / crop_h, new_w / crop_w
  transform = PixelTransform(scale_y=scale_y, scale_x=scale_x,
                             offset_y=paste_y - top * scale_y, offset_x=paste_x - left * scale_x)
  return canvas, transform
