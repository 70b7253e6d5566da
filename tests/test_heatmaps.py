"""Attention heatmaps: each reference's map tints the image where it looks, in its own colour."""

from __future__ import annotations

import numpy as np
import pytest

from mosaic_jax import heatmaps


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


def _colourful_sample(size=32):
  """A sample like the demo's: every pixel a different mix of red, green and blue."""
  y, x = np.mgrid[0:size, 0:size] / (size - 1)
  return np.stack([60 + 140 * x, 70 + 60 * y, 210 - 120 * y * x], axis=-1).round().astype(np.uint8)


def test_the_panel_tints_visibly_where_a_reference_attends_and_has_a_legend():
  grid, tile, per_token = 8, 128, 16  # 8x8 tokens drawn on 128 px tiles: 16 px a token
  shares = np.ones((3, grid, grid), np.float32)
  shares[0, 1:4, 1:4] = 12.0  # reference 1 looks at a subject at the top left, 12x more than elsewhere
  shares[1, 4:7, 4:7] = 12.0  # reference 2 at the bottom right
  shares[2] += np.random.default_rng(0).uniform(-0.1, 0.1, (grid, grid))  # reference 3 is lost: spread evenly
  maps = (shares / shares.sum(axis=(1, 2), keepdims=True)).reshape(3, -1)
  image = _colourful_sample()
  panel = heatmaps.attention_panel(image, maps, (grid, grid), [np.full((16, 16, 3), 200, np.uint8)] * 3, tile=tile)
  bottom = panel[tile:].astype(int)
  plain = bottom[:, :tile]
  np.testing.assert_array_equal(plain, np.repeat(np.repeat(image, 4, 0), 4, 1))  # the sample as it is
  legend = max(10, tile // 9)  # the legend bar's height along the bottom of every overlay tile
  tokens = lambda rows, cols: (slice(rows[0] * per_token, rows[1] * per_token),
                               slice(cols[0] * per_token, cols[1] * per_token))
  for r, (subject, away) in enumerate([((2, 3), (6, 8)), ((5, 6), (0, 2))]):
    change = np.abs(bottom[:, (2 + r) * tile:(3 + r) * tile] - plain).mean(axis=-1)
    # Large at the subject's core token: at full strength the pixel moves 80% toward the colour.
    expected = 0.8 * np.abs(np.asarray(heatmaps.COLOURS[r]) - plain[tokens(subject, subject)]).mean(axis=-1)
    np.testing.assert_allclose(change[tokens(subject, subject)], expected, atol=1.5)
    assert change[tokens(subject, subject)].mean() > 50
    # None two tokens away from it (above the legend bar): there the share is the even one.
    assert change[tokens(away, away)][:-legend].max() <= 1
  # A reference that spreads its attention (within 10% of the even share) leaves the sample almost as it is.
  lost = np.abs(bottom[:-legend, 4 * tile:5 * tile] - plain[:-legend])
  assert lost.max() <= 6 and lost.mean() < 1, (lost.max(), lost.mean())
  # The legend: each reference's own overlay carries a bar of its colour with its name written in it,
  # and the overlay of all a bar holding every colour.
  for r in range(3):
    bar = panel[-legend:, (2 + r) * tile:(3 + r) * tile].reshape(-1, 3)
    is_colour = np.all(bar == heatmaps.COLOURS[r], axis=-1)
    assert 0.5 < is_colour.mean() < 1.0, is_colour.mean()  # the colour, and text on it
  bar = panel[-legend:, tile:2 * tile].reshape(-1, 3)
  assert all(np.all(bar == c, axis=-1).mean() > 0.15 for c in heatmaps.COLOURS[:3])
