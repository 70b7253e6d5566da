"""diffusers-format LoRA files (the format MOSAIC released), in and out.

Keys: `transformer.<module>.lora_A.weight` [r, in] and `transformer.<module>.lora_B.weight` [out, r]
(the prefixes `base_model.model.` of raw peft files, or none, are accepted too). Scale = alpha / r per
module: alpha from a `<module>.alpha` tensor, else from the `lora_adapter_metadata` header that
diffusers writes (`lora_alpha`, `alpha_pattern`), else alpha = r. We fold the scale into lora_B on
load, so the LoRA pytree always has scale 1, and we save with lora_alpha = r.

Modules of different ranks are zero-padded to the largest rank (exact: the padding contributes 0).
MOSAIC-adapted modules absent from the file are zero (no effect) and named in a warning; keys for
modules MOSAIC does not adapt are an error, since applying them only to references would be wrong.
"""

from __future__ import annotations

import json
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np

from mosaic_jax.interop.safetensors_io import SafetensorsFile, save_safetensors
from mosaic_jax.model.config import FluxConfig
from mosaic_jax.model.lora import get_path, set_path, target_modules
from mosaic_jax.model.transformer import param_shapes

PREFIXES = ("transformer.", "base_model.model.", "")
METADATA_KEY = "lora_adapter_metadata"
INDEPENDENT_REFS_KEY = "mosaic_independent_refs"
_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|alpha)$")


class LoraFileError(ValueError):
  """A LoRA file that does not fit the model; the message names every offending key."""


def lora_module_names(cfg: FluxConfig):
  """Yields (diffusers module name, our dotted path, layer index or None, in, out) for every adapted module."""
  shapes = param_shapes(cfg)
  for group, module in target_modules(cfg):
    if not group:
      fan_in, fan_out = get_path(shapes, f"{module}.kernel")
      yield module, module, None, fan_in, fan_out
      continue
    layers, fan_in, fan_out = get_path(shapes, f"{group}.{module}.kernel")
    for i in range(layers):
      yield f"{group}.{i}.{module}", f"{group}.{module}", i, fan_in, fan_out


def _alpha_from_metadata(metadata: dict, module: str):
  """alpha for one module from diffusers' adapter metadata (keys may carry the 'transformer.' prefix)."""
  meta = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in metadata.items()}
  for pattern, alpha in (meta.get("alpha_pattern") or {}).items():
    pattern = pattern.lstrip("^")
    pattern = re.sub(r"\.lora_[AB]\.weight$", "", pattern)
    if module == pattern or module.endswith("." + pattern):
      return float(alpha)
  if meta.get("lora_alpha") is not None:
    return float(meta["lora_alpha"])
  return None


def load_lora(path: str, cfg: FluxConfig, dtype=jnp.float32) -> dict:
  """The LoRA pytree (scale folded into lora_B) for `cfg` from a diffusers-format LoRA file."""
  with SafetensorsFile(path) as f:
    metadata = _adapter_metadata(f, path)
    prefix, parts, unexpected = _group_keys(f.keys())
    if not parts:
      raise LoraFileError(f"{path}: no LoRA tensors (`<module>.lora_A.weight` / `.lora_B.weight`) found.")
    known = {name: rest for name, *rest in lora_module_names(cfg)}
    ranks = _checked_ranks(f, path, cfg, prefix, parts, known, unexpected)
    arrays, missing = _read_modules(f, cfg, parts, known, ranks, metadata, np.dtype(jnp.dtype(dtype)))
  if missing:
    logging.warning("%s: %d of %d MOSAIC LoRA modules are absent and stay zero (no effect): %s",
                    path, len(missing), len(known), ", ".join(missing))
  out: dict = {}
  for ours, leaves in arrays.items():
    set_path(out, ours, {k: jnp.asarray(v) for k, v in leaves.items()})
  return out


def _adapter_metadata(f: SafetensorsFile, path: str) -> dict:
  """diffusers' adapter metadata from the file's header ({} when there is none)."""
  raw = f.metadata.get(METADATA_KEY)
  try:
    return json.loads(raw) if raw else {}
  except json.JSONDecodeError as e:
    raise LoraFileError(f"{path}: header metadata {METADATA_KEY!r} is not JSON ({e}).") from e


def _group_keys(keys: list[str]) -> tuple[str, dict[str, dict[str, str]], list[str]]:
  """(the prefix every key shares, {module: {part: key}}, keys that are no LoRA part)."""
  prefix = next((p for p in PREFIXES if p and keys and all(k.startswith(p) for k in keys)), "")
  parts: dict[str, dict[str, str]] = {}
  unexpected = []
  for key in keys:
    m = _KEY.match(key[len(prefix):])
    if m is None:
      unexpected.append(key)
    else:
      parts.setdefault(m.group("module"), {})[m.group("part")] = key
  return prefix, parts, unexpected


def _checked_ranks(f: SafetensorsFile, path: str, cfg: FluxConfig, prefix: str, parts: dict, known: dict,
                   unexpected: list[str]) -> dict[str, int]:
  """{module: rank} of the file's modules, once every key is a MOSAIC module's and every shape fits;
  otherwise a LoraFileError naming every unexpected key and every shape problem."""
  unexpected = unexpected + [key for module, ps in parts.items() if module not in known for key in ps.values()]
  problems, ranks = [], {}
  for module, ps in parts.items():
    if module not in known:
      continue
    if "lora_A.weight" not in ps or "lora_B.weight" not in ps:
      problems.append(f"{prefix}{module}: needs both lora_A.weight and lora_B.weight")
      continue
    _, _, fan_in, fan_out = known[module]
    a_shape, b_shape = f.shape(ps["lora_A.weight"]), f.shape(ps["lora_B.weight"])
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != fan_in or b_shape[0] != fan_out \
        or a_shape[0] != b_shape[1]:
      problems.append(f"{prefix}{module}: lora_A {a_shape}, lora_B {b_shape}; the model needs "
                      f"lora_A [r, {fan_in}] and lora_B [{fan_out}, r]")
      continue
    ranks[module] = a_shape[0]
  if unexpected or problems:
    lines = [f"{path} does not fit the MOSAIC LoRA of {cfg}:"]
    if unexpected:
      lines.append(f"  {len(unexpected)} unexpected keys (MOSAIC adapts only "
                   "x_embedder and the listed block modules):")
      lines += [f"    {k}" for k in sorted(unexpected)]
    if problems:
      lines.append(f"  {len(problems)} shape problems:")
      lines += [f"    {p}" for p in sorted(problems)]
    raise LoraFileError("\n".join(lines))
  return ranks


def _read_modules(f: SafetensorsFile, cfg: FluxConfig, parts: dict, known: dict, ranks: dict[str, int],
                  metadata: dict, np_dtype) -> tuple[dict[str, dict[str, np.ndarray]], list[str]]:
  """({our path: {"lora_A", "lora_B"}} at the largest rank, zero-padded and with the scale folded into
  lora_B, the MOSAIC modules the file lacks (left zero))."""
  rank = max(ranks.values())
  shapes = param_shapes(cfg)
  arrays: dict[str, dict[str, np.ndarray]] = {}
  missing = []
  for name, (ours, layer, fan_in, fan_out) in known.items():
    if ours not in arrays:
      lead = () if layer is None else (get_path(shapes, ours + ".kernel")[0],)
      arrays[ours] = {"lora_A": np.zeros(lead + (fan_in, rank), np_dtype),
                      "lora_B": np.zeros(lead + (rank, fan_out), np_dtype)}
    if name not in ranks:
      missing.append(name)
      continue
    r, ps = ranks[name], parts[name]
    if "alpha" in ps:
      alpha = float(np.asarray(f.read(ps["alpha"], np.float64)).reshape(-1)[0])
    else:
      alpha = _alpha_from_metadata(metadata, name)
    scale = 1.0 if alpha is None else alpha / r
    index = () if layer is None else (layer,)
    arrays[ours]["lora_A"][index + (slice(None), slice(0, r))] = f.read(ps["lora_A.weight"], np.float32).T
    arrays[ours]["lora_B"][index + (slice(0, r), slice(None))] = f.read(ps["lora_B.weight"], np.float32).T * scale
  return arrays, missing


def save_lora(path: str, lora: dict, cfg: FluxConfig, dtype=np.float32) -> None:
  """Writes the LoRA pytree as a diffusers LoRA file that `load_lora_weights` / `load_lora_adapter` read."""
  tensors = {}
  rank = None
  for name, ours, layer, _, _ in lora_module_names(cfg):
    module = get_path(lora, ours)
    if module is None:
      raise LoraFileError(f"save_lora: the LoRA pytree has no {ours!r} (expected every MOSAIC module).")
    a, b = (np.asarray(jax.device_get(module[k])) for k in ("lora_A", "lora_B"))
    if layer is not None:
      a, b = a[layer], b[layer]
    rank = a.shape[-1]
    tensors[f"transformer.{name}.lora_A.weight"] = np.ascontiguousarray(a.T.astype(dtype))
    tensors[f"transformer.{name}.lora_B.weight"] = np.ascontiguousarray(b.T.astype(dtype))
  metadata = {"transformer.r": rank, "transformer.lora_alpha": rank,
              "transformer.target_modules": sorted(n for n, *_ in lora_module_names(cfg))}
  # Beside diffusers' metadata (which diffusers turns into LoraConfig arguments, so no key of ours goes
  # there): the mask variant the LoRA was trained with, so that samplers need not be told.
  save_safetensors(path, tensors, {"format": "pt", METADATA_KEY: json.dumps(metadata, sort_keys=True),
                                   INDEPENDENT_REFS_KEY: str(bool(cfg.independent_refs)).lower()})


def lora_trained_independent_refs(path: str) -> bool | None:
  """Whether the LoRA file says it was trained with independent_refs (None: files from elsewhere)."""
  with SafetensorsFile(path) as f:
    value = f.metadata.get(INDEPENDENT_REFS_KEY)
  return None if value is None else value == "true"
