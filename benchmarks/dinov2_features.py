"""Images per second of DINOv2 patch features (correspondence/dinov2.py) against transformers in PyTorch, and
how far apart the two position-resize rules put the features.

ViT-B/14 at GeoAware's 896 px (a 64x64 grid), block 11's patch tokens, float32: ours is the jitted
`patch_features` (hub rule) at a fixed batch, timed after compiling; the baseline is transformers'
Dinov2Model (its default attention, `output_hidden_states=True`) on the same pixels. Weights are random
of the real shapes (cost does not depend on values) unless --checkpoint names a transformers Dinov2Model
folder (e.g. facebook/dinov2-base): then the rules' distance is the real one. The distance compares the
layer-11 features of one preprocessed picture under "hub" and "transformers": largest and mean absolute
difference, relative L2 distance, and the lowest cosine similarity of a cell's two feature vectors.

  python benchmarks/dinov2_features.py --batch 1
  python benchmarks/dinov2_features.py --checkpoint /ckpt/dinov2-base --no_torch
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from PIL import Image
from common import best_time

from mosaic_jax.correspondence import dinov2


def torch_seconds(model_cfg: dinov2.Dinov2Config, folder: str | None, pixels: np.ndarray, repeats: int) -> float:
  import time

  import torch
  import transformers
  if folder:
    model = transformers.Dinov2Model.from_pretrained(folder)
  else:
    vit = model_cfg.vit
    with torch.device("meta"):  # random weights: skip the (slow) init, values do not change the cost
      model = transformers.Dinov2Model(transformers.Dinov2Config(
          hidden_size=vit.hidden_size, num_hidden_layers=vit.num_hidden_layers,
          num_attention_heads=vit.num_attention_heads, image_size=vit.image_size, patch_size=vit.patch_size))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
      for param in model.parameters():
        param.normal_(0.0, 0.02)
  model.eval()
  x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
  best = float("inf")
  with torch.no_grad():
    model(pixel_values=x, output_hidden_states=True)
    for _ in range(repeats):
      start = time.perf_counter()
      model(pixel_values=x, output_hidden_states=True)
      best = min(best, time.perf_counter() - start)
  return best


def picture(seed: int = 0) -> Image.Image:
  """Blurred noise with structure at several scales (features of a flat picture would be degenerate)."""
  rng = np.random.default_rng(seed)
  layers = [Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)).resize((1024, 1024), Image.BICUBIC)
            for s in (4, 16, 64)]
  return Image.fromarray(np.mean([np.asarray(layer, np.float32) for layer in layers], axis=0).astype(np.uint8))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--checkpoint", help="a transformers Dinov2Model folder (default: random ViT-B/14 weights)")
  p.add_argument("--attention", default="xla", help="attention_impl: xla, cudnn (NVIDIA, needs --bf16) or splash")
  p.add_argument("--query_chunk", type=int, default=0)
  p.add_argument("--bf16", action="store_true", help="weights and activations in bfloat16")
  p.add_argument("--no_torch", action="store_true", help="skip the PyTorch baseline")
  args = p.parse_args()
  dtype = jax.numpy.bfloat16 if args.bf16 else jax.numpy.float32
  if args.checkpoint:
    model = dinov2.load_dinov2(args.checkpoint, dtype=dtype)
  else:
    cfg = dinov2.dinov2_vitb14()
    model = dinov2.Dinov2Model(cfg, dinov2.init_params(jax.random.key(0), cfg, dtype))
  model = model.with_attention(args.attention, args.query_chunk)
  features = jax.jit(dinov2.patch_features, static_argnames=("layer", "positions"))

  one = dinov2.preprocess(picture())[None]
  by_rule = {rule: np.asarray(features(model, one, positions=rule))[0] for rule in dinov2.POSITION_RULES}
  hub, tf = by_rule["hub"], by_rule["transformers"]
  cosine = np.sum(hub * tf, -1) / (np.linalg.norm(hub, axis=-1) * np.linalg.norm(tf, axis=-1))

  pixels = np.repeat(one, args.batch, axis=0)
  ours = best_time(features, model, pixels, repeats=args.repeats)
  baseline = None if args.no_torch or args.bf16 else torch_seconds(model.config, args.checkpoint, pixels,
                                                                   args.repeats)

  device = jax.devices()[0]
  print(f"{device.platform} ({device.device_kind}, {len(jax.devices())} devices), batch {args.batch}, "
        f"{'bfloat16' if args.bf16 else 'float32'}, attention {args.attention} (query_chunk {args.query_chunk}), "
        f"{'weights of ' + args.checkpoint if args.checkpoint else 'random ViT-B/14 weights'}")
  print(f"DINOv2 B/14 896 px, layer 11 (hub rule): ours {args.batch / ours:.3f} images/s"
        + (f", transformers {args.batch / baseline:.3f} images/s, ratio {baseline / ours:.2f}" if baseline else ""))
  print(f"hub vs transformers rule at layer 11: max |diff| {np.max(np.abs(hub - tf)):.3g}, mean |diff| "
        f"{np.mean(np.abs(hub - tf)):.3g}, relative L2 {np.linalg.norm(hub - tf) / np.linalg.norm(tf):.3g}, "
        f"lowest cell cosine {np.min(cosine):.4f} (features: mean |x| {np.mean(np.abs(tf)):.3g})")


if __name__ == "__main__":
  main()
