"""An independent PyTorch reference for MOSAIC's multi-branch FLUX forward, built from diffusers' modules.

It follows docs/method.md ('Sequence', 'LoRA') literally and the official way: one packed sequence
[text | target | ref_1 .. ref_R] with a dense boolean attention mask, each branch modulated by its own
conditioning vector, reference tokens sent through a peft-LoRA'd copy of the transformer and text and
target tokens through the plain one, and the attention maps materialized in full. It shares no code
with mosaic_jax.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

# docs/method.md, 'LoRA': the modules MOSAIC adapts, as a peft regex over diffusers module names.
MOSAIC_LORA_TARGETS = (
    r"^(x_embedder"
    r"|transformer_blocks\.\d+\.(norm1\.linear|attn\.to_q|attn\.to_k|attn\.to_v|attn\.to_out\.0|ff\.net\.2)"
    r"|single_transformer_blocks\.\d+\.(norm\.linear|proj_mlp|proj_out|attn\.to_q|attn\.to_k|attn\.to_v))$")


def randomize_(model: torch.nn.Module, generator: torch.Generator, qk_norm_scale=2.0):
  """Every weight random and non-zero; QK-norm weights large so attention is far from uniform."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      if p.ndim == 1 and ("norm_q" in name or "norm_k" in name or "norm_added" in name):
        p.copy_(qk_norm_scale + 0.5 * noise)
      elif p.ndim == 2:
        p.copy_(noise / p.shape[1] ** 0.5)
      else:
        p.copy_(0.1 * noise)


def add_mosaic_lora(model, rank, alpha, generator):
  """A copy of `model` with a peft LoRA on MOSAIC's modules, A and B both random and non-zero."""
  from peft import LoraConfig
  lora_model = copy.deepcopy(model)
  lora_model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=MOSAIC_LORA_TARGETS,
                                    init_lora_weights="gaussian"))
  with torch.no_grad():
    for name, p in lora_model.named_parameters():
      if "lora_" in name:
        p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)
  return lora_model


def reference_ids(num_refs, height, width):
  """Reference i (1-based) token (r, c) -> (0, r, c - i * width), as docs/method.md ('Sequence') states."""
  ids = []
  for i in range(1, num_refs + 1):
    for r in range(height):
      for c in range(width):
        ids.append((0, r, c - i * width))
  return torch.tensor(ids, dtype=torch.float32)


def _mask(text_len, target_len, num_refs, ref_len):
  """[T, T] boolean: text/target queries see all keys; ref_i queries see text, target and ref_i."""
  main = text_len + target_len
  total = main + num_refs * ref_len
  allowed = torch.zeros(total, total, dtype=torch.bool)
  allowed[:main, :] = True
  for i in range(num_refs):
    rows = slice(main + i * ref_len, main + (i + 1) * ref_len)
    allowed[rows, :main] = True
    allowed[rows, rows] = True
  return allowed


def _heads(x, heads):
  b, t, _ = x.shape
  return x.view(b, t, heads, -1)


@torch.no_grad()
def mosaic_forward(base, lora_model, target, text, pooled, timestep, guidance, target_ids, text_ids,
                   refs=None, ref_ids=None, ref_guidance=None):
  """Returns (velocity [B, N, C], attention maps [B, L_double, R, M, N] or None)."""
  heads = base.config.num_attention_heads
  batch, n_target = target.shape[:2]
  num_refs = 0 if refs is None else refs.shape[1]
  ref_len = 0 if refs is None else refs.shape[2]
  n_text = text.shape[1]
  lm = lora_model if lora_model is not None else base

  temb = base.time_text_embed(timestep * 1000, guidance * 1000, pooled)
  img = base.x_embedder(target)
  txt = base.context_embedder(text)
  if num_refs:
    g_ref = torch.ones(batch) if ref_guidance is None else ref_guidance
    temb_ref = base.time_text_embed(torch.zeros(batch), g_ref * 1000, pooled)
    ref = lm.x_embedder(refs.reshape(batch, num_refs * ref_len, -1))
    ids = torch.cat([text_ids, target_ids, ref_ids.reshape(-1, 3)], 0)
  else:
    ref = torch.zeros(batch, 0, img.shape[-1])
    temb_ref = temb
    ids = torch.cat([text_ids, target_ids], 0)
  rotary = base.pos_embed(ids)
  mask = _mask(n_text, n_target, num_refs, ref_len)

  def attend(q, k, v):
    q = apply_rotary_emb(q, rotary, sequence_dim=1)
    k = apply_rotary_emb(k, rotary, sequence_dim=1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask)
    return out.transpose(1, 2).flatten(2), q, k

  maps = []
  for blk, lblk in zip(base.transformer_blocks, lm.transformer_blocks):
    x_img, g1, s2, c2, g2 = blk.norm1(img, emb=temb)
    x_txt, tg1, ts2, tc2, tg2 = blk.norm1_context(txt, emb=temb)
    x_ref, rg1, rs2, rc2, rg2 = lblk.norm1(ref, emb=temb_ref)
    a = blk.attn
    la = lblk.attn
    q = torch.cat([a.norm_added_q(_heads(a.add_q_proj(x_txt), heads)), a.norm_q(_heads(a.to_q(x_img), heads)),
                   a.norm_q(_heads(la.to_q(x_ref), heads))], 1)
    k = torch.cat([a.norm_added_k(_heads(a.add_k_proj(x_txt), heads)), a.norm_k(_heads(a.to_k(x_img), heads)),
                   a.norm_k(_heads(la.to_k(x_ref), heads))], 1)
    v = torch.cat([_heads(a.add_v_proj(x_txt), heads), _heads(a.to_v(x_img), heads),
                   _heads(la.to_v(x_ref), heads)], 1)
    out, q_rot, k_rot = attend(q, k, v)
    if num_refs:
      q_ref = q_rot[:, n_text + n_target:].transpose(1, 2)           # [B, H, R*M, D]
      k_tgt = k_rot[:, n_text:n_text + n_target].transpose(1, 2)     # [B, H, N, D]
      probs = torch.softmax(q_ref @ k_tgt.transpose(-1, -2) / q_ref.shape[-1] ** 0.5, dim=-1)
      maps.append(probs.mean(1).reshape(batch, num_refs, ref_len, n_target))
    o_txt, o_img, o_ref = out[:, :n_text], out[:, n_text:n_text + n_target], out[:, n_text + n_target:]
    img = img + g1[:, None] * a.to_out[0](o_img)
    img = img + g2[:, None] * blk.ff(blk.norm2(img) * (1 + c2[:, None]) + s2[:, None])
    txt = txt + tg1[:, None] * a.to_add_out(o_txt)
    txt = txt + tg2[:, None] * blk.ff_context(blk.norm2_context(txt) * (1 + tc2[:, None]) + ts2[:, None])
    ref = ref + rg1[:, None] * la.to_out[0](o_ref)
    ref = ref + rg2[:, None] * lblk.ff(blk.norm2(ref) * (1 + rc2[:, None]) + rs2[:, None])

  main = torch.cat([txt, img], 1)
  for blk, lblk in zip(base.single_transformer_blocks, lm.single_transformer_blocks):
    x_main, g_main = blk.norm(main, emb=temb)
    x_ref, g_ref_gate = lblk.norm(ref, emb=temb_ref)
    a, la = blk.attn, lblk.attn
    q = torch.cat([a.norm_q(_heads(a.to_q(x_main), heads)), a.norm_q(_heads(la.to_q(x_ref), heads))], 1)
    k = torch.cat([a.norm_k(_heads(a.to_k(x_main), heads)), a.norm_k(_heads(la.to_k(x_ref), heads))], 1)
    v = torch.cat([_heads(a.to_v(x_main), heads), _heads(la.to_v(x_ref), heads)], 1)
    out, _, _ = attend(q, k, v)
    n_main = main.shape[1]
    mlp_main = blk.act_mlp(blk.proj_mlp(x_main))
    mlp_ref = lblk.act_mlp(lblk.proj_mlp(x_ref))
    main = main + g_main[:, None] * blk.proj_out(torch.cat([out[:, :n_main], mlp_main], -1))
    ref = ref + g_ref_gate[:, None] * lblk.proj_out(torch.cat([out[:, n_main:], mlp_ref], -1))

  img = main[:, n_text:]
  pred = base.proj_out(base.norm_out(img, temb))
  return pred, (torch.stack(maps, 1) if maps else None)
