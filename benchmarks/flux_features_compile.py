"""DiTF feature extraction (correspondence/flux_features.py) compiled by the TPU compiler for a TPU slice.

FLUX.1-dev from shapes alone (jax.eval_shape: no weights), bf16, split by the training rules over fsdp on
every chip of the slice (mesh data=1, fsdp=all, tensor=1); 1024 px images as model latents [B, 128, 128, 16],
one prompt's T5 (512 tokens) and pooled CLIP; DitfConfig's defaults (block 28, 8 noisy copies per image:
B x 8 sequences, pinned over the batch axes). Prints per chip what the compiler reports: arguments,
temporaries, FLOPs (XLA counts a scan body once: not the blocks' total). Needs libtpu, no TPU.

  python benchmarks/flux_features_compile.py --images 1,8
  python benchmarks/flux_features_compile.py --layers 1,2 --block 2 --attention xla,splash --chips 8,1
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--slice", default="v5e-8", help="a key of mosaic_jax/train/tpu_compile.py's SLICES")
  parser.add_argument("--images", default="1,8", help="images per call, comma separated")
  parser.add_argument("--attention", default="splash", help="attention_impl(s), comma separated")
  parser.add_argument("--layers", default="19,38", help="double,single blocks (FLUX.1-dev: 19,38)")
  parser.add_argument("--block", type=int, default=28, help="DitfConfig.block")
  parser.add_argument("--chips", default="", help="mesh sizes to compare (default: the whole slice)")
  args = parser.parse_args()
  os.environ["JAX_PLATFORMS"] = "cpu"  # the TPU compiler on this machine's CPUs; nothing runs on a TPU

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from mosaic_jax import model, parallel  # pylint: disable=import-outside-toplevel
  from mosaic_jax.correspondence import flux_features  # pylint: disable=import-outside-toplevel
  from mosaic_jax.train import tpu_compile  # pylint: disable=import-outside-toplevel

  devices = tpu_compile.slice_devices(args.slice)
  double, single = (int(n) for n in args.layers.split(","))
  cfg = flux_features.DitfConfig(block=args.block)
  for impl in args.attention.split(","):
    flux_cfg = dataclasses.replace(model.flux1_dev(), num_layers=double, num_single_layers=single,
                                   attention_impl=impl)
    params = jax.eval_shape(lambda c=flux_cfg: model.init_params(jax.random.key(0), c, jnp.bfloat16))
    for chips in [int(n) for n in args.chips.split(",")] if args.chips else [len(devices)]:
      mesh = parallel.make_mesh(dict(data=1, fsdp=-1, tensor=1), devices[:chips])
      placed = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params,
                                      parallel.tree_shardings(params, mesh))
      whole = lambda shape, dtype, m=mesh: jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.replicated(m))
      key = jax.eval_shape(lambda: jax.random.key(0))
      extract = jax.jit(lambda p, latents, text, pooled, k, c=flux_cfg: flux_features.image_features(
          p, c, latents, text, pooled, k, cfg))
      for images in (int(n) for n in args.images.split(",")):
        start = time.time()
        with jax.set_mesh(mesh):
          compiled = extract.lower(placed, whole((images, 128, 128, 16), jnp.float32),
                                   whole((1, 512, 4096), jnp.bfloat16), whole((1, 768), jnp.bfloat16),
                                   whole(key.shape, key.dtype)).compile()
        r = tpu_compile.report(compiled)
        print(f"{args.slice} mesh {dict(mesh.shape)}, {double}+{single} blocks, block {cfg.block}, attention {impl}, "
              f"{images} image(s) x {cfg.copies} copies: per chip arguments {r.argument_bytes / 2**30:.2f} GiB, "
              f"temporaries {r.temp_bytes / 2**30:.2f} GiB, output {r.output_bytes / 2**20:.0f} MiB, "
              f"total {r.total_bytes / 2**30:.2f} of {tpu_compile.SLICES[args.slice].hbm_gib:.0f} GiB; "
              f"FLOPs {r.flops:.3g} (compiled in {time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
  main()
