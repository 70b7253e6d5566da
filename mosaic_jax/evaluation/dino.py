"""DINO ViT (v1; ViT-S/16 at full size) from a transformers `ViTModel` folder (facebook/dino-vits16 layout).

The LayerNorm epsilon is a setting, not read from the file: the original torch.hub DINO uses 1e-6 and
DreamBench's DINO score was computed with it, while the converted transformers weights declare 1e-12.
`DEFAULT_DINO_EPS` is the original; every result records which one it used. The feature is the class
token after the final LayerNorm (torch.hub DINO's output, transformers' `last_hidden_state[:, 0]`); the
pooler of ViTModel (dense + tanh, untrained in the DINO conversion) is not used and its weights are
skipped, as are a classification head's and the `vit.` prefix of a ViTFor... checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax.numpy as jnp

from mosaic_jax.interop.param_assembly import assemble
from mosaic_jax.interop.tensor_table import (TRANSFORMERS_INDEX, TRANSFORMERS_WEIGHTS, CheckpointError,
                                             folder_entries, read_config_json)
from mosaic_jax.interop.vit_checkpoint import vit_targets
from mosaic_jax.model.vit import VitConfig, encode_images

DEFAULT_DINO_EPS = 1e-6

_LAYER_NAMES = {
    ("self_attn", "q_proj"): "attention.attention.query", ("self_attn", "k_proj"): "attention.attention.key",
    ("self_attn", "v_proj"): "attention.attention.value", ("self_attn", "out_proj"): "attention.output.dense",
    ("layer_norm1",): "layernorm_before", ("layer_norm2",): "layernorm_after",
    ("mlp", "fc1"): "intermediate.dense", ("mlp", "fc2"): "output.dense",
}


@dataclasses.dataclass
class DinoModel:
  config: VitConfig
  params: dict
  folder: str

  def embed_images(self, pixels):
    """ImageNet-normalized pixels [B, 224, 224, 3] -> class-token features [B, hidden]."""
    return encode_images(self.params, self.config, pixels)


def config_from_json(config: dict, layer_norm_eps: float, source: str) -> VitConfig:
  if config.get("model_type") != "vit":
    raise CheckpointError(f"{source}: model_type is {config.get('model_type')!r}, expected 'vit' "
                          "(a transformers ViTModel folder such as facebook/dino-vits16).")
  if not config.get("qkv_bias", True):
    raise CheckpointError(f"{source}: qkv_bias=false is not supported (DINO's attention has biases).")
  try:
    return VitConfig(hidden_size=config.get("hidden_size", 768), intermediate_size=config.get("intermediate_size", 3072),
                     num_hidden_layers=config.get("num_hidden_layers", 12),
                     num_attention_heads=config.get("num_attention_heads", 12),
                     image_size=config.get("image_size", 224), patch_size=config.get("patch_size", 16),
                     hidden_act=config.get("hidden_act", "gelu"), layer_norm_eps=float(layer_norm_eps))
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{source}: {e}") from e


def dino_targets(cfg: VitConfig):
  d, n = cfg.hidden_size, cfg.num_patches + 1
  top = {("patch", "kernel"): ("embeddings.patch_embeddings.projection.weight", (d, 3, cfg.patch_size, cfg.patch_size)),
         ("patch", "bias"): ("embeddings.patch_embeddings.projection.bias", (d,)),
         ("class_embedding", "embedding"): ("embeddings.cls_token", (1, 1, d)),
         ("position_embedding", "embedding"): ("embeddings.position_embeddings", (1, n, d)),
         ("final_norm", "scale"): ("layernorm.weight", (d,)), ("final_norm", "bias"): ("layernorm.bias", (d,))}
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}
  return vit_targets(cfg, top, lambda names, i: f"encoder.layer.{i}.{_LAYER_NAMES[names[:-1]]}.{leaf[names[-1]]}")


def load_dino(folder: str, layer_norm_eps: float = DEFAULT_DINO_EPS, dtype=jnp.float32,
              place: Callable | None = None) -> DinoModel:
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise CheckpointError(f"{folder}: no such folder (expected a transformers ViTModel folder, e.g. "
                          "facebook/dino-vits16).")
  config = read_config_json(folder, "transformers ViTModel", TRANSFORMERS_WEIGHTS, TRANSFORMERS_INDEX)
  cfg = config_from_json(config, layer_norm_eps, os.path.join(folder, "config.json"))
  entries = {}
  for key, entry in folder_entries(folder, TRANSFORMERS_WEIGHTS, TRANSFORMERS_INDEX).items():
    key = key[len("vit."):] if key.startswith("vit.") else key
    if not key.startswith(("pooler.", "classifier.")):
      entries[key] = entry
  params = assemble(entries, dino_targets(cfg), f"{folder} does not fit the DINO ViT {cfg}", dtype, place)
  return DinoModel(cfg, params, folder)
