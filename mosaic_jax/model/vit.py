"""The image tower shared by CLIP's vision model, DINO's ViT and DINOv2, as pure functions of a params pytree.

All are pre-LayerNorm ViTs: non-overlapping patches projected by one matrix, a learned class token and
learned position embeddings, blocks `x += attn(ln1(x)); x += mlp(ln2(x))`, a final LayerNorm on the
class token. They differ in small switches, held in `VitConfig`: CLIP has a LayerNorm before the blocks
(`pre_norm`), no patch bias, quick-GELU and a linear projection of the class token; DINO (ViT-S/16)
has a patch bias, exact GELU and no projection; DINOv2 adds LayerScale (`layer_scale`: each branch's
output multiplied by a learned per-channel vector before the residual add). `encode_images` returns the
class token after the final norm (and the projection when there is one): what CLIP-I and DINO scores
compare. DINOv2's own embedding (register tokens, resized position grids) and its patch-token features
live in correspondence/dinov2.py and use `patch_embeddings` and `run_blocks` from here.

Leaves: `patch.kernel` [P*P*3, D] over patches flattened in (row, column, channel) order; the blocks
are stacked along a leading axis and run with `lax.scan` (names as in model/clip.py: `self_attn.q_proj`,
`layer_norm1`, `mlp.fc1`, and `layer_scale1.scale` with LayerScale...). Images come in as [B, H, W, 3]
float32, already normalized with the statistics the tower was trained on (`normalize_pixels`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mosaic_jax.model.attention import multi_branch_attention
from mosaic_jax.model.clip import _ACTIVATIONS, check_encoder_config, layer_norm_affine
from mosaic_jax.model.config import ATTENTION_IMPLS
from mosaic_jax.model.layers import linear, random_params

# The per-channel pixel statistics the towers were trained with (RGB, for pixels in [0, 1]).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINO and DINOv2
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_pixels(image, mean, std) -> np.ndarray:
  """An RGB uint8 image (PIL or [H, W, 3]) -> float32 [H, W, 3], as torchvision's ToTensor + Normalize
  (x / 255, then (x - mean) / std, all in float32, so the result is the same to the bit)."""
  pixels = np.asarray(image, np.float32) / 255.0
  return ((pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class VitConfig:
  hidden_size: int = 384
  intermediate_size: int = 1536
  num_hidden_layers: int = 12
  num_attention_heads: int = 6
  image_size: int = 224
  patch_size: int = 16
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-6
  pre_norm: bool = False          # CLIP's `pre_layrnorm`
  patch_bias: bool = True         # ViT's patch projection has a bias, CLIP's has none
  projection_dim: int | None = None  # CLIP's `visual_projection` (no bias)
  layer_scale: bool = False       # DINOv2's LayerScale on both branches of every block
  # Plain self-attention through model/attention.py: "xla" (any backend; `query_chunk` > 0 holds the float32
  # scores of that many queries at a time), "cudnn" (NVIDIA GPUs, bf16/fp16) or "splash" (TPU).
  attention_impl: str = "xla"
  query_chunk: int = 0

  def __post_init__(self):
    check_encoder_config(self)
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}.")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def output_size(self) -> int:
    return self.projection_dim or self.hidden_size


def clip_vit_b32() -> VitConfig:
  """CLIP ViT-B/32's image tower (openai/clip-vit-base-patch32)."""
  return VitConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                   pre_norm=True, patch_bias=False, projection_dim=512)


def dino_vit_s16(layer_norm_eps: float = 1e-6) -> VitConfig:
  """DINO ViT-S/16 (facebook/dino-vits16)."""
  return VitConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                   image_size=224, patch_size=16, hidden_act="gelu", layer_norm_eps=layer_norm_eps)


def param_shapes(cfg: VitConfig) -> dict:
  d, ff, n, p = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.patch_size
  lin = lambda fan_in, fan_out: {"kernel": (n, fan_in, fan_out), "bias": (n, fan_out)}
  norm = lambda *lead: {"scale": lead + (d,), "bias": lead + (d,)}
  shapes = {
      "patch": {"kernel": (p * p * 3, d)},
      "class_embedding": {"embedding": (1, d)},
      "position_embedding": {"embedding": (cfg.num_patches + 1, d)},
      "layers": {
          "self_attn": {"q_proj": lin(d, d), "k_proj": lin(d, d), "v_proj": lin(d, d), "out_proj": lin(d, d)},
          "layer_norm1": norm(n), "mlp": {"fc1": lin(d, ff), "fc2": lin(ff, d)}, "layer_norm2": norm(n),
      },
      "final_norm": norm(),
  }
  if cfg.layer_scale:
    shapes["layers"]["layer_scale1"] = {"scale": (n, d)}
    shapes["layers"]["layer_scale2"] = {"scale": (n, d)}
  if cfg.patch_bias:
    shapes["patch"]["bias"] = (d,)
  if cfg.pre_norm:
    shapes["pre_norm"] = norm()
  if cfg.projection_dim:
    shapes["projection"] = {"kernel": (d, cfg.projection_dim)}
  return shapes


def init_params(key, cfg: VitConfig, dtype=jnp.float32) -> dict:
  """Random weights of the real shapes, for benchmarks."""
  return random_params(key, param_shapes(cfg), dtype, norm_dtype=jnp.float32)


def patchify(images, patch_size: int):
  """[B, H, W, C] -> [B, (H/P)*(W/P), P*P*C], patches row-major, each flattened (row, column, channel)."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch_size, patch_size, w // patch_size, patch_size, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch_size) * (w // patch_size), patch_size ** 2 * c)


def _layer_scale(p, name: str, cfg: VitConfig, y):
  if not cfg.layer_scale:
    return y
  return (y * p[name]["scale"]).astype(y.dtype)


def _block(p, cfg: VitConfig, x):
  heads = lambda t: t.reshape(t.shape[:-1] + (cfg.num_attention_heads, cfg.head_dim))
  attn = p["self_attn"]
  h = layer_norm_affine(p["layer_norm1"], x, cfg.layer_norm_eps)
  q, k, v = (heads(linear(attn[n], h)) for n in ("q_proj", "k_proj", "v_proj"))
  out, _ = multi_branch_attention(q, k, v, impl=cfg.attention_impl, query_chunk=cfg.query_chunk)
  attended = linear(attn["out_proj"], out.reshape(out.shape[:2] + (cfg.hidden_size,)))
  x = x + _layer_scale(p, "layer_scale1", cfg, attended)
  h = layer_norm_affine(p["layer_norm2"], x, cfg.layer_norm_eps)
  mlp = linear(p["mlp"]["fc2"], _ACTIVATIONS[cfg.hidden_act](linear(p["mlp"]["fc1"], h)))
  return x + _layer_scale(p, "layer_scale2", cfg, mlp)


def patch_embeddings(params, cfg: VitConfig, images):
  """Normalized images [B, H, W, 3] (H, W multiples of the patch size) -> patch tokens [B, H*W/P^2, D],
  row-major, in the weights' dtype (no class token, no position embedding yet)."""
  dtype = params["patch"]["kernel"].dtype
  return linear(params["patch"], patchify(images.astype(dtype), cfg.patch_size))


def run_blocks(layer_params, cfg: VitConfig, x, count: int | None = None):
  """Tokens [B, T, D] through the first `count` (default: all) of the stacked blocks, no final norm."""
  total = jax.tree_util.tree_leaves(layer_params)[0].shape[0]
  if count is None or count == total:
    return jax.lax.scan(lambda x, block_params: (_block(block_params, cfg, x), None), x, layer_params)[0]

  # The first blocks only: scan over their indices and read each block's weights in place (scanning over
  # a slice of the stacked weights would copy the slice first; model/transformer.py measured it).
  def step(x, index):
    block_params = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False),
                                          layer_params)
    return _block(block_params, cfg, x), None

  return jax.lax.scan(step, x, jnp.arange(count))[0]


def encode_images(params, cfg: VitConfig, images):
  """Normalized images [B, S, S, 3] (S = image_size) -> features [B, output_size] (not unit-normalized)."""
  if images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
    raise ValueError(f"images of shape {images.shape[1:]}: the tower takes ({cfg.image_size}, "
                     f"{cfg.image_size}, 3).")
  x = patch_embeddings(params, cfg, images)
  cls = jnp.broadcast_to(params["class_embedding"]["embedding"].astype(x.dtype), (x.shape[0], 1, x.shape[2]))
  x = jnp.concatenate([cls, x], axis=1) + params["position_embedding"]["embedding"].astype(x.dtype)[None]
  if cfg.pre_norm:
    x = layer_norm_affine(params["pre_norm"], x, cfg.layer_norm_eps)
  x = run_blocks(params["layers"], cfg, x)
  pooled = layer_norm_affine(params["final_norm"], x[:, 0], cfg.layer_norm_eps)
  if cfg.projection_dim:
    pooled = linear(params["projection"], pooled)
  return pooled.astype(jnp.float32)
