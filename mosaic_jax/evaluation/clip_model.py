"""CLIP (image and text towers with their projections) from a transformers `CLIPModel` folder, any size.

The folder is what `CLIPModel.save_pretrained` writes (config.json + model.safetensors or shards; the
hub's openai/clip-vit-base-patch32 and clip-vit-large-patch14 hold the same keys, plus the tokenizer
files). Sizes come from config.json. The text tower is FLUX's CLIP text encoder (model/clip.py, loaded
with its own key table); the image tower is model/vit.py. Embeddings are the projected pooled
outputs (`text_embeds` / `image_embeds` before CLIPModel unit-normalizes them): the scores normalize.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax.numpy as jnp

from mosaic_jax.interop.param_assembly import Target, assemble, linear_kernel
from mosaic_jax.interop.tensor_table import (TRANSFORMERS_INDEX, TRANSFORMERS_WEIGHTS, CheckpointError,
                                             folder_entries, read_config_json)
from mosaic_jax.interop.text_encoder_checkpoint import clip_targets, normalize_clip_entries
from mosaic_jax.interop.vit_checkpoint import vit_targets
from mosaic_jax.model import clip as clip_text
from mosaic_jax.model.clip import ClipTextConfig
from mosaic_jax.model.layers import linear
from mosaic_jax.model.vit import VitConfig, encode_images


@dataclasses.dataclass(frozen=True)
class ClipModelConfig:
  text: ClipTextConfig
  vision: VitConfig
  projection_dim: int


@dataclasses.dataclass
class ClipModel:
  """Loaded weights; `embed_images(pixels)` and `embed_texts(ids)` are jit-able pure calls."""
  config: ClipModelConfig
  text_params: dict
  vision_params: dict
  folder: str

  def embed_images(self, pixels):
    """CLIP-normalized pixels [B, S, S, 3] -> [B, projection_dim]."""
    return encode_images(self.vision_params, self.config.vision, pixels)

  def embed_texts(self, input_ids):
    """Token ids [B, 77] -> [B, projection_dim] (the projected end-of-text state)."""
    return text_embeddings(self.text_params, self.config.text, input_ids)


def text_embeddings(text_params, cfg: ClipTextConfig, input_ids):
  """The text tower's output: the end-of-text state through `text_projection` (padding after the
  end-of-text token cannot change it: attention is causal)."""
  _, pooled = clip_text.encode(text_params, cfg, input_ids)
  return linear(text_params["text_projection"], pooled).astype(jnp.float32)


def config_from_json(config: dict, source: str) -> ClipModelConfig:
  if config.get("model_type") != "clip" or "vision_config" not in config or "text_config" not in config:
    raise CheckpointError(f"{source}: expected a transformers CLIPModel config (model_type 'clip' with "
                          f"text_config and vision_config), got model_type {config.get('model_type')!r}.")
  try:
    text = ClipTextConfig.from_transformers_config(config, source)
    v = config["vision_config"]
    projection_dim = int(config.get("projection_dim", 512))
    vision = VitConfig(hidden_size=v.get("hidden_size", 768), intermediate_size=v.get("intermediate_size", 3072),
                       num_hidden_layers=v.get("num_hidden_layers", 12),
                       num_attention_heads=v.get("num_attention_heads", 12), image_size=v.get("image_size", 224),
                       patch_size=v.get("patch_size", 32), hidden_act=v.get("hidden_act", "quick_gelu"),
                       layer_norm_eps=v.get("layer_norm_eps", 1e-5), pre_norm=True, patch_bias=False,
                       projection_dim=projection_dim)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{source}: {e}") from e
  return ClipModelConfig(text, vision, projection_dim)


def vision_targets(cfg: VitConfig) -> list[Target]:
  d, n = cfg.hidden_size, cfg.num_patches + 1
  v = "vision_model."
  top = {("patch", "kernel"): (v + "embeddings.patch_embedding.weight", (d, 3, cfg.patch_size, cfg.patch_size)),
         ("class_embedding", "embedding"): (v + "embeddings.class_embedding", (d,)),
         ("position_embedding", "embedding"): (v + "embeddings.position_embedding.weight", (n, d)),
         ("pre_norm", "scale"): (v + "pre_layrnorm.weight", (d,)), ("pre_norm", "bias"): (v + "pre_layrnorm.bias", (d,)),
         ("final_norm", "scale"): (v + "post_layernorm.weight", (d,)),
         ("final_norm", "bias"): (v + "post_layernorm.bias", (d,)),
         ("projection", "kernel"): ("visual_projection.weight", (cfg.projection_dim, d))}
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}
  return vit_targets(cfg, top, lambda names, i: (f"{v}encoder.layers.{i}." + ".".join(names[:-1]) + "."
                                                 + leaf[names[-1]]))


def load_clip_model(folder: str, dtype=jnp.float32, place: Callable | None = None) -> ClipModel:
  """Both towers from a CLIPModel folder; every missing, unexpected or misshapen key in one error."""
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise CheckpointError(f"{folder}: no such folder (expected a transformers CLIPModel folder).")
  config = read_config_json(folder, "transformers CLIPModel", TRANSFORMERS_WEIGHTS, TRANSFORMERS_INDEX)
  cfg = config_from_json(config, os.path.join(folder, "config.json"))
  entries = folder_entries(folder, TRANSFORMERS_WEIGHTS, TRANSFORMERS_INDEX)
  entries.pop("logit_scale", None)
  entries.pop("vision_model.embeddings.position_ids", None)
  text_entries = normalize_clip_entries({k: e for k, e in entries.items() if k.startswith("text_model.")})
  if "text_projection.weight" in entries:
    text_entries["text_projection.weight"] = entries["text_projection.weight"]
  vision_entries = {k: e for k, e in entries.items() if k.startswith("vision_model.") or k == "visual_projection.weight"}
  stray = sorted(set(entries) - set(vision_entries) - {k for k in entries if k.startswith("text_model.")}
                 - {"text_projection.weight"})
  if stray:
    raise CheckpointError(f"{folder}: keys that belong to neither CLIP tower: {stray[:10]}.")
  text_targets = clip_targets(cfg.text) + [Target("text_projection.weight", ("text_projection", "kernel"), None,
                                                  (cfg.projection_dim, cfg.text.hidden_size), linear_kernel)]
  text_params = assemble(text_entries, text_targets, f"{folder} does not fit the CLIP text tower {cfg.text}",
                         dtype, place)
  vision_params = assemble(vision_entries, vision_targets(cfg.vision),
                           f"{folder} does not fit the CLIP image tower {cfg.vision}", dtype, place)
  return ClipModel(cfg, text_params, vision_params, folder)
