"""The FLUX autoencoder (diffusers `AutoencoderKL` with FLUX settings) as pure functions of a params pytree.

Images and latents are NHWC here (torch is NCHW): images [B, H, W, 3] in [-1, 1], latents
[B, H/8, W/8, 16] for FLUX. Parameter names follow diffusers' module names (`encoder.down_blocks.0.
resnets.1.conv1`, `decoder.mid_block.attentions.0.to_q`, ...). Leaves: a conv is {"kernel": [kh, kw, in,
out] (HWIO), "bias": [out]}, a linear {"kernel": [in, out], "bias"}, a GroupNorm {"scale", "bias"}.

FLUX's VAE has no quant convs: the encoder's `conv_out` gives (mean, logvar) directly and the decoder
starts at its `conv_in`. The DiT sees `(z - shift_factor) * scaling_factor` (see latents.py).
Precision: convs and matmuls accumulate in float32 and round to the parameter dtype; GroupNorm and the
attention softmax run in float32 (diffusers upcasts the FLUX VAE to float32 anyway: force_upcast).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from mosaic_jax.model.latents import Posterior
from mosaic_jax.model.layers import linear, random_params


@dataclasses.dataclass(frozen=True)
class VaeConfig:
  """AutoencoderKL dimensions, named like diffusers' config.json. Defaults are FLUX.1's `vae/`."""
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 16
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.3611
  shift_factor: float = 0.1159
  mid_block_add_attention: bool = True
  # Not in config.json: diffusers hard-codes these for AutoencoderKL.
  norm_eps: float = 1e-6
  logvar_min: float = -30.0
  logvar_max: float = 20.0

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}.")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers_config(cls, config: Mapping[str, Any], source: str = "config") -> "VaeConfig":
    """A VaeConfig from diffusers' AutoencoderKL config.json; anything we do not implement is an error."""
    problems = []
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
      problems.append(f"_class_name is {config.get('_class_name')!r}, expected 'AutoencoderKL'")
    n = len(config.get("block_out_channels", cls.block_out_channels))
    expected_layout = {
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "act_fn": "silu", "use_quant_conv": False, "use_post_quant_conv": False,
        "latents_mean": None, "latents_std": None,
    }
    for name, want in expected_layout.items():
      if name in config and config[name] != want:
        problems.append(f"{name} is {config[name]!r}; only {want!r} is implemented (the FLUX VAE)")
    if problems:
      raise ValueError(f"{source}: " + "; ".join(problems) + ".")
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in known}
    if kwargs.get("shift_factor") is None:  # SD-style VAEs write null: no shift
      kwargs["shift_factor"] = 0.0
    return cls(**kwargs)


def tiny() -> VaeConfig:
  """A small VAE with the FLUX structure (16 latent channels, no quant convs), downsample 8."""
  return VaeConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)


# ---- parameters ----------------------------------------------------------------------------------

def _conv(cin, cout, k=3):
  return {"kernel": (k, k, cin, cout), "bias": (cout,)}


def _norm(c):
  return {"scale": (c,), "bias": (c,)}


def _resnet(cin, cout):
  p = {"norm1": _norm(cin), "conv1": _conv(cin, cout), "norm2": _norm(cout), "conv2": _conv(cout, cout)}
  if cin != cout:
    p["conv_shortcut"] = _conv(cin, cout, k=1)
  return p


def _attention(c):
  lin = {"kernel": (c, c), "bias": (c,)}
  return {"group_norm": _norm(c), "to_q": lin, "to_k": dict(lin), "to_v": dict(lin), "to_out": {"0": dict(lin)}}


def _mid_block(c, cfg):
  p = {"resnets": {"0": _resnet(c, c), "1": _resnet(c, c)}}
  if cfg.mid_block_add_attention:
    p["attentions"] = {"0": _attention(c)}
  return p


def param_shapes(cfg: VaeConfig) -> dict:
  """Nested dict of our leaf shapes, named like diffusers' AutoencoderKL state dict."""
  chans = cfg.block_out_channels
  n = len(chans)
  down_blocks = {}
  for i, cout in enumerate(chans):
    cin = chans[max(i - 1, 0)]
    block = {"resnets": {str(j): _resnet(cin if j == 0 else cout, cout) for j in range(cfg.layers_per_block)}}
    if i < n - 1:
      block["downsamplers"] = {"0": {"conv": _conv(cout, cout)}}
    down_blocks[str(i)] = block
  encoder = {
      "conv_in": _conv(cfg.in_channels, chans[0]), "down_blocks": down_blocks,
      "mid_block": _mid_block(chans[-1], cfg), "conv_norm_out": _norm(chans[-1]),
      "conv_out": _conv(chans[-1], 2 * cfg.latent_channels),
  }
  rev = chans[::-1]
  up_blocks = {}
  for i, cout in enumerate(rev):
    cin = rev[max(i - 1, 0)]
    block = {"resnets": {str(j): _resnet(cin if j == 0 else cout, cout)
                         for j in range(cfg.layers_per_block + 1)}}
    if i < n - 1:
      block["upsamplers"] = {"0": {"conv": _conv(cout, cout)}}
    up_blocks[str(i)] = block
  decoder = {
      "conv_in": _conv(cfg.latent_channels, rev[0]), "mid_block": _mid_block(rev[0], cfg),
      "up_blocks": up_blocks, "conv_norm_out": _norm(rev[-1]), "conv_out": _conv(rev[-1], cfg.out_channels),
  }
  return {"encoder": encoder, "decoder": decoder}


def init_params(key, cfg: VaeConfig, dtype=jnp.float32) -> dict:
  """Random weights (fan-in scaled normal; norm parameters float32, scales around 1)."""
  return random_params(key, param_shapes(cfg), dtype, norm_dtype=jnp.float32)


# ---- leaves --------------------------------------------------------------------------------------

def conv2d(p, x, stride=1, padding="SAME"):
  """NHWC convolution with an HWIO kernel; float32 accumulation, result in the kernel dtype."""
  kernel = p["kernel"]
  y = jax.lax.conv_general_dilated(
      x.astype(kernel.dtype), kernel, window_strides=(stride, stride), padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32)
  return (y + p["bias"].astype(jnp.float32)).astype(kernel.dtype)


def group_norm(p, x, groups, eps):
  """GroupNorm over (H, W, channels of the group) with affine scale/bias, in float32."""
  b, h, w, c = x.shape
  xf = x.astype(jnp.float32).reshape(b, h, w, groups, c // groups)
  mean = jnp.mean(xf, axis=(1, 2, 4), keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=(1, 2, 4), keepdims=True)
  y = ((xf - mean) * jax.lax.rsqrt(var + eps)).reshape(b, h, w, c)
  return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def _resnet_block(p, x, cfg):
  h = conv2d(p["conv1"], jax.nn.silu(group_norm(p["norm1"], x, cfg.norm_num_groups, cfg.norm_eps)))
  h = conv2d(p["conv2"], jax.nn.silu(group_norm(p["norm2"], h, cfg.norm_num_groups, cfg.norm_eps)))
  if "conv_shortcut" in p:
    x = conv2d(p["conv_shortcut"], x)
  return (x.astype(h.dtype) + h).astype(h.dtype)


def _attention_block(p, x, cfg):
  """Single-head self-attention over all H*W positions (diffusers' VAE mid-block attention)."""
  b, h, w, c = x.shape
  tokens = group_norm(p["group_norm"], x, cfg.norm_num_groups, cfg.norm_eps).reshape(b, h * w, c)
  q, k, v = (linear(p[n], tokens) for n in ("to_q", "to_k", "to_v"))
  scores = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * c ** -0.5
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bqk,bkc->bqc", weights, v, preferred_element_type=jnp.float32).astype(v.dtype)
  out = linear(p["to_out"]["0"], out).reshape(b, h, w, c)
  return (x.astype(out.dtype) + out).astype(out.dtype)


def _mid_block_apply(p, x, cfg):
  x = _resnet_block(p["resnets"]["0"], x, cfg)
  if "attentions" in p:
    x = _attention_block(p["attentions"]["0"], x, cfg)
  return _resnet_block(p["resnets"]["1"], x, cfg)


def _downsample(p, x):
  # diffusers pads right and bottom by one, then a 3x3 stride-2 conv without padding.
  x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
  return conv2d(p["conv"], x, stride=2, padding="VALID")


def _upsample(p, x):
  x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
  return conv2d(p["conv"], x)


# ---- the model -----------------------------------------------------------------------------------

def encode(params, cfg: VaeConfig, images) -> Posterior:
  """Images [B, H, W, in_channels] in [-1, 1] -> the diagonal Gaussian posterior over latents
  [B, H/f, W/f, latent_channels] (f = downsample_factor), as float32 mean and std."""
  p = params["encoder"]
  dtype = p["conv_in"]["kernel"].dtype
  f = cfg.downsample_factor
  if images.ndim != 4 or images.shape[-1] != cfg.in_channels or images.shape[1] % f or images.shape[2] % f:
    raise ValueError(f"VAE encode: expected images [B, H, W, {cfg.in_channels}] with H and W multiples "
                     f"of {f}, got shape {tuple(images.shape)}.")
  x = conv2d(p["conv_in"], images.astype(dtype))
  for i in range(len(cfg.block_out_channels)):
    block = p["down_blocks"][str(i)]
    for j in range(cfg.layers_per_block):
      x = _resnet_block(block["resnets"][str(j)], x, cfg)
    if "downsamplers" in block:
      x = _downsample(block["downsamplers"]["0"], x)
  x = _mid_block_apply(p["mid_block"], x, cfg)
  x = jax.nn.silu(group_norm(p["conv_norm_out"], x, cfg.norm_num_groups, cfg.norm_eps))
  moments = conv2d(p["conv_out"], x).astype(jnp.float32)
  mean, logvar = jnp.split(moments, 2, axis=-1)
  logvar = jnp.clip(logvar, cfg.logvar_min, cfg.logvar_max)
  return Posterior(mean=mean, std=jnp.exp(0.5 * logvar))


def decode(params, cfg: VaeConfig, latents):
  """Raw (unscaled, unshifted) latents [B, h, w, latent_channels] -> images [B, h*f, w*f, out_channels]."""
  p = params["decoder"]
  dtype = p["conv_in"]["kernel"].dtype
  if latents.ndim != 4 or latents.shape[-1] != cfg.latent_channels:
    raise ValueError(f"VAE decode: expected latents [B, h, w, {cfg.latent_channels}], got shape "
                     f"{tuple(latents.shape)}.")
  x = conv2d(p["conv_in"], latents.astype(dtype))
  x = _mid_block_apply(p["mid_block"], x, cfg)
  for i in range(len(cfg.block_out_channels)):
    block = p["up_blocks"][str(i)]
    for j in range(cfg.layers_per_block + 1):
      x = _resnet_block(block["resnets"][str(j)], x, cfg)
    if "upsamplers" in block:
      x = _upsample(block["upsamplers"]["0"], x)
  x = jax.nn.silu(group_norm(p["conv_norm_out"], x, cfg.norm_num_groups, cfg.norm_eps))
  return conv2d(p["conv_out"], x)
