"""Which modules MOSAIC adapts, and the LoRA pytree that holds them.

The LoRA pytree mirrors the parameter pytree for the adapted modules only: block modules carry a
leading layer axis like the base weights. LoRA acts on reference tokens only (see transformer.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mosaic_jax.model.config import FluxConfig

# Dotted module paths, relative to the model root or to one block (docs/method.md, 'LoRA').
ROOT_TARGETS = ("x_embedder",)
DOUBLE_TARGETS = ("norm1.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.2")
SINGLE_TARGETS = ("norm.linear", "proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v")


def get_path(tree, dotted: str):
  """tree["a"]["b"]... for "a.b"; None when tree is None or the path is absent."""
  for part in dotted.split("."):
    if tree is None or part not in tree:
      return None
    tree = tree[part]
  return tree


def set_path(tree: dict, dotted: str, value) -> None:
  parts = dotted.split(".")
  for part in parts[:-1]:
    tree = tree.setdefault(part, {})
  tree[parts[-1]] = value


def target_modules(cfg: FluxConfig):
  """Yields (group, module): group is "" (root), "transformer_blocks" or "single_transformer_blocks"."""
  for m in ROOT_TARGETS:
    yield "", m
  if cfg.num_layers:
    for m in DOUBLE_TARGETS:
      yield "transformer_blocks", m
  if cfg.num_single_layers:
    for m in SINGLE_TARGETS:
      yield "single_transformer_blocks", m


def lora_shapes(params_or_shapes, cfg: FluxConfig, rank: int) -> dict:
  """Shapes of a rank-`rank` LoRA for the given base parameters (arrays or ShapeDtypeStructs)."""
  out: dict = {}
  for group, module in target_modules(cfg):
    path = f"{group}.{module}" if group else module
    kernel = get_path(params_or_shapes, path)["kernel"]
    lead, (fan_in, fan_out) = kernel.shape[:-2], kernel.shape[-2:]
    set_path(out, path, {"lora_A": lead + (fan_in, rank), "lora_B": lead + (rank, fan_out)})
  return out


def init_lora(key, params, cfg: FluxConfig, rank: int, dtype=jnp.float32) -> dict:
  """MOSAIC's init: gaussian A (std 1/rank, as peft's "gaussian"), zero B, so training starts at the base model."""
  shapes = lora_shapes(params, cfg, rank)
  leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(leaves))
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(
      shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
  arrays = []
  for k, path, shape in zip(keys, paths, leaves):
    if path[-1].key == "lora_A":
      arrays.append(jax.random.normal(k, shape, dtype) / rank)
    else:
      arrays.append(jnp.zeros(shape, dtype))
  return jax.tree_util.tree_unflatten(treedef, arrays)
