"""Pictures (mosaic_jax/images.py): one rounding rule for uint8, the jitted decodes, the panels."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from PIL import Image

from mosaic_jax import images
from mosaic_jax.model import Autoencoder, PixelAutoencoderConfig, pack_latents

PIXEL = Autoencoder("pixel", PixelAutoencoderConfig(patch_size=2, latent_channels=12))


def test_uint8_rounds_to_nearest_and_recovers_every_byte():
  every_byte = np.arange(256, dtype=np.uint8)
  as_float = every_byte.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
  np.testing.assert_array_equal(images.to_uint8(as_float), every_byte)  # truncation loses 1 on some
  # 0.3 of a level above 100 and 0.7 of a level above 100 (in [-1, 1]), and values outside the range.
  probe = np.array([100.3 / 127.5 - 1, 100.7 / 127.5 - 1, -1.5, 1.5], np.float32)
  np.testing.assert_array_equal(images.to_uint8(probe), [100, 101, 0, 255])
  on_device = images.to_uint8(jnp.asarray(probe))
  assert on_device.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(on_device), [100, 101, 0, 255])


def test_decodes_give_back_the_pixels_of_the_exact_autoencoder():
  rng = np.random.default_rng(0)
  pictures = rng.integers(0, 256, (2, 8, 12, 3), dtype=np.uint8)
  latents = PIXEL.encode_to_model_latents(pictures.astype(np.float32) / 127.5 - 1.0)
  np.testing.assert_array_equal(np.asarray(images.decode_latents(PIXEL, latents)), pictures)
  tokens = pack_latents(latents)
  np.testing.assert_array_equal(np.asarray(images.decode_tokens(PIXEL, tokens, 4, 6)), pictures)


def test_sample_panel_lays_out_references_sample_and_target_per_row():
  rng = np.random.default_rng(1)
  to_latents = lambda x: np.asarray(PIXEL.encode_to_model_latents(x.astype(np.float32) / 127.5 - 1.0))
  target = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
  refs = rng.integers(0, 256, (3, 2, 8, 8, 3), dtype=np.uint8)
  generated = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
  batch = {"target": to_latents(target), "refs": np.stack([to_latents(r) for r in refs])}
  panel = images.sample_panel(PIXEL, batch, pack_latents(to_latents(generated)), max_rows=2, min_tile=16)
  assert panel.shape == (2 * 16, 4 * 16, 3) and panel.dtype == np.uint8  # 8 px tiles doubled to 16
  row1 = panel[16:32:2, ::2]  # the second example, undoubled
  for column, expected in enumerate([refs[1, 0], refs[1, 1], generated[1], target[1]]):
    np.testing.assert_array_equal(row1[:, 8 * column:8 * (column + 1)], expected)


def test_side_by_side_scales_to_the_tallest_and_keeps_the_gaps_white():
  small = Image.new("RGB", (10, 20), (255, 0, 0))
  tall = Image.new("RGB", (30, 40), (0, 0, 255))
  panel = images.side_by_side([small, tall], gap=4)
  assert panel.size == (20 + 4 + 30, 40)
  pixels = np.asarray(panel)
  assert (pixels[:, 20:24] == 255).all() and tuple(pixels[0, 0]) == (255, 0, 0)
  assert tuple(pixels[-1, -1]) == (0, 0, 255)
