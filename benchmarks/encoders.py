"""Per-example cost of FLUX's encoders, and the training input cost with cached vs on-the-fly features.

Random weights (costs do not depend on values). Per example: one caption through T5 (max length
tokens) and CLIP (77 tokens), one image through the VAE encoder. A MOSAIC training example needs
the target and R references encoded plus one caption, so:

  on the fly = VAE(1 + R images) + T5 + CLIP          (what the official loop runs every step)
  cached     = read the stored features of one example (target mean+std, R reference means, T5 states,
               pooled CLIP) from .npy memory maps at a random index, and draw the target sample

The cached side is measured with numpy memory maps standing in for the cached TFDS dataset (the data
pipeline is not in this repository yet); tokenization is left out of both sides.

  python benchmarks/encoders.py                       # small config (CPU-friendly)
  python benchmarks/encoders.py --size flux --batch 8 # FLUX.1 sizes: VAE 512 px, T5-XXL, CLIP-L
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from timing import best_time  # noqa: E402

from mosaic_jax.model import clip, t5, vae  # noqa: E402


def configs(size):
  if size == "flux":
    return vae.VaeConfig(), t5.T5Config(), clip.ClipTextConfig(), 512, 512
  if size == "small":
    return (vae.VaeConfig(block_out_channels=(32, 64, 128, 128), layers_per_block=2),
            t5.T5Config(d_model=256, d_kv=32, d_ff=640, num_layers=4, num_heads=8),
            clip.ClipTextConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                num_attention_heads=4),
            256, 512)
  raise ValueError(size)


def time_per_example(fn, args, batch, repeats):
  """Seconds per example: best of `repeats` calls after one warm-up (compile) call."""
  return best_time(fn, *args, repeats=repeats) / batch


def cached_read_cost(latent_hw, t5_shape, pooled_dim, num_refs, repeats=200):
  """Seconds to read one example's cached features from memory-mapped .npy files and draw the sample."""
  n = 64
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as folder:
    shapes = {"target_mean": (n, *latent_hw, 16), "target_std": (n, *latent_hw, 16),
              "ref_means": (n, num_refs, *latent_hw, 16), "t5": (n, *t5_shape), "pooled": (n, pooled_dim)}
    for name, shape in shapes.items():
      dtype = np.float16 if name == "t5" else np.float32  # T5 states stored in 16 bits (bf16 in practice)
      np.save(os.path.join(folder, name + ".npy"), np.ones(shape, dtype))
    maps = {name: np.load(os.path.join(folder, name + ".npy"), mmap_mode="r") for name in shapes}
    bytes_per_example = sum(m[0].nbytes for m in maps.values())
    start = time.perf_counter()
    for _ in range(repeats):
      i = int(rng.integers(n))
      example = {name: np.array(m[i]) for name, m in maps.items()}
      example["target"] = example["target_mean"] + example["target_std"] * rng.standard_normal(
          example["target_mean"].shape, np.float32)
    return (time.perf_counter() - start) / repeats, bytes_per_example


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", choices=["small", "flux"], default="small")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--refs", type=int, default=1, help="references per training example")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default=None, help="text encoder dtype (default bf16 on GPU/TPU, fp32 on CPU)")
  args = parser.parse_args()

  vae_cfg, t5_cfg, clip_cfg, resolution, t5_len = configs(args.size)
  on_cpu = jax.devices()[0].platform == "cpu"
  text_dtype = jnp.dtype(args.dtype or ("float32" if on_cpu else "bfloat16"))
  key = jax.random.PRNGKey(0)
  b = args.batch
  print(f"device {jax.devices()[0].device_kind} ({jax.device_count()}x); size {args.size}, batch {b}, "
        f"text dtype {text_dtype.name}, VAE float32 at {resolution} px, T5 {t5_len} tokens")

  vae_params = vae.init_params(key, vae_cfg)  # eager, leaf by leaf: no whole-model program
  images = jax.random.uniform(key, (b, resolution, resolution, 3), minval=-1, maxval=1)
  vae_s = time_per_example(jax.jit(lambda p, x: vae.encode(p, vae_cfg, x)), (vae_params, images), b, args.repeats)
  del vae_params

  t5_params = t5.init_params(key, t5_cfg, text_dtype)
  ids = jax.random.randint(key, (b, t5_len), 0, t5_cfg.vocab_size)
  t5_s = time_per_example(jax.jit(lambda p, i: t5.encode(p, t5_cfg, i)), (t5_params, ids), b, args.repeats)
  del t5_params

  clip_params = clip.init_params(key, clip_cfg, text_dtype)
  ids = jax.random.randint(key, (b, 77), 0, clip_cfg.vocab_size)
  clip_s = time_per_example(jax.jit(lambda p, i: clip.encode(p, clip_cfg, i)[1]), (clip_params, ids), b,
                            args.repeats)

  latent_hw = (resolution // vae_cfg.downsample_factor,) * 2
  cached_s, cached_bytes = cached_read_cost(latent_hw, (t5_len, t5_cfg.d_model), clip_cfg.hidden_size, args.refs)
  fly_s = vae_s * (1 + args.refs) + t5_s + clip_s
  print(f"per example: VAE encode {vae_s * 1e3:.1f} ms, T5 {t5_s * 1e3:.1f} ms, CLIP {clip_s * 1e3:.2f} ms")
  print(f"training input, {args.refs} reference(s): on the fly {fly_s * 1e3:.1f} ms, cached "
        f"{cached_s * 1e3:.3f} ms ({cached_bytes / 2**20:.2f} MiB read): ratio {fly_s / cached_s:.0f}x")


if __name__ == "__main__":
  main()
