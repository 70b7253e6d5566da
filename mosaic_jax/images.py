"""Pictures: model latents to uint8 images, the panels that show them, and PNG files.

One rounding rule for every picture this project writes: `to_uint8` maps [-1, 1] to [0, 255] as
round((clip(x, -1, 1) + 1) * 127.5), to the nearest integer (halves to even), so an image read from
uint8 and mapped to [-1, 1] comes back unchanged (truncation would lose 1 on about half the values).
The decodes are jitted: one compile per latent shape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image

from mosaic_jax.heatmaps import attention_panel
from mosaic_jax.model.latents import unpack_latents


def to_uint8(images):
  """Images in [-1, 1] (numpy or jax, inside jit too) -> uint8 in [0, 255], rounded to nearest."""
  xp = jnp if isinstance(images, jax.Array) else np
  return xp.round((xp.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(xp.uint8)


@jax.jit
def decode_latents(autoencoder, latents):
  """Model latents NHWC [B, h, w, C] (what the DiT sees) -> uint8 images [B, H, W, 3]."""
  return to_uint8(autoencoder.decode_model_latents(latents))


@functools.partial(jax.jit, static_argnames=("latent_height", "latent_width"))
def decode_tokens(autoencoder, tokens, latent_height: int, latent_width: int):
  """Packed latent tokens [B, N, C] (the sampler's output) -> uint8 images [B, H, W, 3]."""
  return decode_latents(autoencoder, unpack_latents(tokens, latent_height, latent_width))


def side_by_side(images, gap: int = 8) -> Image.Image:
  """A white panel holding the PIL images left to right, each scaled to the tallest height."""
  height = max(i.height for i in images)
  scaled = [i if i.height == height else i.resize((max(1, round(i.width * height / i.height)), height),
                                                  Image.LANCZOS) for i in images]
  panel = Image.new("RGB", (sum(i.width for i in scaled) + gap * (len(scaled) - 1), height), "white")
  x = 0
  for image in scaled:
    panel.paste(image, (x, 0))
    x += image.width + gap
  return panel


def sample_panel(autoencoder, batch, generated_tokens, max_rows: int = 4, min_tile: int = 128) -> np.ndarray:
  """uint8 [rows * S, (R + 2) * S, 3]: per example of a training batch its references, the sample, then
  the real target (model latents `batch["refs"]` [B, R, h', w', C] and `batch["target"]` [B, h, w, C]).

  Tiles smaller than `min_tile` px (the demo's 32 px images) are enlarged by a whole factor, pixels as
  squares (nearest), so that they can be looked at; S is the enlarged size."""
  rows = [np.concatenate(refs + [generated, real], axis=1)
          for refs, generated, real in _decoded_rows(autoencoder, batch, generated_tokens, max_rows)]
  panel = np.concatenate(rows, axis=0)
  zoom = max(1, -(-min_tile // rows[0].shape[0]))
  return np.repeat(np.repeat(panel, zoom, axis=0), zoom, axis=1)


def attention_sheet(autoencoder, batch, generated_tokens, attention, max_rows: int = 4,
                    tile: int = 128) -> np.ndarray:
  """uint8: per example (at most max_rows, stacked) the heatmap panel (heatmaps.py) of its
  sample and its references' attention over the target a_r(j) [B, R, N] (sampling.denoise's
  record_attention), for the same batch and samples as sample_panel."""
  grid = batch["target"].shape[1] // 2, batch["target"].shape[2] // 2  # 2x2 latent patches per token
  attention = np.asarray(attention)
  return np.concatenate([attention_panel(generated, attention[row], grid, refs, tile=tile)
                         for row, (refs, generated, _) in enumerate(
                             _decoded_rows(autoencoder, batch, generated_tokens, max_rows))], axis=0)


def _decoded_rows(autoencoder, batch, generated_tokens, max_rows: int) -> list:
  """Per example (at most max_rows): ([its references], the sample, the real target) as uint8 images of
  the target's size."""
  target = batch["target"]
  h, w = target.shape[1:3]
  generated = np.asarray(decode_tokens(autoencoder, generated_tokens, h, w))
  real = np.asarray(decode_latents(autoencoder, target))
  refs = np.asarray(batch["refs"])
  size = real.shape[1:3][::-1]
  fit = lambda image: np.asarray(Image.fromarray(image).resize(size))
  return [([fit(ref) for ref in np.asarray(decode_latents(autoencoder, refs[row]))], fit(generated[row]),
           fit(real[row])) for row in range(min(max_rows, target.shape[0]))]


def write_png(path: str, image) -> None:
  """A uint8 [H, W, 3] array or PIL image as a PNG file, local or gs://; its folder is created."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
  with path.open("wb") as f:
    picture.save(f, format="PNG")
