"""Loading the FLUX VAE from a diffusers `vae/` folder (config.json + diffusion_pytorch_model.safetensors).

Every tensor our model expects is named by its diffusers key; the folder's table is checked against
that list in one go (all missing/unexpected/mismatched keys in one CheckpointError) before anything
is read. Conv weights go from torch's [out, in, kh, kw] to our HWIO, linear weights are transposed.
GroupNorm scales and biases stay float32 whatever the requested dtype.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp

from mosaic_jax.interop.param_assembly import Target, assemble, conv_kernel, linear_kernel, torch_leaf_name
from mosaic_jax.interop.tensor_table import (DIFFUSERS_INDEX, DIFFUSERS_WEIGHTS, CheckpointError,
                                             folder_entries, read_config_json, resolve_folder)
from mosaic_jax.model.vae import VaeConfig, param_shapes



def vae_targets(cfg: VaeConfig) -> list[Target]:
  """One Target per tensor of diffusers' AutoencoderKL state dict."""
  flat, _ = jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
  module_leaves: dict[tuple, set] = {}
  for path, _ in flat:
    names = tuple(p.key for p in path)
    module_leaves.setdefault(names[:-1], set()).add(names[-1])
  targets = []
  for path, shape in flat:
    names = tuple(p.key for p in path)
    leaf = names[-1]
    is_norm = "scale" in module_leaves[names[:-1]]
    convert, torch_shape = None, shape
    if leaf == "kernel" and len(shape) == 4:
      convert, torch_shape = conv_kernel, (shape[3], shape[2], shape[0], shape[1])
    elif leaf == "kernel":
      convert, torch_shape = linear_kernel, shape[::-1]
    targets.append(Target(".".join(names[:-1] + (torch_leaf_name(leaf),)), names, None, tuple(torch_shape), convert,
                          jnp.float32 if is_norm else None))
  return targets


def read_vae_config(folder: str) -> VaeConfig:
  config = read_config_json(folder, "diffusers AutoencoderKL", DIFFUSERS_WEIGHTS, DIFFUSERS_INDEX)
  config_path = os.path.join(folder, "config.json")
  try:
    return VaeConfig.from_diffusers_config(config, source=config_path)
  except (TypeError, ValueError) as e:
    raise CheckpointError(str(e)) from e


def load_vae(path: str, dtype=jnp.float32, place: Callable | None = None) -> tuple[VaeConfig, dict]:
  """(config, params) from a diffusers `vae/` folder, or a FLUX checkpoint root holding `vae/`.

  float32 is the default because diffusers runs the FLUX VAE upcast (force_upcast); bf16 works too.
  `place(name, numpy_array)` puts each leaf where it belongs (default: the default device).
  """
  folder = resolve_folder(path, "vae", "diffusers")
  cfg = read_vae_config(folder)
  entries = folder_entries(folder, DIFFUSERS_WEIGHTS, DIFFUSERS_INDEX)
  params = assemble(entries, vae_targets(cfg), f"{folder} does not fit the VAE config {cfg}", dtype, place)
  return cfg, params
