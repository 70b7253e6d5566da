"""The FLUX MM-DiT over MOSAIC's packed multi-branch sequence [text | target | ref_1 | ... | ref_R].

Branches are kept as separate arrays (text [B, S, D], target [B, N, D], references [B, R, M, D]) so that
each gets its own modulation and the LoRA touches reference tokens only:

- text and target use the sample's t and guidance; references use t = 0 and their own guidance;
- LoRA (the `lora` pytree, or None) is applied to reference tokens in the adapted modules only;
- attention follows the MOSAIC mask (attention.py); the output is the velocity on target tokens.

Blocks are stacked along a leading layer axis and run with `lax.scan`: one compiled block per kind,
whatever the depth. With no references this is exactly diffusers' FluxTransformer2DModel.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import einops
import jax
import jax.numpy as jnp

from mosaic_jax.model import attention as attn_lib
from mosaic_jax.model.attention_stats import AttentionStatistics, Correspondences, block_statistics
from mosaic_jax.model.config import FluxConfig
from mosaic_jax.model.embeddings import apply_rope, conditioning, rope
from mosaic_jax.model.layers import (gate, gelu_tanh, layer_norm, linear, modulate, modulation, random_params,
                                     rms_norm)
from mosaic_jax.model.lora import get_path
from mosaic_jax.model.remat import checkpointed, keep
from mosaic_jax.parallel import constrain


class FluxInputs(NamedTuple):
  """One batch of the packed sequence. Latent tokens are packed 2x2 patches (64 channels for FLUX).

  target:       [B, N, C]     noisy target latent tokens
  target_ids:   [N, 3]        position ids (embeddings.image_ids)
  text:         [B, S, 4096]  T5 token embeddings
  text_ids:     [S, 3]        zeros (embeddings.text_ids)
  pooled:       [B, 768]      pooled CLIP embedding
  timestep:     [B]           sigma in [0, 1] of text and target (multiplied by 1000 inside)
  guidance:     [B]           guidance scale of text and target (1.0 in training, 3.5 sampling)
  refs:         [B, R, M, C]  clean reference latent tokens, or None (R = 0 is plain FLUX)
  ref_ids:      [R, M, 3]     reference position ids (embeddings.reference_ids)
  ref_guidance: [B]           guidance of the references; None means 1.0. Their t is always 0.
  """
  target: jax.Array
  target_ids: jax.Array
  text: jax.Array
  text_ids: jax.Array
  pooled: jax.Array
  timestep: jax.Array
  guidance: jax.Array
  refs: Optional[jax.Array] = None
  ref_ids: Optional[jax.Array] = None
  ref_guidance: Optional[jax.Array] = None


# ---- parameters ----------------------------------------------------------------------------------

def _linear(fan_in, fan_out):
  return {"kernel": (fan_in, fan_out), "bias": (fan_out,)}


def param_shapes(cfg: FluxConfig) -> dict:
  """Nested dict of shapes; block parameters carry a leading layer axis. Names follow diffusers."""
  d, hd, mlp = cfg.hidden_size, cfg.attention_head_dim, cfg.mlp_hidden_size
  norm = {"scale": (hd,)}
  double = {
      "norm1": {"linear": _linear(d, 6 * d)},
      "norm1_context": {"linear": _linear(d, 6 * d)},
      "attn": {
          "to_q": _linear(d, d), "to_k": _linear(d, d), "to_v": _linear(d, d),
          "norm_q": norm, "norm_k": norm,
          "add_q_proj": _linear(d, d), "add_k_proj": _linear(d, d), "add_v_proj": _linear(d, d),
          "norm_added_q": norm, "norm_added_k": norm,
          "to_out": {"0": _linear(d, d)}, "to_add_out": _linear(d, d),
      },
      "ff": {"net": {"0": {"proj": _linear(d, mlp)}, "2": _linear(mlp, d)}},
      "ff_context": {"net": {"0": {"proj": _linear(d, mlp)}, "2": _linear(mlp, d)}},
  }
  single = {
      "norm": {"linear": _linear(d, 3 * d)},
      "proj_mlp": _linear(d, mlp),
      "proj_out": _linear(d + mlp, d),
      "attn": {"to_q": _linear(d, d), "to_k": _linear(d, d), "to_v": _linear(d, d),
               "norm_q": norm, "norm_k": norm},
  }
  stack = lambda tree, n: jax.tree_util.tree_map(lambda s: (n,) + s, tree,
                                                 is_leaf=lambda x: isinstance(x, tuple))
  time_text = {
      "timestep_embedder": {"linear_1": _linear(256, d), "linear_2": _linear(d, d)},
      "text_embedder": {"linear_1": _linear(cfg.pooled_projection_dim, d), "linear_2": _linear(d, d)},
  }
  if cfg.guidance_embeds:
    time_text["guidance_embedder"] = {"linear_1": _linear(256, d), "linear_2": _linear(d, d)}
  shapes = {
      "x_embedder": _linear(cfg.in_channels, d),
      "context_embedder": _linear(cfg.joint_attention_dim, d),
      "time_text_embed": time_text,
      "norm_out": {"linear": _linear(d, 2 * d)},
      "proj_out": _linear(d, cfg.output_channels),
  }
  if cfg.num_layers:
    shapes["transformer_blocks"] = stack(double, cfg.num_layers)
  if cfg.num_single_layers:
    shapes["single_transformer_blocks"] = stack(single, cfg.num_single_layers)
  return shapes


def init_params(key, cfg: FluxConfig, dtype=jnp.float32) -> dict:
  """Random weights (fan-in scaled normal; norm scales around 1) for demos and benchmarks."""
  return random_params(key, param_shapes(cfg), dtype)


# ---- blocks ---------------------------------------------------------------------------------------

# Activation pins (no-ops when no mesh is set): batch over the data axes, heads and the MLP hidden
# over tensor, so the compiler gathers fsdp-sharded weights rather than activations.
def _pin_stream(x, cfg):
  return constrain(x, ("batch",) + (None,) * (x.ndim - 1), cfg.logical_rules)


def _pin_heads(x, cfg):
  return constrain(x, ("batch",) + (None,) * (x.ndim - 3) + ("heads", None), cfg.logical_rules)


def _pin_mlp(x, cfg):
  return constrain(x, ("batch",) + (None,) * (x.ndim - 2) + ("mlp",), cfg.logical_rules)


def _heads(x, cfg):
  return _pin_heads(einops.rearrange(x, "... (heads d) -> ... heads d", heads=cfg.num_attention_heads), cfg)


def _merge_heads(x):
  return einops.rearrange(x, "... heads d -> ... (heads d)")


# The tags of model/remat.py: what the remat policies that name them keep of a block.
def _out(y):
  """A gated projection's output, kept: the gate's gradient reads it."""
  return keep(y, "block_output")


def _qkv(p, x, cfg, lora, names=("to_q", "to_k", "to_v"), norms=("norm_q", "norm_k")):
  q, k, v = (keep(_heads(linear(p[n], x, get_path(lora, n)), cfg), "qkv") for n in names)
  return rms_norm(p[norms[0]], q), rms_norm(p[norms[1]], k), v


def double_block(p, lp, cfg, txt, img, refs, temb, temb_ref, rope_main, rope_ref, want_map=False,
                 pairs=None, ref_kv=None, keep_ref_kv=False):
  """One double-stream block. p: this layer's params; lp: this layer's LoRA (or None).

  Returns ((txt, img, refs), extras) where extras holds this block's materialized attention map
  (want_map) and/or its AttentionStatistics (pairs given), computed from the very q and k it uses,
  and its reference keys and values (keep_ref_kv). With refs None, `ref_kv` (cached reference keys
  and values) is what text and target attend to.
  """
  txt_len = txt.shape[1]
  txt, img = _pin_stream(txt, cfg), _pin_stream(img, cfg)
  refs = None if refs is None else _pin_stream(refs, cfg)
  s1, c1, g1, s2, c2, g2 = modulation(p["norm1"]["linear"], temb, 6)
  ts1, tc1, tg1, ts2, tc2, tg2 = modulation(p["norm1_context"]["linear"], temb, 6)
  pa = p["attn"]

  q_img, k_img, v_img = _qkv(pa, modulate(layer_norm(img), s1, c1), cfg, None)
  q_txt, k_txt, v_txt = _qkv(pa, modulate(layer_norm(txt), ts1, tc1), cfg, None,
                             ("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k"))
  q_main = apply_rope(jnp.concatenate([q_txt, q_img], axis=1), rope_main)
  k_main = apply_rope(jnp.concatenate([k_txt, k_img], axis=1), rope_main)
  v_main = jnp.concatenate([v_txt, v_img], axis=1)

  q_ref = None
  k_ref, v_ref = ref_kv if ref_kv is not None else (None, None)
  if refs is not None:
    rs1, rc1, rg1, rs2, rc2, rg2 = modulation(p["norm1"]["linear"], temb_ref, 6,
                                              get_path(lp, "norm1.linear"))
    q_ref, k_ref, v_ref = _qkv(pa, modulate(layer_norm(refs), rs1, rc1), cfg, get_path(lp, "attn"))
    q_ref, k_ref = apply_rope(q_ref, rope_ref), apply_rope(k_ref, rope_ref)

  out_main, out_ref = attn_lib.multi_branch_attention(q_main, k_main, v_main, q_ref, k_ref, v_ref,
                                                      cfg.attention_impl, cfg.independent_refs,
                                                      cfg.attention_chunk, cfg.logical_rules)
  attn_txt, attn_img = _merge_heads(out_main[:, :txt_len]), _merge_heads(out_main[:, txt_len:])

  img = img + gate(g1, _out(linear(pa["to_out"]["0"], attn_img)))
  img = img + gate(g2, _out(_feed_forward(p["ff"], modulate(layer_norm(img), s2, c2), None, cfg)))
  txt = txt + gate(tg1, _out(linear(pa["to_add_out"], attn_txt)))
  txt = txt + gate(tg2, _out(_feed_forward(p["ff_context"], modulate(layer_norm(txt), ts2, tc2), None, cfg)))

  extras = {}
  if refs is not None:
    refs = refs + gate(rg1, _out(linear(pa["to_out"]["0"], _merge_heads(out_ref), get_path(lp, "attn.to_out.0"))))
    refs = refs + gate(rg2, _out(_feed_forward(p["ff"], modulate(layer_norm(refs), rs2, rc2), get_path(lp, "ff"),
                                               cfg)))
    k_target = k_main[:, txt_len:]
    if want_map:
      extras["attention_maps"] = attn_lib.reference_target_attention_map(q_ref, k_target)
    if pairs is not None:
      extras["attention_statistics"] = block_statistics(
          q_ref, k_target, pairs, cfg.stats_chunk, cfg.logical_rules if cfg.attention_impl == "splash" else None)
    if keep_ref_kv:
      extras["ref_kv"] = (k_ref, v_ref)
  return (txt, img, refs), extras


def _feed_forward(p, x, lp, cfg):
  """GELU-tanh MLP; only `net.2` is LoRA-adapted (MOSAIC leaves `net.0.proj` alone)."""
  h = _pin_mlp(gelu_tanh(keep(linear(p["net"]["0"]["proj"], x), "mlp_hidden")), cfg)
  return linear(p["net"]["2"], h, get_path(lp, "net.2"))


def single_block(p, lp, cfg, main, refs, temb, temb_ref, rope_main, rope_ref, ref_kv=None,
                 keep_ref_kv=False):
  """One single-stream block: parallel attention and MLP, proj_out over concat[attn, mlp].

  `main` is [text | target]: both use the target's conditioning, so they share one modulation.
  Returns ((main, refs), extras); `ref_kv` and `keep_ref_kv` as in double_block.
  """
  main = _pin_stream(main, cfg)
  refs = None if refs is None else _pin_stream(refs, cfg)
  shift, scale, g = modulation(p["norm"]["linear"], temb, 3)
  x = modulate(layer_norm(main), shift, scale)
  mlp_main = _pin_mlp(gelu_tanh(keep(linear(p["proj_mlp"], x), "mlp_hidden")), cfg)
  q_main, k_main, v_main = _qkv(p["attn"], x, cfg, None)
  q_main, k_main = apply_rope(q_main, rope_main), apply_rope(k_main, rope_main)

  q_ref = None
  k_ref, v_ref = ref_kv if ref_kv is not None else (None, None)
  if refs is not None:
    rshift, rscale, rg = modulation(p["norm"]["linear"], temb_ref, 3, get_path(lp, "norm.linear"))
    xr = modulate(layer_norm(refs), rshift, rscale)
    mlp_ref = _pin_mlp(gelu_tanh(keep(linear(p["proj_mlp"], xr, get_path(lp, "proj_mlp")), "mlp_hidden")), cfg)
    q_ref, k_ref, v_ref = _qkv(p["attn"], xr, cfg, get_path(lp, "attn"))
    q_ref, k_ref = apply_rope(q_ref, rope_ref), apply_rope(k_ref, rope_ref)

  out_main, out_ref = attn_lib.multi_branch_attention(q_main, k_main, v_main, q_ref, k_ref, v_ref,
                                                      cfg.attention_impl, cfg.independent_refs,
                                                      cfg.attention_chunk, cfg.logical_rules)
  main = main + gate(g, _out(linear(p["proj_out"], jnp.concatenate([_merge_heads(out_main), mlp_main], -1))))
  if refs is not None:
    refs = refs + gate(rg, _out(linear(p["proj_out"], jnp.concatenate([_merge_heads(out_ref), mlp_ref], -1),
                                       get_path(lp, "proj_out"))))
  extras = {"ref_kv": (k_ref, v_ref)} if keep_ref_kv and refs is not None else {}
  return (main, refs), extras


# ---- the model ------------------------------------------------------------------------------------

class _Streams(NamedTuple):
  """The embedded branches and what every block reads besides them; the reference fields are None
  without references."""
  txt: jax.Array
  img: jax.Array
  refs: Optional[jax.Array]
  temb: jax.Array
  temb_ref: Optional[jax.Array]
  rope_main: tuple
  rope_ref: Optional[tuple]


def _has_refs(inputs: FluxInputs) -> bool:
  return inputs.refs is not None and inputs.refs.shape[1] > 0


def _embed(params, lora, cfg: FluxConfig, inputs: FluxInputs) -> _Streams:
  """Token embeddings, conditioning vectors and rotary tables of every branch (references at t = 0)."""
  dtype = params["x_embedder"]["kernel"].dtype
  batch = inputs.target.shape[0]
  temb = conditioning(params["time_text_embed"], cfg, inputs.timestep, inputs.guidance, inputs.pooled)
  img = linear(params["x_embedder"], inputs.target.astype(dtype))
  txt = linear(params["context_embedder"], inputs.text.astype(dtype))
  rope_main = rope(jnp.concatenate([inputs.text_ids, inputs.target_ids], axis=0),
                   cfg.axes_dims_rope, cfg.rope_theta)
  refs = temb_ref = rope_ref = None
  if _has_refs(inputs):
    ref_guidance = (jnp.ones((batch,), jnp.float32) if inputs.ref_guidance is None
                    else inputs.ref_guidance)
    temb_ref = conditioning(params["time_text_embed"], cfg, jnp.zeros((batch,), jnp.float32),
                            ref_guidance, inputs.pooled)
    refs = linear(params["x_embedder"], inputs.refs.astype(dtype), get_path(lora, "x_embedder"))
    rope_ref = rope(inputs.ref_ids, cfg.axes_dims_rope, cfg.rope_theta)
  return _Streams(txt, img, refs, temb, temb_ref, rope_main, rope_ref)


def _scan_group(step, carry, params, lora, group: str, cache, count: int, cfg: FluxConfig):
  """`step` over the first `count` blocks of the stacked `group` with one `lax.scan` (one compiled block
  whatever the depth). Returns (carry, the steps' extras stacked on a leading layer axis)."""
  if not count:
    return carry, {}
  layers = (params[group], get_path(lora, group), cache)
  if count == jax.tree_util.tree_leaves(params[group])[0].shape[0]:
    return jax.lax.scan(checkpointed(step, cfg.remat_policy), carry, layers, unroll=cfg.unroll_layers)

  # The first blocks only: scan over their indices and read each block's weights in place. Scanning over
  # a slice of the stacked weights would copy the slice first (XLA:CPU, 4 of 8 FLUX single blocks in
  # float32: 2.3 GB more temporary memory).
  def step_at(carry, index):
    return step(carry, jax.tree_util.tree_map(lambda x: jax.lax.dynamic_index_in_dim(x, index, keepdims=False),
                                              layers))
  return jax.lax.scan(checkpointed(step_at, cfg.remat_policy), carry, jnp.arange(count), unroll=cfg.unroll_layers)


def _run_double_blocks(params, lora, cfg: FluxConfig, streams: _Streams, count: int, cache=None,
                       want_maps=False, pairs=None, keep_kv=False):
  """The first `count` double blocks: ((txt, img, refs), extras); the options as in double_block."""
  def step(carry, layer):
    p, lp, kv = layer
    return double_block(p, lp, cfg, *carry, streams.temb, streams.temb_ref, streams.rope_main, streams.rope_ref,
                        want_maps, pairs, kv, keep_kv)
  return _scan_group(step, (streams.txt, streams.img, streams.refs), params, lora, "transformer_blocks", cache,
                     count, cfg)


def _run_single_blocks(params, lora, cfg: FluxConfig, streams: _Streams, main, refs, count: int, cache=None,
                       keep_kv=False):
  """The first `count` single blocks over main = [text | target]: ((main, refs), extras)."""
  def step(carry, layer):
    p, lp, kv = layer
    return single_block(p, lp, cfg, *carry, streams.temb, streams.temb_ref, streams.rope_main, streams.rope_ref,
                        kv, keep_kv)
  return _scan_group(step, (main, refs), params, lora, "single_transformer_blocks", cache, count, cfg)


def _output_adaln(params, temb):
  """(shift, scale) of the output layer's AdaLN (`norm_out`, whose linear is (scale, shift) in diffusers)."""
  scale, shift = modulation(params["norm_out"]["linear"], temb, 2)
  return shift, scale


def _collect_aux(double_extras: dict, single_extras: dict, keep_kv: bool) -> dict:
  """forward's aux from the blocks' stacked extras (see forward)."""
  aux = {}
  if "attention_maps" in double_extras:
    aux["attention_maps"] = jnp.moveaxis(double_extras["attention_maps"], 0, 1)
  if "attention_statistics" in double_extras:  # A of docs/method.md: mean over double blocks of head means
    aux["attention_statistics"] = AttentionStatistics(
        *(jnp.mean(x, axis=0) for x in double_extras["attention_statistics"]))
  if keep_kv:
    aux["ref_kv"] = {name: found["ref_kv"] for name, found in (("double", double_extras),
                                                                ("single", single_extras)) if "ref_kv" in found}
  return aux


def forward(params, lora, cfg: FluxConfig, inputs: FluxInputs, return_attention_maps: bool = False,
            correspondences: Correspondences | None = None, return_ref_kv: bool = False,
            ref_kv: dict | None = None):
  """Velocity prediction for the target tokens.

  Returns (pred [B, N, out_channels], aux). `lora` is the LoRA pytree (model/lora.py) or None for the
  base model. With references:
  - return_attention_maps: aux["attention_maps"] is [B, num_layers, R, M, N] float32, each double
    block's softmax over target keys of every reference query (after LoRA, QK-RMSNorm and RoPE),
    averaged over heads; docs/method.md's A is its mean over axis 1. Materialized: for tests and inspection.
  - correspondences: aux["attention_statistics"] is an AttentionStatistics (pair attention [B, K],
    reference attention [B, R, N]) averaged over heads and double blocks, computed in O(tokens) extra
    memory; what SCAL and MDL consume. Without it nothing extra is computed.
  - return_ref_kv: aux["ref_kv"] holds every block's reference keys and values
    ({"double": (k, v), "single": (k, v)}, each [L, B, R, M, H, D]). Passed back as `ref_kv` (with
    inputs.refs None) they replace the reference stream: text and target attend to the cached keys.
    With cfg.independent_refs this is exact, since reference tokens then never see text or target
    and their keys do not change across sampling steps; without it, it is an approximation.
  """
  has_refs = _has_refs(inputs)
  if has_refs and ref_kv is not None:
    raise ValueError("forward: pass either inputs.refs or a ref_kv cache, not both.")
  streams = _embed(params, lora, cfg, inputs)
  keep_kv = return_ref_kv and has_refs
  cache = ref_kv or {}

  (txt, img, refs), double_extras = _run_double_blocks(
      params, lora, cfg, streams, cfg.num_layers, cache.get("double"), return_attention_maps and has_refs,
      correspondences if has_refs else None, keep_kv)
  (main, refs), single_extras = _run_single_blocks(params, lora, cfg, streams, jnp.concatenate([txt, img], axis=1),
                                                   refs, cfg.num_single_layers, cache.get("single"), keep_kv)
  img = main[:, txt.shape[1]:]

  shift, scale = _output_adaln(params, streams.temb)
  pred = linear(params["proj_out"], modulate(layer_norm(img), shift, scale))
  return pred, _collect_aux(double_extras, single_extras, keep_kv)


# ---- a block's input, for features ---------------------------------------------------------------

class BlockInput(NamedTuple):
  """The target tokens as one block receives them, and the AdaLN that block applies to them first.

  image:  [B, N, D]  hidden states of the target tokens (the image part of the stream)
  shift:  [B, D]     the block reads layer_norm(image) * (1 + scale) + shift (its first modulation of
  scale:  [B, D]     target tokens: a double block's `norm1`, a single block's `norm`, or `norm_out`)
  """
  image: jax.Array
  shift: jax.Array
  scale: jax.Array


def block_input(params, lora, cfg: FluxConfig, inputs: FluxInputs, block: int) -> BlockInput:
  """The target tokens entering block `block`: the image-token output of the `block` blocks before it.

  Blocks count as the checkpoint runs them: double blocks 0 .. num_layers - 1, then single blocks;
  `num_layers + num_single_layers` is the output layer (the last block's output, with `norm_out`'s
  shift and scale). Only the blocks before `block` run, the rest of the model is never traced; the
  numbers are forward's (same embeddings, the same scanned double_block / single_block).
  """
  depth = cfg.num_layers + cfg.num_single_layers
  if not 0 <= block <= depth:
    raise ValueError(f"block={block}: expected 0..{depth} ({cfg.num_layers} double blocks, "
                     f"{cfg.num_single_layers} single blocks, then {depth} for the output layer).")
  streams = _embed(params, lora, cfg, inputs)
  (txt, img, refs), _ = _run_double_blocks(params, lora, cfg, streams, min(block, cfg.num_layers))
  if block > cfg.num_layers:
    (main, _), _ = _run_single_blocks(params, lora, cfg, streams, jnp.concatenate([txt, img], axis=1), refs,
                                      block - cfg.num_layers)
    img = main[:, txt.shape[1]:]
  return BlockInput(img, *_image_adaln(params, cfg, streams.temb, block))


def _image_adaln(params, cfg: FluxConfig, temb, block: int):
  """(shift, scale) of block `block`'s first AdaLN of target tokens, split as double_block,
  single_block and the output layer split their modulation."""
  def at(stacked_linear, index):  # one layer's modulation linear out of the stacked group
    return jax.tree_util.tree_map(lambda x: x[index], stacked_linear)
  if block < cfg.num_layers:
    return tuple(modulation(at(params["transformer_blocks"]["norm1"]["linear"], block), temb, 6)[:2])
  if block < cfg.num_layers + cfg.num_single_layers:
    single = at(params["single_transformer_blocks"]["norm"]["linear"], block - cfg.num_layers)
    return tuple(modulation(single, temb, 3)[:2])
  return _output_adaln(params, temb)
