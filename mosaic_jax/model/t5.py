"""The T5 v1.1 encoder (FLUX's text_encoder_2, T5-XXL at full size) as pure functions of a params pytree.

Pre-norm blocks with RMS layer norm (no mean, no bias), unscaled dot-product attention plus a learned
relative position bias (computed once, by block 0's table, and shared by every block), and a gated-GELU
feed-forward `wo(gelu_tanh(wi_0 x) * wi_1 x)` (original-T5 "relu" feed-forwards work too).

Parameter names follow transformers' `T5EncoderModel` state dict: `shared`, `encoder.block.N.layer.0.
SelfAttention.{q,k,v,o}`, `...layer.0.layer_norm`, `...layer.1.DenseReluDense.{wi_0,wi_1,wo}`,
`...layer.1.layer_norm`, `encoder.final_layer_norm`. Blocks are stacked along a leading layer axis and
run with `lax.scan`; block 0's `relative_attention_bias` lives at `encoder.relative_attention_bias`
because only block 0 has one. Leaves: linear {"kernel": [in, out]} (no biases in T5), embedding
{"embedding": [rows, dim]}, norm {"scale": [dim]}.

FLUX calls T5 without an attention mask (padding tokens included, max length 512); `attention_mask`
is there for other uses. Precision: matmuls accumulate in float32, norms and softmax run in float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mosaic_jax.model.layers import gelu_tanh, linear, random_params, rms_norm

_ACTIVATIONS = {
    "gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False), "relu": jax.nn.relu, "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Named like transformers' T5Config. Defaults are FLUX's T5-XXL v1.1 encoder (4.7B parameters)."""
  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"

  def __post_init__(self):
    _ = self.activation  # raises for an unsupported feed_forward_proj

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def activation(self) -> str:
    act = self.feed_forward_proj.split("-")[-1]
    act = "gelu_new" if self.feed_forward_proj == "gated-gelu" else act  # transformers' special case
    if act not in _ACTIVATIONS or self.feed_forward_proj.count("-") > 1 or (
        "-" in self.feed_forward_proj and not self.is_gated):
      raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r}: expected 'gated-<act>' or '<act>' with "
                       f"act in {sorted(_ACTIVATIONS)}.")
    return act

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  @classmethod
  def from_transformers_config(cls, config: Mapping[str, Any], source: str = "config") -> "T5Config":
    if config.get("model_type", "t5") not in ("t5", "umt5"):
      raise ValueError(f"{source}: model_type is {config.get('model_type')!r}, expected 't5'.")
    if config.get("model_type") == "umt5":
      raise ValueError(f"{source}: UMT5 (a relative bias per layer) is not implemented.")
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in known})


def tiny() -> T5Config:
  return T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)


# ---- parameters ----------------------------------------------------------------------------------

def param_shapes(cfg: T5Config) -> dict:
  d, inner, ff, n = cfg.d_model, cfg.inner_dim, cfg.d_ff, cfg.num_layers
  dense = ({"wi_0": {"kernel": (n, d, ff)}, "wi_1": {"kernel": (n, d, ff)}} if cfg.is_gated
           else {"wi": {"kernel": (n, d, ff)}})
  dense["wo"] = {"kernel": (n, ff, d)}
  block = {"layer": {
      "0": {"SelfAttention": {name: {"kernel": (n, d, inner)} for name in ("q", "k", "v")}
            | {"o": {"kernel": (n, inner, d)}},
            "layer_norm": {"scale": (n, d)}},
      "1": {"DenseReluDense": dense, "layer_norm": {"scale": (n, d)}},
  }}
  return {
      "shared": {"embedding": (cfg.vocab_size, d)},
      "encoder": {
          "block": block,
          "relative_attention_bias": {"embedding": (cfg.relative_attention_num_buckets, cfg.num_heads)},
          "final_layer_norm": {"scale": (d,)},
      },
  }


def init_params(key, cfg: T5Config, dtype=jnp.float32) -> dict:
  """Random weights for demos and benchmarks; norm scales (float32) around 1."""
  return random_params(key, param_shapes(cfg), dtype, norm_dtype=jnp.float32, embedding_std=1.0)


# ---- relative position bias ------------------------------------------------------------------------

def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """[length, length] bucket of (key position - query position), bidirectional (encoder) bucketing.

  Computed on the host with static shapes. Half the buckets hold each sign; within a sign, distances
  below num_buckets/4 get their own bucket and larger ones share logarithmically wider buckets up to
  max_distance. The float32 log and truncation mirror transformers' order of operations so that
  distances on a bucket boundary land where transformers puts them.
  """
  relative = np.arange(length)[None, :] - np.arange(length)[:, None]
  half = num_buckets // 2
  buckets = (relative > 0).astype(np.int64) * half
  distance = np.abs(relative)
  max_exact = half // 2
  # Distances below max_exact take the exact branch; clamping them to 1 here only avoids log(0).
  logarithmic = (np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
                 / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
  large = max_exact + logarithmic.astype(np.int64)
  large = np.minimum(large, half - 1)
  return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


def position_bias(params, cfg: T5Config, length: int):
  """[heads, length, length] float32 bias added to every block's attention scores."""
  buckets = relative_position_buckets(length, cfg.relative_attention_num_buckets,
                                      cfg.relative_attention_max_distance)
  table = params["encoder"]["relative_attention_bias"]["embedding"].astype(jnp.float32)
  return jnp.transpose(table[buckets], (2, 0, 1))


# ---- the model -----------------------------------------------------------------------------------

def _block(p, cfg: T5Config, x, bias):
  eps = cfg.layer_norm_epsilon
  attn = p["layer"]["0"]["SelfAttention"]
  h = rms_norm(p["layer"]["0"]["layer_norm"], x, eps)
  heads = lambda t: t.reshape(t.shape[:-1] + (cfg.num_heads, cfg.d_kv))
  q, k, v = (heads(linear(attn[n], h)) for n in ("q", "k", "v"))
  # T5 folds 1/sqrt(d_kv) into its initialization: scores are not scaled.
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, preferred_element_type=jnp.float32).astype(v.dtype)
  x = x + linear(attn["o"], out.reshape(out.shape[:2] + (cfg.inner_dim,)))

  dense = p["layer"]["1"]["DenseReluDense"]
  h = rms_norm(p["layer"]["1"]["layer_norm"], x, eps)
  act = _ACTIVATIONS[cfg.activation]
  if cfg.is_gated:
    h = act(linear(dense["wi_0"], h)) * linear(dense["wi_1"], h)
  else:
    h = act(linear(dense["wi"], h))
  return x + linear(dense["wo"], h)


def encode(params, cfg: T5Config, input_ids, attention_mask=None):
  """Token ids [B, L] -> last hidden states [B, L, d_model] in the parameter dtype.

  attention_mask [B, L] (1 = real token) hides padding keys; FLUX passes none.
  """
  embedding = params["shared"]["embedding"]
  x = jnp.take(embedding, input_ids, axis=0)
  bias = position_bias(params, cfg, input_ids.shape[1])[None]
  if attention_mask is not None:
    bias = bias + jnp.where(attention_mask[:, None, None, :].astype(bool), 0.0, jnp.finfo(jnp.float32).min)

  def step(x, block_params):
    return _block(block_params, cfg, x, bias), None

  x, _ = jax.lax.scan(step, x, params["encoder"]["block"])
  return rms_norm(params["encoder"]["final_layer_norm"], x, cfg.layer_norm_epsilon)
