"""One MOSAIC forward pass through the multi-branch FLUX, timed: the smoke test of an installation.

  python launch/forward.py --config configs/flux_ms.py:demo
  python launch/forward.py --config configs/flux_ms.py --config.checkpoint=/ckpt/FLUX.1-dev \
      --config.lora=/ckpt/mosaic_lora.safetensors

--config.checkpoint may also be a diffusers transformer folder or a BFL single .safetensors file (no
vae/: the token size is then FLUX's, 16 px).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from mosaic_jax import cli, interop, model
from mosaic_jax.model.autoencoder import Autoencoder
from mosaic_jax.model.vae import VaeConfig
from mosaic_jax.settings import Settings, known_fields, settings_from_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/flux_ms.py[:variant]", lock_config=True)


def read_settings(config) -> Settings:
  """The config as Settings, at this script's door. No dataset is read; a checkpoint that is a bare
  transformer has no vae/, and FLUX's VAE geometry gives the token size."""
  root = os.path.expanduser(config.checkpoint)
  no_vae = config.encoders == "checkpoint" and not os.path.isdir(os.path.join(root, "vae"))
  return settings_from_config(config, Autoencoder("vae", VaeConfig(), {}) if no_vae else None, check_files=False)


def build_model(settings: Settings):
  dtype = jnp.dtype(settings.dtype)
  if settings.checkpoint:
    loaded, params = interop.load_flux_transformer(os.path.expanduser(settings.checkpoint), dtype=dtype)
    cfg = settings.transformer_config(loaded)
  else:
    cfg = settings.transformer_config()
    params = model.init_params(jax.random.key(settings.seed), cfg, dtype)
  lora = interop.load_lora(os.path.expanduser(settings.lora), cfg) if settings.lora else None
  return cfg, params, lora


def random_inputs(settings: Settings, cfg) -> model.FluxInputs:
  rng = np.random.default_rng(settings.seed)
  grid, ref_grid = settings.resolution // settings.token_pixels, settings.ref_resolution // settings.token_pixels
  b, r, text_len = settings.batch_size, settings.num_refs, settings.text_len
  return model.FluxInputs(
      target=rng.standard_normal((b, grid * grid, cfg.in_channels), np.float32),
      target_ids=model.image_ids(grid, grid),
      text=rng.standard_normal((b, text_len, cfg.joint_attention_dim), np.float32),
      text_ids=model.text_ids(text_len),
      pooled=rng.standard_normal((b, cfg.pooled_projection_dim), np.float32),
      timestep=np.full((b,), 0.5, np.float32), guidance=np.full((b,), settings.guidance, np.float32),
      refs=rng.standard_normal((b, r, ref_grid * ref_grid, cfg.in_channels), np.float32) if r else None,
      ref_ids=model.reference_ids(r, ref_grid, ref_grid) if r else None)


def main(argv):
  del argv
  settings = read_settings(_CONFIG.value)
  cfg, params, lora = build_model(settings)
  inputs = random_inputs(settings, cfg)
  forward = jax.jit(model.forward, static_argnums=(2, 4))
  start = time.perf_counter()
  compiled = forward.lower(params, lora, cfg, inputs, True).compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  pred, aux = jax.block_until_ready(compiled(params, lora, inputs))
  run_s = time.perf_counter() - start
  print(f"model: {cfg}")
  print(f"references: {settings.num_refs}, prediction {pred.shape} {pred.dtype}, "
        f"finite: {bool(jnp.isfinite(pred).all())}")
  if "attention_maps" in aux:
    print(f"attention maps (per double block, head-averaged): {aux['attention_maps'].shape}")
  print(f"compile {compile_s:.2f} s, forward {run_s:.3f} s on {jax.devices()[0].platform}")


if __name__ == "__main__":
  cli.run_absl(main, known_fields)
