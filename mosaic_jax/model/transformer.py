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
from jax.ad_checkpoint import checkpoint_name

from mosaic_jax.model import attention as attn_lib
from mosaic_jax.model.attention_stats import AttentionStatistics, Correspondences, block_statistics
from mosaic_jax.model.config import FluxConfig
from mosaic_jax.model.embeddings import apply_rope, conditioning, rope
from mosaic_jax.model.layers import (gate, gelu_tanh, layer_norm, linear, modulate, modulation, random_params,
                                     rms_norm)
from mosaic_jax.model.lora import get_path
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


# What remat policy "recompute_mlp" keeps of a block (the names below): enough that its backward pass
# recomputes no projection but the MLP's first one, and no attention output.
_KEPT = ("qkv", "attention", "block_output")


def _keep(x, name):
  """x tagged for the "recompute_mlp" policy (a no-op for every other policy)."""
  return None if x is None else checkpoint_name(x, name)


def _out(y):
  """A gated projection's output, kept: the gate's gradient reads it."""
  return _keep(y, "block_output")


def _qkv(p, x, cfg, lora, names=("to_q", "to_k", "to_v"), norms=("norm_q", "norm_k")):
  q, k, v = (_keep(_heads(linear(p[n], x, get_path(lora, n)), cfg), "qkv") for n in names)
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
  out_main, out_ref = _keep(out_main, "attention"), _keep(out_ref, "attention")
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
      extras["attention_statistics"] = block_statistics(q_ref, k_target, pairs, cfg.stats_chunk)
    if keep_ref_kv:
      extras["ref_kv"] = (k_ref, v_ref)
  return (txt, img, refs), extras


def _feed_forward(p, x, lp, cfg):
  """GELU-tanh MLP; only `net.2` is LoRA-adapted (MOSAIC leaves `net.0.proj` alone)."""
  h = _pin_mlp(gelu_tanh(linear(p["net"]["0"]["proj"], x)), cfg)
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
  mlp_main = _pin_mlp(gelu_tanh(linear(p["proj_mlp"], x)), cfg)
  q_main, k_main, v_main = _qkv(p["attn"], x, cfg, None)
  q_main, k_main = apply_rope(q_main, rope_main), apply_rope(k_main, rope_main)

  q_ref = None
  k_ref, v_ref = ref_kv if ref_kv is not None else (None, None)
  if refs is not None:
    rshift, rscale, rg = modulation(p["norm"]["linear"], temb_ref, 3, get_path(lp, "norm.linear"))
    xr = modulate(layer_norm(refs), rshift, rscale)
    mlp_ref = _pin_mlp(gelu_tanh(linear(p["proj_mlp"], xr, get_path(lp, "proj_mlp"))), cfg)
    q_ref, k_ref, v_ref = _qkv(p["attn"], xr, cfg, get_path(lp, "attn"))
    q_ref, k_ref = apply_rope(q_ref, rope_ref), apply_rope(k_ref, rope_ref)

  out_main, out_ref = attn_lib.multi_branch_attention(q_main, k_main, v_main, q_ref, k_ref, v_ref,
                                                      cfg.attention_impl, cfg.independent_refs,
                                                      cfg.attention_chunk, cfg.logical_rules)
  out_main, out_ref = _keep(out_main, "attention"), _keep(out_ref, "attention")
  main = main + gate(g, _out(linear(p["proj_out"], jnp.concatenate([_merge_heads(out_main), mlp_main], -1))))
  if refs is not None:
    refs = refs + gate(rg, _out(linear(p["proj_out"], jnp.concatenate([_merge_heads(out_ref), mlp_ref], -1),
                                       get_path(lp, "proj_out"))))
  extras = {"ref_kv": (k_ref, v_ref)} if keep_ref_kv and refs is not None else {}
  return (main, refs), extras


# ---- the model ------------------------------------------------------------------------------------

_REMAT = {"full": jax.checkpoint_policies.nothing_saveable,
          "recompute_mlp": jax.checkpoint_policies.save_only_these_names(*_KEPT),
          "dots_saveable": jax.checkpoint_policies.dots_saveable,
          "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _remat(step_fn, cfg: FluxConfig):
  """Each scanned block under jax.checkpoint with cfg.remat_policy (prevent_cse is moot inside scan)."""
  if cfg.remat_policy == "none":
    return step_fn
  return jax.checkpoint(step_fn, policy=_REMAT[cfg.remat_policy], prevent_cse=False)


def forward(params, lora, cfg: FluxConfig, inputs: FluxInputs, return_attention_maps: bool = False,
            correspondences: Correspondences | None = None, return_ref_kv: bool = False,
            ref_kv: dict | None = None):
  """Velocity prediction for the target tokens.

  Returns (pred [B, N, out_channels], aux). `lora` is the LoRA pytree (model/lora.py) or None for the
  base model. With references:
  - return_attention_maps: aux["attention_maps"] is [B, num_layers, R, M, N] float32, each double
    block's softmax over target keys of every reference query (after LoRA, QK-RMSNorm and RoPE),
    averaged over heads; DESIGN's A is its mean over axis 1. Materialized: for tests and inspection.
  - correspondences: aux["attention_statistics"] is an AttentionStatistics (pair attention [B, K],
    reference attention [B, R, N]) averaged over heads and double blocks, computed in O(tokens) extra
    memory; what SCAL and MDL consume. Without it nothing extra is computed.
  - return_ref_kv: aux["ref_kv"] holds every block's reference keys and values
    ({"double": (k, v), "single": (k, v)}, each [L, B, R, M, H, D]). Passed back as `ref_kv` (with
    inputs.refs None) they replace the reference stream: text and target attend to the cached keys.
    With cfg.independent_refs this is exact, since reference tokens then never see text or target
    and their keys do not change across sampling steps; without it, it is an approximation.
  """
  dtype = params["x_embedder"]["kernel"].dtype
  batch = inputs.target.shape[0]
  has_refs = inputs.refs is not None and inputs.refs.shape[1] > 0

  temb = conditioning(params["time_text_embed"], cfg, inputs.timestep, inputs.guidance, inputs.pooled)
  img = linear(params["x_embedder"], inputs.target.astype(dtype))
  txt = linear(params["context_embedder"], inputs.text.astype(dtype))
  rope_main = rope(jnp.concatenate([inputs.text_ids, inputs.target_ids], axis=0),
                   cfg.axes_dims_rope, cfg.rope_theta)

  refs = temb_ref = rope_ref = None
  if has_refs and ref_kv is not None:
    raise ValueError("forward: pass either inputs.refs or a ref_kv cache, not both.")
  if has_refs:
    ref_guidance = (jnp.ones((batch,), jnp.float32) if inputs.ref_guidance is None
                    else inputs.ref_guidance)
    temb_ref = conditioning(params["time_text_embed"], cfg, jnp.zeros((batch,), jnp.float32),
                            ref_guidance, inputs.pooled)
    refs = linear(params["x_embedder"], inputs.refs.astype(dtype), get_path(lora, "x_embedder"))
    rope_ref = rope(inputs.ref_ids, cfg.axes_dims_rope, cfg.rope_theta)
  want_maps = return_attention_maps and has_refs
  pairs = correspondences if has_refs else None
  keep_kv = return_ref_kv and has_refs
  cache = ref_kv or {}

  extras = {}
  if cfg.num_layers:
    def double_step(carry, layer):
      p, lp, kv = layer
      return double_block(p, lp, cfg, *carry, temb, temb_ref, rope_main, rope_ref, want_maps, pairs, kv,
                          keep_kv)

    (txt, img, refs), extras = jax.lax.scan(
        _remat(double_step, cfg), (txt, img, refs),
        (params["transformer_blocks"], get_path(lora, "transformer_blocks"), cache.get("double")),
        unroll=cfg.unroll_layers)

  main = jnp.concatenate([txt, img], axis=1)
  single_extras = {}
  if cfg.num_single_layers:
    def single_step(carry, layer):
      p, lp, kv = layer
      return single_block(p, lp, cfg, *carry, temb, temb_ref, rope_main, rope_ref, kv, keep_kv)

    (main, refs), single_extras = jax.lax.scan(
        _remat(single_step, cfg), (main, refs),
        (params["single_transformer_blocks"], get_path(lora, "single_transformer_blocks"),
         cache.get("single")), unroll=cfg.unroll_layers)
  img = main[:, txt.shape[1]:]

  scale, shift = modulation(params["norm_out"]["linear"], temb, 2)  # diffusers order: (scale, shift)
  pred = linear(params["proj_out"], modulate(layer_norm(img), shift, scale))

  aux = {}
  if "attention_maps" in extras:
    aux["attention_maps"] = jnp.moveaxis(extras["attention_maps"], 0, 1)
  if "attention_statistics" in extras:  # DESIGN's A: mean over double blocks of the head means
    aux["attention_statistics"] = AttentionStatistics(
        *(jnp.mean(x, axis=0) for x in extras["attention_statistics"]))
  if keep_kv:
    aux["ref_kv"] = {name: found["ref_kv"] for name, found in (("double", extras), ("single", single_extras))
                     if "ref_kv" in found}
  return pred, aux
