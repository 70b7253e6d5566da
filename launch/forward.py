"""One MOSAIC forward pass through the multi-branch FLUX, timed: the smoke test of an installation.

  python launch/forward.py --config configs/flux_ms.py:demo
  python launch/forward.py --config configs/flux_ms.py --config.checkpoint=/ckpt/FLUX.1-dev \
      --config.lora=/ckpt/mosaic_lora.safetensors
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from mosaic_jax import cli, interop, model
from mosaic_jax.settings import autoencoder_geometry, known_fields

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/flux_ms.py[:variant]", lock_config=True)


def build_model(config):
  dtype = jnp.dtype(config.dtype)
  if config.checkpoint:
    loaded, params = interop.load_flux_transformer(config.checkpoint, dtype=dtype)
    cfg = model.config.resolve(config.model, config.model_overrides, loaded)
  else:
    cfg = model.config.resolve(config.model, config.model_overrides)
    params = model.init_params(jax.random.key(config.seed), cfg, dtype)
  lora = interop.load_lora(config.lora, cfg) if config.lora else None
  return cfg, params, lora


def random_inputs(config, cfg) -> model.FluxInputs:
  rng = np.random.default_rng(config.seed)
  # 2 x the autoencoder's downsample factor: 16 for FLUX's VAE, 2 x the patch for the demo's pixel autoencoder
  # (a checkpoint that is a bare transformer has no vae/: FLUX's)
  has_vae = config.encoders != "checkpoint" or os.path.isdir(os.path.join(config.checkpoint, "vae"))
  pixels = 2 * autoencoder_geometry(config).downsample_factor if has_vae else 16
  grid, ref_grid = config.resolution // pixels, config.ref_resolution // pixels
  b, r = config.batch_size, config.num_refs
  return model.FluxInputs(
      target=rng.standard_normal((b, grid * grid, cfg.in_channels), np.float32),
      target_ids=model.image_ids(grid, grid),
      text=rng.standard_normal((b, config.text_len, cfg.joint_attention_dim), np.float32),
      text_ids=model.text_ids(config.text_len),
      pooled=rng.standard_normal((b, cfg.pooled_projection_dim), np.float32),
      timestep=np.full((b,), 0.5, np.float32), guidance=np.full((b,), config.guidance, np.float32),
      refs=rng.standard_normal((b, r, ref_grid * ref_grid, cfg.in_channels), np.float32) if r else None,
      ref_ids=model.reference_ids(r, ref_grid, ref_grid) if r else None)


def main(argv):
  del argv
  config = _CONFIG.value
  cfg, params, lora = build_model(config)
  inputs = random_inputs(config, cfg)
  forward = jax.jit(model.forward, static_argnums=(2, 4))
  start = time.perf_counter()
  compiled = forward.lower(params, lora, cfg, inputs, True).compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  pred, aux = jax.block_until_ready(compiled(params, lora, inputs))
  run_s = time.perf_counter() - start
  print(f"model: {cfg}")
  print(f"references: {config.num_refs}, prediction {pred.shape} {pred.dtype}, "
        f"finite: {bool(jnp.isfinite(pred).all())}")
  if "attention_maps" in aux:
    print(f"attention maps (per double block, head-averaged): {aux['attention_maps'].shape}")
  print(f"compile {compile_s:.2f} s, forward {run_s:.3f} s on {jax.devices()[0].platform}")


if __name__ == "__main__":
  cli.run_absl(main, known_fields)
