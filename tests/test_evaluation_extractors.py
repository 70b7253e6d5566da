"""CLIP and DINO feature extractors and the protocol preprocessing against transformers in PyTorch."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from evaluation_fixtures import CLIP_IMAGE_SIZE, DINO_RESIZE, tiny_clip, tiny_dino  # noqa: F401
from test_encoders_text import assert_close

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mosaic_jax.evaluation import preprocess  # noqa: E402
from mosaic_jax.evaluation.clip_model import load_clip_model  # noqa: E402
from mosaic_jax.evaluation.dino import load_dino  # noqa: E402
from mosaic_jax.interop.tensor_table import CheckpointError  # noqa: E402
from mosaic_jax.text import load_clip_tokenizer, token_ids  # noqa: E402

PROMPTS = ["a cat and a backpack in the jungle", "a red teapot on a wooden table"]


def random_images(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]


def to_torch(pixels):  # [B, H, W, 3] -> NCHW
  return torch.from_numpy(np.ascontiguousarray(np.stack(pixels).transpose(0, 3, 1, 2)))


def test_clip_preprocessing_equals_transformers_processor(tiny_clip):
  _, folder = tiny_clip
  processor = transformers.CLIPImageProcessor(size={"shortest_edge": CLIP_IMAGE_SIZE},
                                              crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE})
  # Odd and even margins, portrait and landscape, and an RGBA image.
  images = random_images([(45, 61), (70, 33), (32, 32), (51, 40)]) + [
      Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 47, 4), dtype=np.uint8), "RGBA")]
  for image in images:
    ref = processor(images=image.convert("RGB"), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = preprocess.clip_pixels(image, CLIP_IMAGE_SIZE)
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def torchvision_like_dino(image, resize, crop):
  """DreamBench's Resize(resize, BICUBIC) + CenterCrop(crop) + ToTensor + Normalize, written out here."""
  image = image.convert("RGB")
  w, h = image.size
  short, long = min(w, h), max(w, h)
  long_new = int(resize * long / short)
  image = image.resize((resize, long_new) if w <= h else (long_new, resize), resample=3)
  w, h = image.size
  top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
  array = np.asarray(image)[top:top + crop, left:left + crop].astype(np.float64) / 255
  return ((array - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).astype(np.float32)


def test_dino_preprocessing_equals_the_torchvision_pipeline():
  for image in random_images([(300, 400), (517, 256), (256, 256), (259, 300)], seed=2):
    np.testing.assert_allclose(preprocess.dino_pixels(image), torchvision_like_dino(image, 256, 224), atol=1e-6)
  # torchvision rounds the crop offset: a 3-pixel margin starts at 2 (floor would give 1).
  image = random_images([(40, 51)], seed=3)[0]
  ours = preprocess.dino_pixels(image, DINO_RESIZE, 32)
  np.testing.assert_allclose(ours, torchvision_like_dino(image, DINO_RESIZE, 32), atol=1e-6)


def test_clip_embeddings_match_transformers(tiny_clip):
  model, folder = tiny_clip
  ours = load_clip_model(folder)
  assert ours.config.projection_dim == 24 and ours.config.vision.image_size == CLIP_IMAGE_SIZE
  pixels = [preprocess.clip_pixels(im, CLIP_IMAGE_SIZE) for im in random_images([(40, 50), (64, 32), (33, 33)])]
  tokenizer = load_clip_tokenizer(folder)
  ids = token_ids(tokenizer, PROMPTS, 77)
  with torch.no_grad():
    ref_image = model.visual_projection(model.vision_model(pixel_values=to_torch(pixels)).pooler_output)
    ref_text = model.text_projection(model.text_model(input_ids=torch.from_numpy(ids).long()).pooler_output)
  assert_close(jax.jit(ours.embed_images)(np.stack(pixels)), ref_image.numpy(), "CLIP image embeddings")
  assert_close(jax.jit(ours.embed_texts)(ids), ref_text.numpy(), "CLIP text embeddings")


@pytest.mark.parametrize("eps", [1e-6, 1e-12])
def test_dino_features_match_transformers(tiny_dino, eps):
  model, folder = tiny_dino
  ours = load_dino(folder, layer_norm_eps=eps)
  assert ours.config.layer_norm_eps == eps
  pixels = np.stack([preprocess.dino_pixels(im, DINO_RESIZE, 32) for im in random_images([(40, 50), (60, 37)])])
  reference = transformers.ViTModel(transformers.ViTConfig(**{**model.config.to_dict(), "layer_norm_eps": eps}))
  reference.load_state_dict(model.state_dict())
  with torch.no_grad():
    ref = reference.eval()(pixel_values=to_torch(pixels)).last_hidden_state[:, 0]
  assert_close(jax.jit(ours.embed_images)(pixels), ref.numpy(), f"DINO class token (eps {eps})")


def test_loaders_refuse_the_wrong_folder(tiny_clip, tiny_dino, tmp_path):
  with pytest.raises(CheckpointError, match="expected 'vit'"):
    load_dino(tiny_clip[1])
  with pytest.raises(CheckpointError, match="CLIPModel config"):
    load_clip_model(tiny_dino[1])
  broken = tmp_path / "dino"
  broken.mkdir()
  config = json.load(open(os.path.join(tiny_dino[1], "config.json")))
  (broken / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
  os.symlink(os.path.join(tiny_dino[1], "model.safetensors"), broken / "model.safetensors")
  with pytest.raises(CheckpointError, match="encoder.layer.2.attention.attention.query.weight"):
    load_dino(str(broken))
