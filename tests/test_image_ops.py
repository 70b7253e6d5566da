"""Reference preprocessing (`image_ops.pad_to_square_on_white`) against the official rule.

The official `process_image` crops to the non-white box, scales both sides by one factor
f = size * 0.9 / long_side, truncating each side, (int(w * f), int(h * f)), Lanczos-resizes and pastes
centred on white. The expected images below are built from that rule directly with PIL.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mosaic_jax.data import image_ops

SIZE = 512
MARGIN = (7, 11)  # white around the subject on the left and top: the crop must remove it


def official_size(width, height, size=SIZE, fill=0.9):
  factor = size * fill / max(width, height)
  return int(width * factor), int(height * factor)


def subject_on_white(width, height, seed=0):
  """A textured, nowhere-white width x height subject on a larger white canvas."""
  pixels = np.random.default_rng(seed).integers(0, 200, (height, width, 3), dtype=np.uint8)
  subject = Image.fromarray(pixels)
  canvas = Image.new("RGB", (width + MARGIN[0] + 5, height + MARGIN[1] + 3), (255, 255, 255))
  canvas.paste(subject, MARGIN)
  return canvas, subject


@pytest.mark.parametrize("width,height", [(300, 299), (1000, 999), (999, 1000), (123, 457), (457, 123),
                                          (256, 256)])
def test_matches_the_official_rule(width, height):
  image, subject = subject_on_white(width, height)
  new_w, new_h = official_size(width, height)
  expected = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
  expected.paste(subject.resize((new_w, new_h), Image.LANCZOS), ((SIZE - new_w) // 2, (SIZE - new_h) // 2))

  square, _ = image_ops.pad_to_square_on_white(image, SIZE)
  np.testing.assert_array_equal(np.asarray(square), np.asarray(expected))


def test_the_issue_s_example_is_460_by_459():
  image, _ = subject_on_white(300, 299)
  square, _ = image_ops.pad_to_square_on_white(image, SIZE)
  rows, cols = np.nonzero(np.any(np.asarray(square) < 255, axis=-1))
  assert (cols.max() - cols.min() + 1, rows.max() - rows.min() + 1) == (460, 459)


@pytest.mark.parametrize("width,height", [(300, 299), (123, 457), (999, 1000)])
def test_pixel_transform_maps_the_subject_onto_its_pasted_box(width, height):
  """The transform the training pipeline moves correspondences with: the subject's corners (continuous
  pixel coordinates in the uncropped image) land on the corners of the pasted box."""
  image, _ = subject_on_white(width, height)
  _, transform = image_ops.pad_to_square_on_white(image, SIZE)
  new_w, new_h = official_size(width, height)
  left, top = (SIZE - new_w) // 2, (SIZE - new_h) // 2
  y, x = transform.apply(np.array([MARGIN[1], MARGIN[1] + height], float),
                         np.array([MARGIN[0], MARGIN[0] + width], float))
  np.testing.assert_allclose(y, [top, top + new_h], atol=1e-9)
  np.testing.assert_allclose(x, [left, left + new_w], atol=1e-9)
