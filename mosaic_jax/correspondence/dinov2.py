"""DINOv2 patch features as GeoAware-SC reads them, for correspondence matching: the model, its loader and
its preprocessing.

The model is DINOv2 ViT-S/14, B/14 or L/14 (with or without register tokens) as pure functions of a
params pytree, on the shared ViT tower (model/vit.py) with LayerScale switched on. It loads from a
transformers `Dinov2Model` or `Dinov2WithRegistersModel` folder (config.json + model.safetensors or
shards; a `Dinov2ForImageClassification` folder too: its `dinov2.` prefix is dropped, its head skipped).
The mask token is not loaded: it only replaces masked patches in pre-training.

The feature: the patch tokens output by block `layer` (0-based; GeoAware-SC's 'token' facet of layer 11
on B/14), before the final LayerNorm (transformers' `hidden_states[layer + 1]`), class and register
tokens dropped, as a [B, H/14, W/14, D] grid (64x64 at GeoAware's 896 px). Only blocks 0..layer run.

Position embeddings are learned on the checkpoint's 37x37 grid (518 px) and resized to the image's grid
with PyTorch's bicubic interpolation (Keys' cubic with A = -0.75, align_corners=False, edge taps clamped).
Two rules exist (`positions`):
- "hub": as the torch.hub DINOv2 (facebookresearch/dinov2) that GeoAware-SC loads, and so the released
  matcher: `interpolate(scale_factor=((gh + 0.1) / 37, (gw + 0.1) / 37))`. PyTorch then maps output
  cell i to source (i + 0.5) * 37 / (g + 0.1) - 0.5 (the given scale factor, not the size ratio), so the
  grid is sampled slightly differently than by "transformers". This is the default: only it reproduces
  the released correspondences' features.
- "transformers": as transformers' Dinov2Model: `interpolate(size=(gh, gw))`, source
  (i + 0.5) * 37 / g - 0.5. At 896 px the two differ by about 4e-2 at layer 11 (on random B/14 weights
  here: max |difference| 0.056, mean 0.0032, relative L2 1.2e-3, as benchmarks/dinov2_features.py prints it;
  with --checkpoint it prints it for real ones).
Register models resize by `size=` with antialiasing (Keys' cubic with A = -0.5 over a renormalized,
edge-truncated window) under both rules: the hub's `_reg` models and transformers' registers model
agree there. Both interpolate in float32 and cast to the model's dtype; at the checkpoint's own grid the
table is used as it is. The resize is a fixed linear map per grid, so its weights are built once in numpy
(as PyTorch computes them) and applied in the graph: `patch_features` stays jittable.

Preprocessing (`preprocess`) follows MOSAIC's preprocess script then GeoAware-SC: the image squashed to
1024x1024 (PIL bicubic; images already at 1024, as the matcher prepares them, pass unchanged), resized
to 896x896 (PIL LANCZOS: GeoAware keeps the aspect by the long side and pads black to a square, a plain
resize after the squash), then ImageNet mean/std, float32 [896, 896, 3].

  model = load_dinov2(folder)                                    # Dinov2Model(config, params, folder)
  pixels = np.stack([preprocess(image) for image in images])     # [B, 896, 896, 3]
  features = jax.jit(patch_features, static_argnames=("layer", "positions"))(model, pixels)  # [B, 64, 64, 768]

`Dinov2Model` is a pytree whose only child is the params, so it passes through jax.jit. On a mesh the
params are replicated and the batch split over the data axes (batch items never interact); jit takes
`layer` and `positions` positionally then:

  mesh = parallel.make_mesh({"data": -1})
  replicated, batch = parallel.sharding.replicated(mesh), parallel.sharding.batch_sharding(mesh)
  run = jax.jit(patch_features, static_argnums=(2, 3), in_shardings=(replicated, batch), out_shardings=batch)
  features = run(jax.device_put(model, replicated), jax.device_put(pixels, batch), GEOAWARE_LAYER, "hub")

`Dinov2Model.with_attention` picks the attention implementation (cudnn on NVIDIA GPUs in bf16, splash on
TPUs, query chunks on the portable one; at 896 px one image's float32 scores are 12 x 4097 x 4097).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mosaic_jax.interop.param_assembly import Target, assemble
from mosaic_jax.interop.tensor_table import (TRANSFORMERS_INDEX, TRANSFORMERS_WEIGHTS, CheckpointError,
                                             folder_entries, read_config_json)
from mosaic_jax.interop.vit_checkpoint import vit_targets
from mosaic_jax.model import vit
from mosaic_jax.model.layers import random_params
from mosaic_jax.model.vit import IMAGENET_MEAN, IMAGENET_STD, VitConfig, normalize_pixels

POSITION_RULES = ("hub", "transformers")
GEOAWARE_LAYER = 11       # GeoAware-SC's DINOv2 layer ('token' facet of B/14)
GEOAWARE_SIZE = 896       # GeoAware-SC's DINOv2 input: 64 cells of 14 px
SQUASH_SIZE = 1024        # MOSAIC's preprocess script resizes every image to 1024x1024 first
HUB_OFFSET = 0.1          # the hub's `interpolate_offset` (added to the output grid in the scale factor)


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
  vit: VitConfig
  num_register_tokens: int = 0

  @property
  def position_grid(self) -> int:
    """Side of the checkpoint's position-embedding grid (37 for DINOv2's 518 px)."""
    return self.vit.image_size // self.vit.patch_size


def _config(hidden: int, layers: int, heads: int, registers: int) -> Dinov2Config:
  return Dinov2Config(VitConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, image_size=518, patch_size=14, hidden_act="gelu",
                                layer_norm_eps=1e-6, layer_scale=True), registers)


def dinov2_vits14(registers: int = 0) -> Dinov2Config:
  """facebook/dinov2-small (with registers: facebook/dinov2-with-registers-small, 4)."""
  return _config(384, 12, 6, registers)


def dinov2_vitb14(registers: int = 0) -> Dinov2Config:
  """facebook/dinov2-base: the one GeoAware-SC uses."""
  return _config(768, 12, 12, registers)


def dinov2_vitl14(registers: int = 0) -> Dinov2Config:
  """facebook/dinov2-large."""
  return _config(1024, 24, 16, registers)


def param_shapes(cfg: Dinov2Config) -> dict:
  shapes = vit.param_shapes(cfg.vit)
  if cfg.num_register_tokens:
    shapes["register_tokens"] = {"embedding": (cfg.num_register_tokens, cfg.vit.hidden_size)}
  return shapes


def init_params(key, cfg: Dinov2Config, dtype=jnp.float32) -> dict:
  """Random weights of the real shapes, for benchmarks."""
  return random_params(key, param_shapes(cfg), dtype, norm_dtype=jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Dinov2Model:
  """A DINOv2 config with its params: a pytree whose only child is params, so it passes through jit."""
  config: Dinov2Config = dataclasses.field(metadata={"static": True})
  params: Any = None
  folder: str | None = dataclasses.field(default=None, metadata={"static": True})

  def with_attention(self, impl: str = "xla", query_chunk: int = 0) -> "Dinov2Model":
    """The same weights with another attention implementation (model/attention.py: "xla", "cudnn" on
    NVIDIA GPUs in bf16/fp16, "splash" on TPUs); query_chunk > 0 ("xla") bounds the float32 scores held
    at once (at 896 px: 4097 x 4097 per head and image without it)."""
    vit_config = dataclasses.replace(self.config.vit, attention_impl=impl, query_chunk=query_chunk)
    return dataclasses.replace(self, config=dataclasses.replace(self.config, vit=vit_config))


# ---- position embeddings ---------------------------------------------------------------------------

def _fma32(a, b, c) -> np.ndarray:
  """float32 a * b + c rounded once, as a fused multiply-add (the float32 product is exact in float64)."""
  return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(np.float32)


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel at |x|, in float32 with the multiply-adds fused as PyTorch's CPU build
  evaluates `cubic_convolution1/2` (measured: 2e-7 from its weights, against 7e-7 unfused)."""
  x, a = np.abs(x).astype(np.float32), np.float32(a)
  near = _fma32(_fma32(a + 2, x, -(a + 3)) * x, x, 1)
  far = _fma32(_fma32(_fma32(a, x, -5 * a), x, 8 * a), x, -4 * a)
  return np.where(x < 1, near, np.where(x < 2, far, np.float32(0))).astype(np.float32)


def _torch_scale(in_size: int, out_size: int, scale_factor: float | None) -> np.float32:
  """PyTorch's source step (`area_pixel_compute_scale`, align_corners=False): 1 / scale_factor when a
  scale factor was given, else in_size / out_size, in float32."""
  if scale_factor is not None:
    return np.float32(1.0 / scale_factor)
  return np.float32(in_size) / np.float32(out_size)


def interpolation_matrix(in_size: int, out_size: int, scale_factor: float | None = None,
                         antialias: bool = False) -> np.ndarray:
  """float32 [out_size, in_size]: PyTorch's 1-D bicubic resize (align_corners=False) as a matrix.

  `F.interpolate(x, mode="bicubic", ...)` on a 2-D grid equals rows @ x @ cols.T with one such matrix
  per axis. scale_factor: the value given to `interpolate(scale_factor=...)` for this axis (then out_size
  must be floor(in_size * scale_factor), as PyTorch makes it); None for `size=`. antialias: PyTorch's
  antialiased kernel (A = -0.5, the window widened by the scale when shrinking, truncated at the edges
  and renormalized) instead of the plain one (A = -0.75, four taps, indices clamped to the edge).
  """
  if scale_factor is not None and math.floor(in_size * scale_factor) != out_size:
    raise ValueError(f"scale factor {scale_factor} makes {math.floor(in_size * scale_factor)} cells from "
                     f"{in_size}, not {out_size}.")
  scale = _torch_scale(in_size, out_size, scale_factor)
  matrix = np.zeros((out_size, in_size), np.float32)
  cells = np.arange(out_size, dtype=np.float32)
  if not antialias:
    # scale * (i + 0.5) - 0.5 as PyTorch's build computes it: one fused multiply-add (the float32 product
    # is exact in float64), rounded once; no clamp at 0 for cubic.
    source = _fma32(scale, cells + np.float32(0.5), -0.5)
    base = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    t = np.clip(source - base.astype(np.float32), np.float32(0), np.float32(1))
    taps = (t + 1, t, 1 - t, (1 - t) + 1)  # distances to base-1, base, base+1, base+2
    for offset, distance in zip((-1, 0, 1, 2), taps):
      columns = np.clip(base + offset, 0, in_size - 1)
      np.add.at(matrix, (np.arange(out_size), columns), _keys_cubic(distance, -0.75))
    return matrix
  support = np.float32(2.0) * max(scale, np.float32(1.0))  # 4 taps wide, times the scale when shrinking
  inverse = np.float32(1.0) / scale if scale >= 1 else np.float32(1.0)
  for i, center in enumerate(scale * (cells + np.float32(0.5))):
    start = max(int(center - support + np.float32(0.5)), 0)
    stop = min(int(center + support + np.float32(0.5)), in_size)
    positions = np.arange(start, stop)
    weights = _keys_cubic((positions.astype(np.float32) - center + np.float32(0.5)) * inverse, -0.5)
    total = weights.sum(dtype=np.float32)
    matrix[i, start:stop] = weights / total if total != 0 else weights
  return matrix


def position_resize(cfg: Dinov2Config, grid_h: int, grid_w: int, positions: str):
  """(rows [grid_h, M], cols [grid_w, M]) resizing the checkpoint's MxM position grid, or None when the
  grid is the checkpoint's own (both implementations then use the table unchanged)."""
  if positions not in POSITION_RULES:
    raise ValueError(f"positions={positions!r}: expected one of {POSITION_RULES}.")
  m = cfg.position_grid
  if (grid_h, grid_w) == (m, m):
    return None
  if cfg.num_register_tokens:  # the hub's _reg models and transformers agree: size=, antialiased
    return (interpolation_matrix(m, grid_h, antialias=True), interpolation_matrix(m, grid_w, antialias=True))
  if positions == "hub":
    return (interpolation_matrix(m, grid_h, (grid_h + HUB_OFFSET) / m),
            interpolation_matrix(m, grid_w, (grid_w + HUB_OFFSET) / m))
  return interpolation_matrix(m, grid_h), interpolation_matrix(m, grid_w)


def position_embeddings(params, cfg: Dinov2Config, grid_h: int, grid_w: int, positions: str):
  """float32 [1 + grid_h * grid_w, D]: the class token's position embedding, then the patch grid's,
  row-major, resized from the checkpoint's grid by the rule `positions`."""
  table = params["position_embedding"]["embedding"].astype(jnp.float32)
  resize = position_resize(cfg, grid_h, grid_w, positions)
  if resize is None:
    return table
  rows, cols = resize
  m, d = cfg.position_grid, table.shape[-1]
  grid = table[1:].reshape(m, m, d)
  # Width first, then height, as PyTorch's kernels sum; full float32 products on every backend.
  grid = jnp.einsum("wx,yxd->ywd", cols, grid, precision=jax.lax.Precision.HIGHEST)
  grid = jnp.einsum("hy,ywd->hwd", rows, grid, precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([table[:1], grid.reshape(grid_h * grid_w, d)], axis=0)


# ---- the model -------------------------------------------------------------------------------------

def _grid(cfg: Dinov2Config, pixels) -> tuple[int, int]:
  p = cfg.vit.patch_size
  if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.shape[1] % p or pixels.shape[2] % p:
    raise ValueError(f"pixels of shape {tuple(pixels.shape)}: expected [B, H, W, 3] with H and W multiples "
                     f"of the patch size {p} (896 px for GeoAware's 64x64 grid).")
  return pixels.shape[1] // p, pixels.shape[2] // p


def embed(params, cfg: Dinov2Config, pixels, positions: str = "hub"):
  """Normalized pixels [B, H, W, 3] -> tokens [B, 1 + registers + H*W/14^2, D]: the class token, the
  register tokens, then the patches; position embeddings are added to the class and patch tokens only."""
  grid_h, grid_w = _grid(cfg, pixels)
  x = vit.patch_embeddings(params, cfg.vit, pixels)
  batch, _, width = x.shape
  cls = jnp.broadcast_to(params["class_embedding"]["embedding"].astype(x.dtype), (batch, 1, width))
  x = jnp.concatenate([cls, x], axis=1)
  x = x + position_embeddings(params, cfg, grid_h, grid_w, positions).astype(x.dtype)[None]
  if cfg.num_register_tokens:
    registers = params["register_tokens"]["embedding"].astype(x.dtype)
    x = jnp.concatenate([x[:, :1], jnp.broadcast_to(registers, (batch,) + registers.shape), x[:, 1:]], axis=1)
  return x


def patch_features(model: Dinov2Model, pixels, layer: int = GEOAWARE_LAYER, positions: str = "hub"):
  """ImageNet-normalized pixels [B, H, W, 3] -> float32 patch tokens [B, H/14, W/14, D] output by block
  `layer` (0-based), before the final LayerNorm. `layer` and `positions` are static under jit."""
  cfg = model.config
  if not 0 <= layer < cfg.vit.num_hidden_layers:
    raise ValueError(f"layer={layer}: this DINOv2 has blocks 0..{cfg.vit.num_hidden_layers - 1}.")
  if positions not in POSITION_RULES:
    raise ValueError(f"positions={positions!r}: expected one of {POSITION_RULES}.")
  grid_h, grid_w = _grid(cfg, pixels)
  x = embed(model.params, cfg, pixels, positions)
  x = vit.run_blocks(model.params["layers"], cfg.vit, x, count=layer + 1)
  patches = x[:, 1 + cfg.num_register_tokens:]
  return patches.reshape(x.shape[0], grid_h, grid_w, x.shape[-1]).astype(jnp.float32)


# ---- preprocessing ---------------------------------------------------------------------------------

def preprocess(image, size: int = GEOAWARE_SIZE, squash: int = SQUASH_SIZE) -> np.ndarray:
  """A PIL image or uint8 [H, W, 3] array -> float32 [size, size, 3]: squashed to squash x squash (PIL
  bicubic; unchanged when already that size), resized to size x size (PIL LANCZOS), ImageNet mean/std."""
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"image array of dtype {image.dtype} and shape {image.shape}: expected uint8 [H, W, 3].")
    image = Image.fromarray(image)
  elif not isinstance(image, Image.Image):
    raise ValueError(f"image of type {type(image).__name__}: expected a PIL image or a uint8 [H, W, 3] array.")
  image = image.convert("RGB")
  if image.size != (squash, squash):
    image = image.resize((squash, squash), Image.BICUBIC)
  image = image.resize((size, size), Image.LANCZOS)
  return normalize_pixels(image, IMAGENET_MEAN, IMAGENET_STD)


# ---- checkpoint ------------------------------------------------------------------------------------

_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
_LAYER_NAMES = {
    ("self_attn", "q_proj"): "attention.attention.query", ("self_attn", "k_proj"): "attention.attention.key",
    ("self_attn", "v_proj"): "attention.attention.value", ("self_attn", "out_proj"): "attention.output.dense",
    ("layer_norm1",): "norm1", ("layer_norm2",): "norm2", ("mlp", "fc1"): "mlp.fc1", ("mlp", "fc2"): "mlp.fc2",
    ("layer_scale1",): "layer_scale1", ("layer_scale2",): "layer_scale2",
}


def _layer_key(names: tuple[str, ...], i: int) -> str:
  module = _LAYER_NAMES[names[:-1]]
  leaf = "lambda1" if module.startswith("layer_scale") else {"kernel": "weight", "scale": "weight"}.get(
      names[-1], names[-1])
  return f"encoder.layer.{i}.{module}.{leaf}"


def config_from_json(config: dict, source: str) -> Dinov2Config:
  if config.get("model_type") not in _MODEL_TYPES:
    raise CheckpointError(f"{source}: model_type is {config.get('model_type')!r}, expected one of {_MODEL_TYPES} "
                          "(a transformers Dinov2Model or Dinov2WithRegistersModel folder).")
  unsupported = [(config.get("use_swiglu_ffn", False), "use_swiglu_ffn", "ViT-g/14's SwiGLU MLP"),
                 (not config.get("qkv_bias", True), "qkv_bias", "attention without biases"),
                 (config.get("num_channels", 3) != 3, "num_channels", "other than RGB input")]
  for bad, key, what in unsupported:
    if bad:
      raise CheckpointError(f"{source}: {key}={config[key]!r} ({what}) is not supported; expected a "
                            "DINOv2 ViT-S/14, B/14 or L/14.")
  registers = config.get("num_register_tokens", 4) if config["model_type"] == "dinov2_with_registers" else 0
  try:
    hidden = config.get("hidden_size", 768)
    return Dinov2Config(VitConfig(
        hidden_size=hidden, intermediate_size=int(hidden * config.get("mlp_ratio", 4)),
        num_hidden_layers=config.get("num_hidden_layers", 12),
        num_attention_heads=config.get("num_attention_heads", 12),
        image_size=config.get("image_size", 518), patch_size=config.get("patch_size", 14),
        hidden_act=config.get("hidden_act", "gelu"), layer_norm_eps=float(config.get("layer_norm_eps", 1e-6)),
        layer_scale=True), registers)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{source}: {e}") from e


def dinov2_targets(cfg: Dinov2Config) -> list:
  d, p, n = cfg.vit.hidden_size, cfg.vit.patch_size, cfg.vit.num_patches + 1
  top = {("patch", "kernel"): ("embeddings.patch_embeddings.projection.weight", (d, 3, p, p)),
         ("patch", "bias"): ("embeddings.patch_embeddings.projection.bias", (d,)),
         ("class_embedding", "embedding"): ("embeddings.cls_token", (1, 1, d)),
         ("position_embedding", "embedding"): ("embeddings.position_embeddings", (1, n, d)),
         ("final_norm", "scale"): ("layernorm.weight", (d,)), ("final_norm", "bias"): ("layernorm.bias", (d,))}
  targets = vit_targets(cfg.vit, top, _layer_key)
  if cfg.num_register_tokens:
    r = cfg.num_register_tokens
    targets.append(Target("embeddings.register_tokens", ("register_tokens", "embedding"), None, (1, r, d),
                          lambda a: a.reshape(r, d)))
  return targets


def load_dinov2(folder: str, dtype=jnp.float32, place: Callable | None = None) -> Dinov2Model:
  """A transformers Dinov2Model / Dinov2WithRegistersModel folder -> Dinov2Model (weights in `dtype`,
  norms and LayerScale in float32; `place(path, array)` puts each leaf, e.g. replicated on a mesh)."""
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise CheckpointError(f"{folder}: no such folder (expected a transformers Dinov2Model folder, e.g. "
                          "facebook/dinov2-base).")
  config = read_config_json(folder, "transformers Dinov2Model", TRANSFORMERS_WEIGHTS, TRANSFORMERS_INDEX)
  cfg = config_from_json(config, os.path.join(folder, "config.json"))
  entries = {}
  for key, entry in folder_entries(folder, TRANSFORMERS_WEIGHTS, TRANSFORMERS_INDEX).items():
    key = key[len("dinov2."):] if key.startswith("dinov2.") else key
    if not key.startswith("classifier.") and key != "embeddings.mask_token":
      entries[key] = entry
  params = assemble(entries, dinov2_targets(cfg), f"{folder} does not fit the DINOv2 {cfg}", dtype, place)
  return Dinov2Model(cfg, params, folder)
