"""Per-device memory of the MOSAIC recipe's train step at FLUX.1-dev scale, from shapes alone.

The trainer's own step (trainer.compile_from_shapes: the config's sharding rules and remat policy) is
compiled ahead of time for abstract parameters, LoRA, optimizer state and batch: no weights are
loaded and nothing runs, so a mesh and batch can be checked in minutes before any accelerator time is
spent. On a machine without the accelerators, fake CPU devices stand in (`--cpu_devices`); their
numbers come from the CPU compiler, whose buffer assignment differs from the GPU's and TPU's, and
the xla attention path materializes scores that cudnn/splash would not: read them as an upper bound
and as ratios between settings. On real devices, run without --cpu_devices.

With libtpu installed, `--topology v5p-8` (any key of mosaic_jax/train/tpu_compile.py's SLICES, comma
separated) compiles with the real TPU compiler for that slice's compile-only devices, on this machine:
memory per chip, and FLOPs per chip, the compiler's `optimal_seconds` and the MFU it implies. XLA's
cost analysis counts a `lax.scan` body once, not once per layer, so those three come from three
more compiles of the same step (same mesh, batch, shardings) with its blocks unrolled
(FluxConfig.unroll_layers) and 1 double + 1 single, 2 + 1 and 1 + 2 blocks: per double block
D = c(2,1) - c(1,1), per single block S = c(1,2) - c(1,1), and the step's cost
= c(1,1) + (L - 1) D + (L' - 1) S for L double and L' single blocks (19 and 38); `--cost_base b` uses
b+b, b+1+b and b+b+1 blocks instead, and each compile's raw figures are printed. XLA's cost analysis
does not see inside Pallas kernels (custom calls count nothing), so these three compiles use the xla
attention unchunked (attention_chunk=0: the same masked groups, no extra forward in the backward):
their attention FLOPs are the real ones, their time estimate is that of plain XLA attention (float32
logits through HBM), not splash's; the memory figures are those of the configured attention. The MFU is
the analytic step FLOPs (train/metrics.py) / chips / optimal_seconds / the chip's peak bf16 FLOP/s.
Where libtpu's estimate is not usable (negative on v5e and v6e in libtpu 0.0.42), the roofline stands
in: the step takes at least max(compiled FLOPs / peak FLOP/s, bytes accessed / HBM bandwidth) per
chip, so the MFU it implies is an upper bound (collectives and latency not counted).
`--sampler v5e-8` compiles the sampler's denoise loop (base and LoRA split by the training rules over
fsdp, bf16, the reference cache) for a slice and prints its memory per chip.

  python benchmarks/train_memory.py --cpu_devices 8 --mesh 1,8,1 --batch 8 --refs 1,3,6
  python benchmarks/train_memory.py --remat full,dots_with_no_batch_dims_saveable --refs 6
  python benchmarks/train_memory.py --topology v5p-8,v5e-16,v6e-8 --attention splash --refs 1,6
  python benchmarks/train_memory.py --sampler v5e-8 --attention splash --refs 2
"""

from __future__ import annotations

import argparse
import os

import common


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cpu_devices", type=int, default=0, help="fake this many CPU devices (0: real devices)")
  parser.add_argument("--topology", default="", help="compile for these TPU slices (e.g. v5p-8,v5e-16,v6e-8; "
                      "needs libtpu, no TPU)")
  parser.add_argument("--sampler", default="", help="compile the sampler's denoise loop for this TPU slice")
  parser.add_argument("--steps", type=int, default=28, help="--sampler: denoising steps")
  parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (-1: the remaining devices)")
  parser.add_argument("--batch", type=int, default=0, help="global batch (0: one per device)")
  parser.add_argument("--figures", default="memory,cost", help="--topology: memory (one compile) and/or cost "
                      "(three compiles: the step's FLOPs, time estimate and MFU)")
  parser.add_argument("--cost_base", type=int, default=1, help="cost compiles unroll b+b, b+1+b and b+b+1 "
                      "blocks (module docstring); a larger b moves the differences away from the step's fixed part")
  parser.add_argument("--refs", default="1,6", help="reference counts to compile for")
  parser.add_argument("--remat", default="full", help="remat policies to compare, comma separated")
  parser.add_argument("--attention", default=None, help="attention_impl (cudnn needs a GPU, splash a TPU; default "
                      "splash with --topology/--sampler, else xla)")
  parser.add_argument("--attention_chunk", type=int, default=None,
                      help="xla attention queries per chunk (0: all at once; default: FluxConfig's)")
  parser.add_argument("--layers", default="", help="double,single blocks instead of FLUX.1-dev's 19,38 (to see "
                      "what grows with depth)")
  return parser.parse_args()


def main():
  args = parse_args()
  if args.topology or args.sampler:  # the TPU compiler on this machine's CPUs; nothing runs on a TPU
    os.environ["JAX_PLATFORMS"] = "cpu"
  elif args.cpu_devices:  # before jax starts
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.cpu_devices}"
  import jax  # pylint: disable=import-outside-toplevel
  from mosaic_jax.train import tpu_compile, trainer  # pylint: disable=import-outside-toplevel

  if args.attention is None:  # the recipe's kernel for the platform compiled for
    args.attention = "splash" if args.topology or args.sampler else "xla"
  vae = common.flux_vae()
  refs = [int(r) for r in args.refs.split(",")]
  depth = tuple(int(n) for n in args.layers.split(",")) if args.layers else None

  def transformer(remat, layers=None):  # layers: a cost compile's blocks (module docstring)
    return common.flux_transformer(remat, args.attention, layers or depth, args.attention_chunk,
                                   unrolled=layers is not None)

  recipe = lambda devices: common.flux_recipe(args.mesh, args.batch, devices)

  if args.sampler:
    compile_sampler(args.sampler, transformer, refs, args.steps)
    return
  if args.topology:
    for name in args.topology.split(","):
      for remat in args.remat.split(","):
        compile_for_slice(name, recipe, transformer, refs, remat, args.figures.split(","), vae,
                          common.FLUX_TEXT_SHAPES, args.cost_base)
    return

  config, mesh = recipe(None)
  print(f"FLUX.1-dev{' with ' + args.layers + ' blocks' if args.layers else ''}, LoRA rank {config.lora_rank}, "
        f"{config.resolution} px, batch {config.batch_size}, mesh {dict(mesh.shape)} over {jax.device_count()} "
        f"{jax.devices()[0].device_kind}, attention {args.attention}"
        f"{'' if args.attention_chunk is None else f' (query chunk {args.attention_chunk})'}")
  for remat in args.remat.split(","):
    compiled = trainer.compile_from_shapes(config, transformer(remat), mesh, refs, vae, common.FLUX_TEXT_SHAPES)
    for r, executable in compiled.items():
      stats = tpu_compile.report(executable)
      print(f"remat {remat}, {r} reference(s): {stats.total_bytes / 2 ** 30:.1f} GiB per device (arguments "
            f"{stats.argument_bytes / 2 ** 30:.1f}, temporaries {stats.temp_bytes / 2 ** 30:.1f})")


def compile_for_slice(name, recipe, transformer, refs, remat, figures, vae, text_shapes, base=1):
  """The recipe's step compiled for TPU slice `name`: memory per chip, and the step's FLOPs per chip,
  the compiler's time estimate and the MFU it implies (module docstring: how the scan is counted)."""
  import jax  # pylint: disable=import-outside-toplevel
  from mosaic_jax.train import metrics, trainer, tpu_compile  # pylint: disable=import-outside-toplevel

  spec = tpu_compile.SLICES[name]
  devices = tpu_compile.slice_devices(name)
  config, mesh = recipe(devices)
  chips, kind = len(devices), devices[0].device_kind
  peak = metrics.peak_tflops(kind)
  cfg = transformer(remat)
  print(f"{name} ({spec.topology}, {chips} x {kind}, {spec.hbm_gib:.0f} GiB HBM per chip): FLUX.1-dev, LoRA rank "
        f"{config.lora_rank}, {config.resolution} px, batch {config.batch_size}, mesh {dict(mesh.shape)}, "
        f"attention {cfg.attention_impl}, remat {remat}", flush=True)
  for r in refs:
    line = f"  {name} {r} ref(s)"
    if "memory" in figures:
      try:
        memory = tpu_compile.report(trainer.compile_from_shapes(config, cfg, mesh, [r], vae, text_shapes)[r])
        fits = "fits" if memory.total_bytes <= spec.hbm_gib * 2 ** 30 else "does NOT fit"
        line += (f": {memory.total_bytes / 2 ** 30:.1f} GiB per chip (arguments {memory.argument_bytes / 2 ** 30:.1f}, "
                 f"temporaries {memory.temp_bytes / 2 ** 30:.1f}): {fits} in {spec.hbm_gib:.0f} GiB")
      except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
          raise
        # the TPU compiler refuses a program whose buffers exceed the chip's HBM: that is the answer (the
        # cost compiles below have fewer blocks and still say what the step would cost)
        line += f": does NOT fit, the compiler says: {str(e).splitlines()[0]}"
    if "cost" in figures:
      b = base
      shapes = ((b, b), (b + 1, b), (b, b + 1))
      c = {layers: tpu_compile.report(trainer.compile_from_shapes(config, transformer(remat, layers), mesh, [r],
                                                                  vae, text_shapes)[r])
           for layers in shapes}
      for layers in shapes:  # the raw figures, so that a strange extrapolation can be read back to its compile
        print(f"    {layers[0]}+{layers[1]} blocks: {c[layers].flops / 1e12:.3f} TFLOP, {c[layers].bytes_accessed / 1e12:.3f} "
              f"TB accessed, optimal_seconds {c[layers].optimal_seconds:.4f} s", flush=True)
      per = lambda field: (getattr(c[b, b], field) + (cfg.num_layers - b) * (getattr(c[b + 1, b], field) - getattr(
          c[b, b], field)) + (cfg.num_single_layers - b) * (getattr(c[b, b + 1], field) - getattr(c[b, b], field)))
      flops, traffic, seconds = per("flops"), per("bytes_accessed"), per("optimal_seconds")
      tokens = config.resolution // 16
      shape = metrics.StepShape(config.batch_size, config.text_len, tokens ** 2, r, (config.ref_resolution // 16) ** 2)
      analytic = metrics.train_step_flops(cfg, shape, config.lora_rank, trains_base=config.trainable != "lora")
      # the roofline: neither the compiled FLOPs at the chip's peak nor the HBM traffic at its bandwidth
      # can take less; a lower bound on the step time, so its MFU is an upper bound
      compute_s = flops / (peak * 1e12) if peak else float("nan")
      memory_s = traffic / (spec.hbm_gbps * 1e9)
      roofline = max(compute_s, memory_s)
      mfu = lambda t: analytic / chips / t / (peak * 1e12) if peak and t > 0 else float("nan")
      # the compiler's estimate is a heuristic per compile; a negative extrapolation says it is unusable here
      line += (f"; compiled {flops / 1e12:.1f} TFLOP per chip ({flops * chips / analytic:.2f}x the analytic "
               f"{analytic / 1e12:.1f} TFLOP / {chips}), {traffic / 1e12:.2f} TB accessed per chip; optimal_seconds "
               f"{seconds:.3f} s, implied MFU {100 * mfu(seconds):.1f}%; roofline {roofline:.3f} s "
               f"({'compute' if compute_s >= memory_s else 'HBM'}-bound), MFU at most "
               f"{100 * mfu(roofline):.1f}% (peak {peak} TFLOP/s, {spec.hbm_gbps:.0f} GB/s; from unrolled {b}+{b}, "
               f"{b + 1}+{b}, {b}+{b + 1} block compiles with xla attention)")
    print(line, flush=True)


def compile_sampler(name, transformer, refs, steps):
  """The sampler's jitted denoise loop (FLUX.1-dev + a rank-512 LoRA, bf16, base split by the training
  rules over fsdp on every chip, the reference cache) compiled for TPU slice `name`; memory per chip."""
  import dataclasses  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from mosaic_jax.configs import flux_ms  # pylint: disable=import-outside-toplevel
  from mosaic_jax import model, parallel, sample  # pylint: disable=import-outside-toplevel
  from mosaic_jax.train import tpu_compile  # pylint: disable=import-outside-toplevel

  spec = tpu_compile.SLICES[name]
  devices = tpu_compile.slice_devices(name)
  config = flux_ms.get_config("default")
  mesh = parallel.make_mesh(dict(data=1, fsdp=-1, tensor=1), devices)
  rules = dict(param_rules=tuple(config.sharding.param_rules), logical_rules=tuple(config.sharding.logical_rules))
  # The cache is exact for a model trained with independent references (sample.py); the shapes are the same.
  cfg = dataclasses.replace(transformer("none"), independent_refs=True)
  key = jax.random.key(0)
  params = jax.eval_shape(lambda k: model.init_params(k, cfg, jnp.bfloat16), key)
  lora = jax.eval_shape(lambda k: model.init_lora(k, params, cfg, config.lora_rank, jnp.bfloat16), key)
  placed = lambda tree: jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
      parallel.tree_shardings(tree, mesh, **rules))
  whole = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.replicated(mesh))
  grid = config.resolution // 16
  for r in refs:
    args = (placed(params), placed(lora), cfg, whole((1, grid * grid, cfg.in_channels), jnp.float32),
            whole((1, config.text_len, cfg.joint_attention_dim), jnp.bfloat16), whole((config.text_len, 3), jnp.int32),
            whole((1, cfg.pooled_projection_dim), jnp.bfloat16), whole((grid * grid, 3), jnp.int32),
            whole((steps + 1,), jnp.float32), whole((), jnp.float32),
            whole((1, r, grid * grid, cfg.in_channels), jnp.bfloat16), whole((r, grid * grid, 3), jnp.int32))
    with jax.set_mesh(mesh):  # splash places itself under shard_map on the slice's mesh
      compiled = sample.denoise.lower(*args, use_ref_cache=True).compile()
    stats = tpu_compile.report(compiled)
    fits = "fits" if stats.total_bytes <= spec.hbm_gib * 2 ** 30 else "does NOT fit"
    print(f"sampler on {name} ({len(devices)} x {devices[0].device_kind}, mesh {dict(mesh.shape)}): FLUX.1-dev + "
          f"LoRA rank {config.lora_rank} in bf16, {config.resolution} px, {r} reference(s), {steps} steps with the "
          f"reference cache, attention {cfg.attention_impl}: {stats.total_bytes / 2 ** 30:.1f} GiB per chip "
          f"(arguments {stats.argument_bytes / 2 ** 30:.1f}, temporaries {stats.temp_bytes / 2 ** 30:.1f}): {fits} "
          f"in {spec.hbm_gib:.0f} GiB", flush=True)


if __name__ == "__main__":
  main()
