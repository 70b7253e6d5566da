"""Per-device memory of the MOSAIC recipe's train step at FLUX.1-dev scale, from shapes alone.

The trainer's own step (trainer.compile_from_shapes: the config's sharding rules and remat policy) is
compiled ahead of time for abstract parameters, LoRA, optimizer state and batch: no weights are
loaded and nothing runs, so a mesh and batch can be checked in minutes before any accelerator time is
spent. On a machine without the accelerators, fake CPU devices stand in (`--cpu_devices`); their
numbers come from the CPU compiler, whose buffer assignment differs from the GPU's and TPU's, and
the xla attention path materializes scores that cudnn/splash would not: read them as an upper bound
and as ratios between settings. On real devices, run without --cpu_devices.

  python benchmarks/train_memory.py --cpu_devices 8 --mesh 1,8,1 --batch 8 --refs 1,3,6
  python benchmarks/train_memory.py --remat full,dots_with_no_batch_dims_saveable --refs 6
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cpu_devices", type=int, default=0, help="fake this many CPU devices (0: real devices)")
  parser.add_argument("--mesh", default="1,8,1", help="data,fsdp,tensor sizes")
  parser.add_argument("--batch", type=int, default=8, help="global batch")
  parser.add_argument("--refs", default="1,6", help="reference counts to compile for")
  parser.add_argument("--remat", default="full", help="remat policies to compare, comma separated")
  parser.add_argument("--attention", default="xla", help="attention_impl (cudnn needs a GPU, splash a TPU)")
  parser.add_argument("--attention_chunk", type=int, default=None,
                      help="xla attention queries per chunk (0: all at once; default: FluxConfig's)")
  parser.add_argument("--layers", default="", help="double,single blocks instead of FLUX.1-dev's 19,38 (to see "
                      "what grows with depth)")
  return parser.parse_args()


def main():
  args = parse_args()
  if args.cpu_devices:  # before jax starts
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.cpu_devices}"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path[:0] = [root, os.path.join(root, "configs")]

  import dataclasses  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import flux_ms  # pylint: disable=import-outside-toplevel
  from mosaic_jax import model, parallel  # pylint: disable=import-outside-toplevel
  from mosaic_jax.model.autoencoder import Autoencoder  # pylint: disable=import-outside-toplevel
  from mosaic_jax.model.vae import VaeConfig  # pylint: disable=import-outside-toplevel
  from mosaic_jax.train import trainer  # pylint: disable=import-outside-toplevel

  config = flux_ms.get_config("default")
  config.mesh.update(dict(zip(("data", "fsdp", "tensor"), (int(s) for s in args.mesh.split(",")))))
  config.batch_size = args.batch
  mesh = parallel.make_mesh(config.mesh.to_dict())
  vae = Autoencoder("vae", VaeConfig(), {})  # FLUX's VAE geometry (/8, 16 channels); no weights
  text_shapes = ((config.text_len, 4096), (768,))  # T5-XXL states, pooled CLIP-L
  print(f"FLUX.1-dev{' with ' + args.layers + ' blocks' if args.layers else ''}, LoRA rank {config.lora_rank}, "
        f"{config.resolution} px, batch {args.batch}, mesh {dict(mesh.shape)} over {jax.device_count()} "
        f"{jax.devices()[0].device_kind}, attention {args.attention}"
        f"{'' if args.attention_chunk is None else f' (query chunk {args.attention_chunk})'}")
  for remat in args.remat.split(","):
    cfg = dataclasses.replace(model.config.flux1_dev(), remat_policy=remat, attention_impl=args.attention)
    if args.attention_chunk is not None:
      cfg = dataclasses.replace(cfg, attention_chunk=args.attention_chunk)
    if args.layers:
      cfg = dataclasses.replace(cfg, **dict(zip(("num_layers", "num_single_layers"),
                                                (int(n) for n in args.layers.split(",")))))
    compiled = trainer.compile_from_shapes(config, cfg, mesh, [int(r) for r in args.refs.split(",")], vae,
                                           text_shapes)
    for r, executable in compiled.items():
      stats = executable.memory_analysis()
      total = stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes + \
          stats.temp_size_in_bytes
      print(f"remat {remat}, {r} reference(s): {total / 2 ** 30:.1f} GiB per device (arguments "
            f"{stats.argument_size_in_bytes / 2 ** 30:.1f}, temporaries {stats.temp_size_in_bytes / 2 ** 30:.1f})")


if __name__ == "__main__":
  main()
