"""Loading FLUX transformer weights: diffusers `transformer/` folders and BFL single files.

Both formats are first described as a table {diffusers key: (torch shape, reader)} without reading any
tensor; the table is checked against the shapes our model expects (every missing key, unexpected key
and shape mismatch reported in one error), and only then is each parameter assembled tensor by tensor
in the target dtype and handed to `place` (default: device_put), so the host never holds more than one
stacked parameter beyond the memory-mapped files.
"""

from __future__ import annotations

import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mosaic_jax.interop.param_assembly import Target, assemble, linear_kernel, torch_leaf_name
from mosaic_jax.interop.safetensors_io import SafetensorsFile
from mosaic_jax.interop.tensor_table import (DIFFUSERS_INDEX, DIFFUSERS_WEIGHTS, CheckpointError, Entry,
                                             folder_entries, read_config_json, resolve_folder)
from mosaic_jax.model.config import FluxConfig
from mosaic_jax.model.transformer import param_shapes

BLOCK_GROUPS = ("transformer_blocks", "single_transformer_blocks")


# ---- our parameter names <-> diffusers names ------------------------------------------------------

def expected_diffusers_keys(cfg: FluxConfig):
  """Yields (diffusers key, our leaf path tuple, layer index or None, torch shape)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
  for path, shape in flat:
    names = tuple(p.key for p in path)
    layers = [None]
    if names[0] in BLOCK_GROUPS:
      layers, shape = range(shape[0]), shape[1:]
    torch_shape = shape[::-1] if names[-1] == "kernel" else shape
    for i in layers:
      middle = names[:1] + ((str(i),) if i is not None else ()) + names[1:-1]
      yield ".".join(middle + (torch_leaf_name(names[-1]),)), names, i, tuple(torch_shape)


def flux_targets(cfg: FluxConfig) -> list[Target]:
  return [Target(name, leaf_path, layer, shape, linear_kernel if leaf_path[-1] == "kernel" else None)
          for name, leaf_path, layer, shape in expected_diffusers_keys(cfg)]


# ---- diffusers folder ----------------------------------------------------------------------------

def diffusers_folder_entries(folder: str) -> tuple[FluxConfig, dict[str, Entry]]:
  what = "diffusers FluxTransformer2DModel"
  config = read_config_json(folder, what, DIFFUSERS_WEIGHTS, DIFFUSERS_INDEX)
  cfg = FluxConfig.from_diffusers_config(config, source=os.path.join(folder, "config.json"))
  return cfg, folder_entries(folder, DIFFUSERS_WEIGHTS, DIFFUSERS_INDEX)


# ---- BFL single file (flux1-dev.safetensors names) -----------------------------------------------

_BFL_ROOT = {
    "img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
}
_BFL_DOUBLE = {
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
    "img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k",
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
}
_BFL_DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                     "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_BFL_SINGLE = {"linear2": "proj_out", "modulation.lin": "norm.linear",
               "norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}
_BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def infer_bfl_config(f: SafetensorsFile, keys: list[str]) -> FluxConfig:
  def count(prefix):
    ids = {int(m.group(1)) for k in keys if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0
  def shape(key):
    return f.shape(next(k for k in keys if _strip(k) == key))
  hidden, in_channels = shape("img_in.weight")
  norm_key = ("double_blocks.0.img_attn.norm.query_norm.scale" if count("double_blocks")
              else "single_blocks.0.norm.query_norm.scale")
  head_dim = shape(norm_key)[0]
  if head_dim != 128:
    raise CheckpointError(f"{f.path}: head_dim {head_dim} is not FLUX's 128; pass config= to say "
                          "which rope axes it uses.")
  return FluxConfig(
      in_channels=in_channels, out_channels=shape("final_layer.linear.weight")[0],
      num_layers=count("double_blocks"), num_single_layers=count("single_blocks"),
      attention_head_dim=head_dim, num_attention_heads=hidden // head_dim,
      joint_attention_dim=shape("txt_in.weight")[1],
      pooled_projection_dim=shape("vector_in.in_layer.weight")[1],
      guidance_embeds=any(_strip(k).startswith("guidance_in.") for k in keys))


def _strip(key: str) -> str:
  for p in _BFL_PREFIXES:
    if key.startswith(p):
      return key[len(p):]
  return key


def bfl_file_entries(path: str, cfg: FluxConfig | None) -> tuple[FluxConfig, dict[str, Entry]]:
  f = SafetensorsFile(path)
  keys = f.keys()
  cfg = cfg or infer_bfl_config(f, keys)
  d, mlp = cfg.hidden_size, cfg.mlp_hidden_size
  entries: dict[str, Entry] = {}

  def add(target, key, rows=None, swap_halves=False):
    full = f.shape(key)
    shape = full if rows is None else (rows[1] - rows[0],) + tuple(full[1:])
    def read(dtype):
      array = f.read(key)
      if rows is not None:
        array = array[rows[0]:rows[1]]
      if swap_halves:  # BFL final AdaLN is (shift, scale); diffusers' norm_out is (scale, shift)
        half = array.shape[0] // 2
        array = np.concatenate([array[half:], array[:half]], axis=0)
      return array.astype(dtype)
    entries[target] = Entry(tuple(shape), read)

  for key in keys:
    name = _strip(key)
    module, leaf = name.rsplit(".", 1)
    leaf = "weight" if leaf == "scale" else leaf
    m = re.match(r"(double_blocks|single_blocks)\.(\d+)\.(.+)$", module)
    if module in _BFL_ROOT:
      add(f"{_BFL_ROOT[module]}.{leaf}", key)
    elif module == "final_layer.adaLN_modulation.1":
      add(f"norm_out.linear.{leaf}", key, swap_halves=True)
    elif m and m.group(1) == "double_blocks" and m.group(3) in _BFL_DOUBLE:
      add(f"transformer_blocks.{m.group(2)}.{_BFL_DOUBLE[m.group(3)]}.{leaf}", key)
    elif m and m.group(1) == "double_blocks" and m.group(3) in _BFL_DOUBLE_FUSED:
      for j, target in enumerate(_BFL_DOUBLE_FUSED[m.group(3)]):
        add(f"transformer_blocks.{m.group(2)}.{target}.{leaf}", key, rows=(j * d, (j + 1) * d))
    elif m and m.group(1) == "single_blocks" and m.group(3) in _BFL_SINGLE:
      add(f"single_transformer_blocks.{m.group(2)}.{_BFL_SINGLE[m.group(3)]}.{leaf}", key)
    elif m and m.group(1) == "single_blocks" and m.group(3) == "linear1":
      bounds = [0, d, 2 * d, 3 * d, 3 * d + mlp]
      for j, target in enumerate(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")):
        add(f"single_transformer_blocks.{m.group(2)}.{target}.{leaf}", key, rows=(bounds[j], bounds[j + 1]))
    else:
      entries[f"(BFL) {key}"] = Entry(f.shape(key), None)  # reported as unexpected, by its own name
  return cfg, entries


# ---- entry point ---------------------------------------------------------------------------------

def load_flux_transformer(path: str, dtype=jnp.bfloat16, config: FluxConfig | None = None,
                          place: Callable | None = None) -> tuple[FluxConfig, dict]:
  """(config, params) from a diffusers transformer folder, a checkpoint root holding `transformer/`,
  or a BFL single .safetensors file. `place(name, numpy_array)` puts each parameter where it
  belongs (e.g. a sharded device_put); by default on the default device."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = resolve_folder(path, "transformer", "diffusers")
    cfg, entries = diffusers_folder_entries(path)
    if config is not None:
      if config.to_diffusers_config() != cfg.to_diffusers_config():
        raise CheckpointError(f"{path}/config.json describes {cfg}, but config={config} was passed.")
      cfg = config  # keeps the caller's execution options
  elif os.path.isfile(path):
    cfg, entries = bfl_file_entries(path, config)
  else:
    raise CheckpointError(f"{path}: no such file or folder.")
  params = assemble(entries, flux_targets(cfg), f"{path} does not fit the FLUX transformer config {cfg}",
                    dtype, place)
  return cfg, params
