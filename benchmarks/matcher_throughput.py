"""How fast the two matchers are: images/s on this machine, and the TPU compiler's figures for a slice.

  python benchmarks/matcher_throughput.py                     # both parts
  python benchmarks/matcher_throughput.py --skip_tpu --repeats 3
  python benchmarks/matcher_throughput.py --skip_cpu --topology v5e-8

Here (the devices jax sees; random weights of the real shapes):
- DINOv2 B/14 at 896 px (64x64 cells, blocks 0..11 run): seconds per image of the features, and per pair
  of the whole matcher step (both images' features and the 4096 x 4096 argmax).
- FLUX DiTF at 1024 px: FLUX.1-dev in float32 does not fit a small machine, so the parts are timed at the
  real width and extrapolated to DiTF's default read-out (the input of block 28: 19 double and 9 single
  blocks run) and 8 noisy copies: the VAE encoder at 1024 px; the transformer from latents with one copy
  and (a) 1 double block, (b) 1 double + 1 single, (c) 2 double blocks, whose differences give a double
  and a single block; per image = VAE + copies * (embed + 19 double + 9 single), embed = (a) - double.
TPU (the real TPU compiler on libtpu's compile-only devices; nothing runs): each matcher's whole step
(features of targets and references, argmax) at the real sizes from jax.eval_shape params, one pair per
chip, the batch split and the params placed as training places them: memory per chip, and the time per
step and per 1024 px image. Both models run their blocks in a scan, whose body the compiler counts once,
so the time adds the other blocks, estimated from compiles of one or two blocks at the same per-chip
batch (ditf_tpu, dinov2_tpu). Where the compiler gives no time estimate (it answers a negative number for
these programs), a roofline of its FLOPs and HBM traffic stands in (step_seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mosaic_jax.correspondence import dinov2, extractors, flux_features, matchers  # noqa: E402
from mosaic_jax.model import config as model_config  # noqa: E402
from mosaic_jax.model import transformer, vae, vit  # noqa: E402
from mosaic_jax.model.autoencoder import Autoencoder  # noqa: E402

DITF = flux_features.DitfConfig()
T5_TOKENS, T5_WIDTH, CLIP_WIDTH = 512, 4096, 768


def _seconds(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _images(count: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (count, 1024, 1024, 3), dtype=np.uint8)


def dinov2_cpu(repeats: int) -> dict:
  cfg = dinov2.dinov2_vitb14()
  model = dinov2.Dinov2Model(cfg, dinov2.init_params(jax.random.key(0), cfg))
  runner = matchers.MeshMatcher(extractors.dinov2_matcher(model), batch_size=1)
  images = _images(2)
  per_image = _seconds(lambda: runner.image_features(images[:1]), repeats)
  per_pair = _seconds(lambda: runner(images[:1], images[1:]), repeats)
  return {"per_image_s": per_image, "per_pair_s": per_pair}


def _vae_seconds(repeats: int) -> tuple[float, jax.Array]:
  """The FLUX VAE encoder (random weights) on one 1024 px image: seconds, and the model latents."""
  vae_cfg = vae.VaeConfig()
  encoder = {"encoder": vae.init_params(jax.random.key(1), vae_cfg)["encoder"]}
  pixels = jnp.asarray(matchers.unit_range(_images(1)))
  encode = jax.jit(lambda p, x: Autoencoder("vae", vae_cfg, p).encode_to_model_latents(x))
  return _seconds(lambda: encode(encoder, pixels), repeats), encode(encoder, pixels)


def _transformer_seconds(double: int, single: int, block: int, latents, repeats: int) -> float:
  """DiTF features from latents, one copy, through a FLUX.1-dev-wide transformer of double + single blocks."""
  flux_cfg = dataclasses.replace(model_config.flux1_dev(), num_layers=double, num_single_layers=single)
  params = transformer.init_params(jax.random.key(2), flux_cfg, jnp.float32)
  text = jnp.zeros((1, T5_TOKENS, T5_WIDTH), jnp.float32)
  pooled = jnp.zeros((1, CLIP_WIDTH), jnp.float32)
  cfg = dataclasses.replace(DITF, copies=1, block=block, discard_massive=False)
  run = jax.jit(lambda p, x: flux_features.image_features(p, flux_cfg, x, text, pooled, jax.random.key(3), cfg))
  return _seconds(lambda: run(params, latents), repeats)


def ditf_cpu(repeats: int) -> dict:
  """The parts at FLUX.1-dev's width, float32, one at a time (each fits a few GiB)."""
  vae_s, latents = _vae_seconds(repeats)
  timed = {}
  for name, (double, single, block) in {"a": (1, 1, 1), "b": (1, 1, 2), "c": (2, 0, 2)}.items():
    timed[name] = _transformer_seconds(double, single, block, latents, repeats)
    gc.collect()
  double_s = timed["c"] - timed["a"]
  single_s = timed["b"] - timed["a"]
  embed_s = max(timed["a"] - double_s, 0.0)
  doubles = min(DITF.block, 19)
  singles = DITF.block - doubles
  per_image = vae_s + DITF.copies * (embed_s + doubles * double_s + singles * single_s)
  return {"vae_s": vae_s, "double_block_s": double_s, "single_block_s": single_s, "embed_s": embed_s,
          "per_image_s": per_image, "blocks": (doubles, singles)}


def step_seconds(parts: list[tuple[object, int]], slice_name: str) -> tuple[float, str]:
  """Per-chip seconds of a step made of compiled parts [(report, times)]: the compiler's estimate where it
  gives one (it answers a negative number for some programs), else a roofline of its FLOPs (at the chip's
  bf16 peak: float32 matmuls run as bf16 passes at default precision) and its HBM traffic."""
  from mosaic_jax.train import metrics, tpu_compile
  if all(report.optimal_seconds > 0 for report, _ in parts):
    return sum(times * report.optimal_seconds for report, times in parts), "compiler estimate"
  devices = tpu_compile.slice_devices(slice_name)
  peak = metrics.peak_tflops(devices[0].device_kind) * 1e12
  bandwidth = tpu_compile.SLICES[slice_name].hbm_gbps * 1e9
  flops = sum(times * report.flops for report, times in parts)
  traffic = sum(times * report.bytes_accessed for report, times in parts)
  return max(flops / peak, traffic / bandwidth), (
      f"roofline: {flops / 1e12:.2f} TFLOP = {flops / peak * 1e3:.0f} ms at the bf16 peak, {traffic / 1e9:.1f} GB of "
      f"HBM traffic = {traffic / bandwidth * 1e3:.0f} ms, per chip and step")


def _tpu_report(lowered):
  from mosaic_jax.train import tpu_compile
  start = time.perf_counter()
  compiled = lowered.compile()
  return tpu_compile.report(compiled), time.perf_counter() - start


def tpu_mesh(slice_name: str):
  from mosaic_jax.parallel.sharding import make_mesh
  from mosaic_jax.train import tpu_compile
  return make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, tpu_compile.slice_devices(slice_name))


def dinov2_tpu(mesh, slice_name: str) -> dict:
  """DINOv2 B/14, float32 and xla attention as the matcher runs it (4097 tokens: no splash)."""
  batch = mesh.size
  cfg = dinov2.dinov2_vitb14()
  shapes = jax.eval_shape(lambda key: dinov2.init_params(key, cfg), jax.random.key(0))
  matcher = extractors.dinov2_matcher(dinov2.Dinov2Model(cfg, shapes))
  report, compile_s = _tpu_report(matchers.lower_grids(matcher, mesh, (batch, 896, 896, 3)))
  vit_cfg = matcher.params.config.vit
  one_block = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct((1,) + leaf.shape[1:], leaf.dtype), shapes["layers"])
  tokens = jax.ShapeDtypeStruct((2, 1 + 64 * 64, cfg.vit.hidden_size), jnp.float32)  # a chip's two images
  block_report, _ = _tpu_report(_lower_on(mesh, lambda p, x: vit.run_blocks(p, vit_cfg, x), one_block, tokens))
  step_s, how = step_seconds([(report, 1), (block_report, EXTRA_DINOV2_BLOCKS)], slice_name)
  return {"report": report, "compile_s": compile_s, "step_s": step_s, "how": how, "per_image_s": step_s / (2 * batch)}


def _flux_shapes(flux_cfg):
  params = jax.eval_shape(lambda key: transformer.init_params(key, flux_cfg, jnp.bfloat16), jax.random.key(0))
  text = jax.ShapeDtypeStruct((1, T5_TOKENS, T5_WIDTH), jnp.bfloat16)
  pooled = jax.ShapeDtypeStruct((1, CLIP_WIDTH), jnp.bfloat16)
  return params, text, pooled


def _features_report(mesh, double: int, single: int, block: int, images: int):
  """The transformer part alone (latents in), FLUX.1-dev width, `double` + `single` blocks, read at `block`."""
  from mosaic_jax.parallel.sharding import batch_sharding, replicated, tree_shardings
  # unrolled: the compiler counts a scan body once, however many blocks the scan runs
  flux_cfg = dataclasses.replace(model_config.flux1_dev(), num_layers=double, num_single_layers=single,
                                 attention_impl="splash", unroll_layers=True)
  params, text, pooled = _flux_shapes(flux_cfg)
  cfg = dataclasses.replace(DITF, block=block)
  shardings = tree_shardings(params, mesh)
  params = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        params, shardings)
  latents = jax.ShapeDtypeStruct((images, 128, 128, 16), jnp.float32, sharding=batch_sharding(mesh))
  text, pooled = (jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)) for x in (text, pooled))
  with jax.set_mesh(mesh):
    lowered = jax.jit(lambda p, x, t, c: flux_features.image_features(p, flux_cfg, x, t, c, jax.random.key(0),
                                                                      cfg)).lower(params, latents, text, pooled)
  return _tpu_report(lowered)[0]


def ditf_tpu(mesh, slice_name: str) -> dict:
  """FLUX.1-dev DiTF, bf16 weights, splash attention (xla's attention needs 17.5 GiB of temporaries per v5e chip
  at one pair per chip), blocks in their scans as the matcher runs them: memory of the whole step. The
  compiler counts a scan body once, so the time adds the other 18 double and 8 single blocks, each the
  difference of two compiles of the transformer part alone at the same per-chip batch (1 and 2 double
  blocks; 1 double + 1 single). (Unrolling all blocks instead makes the compiler gather many blocks'
  weights at once: 17.7 GiB.)"""
  batch = mesh.size
  flux_cfg = dataclasses.replace(model_config.flux1_dev(), attention_impl="splash")
  params, text, pooled = _flux_shapes(flux_cfg)
  vae_cfg = vae.VaeConfig()
  encoder = jax.eval_shape(lambda key: {"encoder": vae.init_params(key, vae_cfg)["encoder"]}, jax.random.key(1))
  matcher = extractors.ditf_matcher(params, flux_cfg, Autoencoder("vae", vae_cfg, encoder), text, pooled)
  report, compile_s = _tpu_report(matchers.lower_grids(matcher, mesh, (batch, 1024, 1024, 3)))
  print(f"  (FLUX DiTF step compiled in {compile_s:.0f} s: {report.total_bytes / 2 ** 30:.2f} GiB per chip; now its "
        "blocks' time)", flush=True)
  one_double = _features_report(mesh, 1, 0, 1, 2 * batch)
  two_double = _features_report(mesh, 2, 0, 2, 2 * batch)
  double_single = _features_report(mesh, 1, 1, 2, 2 * batch)
  doubles, singles = min(DITF.block, 19), DITF.block - min(DITF.block, 19)
  # step + (doubles - 1) * (two_double - one_double) + (singles - 1) * (double_single - one_double)
  parts = [(report, 1), (two_double, doubles - 1), (double_single, singles - 1),
           (one_double, -(doubles - 1) - (singles - 1))]
  step_s, how = step_seconds(parts, slice_name)
  return {"report": report, "compile_s": compile_s, "step_s": step_s, "how": how, "per_image_s": step_s / (2 * batch)}


EXTRA_DINOV2_BLOCKS = dinov2.GEOAWARE_LAYER  # blocks 1..11, beyond the scan body the compiler counts once


def _lower_on(mesh, fn, *shapes):
  from mosaic_jax.parallel.sharding import replicated
  placed = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated(mesh)), shapes)
  with jax.set_mesh(mesh):
    return jax.jit(fn).lower(*placed)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--skip_cpu", action="store_true")
  parser.add_argument("--skip_tpu", action="store_true")
  parser.add_argument("--topology", default="v5e-8")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--matchers", default="dinov2,ditf", help="which of dinov2,ditf to measure")
  args = parser.parse_args(argv)
  if not args.skip_cpu:
    device = jax.devices()[0]
    print(f"== on this machine: {jax.device_count()} x {device.device_kind}, random weights, batch 1", flush=True)
    if "dinov2" in args.matchers:
      result = dinov2_cpu(args.repeats)
      print(f"DINOv2 B/14 896 px: {result['per_image_s']:.2f} s/image = {1 / result['per_image_s']:.3f} images/s; "
            f"matcher step {result['per_pair_s']:.2f} s/pair", flush=True)
    if "ditf" in args.matchers:
      result = ditf_cpu(args.repeats)
      doubles, singles = result["blocks"]
      print(f"FLUX DiTF 1024 px parts: VAE encoder {result['vae_s']:.2f} s, double block {result['double_block_s']:.2f} "
            f"s, single block {result['single_block_s']:.2f} s, embedding {result['embed_s']:.2f} s (one copy)")
      print(f"FLUX DiTF 1024 px, extrapolated to block {DITF.block} ({doubles} double + {singles} single) x "
            f"{DITF.copies} copies: {result['per_image_s']:.1f} s/image = {1 / result['per_image_s']:.4f} images/s",
            flush=True)
  if not args.skip_tpu:
    from mosaic_jax.train import tpu_compile
    missing = tpu_compile.libtpu_missing()
    if missing:
      print(f"== TPU: skipped ({missing})")
      return
    mesh = tpu_mesh(args.topology)
    print(f"== {args.topology} ({mesh.size} chips, {tpu_compile.SLICES[args.topology].hbm_gib} GiB HBM each), one "
          "pair per chip, TPU compiler", flush=True)
    for name, estimate, title in (
        ("dinov2", dinov2_tpu, "DINOv2 B/14 896 px, float32"),
        ("ditf", ditf_tpu, f"FLUX.1-dev DiTF 1024 px, bf16, splash, block {DITF.block} x {DITF.copies} copies")):
      if name not in args.matchers:
        continue
      entry = estimate(mesh, args.topology)
      report = entry["report"]
      print(f"{title}: {report.total_bytes / 2 ** 30:.2f} GiB per chip (arguments {report.argument_bytes / 2 ** 30:.2f}, "
            f"temporaries {report.temp_bytes / 2 ** 30:.2f}); step {entry['step_s'] * 1e3:.1f} ms for "
            f"{2 * mesh.size} images = {entry['per_image_s'] * 1e3:.2f} ms per image "
            f"({1 / entry['per_image_s']:.0f} images/s per slice; {entry['how']}); compiled in {entry['compile_s']:.0f} s",
            flush=True)


if __name__ == "__main__":
  main()
