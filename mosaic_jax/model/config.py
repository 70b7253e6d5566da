"""FLUX transformer dimensions, named exactly like diffusers' `FluxTransformer2DModel` config.json.

Using diffusers' field names means a checkpoint's config.json maps onto this dataclass with no
translation table, and `to_diffusers_config` writes one that diffusers reads back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mosaic_jax.model import remat
from mosaic_jax.parallel.sharding import DEFAULT_LOGICAL_RULES, hashable_rules

ATTENTION_IMPLS = ("xla", "cudnn", "splash")
# Per-block rematerialization (jax.checkpoint of each scanned block): what the backward pass keeps, and
# where; each policy's description is in model/remat.py.
REMAT_POLICIES = tuple(remat.POLICIES)
PRESETS = ("flux1_dev", "tiny")  # the functions below that give a FluxConfig by name (config.model)
_NOT_IN_DIFFUSERS_CONFIG = ("rope_theta", "mlp_ratio", "independent_refs", "attention_impl", "stats_chunk",
                            "attention_chunk", "remat_policy", "unroll_layers", "logical_rules")
# Set by the program, not by a model override: the trainer copies config.sharding.logical_rules here.
NOT_OVERRIDABLE = ("logical_rules",)


@dataclasses.dataclass(frozen=True)
class FluxConfig:
  patch_size: int = 1
  in_channels: int = 64
  out_channels: int | None = None
  num_layers: int = 19  # double-stream blocks
  num_single_layers: int = 38
  attention_head_dim: int = 128
  num_attention_heads: int = 24
  joint_attention_dim: int = 4096  # T5 width
  pooled_projection_dim: int = 768  # CLIP pooled width
  guidance_embeds: bool = True
  axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
  # Not in diffusers' config.json: FLUX constants, kept here so tiny test models can vary them.
  rope_theta: float = 10000.0
  mlp_ratio: float = 4.0
  # MOSAIC's mask variant: references attend to themselves only, which makes reference keys and values
  # cacheable across sampling steps (exact only for a model trained this way).
  independent_refs: bool = False
  # Execution, not architecture (never written to config.json):
  attention_impl: str = "xla"  # "xla" (portable), "cudnn" (NVIDIA GPU, bf16/fp16), "splash" (TPU Pallas)
  stats_chunk: int = 256  # reference queries per chunk in the attention statistics (attention_stats.py)
  # xla attention: queries per chunk (0: all at once). Bounds the float32 logits held at a time
  # (FLUX.1-dev, 6 references: 1.1 GB per block for the main queries' logits alone, unchunked);
  # costs one more attention forward in the backward pass. cudnn and splash never hold the logits.
  attention_chunk: int = 512
  remat_policy: str = "none"  # one of REMAT_POLICIES; "full" recomputes each block in the backward pass
  # Logical axis -> mesh axes, for the activation pins and hand-placed kernels under `jax.set_mesh`
  # (parallel/sharding.py). Here, rather than in a context, because the config is a static argument
  # of every jit: a trace made under one rule table is never reused under another.
  logical_rules: tuple = dataclasses.field(default=DEFAULT_LOGICAL_RULES, repr=False)
  # Blocks as straight-line code instead of a `lax.scan` loop: compiles slower, same numbers. For XLA's
  # cost analysis, which counts a loop body once (benchmarks/train_memory.py's FLOPs and time estimate).
  unroll_layers: bool = False

  def __post_init__(self):
    if self.patch_size != 1:
      raise ValueError(f"patch_size={self.patch_size}: only 1 is supported (FLUX packs 2x2 outside).")
    if sum(self.axes_dims_rope) != self.attention_head_dim:
      raise ValueError(
          f"axes_dims_rope={tuple(self.axes_dims_rope)} must sum to attention_head_dim="
          f"{self.attention_head_dim}.")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}.")
    if self.attention_chunk < 0:
      raise ValueError(f"attention_chunk={self.attention_chunk}: expected 0 (no chunks) or a positive count.")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}.")
    if any(d % 2 for d in self.axes_dims_rope):
      raise ValueError(f"axes_dims_rope={tuple(self.axes_dims_rope)}: every axis must be even.")
    object.__setattr__(self, "axes_dims_rope", tuple(int(d) for d in self.axes_dims_rope))
    object.__setattr__(self, "logical_rules", hashable_rules(self.logical_rules))

  @property
  def hidden_size(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def mlp_hidden_size(self) -> int:
    return int(self.hidden_size * self.mlp_ratio)

  @property
  def output_channels(self) -> int:
    return self.out_channels or self.in_channels

  @classmethod
  def from_diffusers_config(cls, config: Mapping[str, Any], source: str = "config") -> "FluxConfig":
    """Builds a config from a diffusers config.json dict; unknown architecture fields are an error."""
    known = {f.name for f in dataclasses.fields(cls)}
    ignorable = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}
    unknown = sorted(k for k in config if k not in known and k not in ignorable)
    if unknown:
      raise ValueError(f"{source}: unsupported FluxTransformer2DModel fields {unknown}.")
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in known})

  def to_diffusers_config(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    for k in _NOT_IN_DIFFUSERS_CONFIG:
      out.pop(k)
    out["axes_dims_rope"] = list(self.axes_dims_rope)
    out["_class_name"] = "FluxTransformer2DModel"
    return out


def with_overrides(cfg: FluxConfig, overrides: Mapping[str, Any]) -> FluxConfig:
  """`cfg` with the fields that `overrides` sets; None means "not set" (a config file's placeholder)."""
  overrides = dict(overrides)  # a mapping, a ConfigDict or (name, value) pairs
  known = {f.name for f in dataclasses.fields(FluxConfig)}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ValueError(f"unknown FluxConfig field(s) {unknown}.")
  return dataclasses.replace(cfg, **{k: tuple(v) if isinstance(v, list) else v
                                     for k, v in overrides.items() if v is not None})


def preset(name: str, overrides: Mapping[str, Any] | None = None) -> FluxConfig:
  """The preset called `name` (one of PRESETS) with `overrides` applied (see with_overrides)."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; expected one of {PRESETS}.")
  return with_overrides(globals()[name](), overrides or {})


def resolve(name: str, overrides: Mapping[str, Any] | None = None, loaded: FluxConfig | None = None) -> FluxConfig:
  """The one way a program's model overrides are applied (training, sampling, forward.py): to `loaded`,
  the config of the checkpoint the weights come from, or else to the preset called `name`."""
  return with_overrides(loaded, overrides or {}) if loaded is not None else preset(name, overrides)


def field_types() -> dict[str, type]:
  """FluxConfig field -> the type a command-line override is parsed as."""
  return {f.name: type(f.default) if f.default is not None else int for f in dataclasses.fields(FluxConfig)
          if f.name not in NOT_OVERRIDABLE}


def flux1_dev() -> FluxConfig:
  """FLUX.1-dev: 19 double + 38 single blocks, hidden 3072, 11.9B parameters."""
  return FluxConfig()


def tiny(num_layers: int = 2, num_single_layers: int = 2) -> FluxConfig:
  """A small FLUX for tests and demos: 2 heads of 16, same structure as FLUX.1-dev."""
  return FluxConfig(
      in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
      pooled_projection_dim=12, axes_dims_rope=(4, 6, 6))
