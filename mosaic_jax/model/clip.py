"""The CLIP text encoder (FLUX's text_encoder, CLIP-L at full size) as pure functions of a params pytree.

Token + learned position embeddings, pre-LayerNorm blocks with causal self-attention and a quick-GELU
MLP, a final LayerNorm; the pooled output is the final hidden state at the end-of-text token. FLUX uses
only the pooled vector (768 wide for CLIP-L), from 77 tokens padded to max length, without attention
mask.

Which position is "end of text" follows transformers: configs written before transformers fixed the
eos id have `eos_token_id == 2` (CLIP-L's, and so FLUX's, config.json do), and then the position of the
largest token id is used (the end-of-text id 49407 is the largest in CLIP's vocabulary; the first
occurrence wins, so padding with that id is harmless); otherwise the first position holding
`eos_token_id`.

Parameter names follow transformers' `CLIPTextModel` (`embeddings.token_embedding`, `encoder.layers.N.
self_attn.q_proj`, `...layer_norm1`, `...mlp.fc1`, `final_layer_norm`); layers are stacked along a
leading axis and run with `lax.scan`. Leaves: linear {"kernel": [in, out], "bias"}, embedding
{"embedding": [rows, dim]}, LayerNorm {"scale", "bias"} (float32).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from mosaic_jax.model.layers import gelu_tanh, linear, random_params

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh,
}


def check_encoder_config(cfg) -> None:
  """What every CLIP-style encoder config must hold (this text tower, model/vit.py's vision towers):
  a supported activation and a hidden size made of whole heads."""
  if cfg.hidden_act not in _ACTIVATIONS:
    raise ValueError(f"hidden_act={cfg.hidden_act!r}: expected one of {sorted(_ACTIVATIONS)}.")
  if cfg.hidden_size % cfg.num_attention_heads:
    raise ValueError(f"hidden_size={cfg.hidden_size} is not divisible by num_attention_heads="
                     f"{cfg.num_attention_heads}.")


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
  """Named like transformers' CLIPTextConfig. Defaults are FLUX's CLIP-L text encoder (123M parameters)."""
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 2

  def __post_init__(self):
    check_encoder_config(self)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_transformers_config(cls, config: Mapping[str, Any], source: str = "config") -> "ClipTextConfig":
    """From a CLIPTextModel config.json, or the text_config of a full CLIPModel config."""
    if config.get("model_type") == "clip" and "text_config" in config:
      config = config["text_config"]
    if config.get("model_type", "clip_text_model") != "clip_text_model":
      raise ValueError(f"{source}: model_type is {config.get('model_type')!r}, expected 'clip_text_model'.")
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in known and v is not None})


def tiny() -> ClipTextConfig:
  return ClipTextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=16, eos_token_id=2)


# ---- parameters ----------------------------------------------------------------------------------

def param_shapes(cfg: ClipTextConfig) -> dict:
  d, ff, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
  lin = lambda fan_in, fan_out: {"kernel": (n, fan_in, fan_out), "bias": (n, fan_out)}
  norm = {"scale": (n, d), "bias": (n, d)}
  layer = {
      "self_attn": {"q_proj": lin(d, d), "k_proj": lin(d, d), "v_proj": lin(d, d), "out_proj": lin(d, d)},
      "layer_norm1": norm, "mlp": {"fc1": lin(d, ff), "fc2": lin(ff, d)}, "layer_norm2": dict(norm),
  }
  return {
      "embeddings": {"token_embedding": {"embedding": (cfg.vocab_size, d)},
                     "position_embedding": {"embedding": (cfg.max_position_embeddings, d)}},
      "encoder": {"layers": layer},
      "final_layer_norm": {"scale": (d,), "bias": (d,)},
  }


def init_params(key, cfg: ClipTextConfig, dtype=jnp.float32) -> dict:
  """Random weights for demos and benchmarks; LayerNorm parameters (float32) around (1, 0)."""
  return random_params(key, param_shapes(cfg), dtype, norm_dtype=jnp.float32)


# ---- the model -----------------------------------------------------------------------------------

def layer_norm_affine(p, x, eps):
  """LayerNorm with scale and bias, computed in float32, returned in x's dtype."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(var + eps)
  return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def _layer(p, cfg: ClipTextConfig, x, mask_bias):
  heads = lambda t: t.reshape(t.shape[:-1] + (cfg.num_attention_heads, cfg.head_dim))
  attn = p["self_attn"]
  h = layer_norm_affine(p["layer_norm1"], x, cfg.layer_norm_eps)
  q, k, v = (heads(linear(attn[n], h)) for n in ("q_proj", "k_proj", "v_proj"))
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * cfg.head_dim ** -0.5
  weights = jax.nn.softmax(scores + mask_bias, axis=-1).astype(v.dtype)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, preferred_element_type=jnp.float32).astype(v.dtype)
  x = x + linear(attn["out_proj"], out.reshape(out.shape[:2] + (cfg.hidden_size,)))
  h = layer_norm_affine(p["layer_norm2"], x, cfg.layer_norm_eps)
  h = linear(p["mlp"]["fc2"], _ACTIVATIONS[cfg.hidden_act](linear(p["mlp"]["fc1"], h)))
  return x + h


def eos_positions(cfg: ClipTextConfig, input_ids):
  """[B] index of the end-of-text token, chosen the way transformers chooses it (module docstring)."""
  if cfg.eos_token_id == 2:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax((input_ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)


def encode(params, cfg: ClipTextConfig, input_ids, attention_mask=None):
  """Token ids [B, L] (L <= max_position_embeddings) -> (last hidden states [B, L, D], pooled [B, D]).

  Attention is causal; attention_mask [B, L] (1 = real token) also hides padding keys (FLUX passes none).
  """
  length = input_ids.shape[1]
  if length > cfg.max_position_embeddings:
    raise ValueError(f"CLIP encode: {length} tokens exceed max_position_embeddings={cfg.max_position_embeddings}.")
  emb = params["embeddings"]
  x = (jnp.take(emb["token_embedding"]["embedding"], input_ids, axis=0)
       + emb["position_embedding"]["embedding"][:length][None])
  causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
  if attention_mask is not None:
    causal = causal & attention_mask[:, None, None, :].astype(bool)
  mask_bias = jnp.where(causal, 0.0, jnp.finfo(jnp.float32).min)

  def step(x, layer_params):
    return _layer(layer_params, cfg, x, mask_bias), None

  x, _ = jax.lax.scan(step, x, params["encoder"]["layers"])
  hidden = layer_norm_affine(params["final_layer_norm"], x, cfg.layer_norm_eps)
  pooled = jnp.take_along_axis(hidden, eos_positions(cfg, input_ids)[:, None, None], axis=1)[:, 0]
  return hidden, pooled
