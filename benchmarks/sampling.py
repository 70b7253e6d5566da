"""Time per image of the jitted sampler (mosaic_jax.sampling.denoise) with 4 references, with and without
the reference KV cache, and with no references, measured in one run on whatever device JAX has.

A small FLUX-shaped model (random weights, independent_refs, a random rank-16 LoRA): heads of 128 as in
FLUX.1-dev, fewer and narrower blocks. Time per image is the denoising loop alone (text and reference
encoding and the VAE decode are the same in all three runs), warm (compile excluded, printed apart),
best of --repeats, divided by the batch size. The aim: sampling with cached references costs at most 1.3x
sampling without references.

  python benchmarks/sampling.py                       # hidden 1024, 1+2 blocks, 256 px, 28 steps
  python benchmarks/sampling.py --heads 24 --double 2 --single 4 --size 512 --text-len 512 \
      --dtype bfloat16 --attention cudnn              # FLUX.1-dev width, on an NVIDIA GPU

Measured (H200, bf16, the second command): no references 0.176 s, 4 references 0.572 s uncached,
0.219 s with the cache: 1.24x. With --attention xla the cache gives 1.85x there, because XLA's
attention writes the float32 [heads, queries, keys] logits to memory and the cache quadruples the keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from mosaic_jax import model, sampling


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--heads", type=int, default=8, help="attention heads of 128 (FLUX.1-dev: 24)")
  parser.add_argument("--double", type=int, default=1, help="double-stream blocks (FLUX.1-dev: 19)")
  parser.add_argument("--single", type=int, default=2, help="single-stream blocks (FLUX.1-dev: 38)")
  parser.add_argument("--size", type=int, default=256, help="target and reference size in pixels")
  parser.add_argument("--refs", type=int, default=4)
  parser.add_argument("--text-len", type=int, default=128)
  parser.add_argument("--steps", type=int, default=sampling.DEFAULT_STEPS)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--attention", default="xla", help="xla | cudnn | splash")
  args = parser.parse_args()

  cfg = dataclasses.replace(model.flux1_dev(), num_attention_heads=args.heads, num_layers=args.double,
                            num_single_layers=args.single, independent_refs=True,
                            attention_impl=args.attention)
  dtype = jnp.dtype(args.dtype)
  params = model.init_params(jax.random.key(0), cfg, dtype)
  lora = model.init_lora(jax.random.key(1), params, cfg, rank=16, dtype=dtype)
  grid, b = args.size // 16, args.batch
  rng = np.random.default_rng(0)
  no_refs = model.FluxInputs(
      target=rng.standard_normal((b, grid * grid, cfg.in_channels), np.float32),
      target_ids=model.image_ids(grid, grid),
      text=rng.standard_normal((b, args.text_len, cfg.joint_attention_dim), np.float32),
      text_ids=model.text_ids(args.text_len),
      pooled=rng.standard_normal((b, cfg.pooled_projection_dim), np.float32),
      timestep=None, guidance=np.float32(sampling.DEFAULT_GUIDANCE))
  with_refs = no_refs._replace(refs=rng.standard_normal((b, args.refs, grid * grid, cfg.in_channels), np.float32),
                               ref_ids=model.reference_ids(args.refs, grid, grid))
  sigmas = sampling.flow_sigmas(args.steps, grid * grid)
  runs = {"no references": (no_refs, False), f"{args.refs} refs, no cache": (with_refs, False),
          f"{args.refs} refs, KV cache": (with_refs, True)}

  print(f"device {jax.devices()[0].device_kind}; hidden {cfg.hidden_size} ({args.heads} heads of 128), "
        f"{args.double} double + {args.single} single blocks, {args.dtype}, attention {args.attention}; "
        f"target {grid * grid} tokens, text {args.text_len}, {args.refs} references of {grid * grid} tokens; "
        f"{args.steps} steps, batch {b}")
  per_image = {}
  for name, (inputs, use_cache) in runs.items():
    start = time.perf_counter()
    compiled = sampling.denoise.lower(params, lora, cfg, inputs, sigmas, use_ref_cache=use_cache).compile()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(compiled(params, lora, inputs, sigmas))
      times.append(time.perf_counter() - start)
    per_image[name] = min(times) / b
    print(f"{name:>22}: {per_image[name]:8.3f} s per image ({per_image[name] / args.steps * 1e3:7.1f} ms "
          f"per step), compile {compile_s:.1f} s", flush=True)
  base = per_image["no references"]
  uncached, cached = per_image[f"{args.refs} refs, no cache"], per_image[f"{args.refs} refs, KV cache"]
  print(f"ratios to no references: no cache {uncached / base:.2f}x, KV cache {cached / base:.2f}x "
        f"(aim <= 1.3x); the cache is {uncached / cached:.2f}x faster than full sampling")


if __name__ == "__main__":
  main()
