"""Per-example cost of FLUX's encoders, and the training input cost with cached vs on-the-fly features.

Random weights (costs do not depend on values). Per example: one caption through T5 (max length
tokens) and CLIP (77 tokens), one image through the VAE encoder.

Then the real input pipeline, both ways, on a synthetic SemAlign-MS dataset built in a temporary folder
(`--examples` scenes with `--refs` references at the VAE resolution): batches of the training iterator
turned into what the train step reads (`train.batches.step_batch`),
  on the fly = decode images, derive pairs, VAE(1 + R images) + T5 + CLIP   (the official loop)
  cached     = read the features launch/encode_dataset.py stored (data/cached_features.py)
timed over the same batches after one warm-up batch. The ratio is the training input cost saved.

  python benchmarks/encoders.py                       # small config (CPU-friendly)
  python benchmarks/encoders.py --size flux --batch 8 # FLUX.1 sizes: VAE 512 px, T5-XXL, CLIP-L
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import best_time

from mosaic_jax.configs import flux_ms
from mosaic_jax.data import cached_features, make_iterator
from mosaic_jax.data.pipeline import RAW_IMAGE_DECODERS, PipelineConfig
from mosaic_jax.data.semalign_ms import SemalignMs, SemalignMsConfig
from mosaic_jax.encoders import FluxEncoders
from mosaic_jax.model import clip, t5, vae
from mosaic_jax.model.autoencoder import Autoencoder
from mosaic_jax.settings import settings_from_config
from mosaic_jax.text import ByteTokenizers
from mosaic_jax.train.batches import step_batch


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


def input_cost(encoders, resolution: int, refs: int, examples: int, batch: int) -> tuple[float, float, float]:
  """(on-the-fly s/example, cached s/example, cached MiB/example) through the real input pipeline."""

  with tempfile.TemporaryDirectory() as folder:
    builder = SemalignMs(config=SemalignMsConfig(
        name=f"bench_{resolution}_{refs}", source="synthetic", image_size=resolution, min_refs=refs,
        max_refs=refs, num_train=examples, num_validation=1), data_dir=folder)
    builder.download_and_prepare()
    raw = builder.as_data_source("train", decoders=RAW_IMAGE_DECODERS)
    num_refs = np.full(examples, refs)
    pipeline = PipelineConfig(target_size=resolution, ref_size=resolution, global_batch_size=batch, num_epochs=1)
    cache = os.path.join(folder, "cache")
    cached_features.encode_dataset({"train": (raw, num_refs)}, cache, encoders, pipeline, {}, batch_size=batch)
    cached, _ = cached_features.open_split(cache, "train")
    config = flux_ms.get_config("default")  # the step's batch layout at this resolution and latent geometry
    config.resolution = config.ref_resolution = resolution
    settings = settings_from_config(config, encoders.autoencoder, check_files=False)

    def seconds_per_example(source):
      iterator = make_iterator(source, num_refs, pipeline)
      step_batch(next(iterator), encoders, settings)  # warm-up: compiles, fills caches
      start, seen = time.perf_counter(), 0
      for host_batch in iterator:
        jax.block_until_ready(step_batch(host_batch, encoders, settings))
        seen += batch
      return (time.perf_counter() - start) / seen

    fly_s, cached_s = seconds_per_example(raw), seconds_per_example(cached)
    stored = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(cache) for f in files)
    return fly_s, cached_s, stored / examples / 2 ** 20


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", choices=["small", "flux"], default="small")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--refs", type=int, default=2, help="references per training example")
  parser.add_argument("--examples", type=int, default=32, help="synthetic examples in the pipeline comparison")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default=None, help="text encoder dtype (default bf16 on GPU/TPU, fp32 on CPU)")
  args = parser.parse_args()

  vae_cfg, t5_cfg, clip_cfg, resolution, t5_len = configs(args.size)
  on_cpu = jax.devices()[0].platform == "cpu"
  text_dtype = jnp.dtype(args.dtype or ("float32" if on_cpu else "bfloat16"))
  key = jax.random.key(0)
  b = args.batch
  print(f"device {jax.devices()[0].device_kind} ({jax.device_count()}x); size {args.size}, batch {b}, "
        f"text dtype {text_dtype.name}, VAE float32 at {resolution} px, T5 {t5_len} tokens")

  vae_params = vae.init_params(key, vae_cfg)  # eager, leaf by leaf: no whole-model program
  images = jax.random.uniform(key, (b, resolution, resolution, 3), minval=-1, maxval=1)
  vae_s = time_per_example(jax.jit(lambda p, x: vae.encode(p, vae_cfg, x)), (vae_params, images), b, args.repeats)

  t5_params = t5.init_params(key, t5_cfg, text_dtype)
  ids = jax.random.randint(key, (b, t5_len), 0, t5_cfg.vocab_size)
  t5_s = time_per_example(jax.jit(lambda p, i: t5.encode(p, t5_cfg, i)), (t5_params, ids), b, args.repeats)

  clip_params = clip.init_params(key, clip_cfg, text_dtype)
  ids = jax.random.randint(key, (b, 77), 0, clip_cfg.vocab_size)
  clip_s = time_per_example(jax.jit(lambda p, i: clip.encode(p, clip_cfg, i)[1]), (clip_params, ids), b,
                            args.repeats)

  print(f"per example: VAE encode {vae_s * 1e3:.1f} ms, T5 {t5_s * 1e3:.1f} ms, CLIP {clip_s * 1e3:.2f} ms")
  encoders = FluxEncoders(Autoencoder("vae", vae_cfg, vae_params), t5_cfg, t5_params, clip_cfg, clip_params,
                          ByteTokenizers(t5_cfg.vocab_size, t5_len, 77))
  fly_s, cached_s, mib = input_cost(encoders, resolution, args.refs, args.examples, b)
  print(f"training input, {args.refs} reference(s), batch {b}, real pipeline: on the fly {fly_s * 1e3:.1f} "
        f"ms/example, cached {cached_s * 1e3:.2f} ms/example ({mib:.2f} MiB stored per example): "
        f"ratio {fly_s / cached_s:.1f}x")


if __name__ == "__main__":
  main()
