"""Loading FLUX's text encoders from transformers folders: T5 (`text_encoder_2/`) and CLIP (`text_encoder/`).

Each folder is config.json plus model.safetensors, or shards listed by model.safetensors.index.json
(T5-XXL ships as two shards). Key spellings differ between transformers versions, so the table is first
normalized to one spelling:

- T5: the token table is `shared.weight`; files from older versions may (also) hold the tied copy
  `encoder.embed_tokens.weight`, used when `shared.weight` is absent and dropped otherwise. A full
  T5 checkpoint's `decoder.*` and `lm_head.*` are skipped, as T5EncoderModel does.
- CLIP: transformers 5 saves CLIPTextModel keys without the `text_model.` prefix that older files
  (FLUX.1's among them) carry; the non-persistent `embeddings.position_ids` buffer of old files is
  dropped.

Then the table is checked against what the config implies (every bad key in one CheckpointError) and
assembled leaf by leaf: weights in `dtype` (bf16 for T5-XXL: 9.5 GB instead of 19), norms and T5's
relative-position table in float32. Stacked layer leaves go through `place(name, array)` whole, so a
sharded device_put (like the DiT's) places T5-XXL without a host copy of more than one leaf.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp

from mosaic_jax.interop.param_assembly import Target, assemble, linear_kernel, torch_leaf_name
from mosaic_jax.interop.tensor_table import (TRANSFORMERS_INDEX, TRANSFORMERS_WEIGHTS, CheckpointError, Entry,
                                             folder_entries, read_config_json, resolve_folder)
from mosaic_jax.model.clip import ClipTextConfig
from mosaic_jax.model.clip import param_shapes as clip_param_shapes
from mosaic_jax.model.t5 import T5Config
from mosaic_jax.model.t5 import param_shapes as t5_param_shapes


def _targets(shapes: dict, stacked_group: tuple[str, ...], torch_name: Callable[[tuple, int | None], str]):
  """Targets for a pytree whose leaves under `stacked_group` carry a leading layer axis."""
  flat, _ = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
  targets = []
  for path, shape in flat:
    names = tuple(p.key for p in path)
    leaf = names[-1]
    stacked = names[:len(stacked_group)] == stacked_group
    layers = range(shape[0]) if stacked else [None]
    shape = shape[1:] if stacked else shape
    is_float32 = leaf == "scale" or "norm" in names[-2] or names[-2] == "relative_attention_bias"
    convert = linear_kernel if leaf == "kernel" else None
    torch_shape = shape[::-1] if leaf == "kernel" else shape
    for layer in layers:
      targets.append(Target(torch_name(names, layer), names, layer, tuple(torch_shape), convert,
                            jnp.float32 if is_float32 else None))
  return targets


# ---- T5 -------------------------------------------------------------------------------------------

def t5_targets(cfg: T5Config) -> list[Target]:
  def torch_name(names, layer):
    if names == ("encoder", "relative_attention_bias", "embedding"):
      return "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    if layer is not None:  # ("encoder", "block", "layer", ...) -> encoder.block.{i}.layer...
      names = names[:2] + (str(layer),) + names[2:]
    return ".".join(names[:-1] + (torch_leaf_name(names[-1]),))
  return _targets(t5_param_shapes(cfg), ("encoder", "block"), torch_name)


def normalize_t5_entries(entries: dict[str, Entry]) -> dict[str, Entry]:
  entries = {k: v for k, v in entries.items() if not k.startswith(("decoder.", "lm_head."))}
  tied = entries.pop("encoder.embed_tokens.weight", None)
  if tied is not None and "shared.weight" not in entries:
    entries["shared.weight"] = tied
  return entries


def _load_transformers_encoder(path: str, flux_subfolder: str, model_class: str, config_class, normalize,
                               targets, dtype, place):
  """(config, params) of a transformers `model_class` folder (or a FLUX root's `flux_subfolder`):
  config_class read from its config.json, weights normalized to our names and fitted to `targets`."""
  folder = resolve_folder(path, flux_subfolder, "transformers")
  try:
    cfg = config_class.from_transformers_config(
        read_config_json(folder, f"transformers {model_class}", TRANSFORMERS_WEIGHTS, TRANSFORMERS_INDEX),
        source=os.path.join(folder, "config.json"))
  except (TypeError, ValueError) as e:
    raise CheckpointError(str(e)) from e
  entries = normalize(folder_entries(folder, TRANSFORMERS_WEIGHTS, TRANSFORMERS_INDEX))
  params = assemble(entries, targets(cfg), f"{folder} does not fit the {model_class} config {cfg}", dtype, place)
  return cfg, params


def load_t5_encoder(path: str, dtype=jnp.bfloat16, place: Callable | None = None) -> tuple[T5Config, dict]:
  """(config, params) from a transformers T5EncoderModel folder (or a FLUX root with `text_encoder_2/`)."""
  return _load_transformers_encoder(path, "text_encoder_2", "T5EncoderModel", T5Config, normalize_t5_entries,
                                    t5_targets, dtype, place)


# ---- CLIP -----------------------------------------------------------------------------------------

def clip_targets(cfg: ClipTextConfig) -> list[Target]:
  def torch_name(names, layer):
    if layer is not None:  # ("encoder", "layers", ...) -> encoder.layers.{i}...
      names = names[:2] + (str(layer),) + names[2:]
    return ".".join(names[:-1] + (torch_leaf_name(names[-1]),))
  return _targets(clip_param_shapes(cfg), ("encoder", "layers"), torch_name)


def normalize_clip_entries(entries: dict[str, Entry]) -> dict[str, Entry]:
  out = {}
  for key, entry in entries.items():
    key = key[len("text_model."):] if key.startswith("text_model.") else key
    if key != "embeddings.position_ids":
      out[key] = entry
  return out


def load_clip_text_encoder(path: str, dtype=jnp.bfloat16,
                           place: Callable | None = None) -> tuple[ClipTextConfig, dict]:
  """(config, params) from a transformers CLIPTextModel folder (or a FLUX root with `text_encoder/`)."""
  return _load_transformers_encoder(path, "text_encoder", "CLIPTextModel", ClipTextConfig, normalize_clip_entries,
                                    clip_targets, dtype, place)
