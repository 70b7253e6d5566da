"""Images per second of the evaluation's feature extractors on this machine, against transformers (PyTorch).

Shapes of the real models with random weights (nothing is downloaded; cost does not depend on values):
CLIP ViT-B/32 image tower (224 px) and text tower (77 tokens), DINO ViT-S/16 (224 px), float32. Ours is
the jitted JAX tower at a fixed batch (what launch/evaluate.py runs); the baseline is transformers'
CLIPModel / ViTModel in PyTorch on the same inputs. Also: the PIL preprocessing per image (both
protocols), which runs on the host beside the towers.

  python benchmarks/evaluator_throughput.py --batch 32
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from common import best_time

from mosaic_jax.evaluation import preprocess
from mosaic_jax.evaluation.clip_model import text_embeddings
from mosaic_jax.model import clip as clip_text
from mosaic_jax.model import vit

CLIP_B32_TEXT = clip_text.ClipTextConfig(hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                                         eos_token_id=49407)


def torch_baselines(batch: int, repeats: int):
  import torch
  import transformers
  clip = transformers.CLIPModel(transformers.CLIPConfig(
      text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12),
      vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                         image_size=224, patch_size=32), projection_dim=512)).eval()
  dino = transformers.ViTModel(transformers.ViTConfig(
      hidden_size=384, intermediate_size=1536, num_attention_heads=6, num_hidden_layers=12, image_size=224,
      patch_size=16, layer_norm_eps=1e-6), add_pooling_layer=False).eval()
  pixels = torch.randn(batch, 3, 224, 224)
  ids = torch.randint(0, 49000, (batch, 77))

  def timed(fn):
    with torch.no_grad():
      fn()
      best = float("inf")
      for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best

  return {"clip_image": timed(lambda: clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)),
          "clip_text": timed(lambda: clip.text_projection(clip.text_model(input_ids=ids).pooler_output)),
          "dino": timed(lambda: dino(pixel_values=pixels).last_hidden_state[:, 0])}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--no_torch", action="store_true", help="skip the PyTorch baseline")
  args = p.parse_args()
  key = jax.random.key(0)
  clip_cfg, dino_cfg = vit.clip_vit_b32(), vit.dino_vit_s16()
  clip_params, dino_params = vit.init_params(key, clip_cfg), vit.init_params(key, dino_cfg)
  text_params = clip_text.init_params(key, CLIP_B32_TEXT)
  text_params["text_projection"] = {"kernel": jax.random.normal(key, (512, 512)) * 512 ** -0.5}
  pixels = np.random.default_rng(0).standard_normal((args.batch, 224, 224, 3)).astype(np.float32)
  ids = np.random.default_rng(1).integers(0, 49000, (args.batch, 77)).astype(np.int32)
  ours = {
      "clip_image": best_time(jax.jit(lambda p, x: vit.encode_images(p, clip_cfg, x)), clip_params, pixels,
                              repeats=args.repeats),
      "clip_text": best_time(jax.jit(lambda p, x: text_embeddings(p, CLIP_B32_TEXT, x)), text_params, ids,
                             repeats=args.repeats),
      "dino": best_time(jax.jit(lambda p, x: vit.encode_images(p, dino_cfg, x)), dino_params, pixels,
                        repeats=args.repeats),
  }
  baseline = None if args.no_torch else torch_baselines(args.batch, args.repeats)

  from PIL import Image
  images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (512, 512, 3), dtype=np.uint8))
            for i in range(16)]
  start = time.perf_counter()
  for image in images:
    preprocess.clip_pixels(image)
    preprocess.dino_pixels(image)
  per_image = (time.perf_counter() - start) / len(images)

  print(f"{jax.devices()[0].platform} ({len(jax.devices())} devices), batch {args.batch}, float32")
  print(f"{'tower':<26} {'ours (items/s)':>15} {'torch (items/s)':>16} {'ratio':>7}")
  names = {"clip_image": "CLIP ViT-B/32 image 224px", "clip_text": "CLIP ViT-B/32 text 77 tok",
           "dino": "DINO ViT-S/16 224px"}
  for name, seconds in ours.items():
    ref = baseline[name] if baseline else None
    print(f"{names[name]:<26} {args.batch / seconds:>15.1f} "
          f"{(args.batch / ref if ref else float('nan')):>16.1f} {(ref / seconds if ref else float('nan')):>7.2f}")
  print(f"PIL preprocessing (512 px image, CLIP + DINO): {1 / per_image:.1f} images/s on one core")


if __name__ == "__main__":
  main()
