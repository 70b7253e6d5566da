"""Train-step time against the number of references on this machine, and the step's FLOP count and
MFU formula for FLUX.1-dev at 6 references.

  python benchmarks/train_step.py                        # demo + scaled configs, CPU-sized
  python benchmarks/train_step.py --scaled_refs 1,2,4,6 --scaled_layers 2,2 --steps 3

Configs: `demo` (configs/flux_ms.py:demo: tiny DiT, its resolution, base + LoRA trained) and `scaled`
(hidden 768 = 6 heads x 128, 512 px target and references (32x32 tokens each), LoRA rank 64 on a
frozen float32 base, the recipe's remat policy, xla attention in chunks, `--scaled_layers`
double,single blocks, 64 text tokens, batch 1). Random features stand in for the encoders: the step
is what is timed. FLOPs are metrics.train_step_flops (model FLOPs: recomputation not counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from mosaic_jax import model
from mosaic_jax.configs import flux_ms
from mosaic_jax.settings import settings_from_config
from mosaic_jax.train import metrics as metrics_lib
from mosaic_jax.train import step as step_lib


def _batch(rng, settings, num_refs, cfg):
  """Random features and pairs of the shapes the step reads (step.batch_spec)."""
  spec = step_lib.batch_spec(settings, num_refs, ((settings.text_len, cfg.joint_attention_dim),
                                                  (cfg.pooled_projection_dim,)))
  grid, ref_grid = settings.latent_size // 2, settings.ref_latent_size // 2
  high = {"pair_ref": num_refs, "pair_ref_token": ref_grid * ref_grid, "pair_target_token": grid * grid}
  out = {}
  for key, s in spec.items():
    if key in high:
      out[key] = rng.integers(0, high[key], s.shape).astype(s.dtype)
    elif key in ("target_std", "drop_refs"):
      out[key] = np.zeros(s.shape, s.dtype)
    elif key == "pair_valid":
      out[key] = np.ones(s.shape, s.dtype)
    else:
      out[key] = rng.standard_normal(s.shape).astype(s.dtype)
  return out


def time_step(cfg, settings, num_refs, trains_base, lora_rank, steps):
  params = model.init_params(jax.random.key(0), cfg, jnp.float32)
  lora = model.init_lora(jax.random.key(1), params, cfg, lora_rank)
  trainable = {"base": params, "lora": lora} if trains_base else {"lora": lora}
  base = {} if trains_base else params
  optimizer = step_lib.make_optimizer(settings.optimizer, settings.total_steps)
  state = step_lib.init_state(trainable, optimizer)
  batch = _batch(np.random.default_rng(0), settings, num_refs, cfg)
  batch_size, grid, text_len = settings.batch_size, settings.latent_size // 2, settings.text_len
  fn = jax.jit(functools.partial(step_lib.train_step, cfg=cfg, settings=settings, optimizer=optimizer),
               donate_argnums=(0,))
  start = time.perf_counter()
  compiled = fn.lower(state, base, batch).compile()
  compile_s = time.perf_counter() - start
  state, metrics = compiled(state, base, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, base, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - start) / steps
  flops = metrics_lib.train_step_flops(
      cfg, metrics_lib.StepShape(batch_size, text_len, grid * grid, num_refs, grid * grid), lora_rank, trains_base)
  return compile_s, step_s, flops


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--demo_refs", default="2,3")
  parser.add_argument("--scaled_refs", default="1,2,4,6")
  parser.add_argument("--scaled_layers", default="1,1", help="double,single blocks of the scaled config")
  parser.add_argument("--steps", type=int, default=2)
  args = parser.parse_args()
  device = jax.devices()[0]
  print(f"device: {device.platform} {device.device_kind} x{jax.device_count()}")

  demo = settings_from_config(flux_ms.get_config("demo"), check_files=False)
  demo_cfg = demo.transformer_config()
  print(f"\n{'config':<8} {'R':>2} {'tokens':>7} {'compile s':>10} {'step s':>8} {'GFLOP/step':>11} {'GFLOP/s':>8}")
  for r in (int(x) for x in args.demo_refs.split(",")):
    grid = demo.resolution // demo.token_pixels
    c, s, f = time_step(demo_cfg, demo, r, True, demo.lora_rank, args.steps)
    print(f"{'demo':<8} {r:>2} {demo.text_len + grid * grid * (r + 1):>7} {c:>10.1f} {s:>8.3f} {f / 1e9:>11.1f} "
          f"{f / s / 1e9:>8.1f}", flush=True)

  double, single = (int(x) for x in args.scaled_layers.split(","))
  scaled_cfg = dataclasses.replace(model.tiny(), in_channels=64, num_layers=double, num_single_layers=single,
                                   attention_head_dim=128, num_attention_heads=6, joint_attention_dim=256,
                                   pooled_projection_dim=64, axes_dims_rope=(16, 56, 56),
                                   remat_policy=flux_ms.get_config().remat_policy)  # the recipe's
  # The demo's optimizer and losses at 512 px through FLUX's VAE geometry (16 px, 16 channels per token).
  scaled = dataclasses.replace(demo, batch_size=1, resolution=512, ref_resolution=512, text_len=64, token_pixels=16,
                               latent_channels=16, dataset=dataclasses.replace(demo.dataset, max_pairs=1024))
  base_time = None
  for r in (int(x) for x in args.scaled_refs.split(",")):
    c, s, f = time_step(scaled_cfg, scaled, r, False, 64, args.steps)
    base_time = base_time or s
    print(f"{'scaled':<8} {r:>2} {64 + 1024 * (r + 1):>7} {c:>10.1f} {s:>8.3f} {f / 1e9:>11.1f} "
          f"{f / s / 1e9:>8.1f}   ({s / base_time:.2f}x the first)", flush=True)

  dev = model.flux1_dev()
  shape = metrics_lib.StepShape(batch=1, text_tokens=512, target_tokens=1024, num_refs=6, ref_tokens=1024)
  base, lora, stats = metrics_lib.forward_flops(dev, shape, lora_rank=512)
  step = metrics_lib.train_step_flops(dev, shape, 512, trains_base=False)
  print("\nFLUX.1-dev, 512 px, 6 references, 512 T5 tokens, LoRA rank 512, batch 1 per device:")
  print(f"  forward: base {base / 1e12:.1f} TFLOP + LoRA {lora / 1e12:.2f} TFLOP + SCAL/MDL statistics "
        f"{stats / 1e12:.2f} TFLOP")
  print(f"  train step = 2 x base + 3 x LoRA + 4 x statistics = {step / 1e12:.1f} TFLOP")
  print("  MFU = step FLOPs / (step seconds x devices x peak FLOP/s per device); e.g. one H100 (989 "
        f"dense bf16 TFLOP/s) at 50% MFU takes {step / (0.5 * 989e12):.2f} s per step")


if __name__ == "__main__":
  main()
