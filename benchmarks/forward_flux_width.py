"""Compile and run time of one multi-branch forward at FLUX.1-dev width, on whatever device JAX has.

FLUX.1-dev dimensions (hidden 3072, 24 heads of 128, T5 4096, CLIP 768) with only 2 double and 2 single
blocks, random float32 weights; 512 px target (1024 tokens), 512 text tokens, 512 px references
(1024 tokens each). Prints one line per reference count.

  python benchmarks/forward_flux_width.py            # 1 and 6 references
  python benchmarks/forward_flux_width.py --refs 0 1 6 --resolution 256
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from mosaic_jax import model


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--refs", type=int, nargs="+", default=[1, 6])
  parser.add_argument("--resolution", type=int, default=512)
  parser.add_argument("--text-len", type=int, default=512)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--attention", default="xla", help="xla | cudnn | splash")
  args = parser.parse_args()

  cfg = dataclasses.replace(model.flux1_dev(), num_layers=2, num_single_layers=2, attention_impl=args.attention)
  params = model.init_params(jax.random.key(0), cfg, jnp.dtype(args.dtype))
  grid = args.resolution // 16
  rng = np.random.default_rng(0)
  forward = jax.jit(model.forward, static_argnums=(2, 4))
  print(f"device {jax.devices()[0].device_kind}; FLUX.1-dev width, 2 double + 2 single blocks, "
        f"{args.dtype}, attention {args.attention}; target {grid * grid} tokens, text {args.text_len}, references {grid * grid} each")
  for num_refs in args.refs:
    inputs = model.FluxInputs(
        target=rng.standard_normal((1, grid * grid, 64), np.float32), target_ids=model.image_ids(grid, grid),
        text=rng.standard_normal((1, args.text_len, 4096), np.float32), text_ids=model.text_ids(args.text_len),
        pooled=rng.standard_normal((1, 768), np.float32), timestep=np.array([0.5], np.float32),
        guidance=np.array([1.0], np.float32),
        refs=rng.standard_normal((1, num_refs, grid * grid, 64), np.float32) if num_refs else None,
        ref_ids=model.reference_ids(num_refs, grid, grid) if num_refs else None)
    start = time.perf_counter()
    compiled = forward.lower(params, None, cfg, inputs, False).compile()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(compiled(params, None, inputs))
      times.append(time.perf_counter() - start)
    tokens = args.text_len + grid * grid * (1 + num_refs)
    print(f"refs {num_refs}: {tokens} tokens, compile {compile_s:.2f} s, forward {min(times):.2f} s "
          f"(best of {args.repeats})")


if __name__ == "__main__":
  main()
