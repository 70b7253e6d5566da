"""Attention heatmaps: each reference's map tints the image where it looks, in its own colour."""

from __future__ import annotations

import numpy as np
import pytest

from mosaic_jax.evaluation import heatmaps


def planted_maps():
  """Two references on a 4x4 target: the first looks at the top-left token, the second at the bottom-right."""
  maps = np.full((2, 16), 1e-3, np.float32)
  maps[0, 0] = 1.0
  maps[1, 15] = 1.0
  return maps


def test_each_reference_tints_where_it_looks():
  image = np.full((64, 64, 3), 128, np.uint8)
  out = heatmaps.attention_overlay(image, planted_maps(), (4, 4), alpha=0.6)
  colours = np.asarray(heatmaps.COLOURS[:2], np.float32)
  top_left, bottom_right, other = out[4, 4].astype(np.float32), out[60, 60].astype(np.float32), out[4, 60]
  # Near a reference's token the pixel moves 60% toward that reference's colour, not the other's.
  np.testing.assert_allclose(top_left, 0.4 * 128 + 0.6 * colours[0], atol=2)
  np.testing.assert_allclose(bottom_right, 0.4 * 128 + 0.6 * colours[1], atol=2)
  np.testing.assert_allclose(other, 128, atol=1)  # nobody looks at the top-right corner
  alone = heatmaps.attention_overlay(image, planted_maps(), (4, 4), only=1)
  np.testing.assert_allclose(alone[4, 4], 128, atol=1)
  np.testing.assert_array_equal(alone[60, 60], out[60, 60])


def test_maps_from_attention_maps_and_panel_shape():
  rng = np.random.default_rng(0)
  maps = rng.random((1, 3, 2, 5, 16)).astype(np.float32)  # [B, layers, R, M, N]
  a = heatmaps.reference_attention_from_maps(maps)
  np.testing.assert_allclose(a[0, 1, 7], maps[0, :, 1, :, 7].mean(), rtol=1e-6)
  panel = heatmaps.attention_panel(np.zeros((32, 32, 3), np.uint8), a[0], (4, 4),
                                   reference_images=[np.zeros((16, 16, 3), np.uint8)] * 2, tile=64)
  assert panel.shape == (128, 4 * 64, 3)
  with pytest.raises(ValueError, match=r"expected \[R, 16\] for a 4x4"):
    heatmaps.attention_overlay(np.zeros((8, 8, 3), np.uint8), np.ones((2, 15)), (4, 4))
