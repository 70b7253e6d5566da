"""The protocols' image preprocessing on PIL images, as numpy float32 [S, S, 3] (channels last).

- CLIP (what the model folder's CLIPImageProcessor does): RGB; shortest side to `size` with PIL bicubic
  (the long side int(size * long / short)); center crop `size` with the offset floor((side - size) / 2);
  /255; CLIP mean/std.
- DINO (DreamBench's torchvision pipeline `Resize(256, BICUBIC), CenterCrop(224), ToTensor,
  Normalize(ImageNet)`): shortest side to 256 the same way; center crop 224 with torchvision's offset
  round((side - 224) / 2) (Python rounding, half to even); /255; ImageNet mean/std.

Both resize in uint8 through PIL, as the references do, so results match them exactly.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from mosaic_jax.model.vit import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, normalize_pixels

DINO_RESIZE = 256
DINO_CROP = 224


def resize_shortest_side(image: Image.Image, size: int) -> Image.Image:
  width, height = image.size
  if width <= height:
    new = (size, int(size * height / width))
  else:
    new = (int(size * width / height), size)
  return image.resize(new, Image.BICUBIC)


def center_crop(image: Image.Image, size: int, rounding) -> Image.Image:
  width, height = image.size
  top, left = rounding((height - size) / 2), rounding((width - size) / 2)
  return image.crop((left, top, left + size, top + size))


def clip_pixels(image: Image.Image, size: int = 224) -> np.ndarray:
  image = resize_shortest_side(image.convert("RGB"), size)
  return normalize_pixels(center_crop(image, size, lambda x: int(np.floor(x))), CLIP_MEAN, CLIP_STD)


def dino_pixels(image: Image.Image, resize: int = DINO_RESIZE, crop: int = DINO_CROP) -> np.ndarray:
  image = resize_shortest_side(image.convert("RGB"), resize)
  return normalize_pixels(center_crop(image, crop, lambda x: int(round(x))), IMAGENET_MEAN, IMAGENET_STD)
