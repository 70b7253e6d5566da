"""The image tower shared by CLIP's vision model and DINO's ViT, as pure functions of a params pytree.

Both are pre-LayerNorm ViTs: non-overlapping patches projected by one matrix, a learned class token and
learned position embeddings, blocks `x += attn(ln1(x)); x += mlp(ln2(x))`, a final LayerNorm on the
class token. They differ in small switches, held in `VitConfig`: CLIP has a LayerNorm before the blocks
(`pre_norm`), no patch bias, quick-GELU and a linear projection of the class token; DINO (ViT-S/16)
has a patch bias, exact GELU and no projection. The output is the class token after the final norm
(and the projection when there is one): what CLIP-I and DINO scores compare.

Leaves: `patch.kernel` [P*P*3, D] over patches flattened in (row, column, channel) order; the blocks
are stacked along a leading axis and run with `lax.scan` (names as in model/clip.py: `self_attn.q_proj`,
`layer_norm1`, `mlp.fc1`...). Images come in as [B, H, W, 3] float32, already normalized.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mosaic_jax.model.clip import _ACTIVATIONS, check_encoder_config, layer_norm_affine
from mosaic_jax.model.layers import linear, random_params


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

  def __post_init__(self):
    check_encoder_config(self)
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


def _block(p, cfg: VitConfig, x):
  heads = lambda t: t.reshape(t.shape[:-1] + (cfg.num_attention_heads, cfg.head_dim))
  attn = p["self_attn"]
  h = layer_norm_affine(p["layer_norm1"], x, cfg.layer_norm_eps)
  q, k, v = (heads(linear(attn[n], h)) for n in ("q_proj", "k_proj", "v_proj"))
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * cfg.head_dim ** -0.5
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, preferred_element_type=jnp.float32).astype(v.dtype)
  x = x + linear(attn["out_proj"], out.reshape(out.shape[:2] + (cfg.hidden_size,)))
  h = layer_norm_affine(p["layer_norm2"], x, cfg.layer_norm_eps)
  return x + linear(p["mlp"]["fc2"], _ACTIVATIONS[cfg.hidden_act](linear(p["mlp"]["fc1"], h)))


def encode_images(params, cfg: VitConfig, images):
  """Normalized images [B, S, S, 3] (S = image_size) -> features [B, output_size] (not unit-normalized)."""
  if images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
    raise ValueError(f"images of shape {images.shape[1:]}: the tower takes ({cfg.image_size}, "
                     f"{cfg.image_size}, 3).")
  dtype = params["patch"]["kernel"].dtype
  x = linear(params["patch"], patchify(images.astype(dtype), cfg.patch_size))
  cls = jnp.broadcast_to(params["class_embedding"]["embedding"].astype(x.dtype), (x.shape[0], 1, x.shape[2]))
  x = jnp.concatenate([cls, x], axis=1) + params["position_embedding"]["embedding"].astype(x.dtype)[None]
  if cfg.pre_norm:
    x = layer_norm_affine(params["pre_norm"], x, cfg.layer_norm_eps)

  def step(x, layer_params):
    return _block(layer_params, cfg, x), None

  x, _ = jax.lax.scan(step, x, params["layers"])
  pooled = layer_norm_affine(params["final_norm"], x[:, 0], cfg.layer_norm_eps)
  if cfg.projection_dim:
    pooled = linear(params["projection"], pooled)
  return pooled.astype(jnp.float32)


# ---- checkpoint layout ---------------------------------------------------------------------------

def _patch_kernel(array):
  """torch Conv2d weight [D, C, P, P] -> our [P*P*C, D] over (row, column, channel)."""
  d = array.shape[0]
  return array.transpose(2, 3, 1, 0).reshape(-1, d)


def vit_targets(cfg: VitConfig, top_level: dict, layer_key) -> list:
  """Targets (interop/param_assembly) for a ViT checkpoint.

  top_level: our unstacked leaf path -> (torch key, torch shape); layer_key(our path under `layers`,
  i) -> torch key of layer i. Kernels are transposed; the patch kernel is flattened from the conv.
  """
  from mosaic_jax.interop.param_assembly import Target, linear_kernel
  targets = []
  for path, (key, shape) in top_level.items():
    convert = (_patch_kernel if path == ("patch", "kernel") else linear_kernel if path[-1] == "kernel"
               else (lambda a, n=path: a.reshape(param_shapes(cfg)[n[0]][n[1]])))
    float32 = "norm" in path[0]
    targets.append(Target(key, path, None, tuple(shape), convert, jnp.float32 if float32 else None))
  flat, _ = jax.tree_util.tree_flatten_with_path(param_shapes(cfg)["layers"],
                                                 is_leaf=lambda x: isinstance(x, tuple))
  for tree_path, shape in flat:
    names = tuple(p.key for p in tree_path)
    leaf_shape = shape[1:][::-1] if names[-1] == "kernel" else shape[1:]
    for i in range(cfg.num_hidden_layers):
      targets.append(Target(layer_key(names, i), ("layers",) + names, i, tuple(leaf_shape),
                            linear_kernel if names[-1] == "kernel" else None,
                            jnp.float32 if "norm" in names[0] else None))
  return targets
