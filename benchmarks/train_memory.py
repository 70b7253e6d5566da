"""Per-device memory of the MOSAIC recipe's train step at FLUX.1-dev scale, from shapes alone.

The trainer's own step (train/compilation.py's compile_from_shapes: the config's sharding rules and
remat policy) is compiled ahead of time for abstract parameters, LoRA, optimizer state and batch: no
weights are loaded and nothing runs, so a mesh and batch can be checked in minutes before any
accelerator time is spent. On a machine without the accelerators, fake CPU devices stand in (`--cpu_devices`); their
numbers come from the CPU compiler, whose buffer assignment differs from the GPU's and TPU's, and
the xla attention path materializes scores that cudnn/splash would not: read them as an upper bound
and as ratios between settings. On real devices, run without --cpu_devices.

With libtpu installed, `--topology v5p-8` (any key of mosaic_jax/train/tpu_compile.py's SLICES, comma
separated) compiles with the real TPU compiler for that slice's compile-only devices, on this machine:
memory per chip (device, and host for the policies that offload), and, read from the same compile's
optimized HLO (hlo_costs.py; one compile gives all), the step's FLOPs and HBM bytes per chip with every
iteration of the scanned blocks counted and the Pallas kernels' FLOPs from their operand shapes, and an
estimated step time: each op its FLOPs at the chip's peak bf16 rate plus its HBM traffic at the chip's
bandwidth, summed (collectives and latency not counted). XLA's own cost analysis cannot give these: it
counts a loop body once and a kernel as nothing. On the ops it does cover, libtpu's `optimal_seconds`
reads 2-5% above this estimate (v5p, five programs, 1 to 57 blocks), and the ratio is printed for the
program at hand where libtpu's estimate is positive (not on v5e and v6e in libtpu 0.0.42). The MFU is
the analytic step FLOPs (train/metrics.py) / chips / estimated time / the chip's peak. For a policy that
offloads, the bytes moved between host and device per step are printed, and the host bandwidth per chip
that would hide them under the step; the estimate itself does not count them. `--figures
memory,cost,breakdown` adds the FLOPs, bytes and estimated time per category (projections, LoRA,
attention, statistics, elementwise, layout, collectives...). A policy whose step the compiler refuses
(RESOURCE_EXHAUSTED) is reported as not fitting, with the compiler's line, and no cost. `--remat auto`
runs the trainer's own choice (train/remat_choice.py: candidates in order, each with its memory and
the executable's own time estimate, the first that fits the chip less 10% headroom; `--auto_all`: every
candidate, the fastest that fits) and prints the chosen policy's figures as above.
`--sampler v5e-8` compiles the sampler's denoise loop (base and LoRA split by the training rules over
fsdp, bf16, the reference cache) for a slice and prints its memory per chip.

  python benchmarks/train_memory.py --cpu_devices 8 --mesh 1,8,1 --batch 8 --refs 1,3,6
  python benchmarks/train_memory.py --remat full,dots_with_no_batch_dims_saveable --refs 6
  python benchmarks/train_memory.py --topology v5p-8,v5e-16,v6e-8 --remat keep_all,recompute_mlp --refs 1,6
  python benchmarks/train_memory.py --topology v5p-8 --refs 6 --figures memory,cost,breakdown
  python benchmarks/train_memory.py --topology v5p-8,v6e-8,v5e-16 --remat auto --refs 1,6
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
  parser.add_argument("--figures", default="memory,cost", help="--topology: memory, and cost (the step's FLOPs, "
                      "HBM traffic, estimated time and MFU, from the same compile); breakdown: also where they go")
  parser.add_argument("--refs", default="1,6", help="reference counts to compile for")
  parser.add_argument("--remat", default="full", help="remat policies to compare, comma separated; auto: the "
                      "trainer's choice for the slice (--topology), with each candidate's memory and estimate")
  parser.add_argument("--candidates", default="", help="--remat auto: these candidates, in this order, instead of "
                      "model/remat.py's CANDIDATES (to skip one known not to fit)")
  parser.add_argument("--auto_all", action="store_true", help="--remat auto compiles every candidate and keeps the "
                      "fastest that fits by the estimate (the trainer stops at the first that fits)")
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
  from mosaic_jax.train import tpu_compile  # pylint: disable=import-outside-toplevel

  if args.attention is None:  # the recipe's kernel for the platform compiled for
    args.attention = "splash" if args.topology or args.sampler else "xla"
  vae = common.flux_vae()
  refs = [int(r) for r in args.refs.split(",")]
  depth = tuple(int(n) for n in args.layers.split(",")) if args.layers else None
  transformer = lambda remat: common.flux_transformer(remat, args.attention, depth, args.attention_chunk)
  recipe = lambda devices: common.flux_recipe(args.mesh, args.batch, devices)

  if args.sampler:
    compile_sampler(args.sampler, transformer, refs, args.steps)
    return
  if args.topology:
    for name in args.topology.split(","):
      for remat in args.remat.split(","):
        compile_for_slice(name, recipe, transformer, refs, remat, args.figures.split(","), vae,
                          common.FLUX_TEXT_SHAPES, args.auto_all, args.candidates)
    return

  config, mesh = recipe(None)
  print(f"FLUX.1-dev{' with ' + args.layers + ' blocks' if args.layers else ''}, LoRA rank {config.lora_rank}, "
        f"{config.resolution} px, batch {config.batch_size}, mesh {dict(mesh.shape)} over {jax.device_count()} "
        f"{jax.devices()[0].device_kind}, attention {args.attention}"
        f"{'' if args.attention_chunk is None else f' (query chunk {args.attention_chunk})'}")
  for remat in args.remat.split(","):
    compiled = common.compile_recipe_step(config, transformer(remat), mesh, refs, vae, common.FLUX_TEXT_SHAPES)
    for r, executable in compiled.items():
      stats = tpu_compile.report(executable)
      print(f"remat {remat}, {r} reference(s): {stats.total_bytes / 2 ** 30:.1f} GiB per device (arguments "
            f"{stats.argument_bytes / 2 ** 30:.1f}, temporaries {stats.temp_bytes / 2 ** 30:.1f})")


def compile_for_slice(name, recipe, transformer, refs, remat, figures, vae, text_shapes, auto_all=False,
                      candidates=""):
  """The recipe's step compiled for TPU slice `name`: memory per chip and, read from the same compile's
  optimized HLO, the step's FLOPs and HBM traffic per chip, an estimated step time and the MFU it implies
  (module docstring)."""
  import jax  # pylint: disable=import-outside-toplevel
  from mosaic_jax.train import metrics, tpu_compile  # pylint: disable=import-outside-toplevel

  import hlo_costs  # pylint: disable=import-outside-toplevel  (benchmarks/ is the script's folder)

  spec = tpu_compile.SLICES[name]
  devices = tpu_compile.slice_devices(name)
  config, mesh = recipe(devices)
  chips, kind = len(devices), devices[0].device_kind
  peak = metrics.peak_tflops(kind)
  print(f"{name} ({spec.topology}, {chips} x {kind}, {spec.hbm_gib:.0f} GiB HBM per chip): FLUX.1-dev, LoRA rank "
        f"{config.lora_rank}, {config.resolution} px, batch {config.batch_size}, mesh {dict(mesh.shape)}, "
        f"attention {transformer('full').attention_impl}, remat {remat}", flush=True)
  for r in refs:
    line = f"  {name} {r} ref(s)"
    step = lambda policy: common.compile_recipe_step(config, transformer(policy), mesh, [r], vae, text_shapes)[r]
    if remat == "auto":  # the trainer's choice (train/remat_choice.py), its candidates' lines as it logs them
      from mosaic_jax.settings import ConfigError  # pylint: disable=import-outside-toplevel
      from mosaic_jax.train import remat_choice  # pylint: disable=import-outside-toplevel
      try:
        chosen, compiled, _ = remat_choice.choose(step, devices[0], exhaustive=auto_all, **(
            dict(candidates=tuple(candidates.split(","))) if candidates else {}))
      except ConfigError as e:
        print(f"{line}: {e}", flush=True)
        continue
      cfg, line = transformer(chosen), f"{line}, auto chose {chosen}"
    else:
      cfg = transformer(remat)
      try:
        compiled = step(remat)
      except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
          raise
        # the TPU compiler refuses a program whose buffers exceed the chip's HBM: that is the answer
        print(f"{line}: does NOT fit, the compiler says: {str(e).splitlines()[0]}", flush=True)
        continue
    memory = tpu_compile.report(compiled)
    analysis = compiled.memory_analysis()
    host = analysis.host_temp_size_in_bytes + analysis.host_argument_size_in_bytes
    host = f", and {host / 2 ** 30:.1f} GiB of host memory" if host else ""
    fits = "fits" if memory.total_bytes <= spec.hbm_gib * 2 ** 30 else "does NOT fit"
    line += (f": {memory.total_bytes / 2 ** 30:.1f} GiB per chip (arguments {memory.argument_bytes / 2 ** 30:.1f}, "
             f"temporaries {memory.temp_bytes / 2 ** 30:.1f}{host}): {fits} in {spec.hbm_gib:.0f} GiB")
    if "cost" in figures and peak:
      hlo = hlo_costs.Hlo(compiled.as_text())
      est = hlo_costs.estimate(hlo, peak * 1e12, spec.hbm_gbps * 1e9)
      tokens = config.resolution // 16
      shape = metrics.StepShape(config.batch_size, config.text_len, tokens ** 2, r, (config.ref_resolution // 16) ** 2)
      analytic = metrics.train_step_flops(cfg, shape, config.lora_rank, trains_base=config.trainable != "lora")
      mfu = lambda seconds: 100 * analytic / chips / seconds / (peak * 1e12)
      line += (f"; {est.flops / 1e12:.1f} TFLOP per chip ({est.flops * chips / analytic:.2f}x the analytic "
               f"{analytic / 1e12:.1f} / {chips}; Pallas kernels {est.kernel_flops / 1e12:.1f}), "
               f"{est.bytes / 1e12:.2f} TB accessed; estimated {est.seconds:.3f} s per step, "
               f"MFU {mfu(est.seconds):.1f}%")
      # libtpu's own estimate covers the same ops once per loop body and no kernel: where it is usable
      # (positive), their ratio says how our per-op roofline reads against it on this very program
      if memory.optimal_seconds > 0:
        ratio = memory.optimal_seconds / est.compiler_like
        line += (f" (libtpu's estimate of the ops it covers is {ratio:.2f}x ours: at that rate "
                 f"{est.seconds * ratio:.3f} s, MFU {mfu(est.seconds * ratio):.1f}%)")
      if est.host_bytes:
        line += (f"; {est.host_bytes / 1e9:.1f} GB between host and device per step, hidden under the step only at "
                 f"{est.host_bytes / est.seconds / 1e9:.0f} GB/s per chip or more")
      if "breakdown" in figures:
        line += "\n" + breakdown_table(hlo, peak * 1e12, spec.hbm_gbps * 1e9)
    print(line, flush=True)


def breakdown_table(hlo, peak_flops, hbm_bytes_per_s) -> str:
  """Where the step's FLOPs, HBM traffic and estimated time go, by category (hlo_costs.breakdown)."""
  import hlo_costs  # pylint: disable=import-outside-toplevel

  table = hlo_costs.breakdown(hlo)
  seconds = {cat: row["flops"] / peak_flops + row["bytes"] / hbm_bytes_per_s for cat, row in table.items()}
  total = sum(seconds.values())
  rows = [f"    {'category':<52} {'TFLOP':>8} {'GB':>8} {'est. s':>7} {'share':>6}"]
  for cat in sorted(table, key=lambda c: -seconds[c]):
    if seconds[cat] >= 1e-4 * total:
      rows.append(f"    {cat:<52} {table[cat]['flops'] / 1e12:>8.2f} {table[cat]['bytes'] / 1e9:>8.1f} "
                  f"{seconds[cat]:>7.3f} {seconds[cat] / total:>6.1%}")
  return "\n".join(rows)


def compile_sampler(name, transformer, refs, steps):
  """The sampler's jitted denoise loop (FLUX.1-dev + a rank-512 LoRA, bf16, base split by the training
  rules over fsdp on every chip, the reference cache) compiled for TPU slice `name`; memory per chip."""
  import dataclasses  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from mosaic_jax.configs import flux_ms  # pylint: disable=import-outside-toplevel
  from mosaic_jax import model, parallel  # pylint: disable=import-outside-toplevel
  from mosaic_jax.sampling import denoise  # pylint: disable=import-outside-toplevel
  from mosaic_jax.train import tpu_compile  # pylint: disable=import-outside-toplevel

  spec = tpu_compile.SLICES[name]
  devices = tpu_compile.slice_devices(name)
  config = flux_ms.get_config("default")
  mesh = parallel.make_mesh(dict(data=1, fsdp=-1, tensor=1), devices)
  rules = dict(param_rules=tuple(config.sharding.param_rules), logical_rules=tuple(config.sharding.logical_rules))
  # The cache is exact for a model trained with independent references (sampling/loop.py); the shapes are the same.
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
    inputs = model.FluxInputs(
        target=whole((1, grid * grid, cfg.in_channels), jnp.float32), target_ids=whole((grid * grid, 3), jnp.int32),
        text=whole((1, config.text_len, cfg.joint_attention_dim), jnp.bfloat16),
        text_ids=whole((config.text_len, 3), jnp.int32), pooled=whole((1, cfg.pooled_projection_dim), jnp.bfloat16),
        timestep=None, guidance=whole((), jnp.float32), refs=whole((1, r, grid * grid, cfg.in_channels), jnp.bfloat16),
        ref_ids=whole((r, grid * grid, 3), jnp.int32))
    with jax.set_mesh(mesh):  # splash places itself under shard_map on the slice's mesh
      compiled = denoise.lower(placed(params), placed(lora), cfg, inputs, whole((steps + 1,), jnp.float32),
                               use_ref_cache=True).compile()
    stats = tpu_compile.report(compiled)
    fits = "fits" if stats.total_bytes <= spec.hbm_gib * 2 ** 30 else "does NOT fit"
    print(f"sampler on {name} ({len(devices)} x {devices[0].device_kind}, mesh {dict(mesh.shape)}): FLUX.1-dev + "
          f"LoRA rank {config.lora_rank} in bf16, {config.resolution} px, {r} reference(s), {steps} steps with the "
          f"reference cache, attention {cfg.attention_impl}: {stats.total_bytes / 2 ** 30:.1f} GiB per chip "
          f"(arguments {stats.argument_bytes / 2 ** 30:.1f}, temporaries {stats.temp_bytes / 2 ** 30:.1f}): {fits} "
          f"in {spec.hbm_gib:.0f} GiB", flush=True)


if __name__ == "__main__":
  main()
