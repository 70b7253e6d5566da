"""Samplers from files: a FLUX checkpoint root with a MOSAIC LoRA file (or the newest LoRA a training
workdir exported), or a training workdir itself, which brings its own base, LoRA, encoders and
settings (workdir/trained.py). Nothing is compiled here: a LoRA that does not fit fails first.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp

from mosaic_jax import parallel
from mosaic_jax.model import config as model_config
from mosaic_jax.sampling.requests import SampleInputError, SampleOptions
from mosaic_jax.sampling.sampler import Sampler
from mosaic_jax.workdir.trained import load_trained


def resolve_lora_file(path: str) -> str:
  """A LoRA file, or the LoRA inside a training workdir (the trainer writes `lora/<step>/lora.safetensors`
  and `lora_ema.safetensors`): the highest step number in the path, the EMA at equal steps, then the
  newest file."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return path
  if not os.path.isdir(path):
    raise SampleInputError(f"LoRA {path}: no such file or folder (expected a diffusers-format LoRA "
                           ".safetensors file or a training workdir holding one).")
  found = [os.path.join(d, f) for d, _, files in os.walk(path) for f in files if f.endswith(".safetensors")]
  if not found:
    raise SampleInputError(f"LoRA {path}: the folder holds no .safetensors LoRA file.")

  def preference(file):
    steps = [int(n) for n in re.findall(r"\d+", os.path.relpath(file, path))]
    return (max(steps, default=-1), "ema" in os.path.basename(file).lower(), os.path.getmtime(file))

  return max(found, key=preference)


def _mesh(mesh_shape):
  try:
    return parallel.make_mesh(dict(mesh_shape or {"data": -1}))
  except ValueError as error:
    raise SampleInputError(f"--mesh: {error}") from error


def load_sampler(checkpoint: str, lora: str | None, options: SampleOptions, dtype=jnp.bfloat16,
                 independent_refs: bool = False, t5_max_length: int = 512,
                 text_dtype=jnp.bfloat16, attention_impl: str = "xla", mesh_shape=None) -> Sampler:
  """Reads a FLUX checkpoint root (transformer/, vae/, text_encoder(_2)/, tokenizer(_2)/) and a LoRA file
  or training workdir.

  independent_refs: the LoRA was trained with independent_refs (then the reference KV cache is exact).
  attention_impl: "xla", "cudnn" (NVIDIA, bf16; it never holds the [queries, keys] logits, which is what
  makes the cache pay off) or "splash" (TPU).
  mesh_shape: {"data", "fsdp", "tensor"} sizes (one may be -1); default every device on data. Each
  transformer tensor goes straight from the file to its shards, never whole onto one device."""
  from mosaic_jax.encoders import load_flux_encoders
  from mosaic_jax.interop import load_flux_transformer, load_lora, lora_trained_independent_refs
  if not os.path.isdir(checkpoint):
    raise SampleInputError(f"checkpoint {checkpoint}: no such folder (expected a FLUX checkpoint root with "
                           "transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/).")
  mesh = _mesh(mesh_shape)

  def place(name, array):
    sharding = parallel.sharding_for(name.replace(".", "/"), array.shape, mesh)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

  cfg, params = load_flux_transformer(checkpoint, dtype=dtype, place=place)
  lora_file = resolve_lora_file(lora) if lora else None
  if lora_file and not independent_refs:  # the LoRA file says how it was trained (files we exported)
    independent_refs = bool(lora_trained_independent_refs(lora_file))
  cfg = model_config.with_overrides(cfg, {"independent_refs": independent_refs, "attention_impl": attention_impl})
  lora_tree = load_lora(lora_file, cfg, dtype=dtype) if lora_file else None
  encoders = load_flux_encoders(checkpoint, t5_dtype=text_dtype, clip_dtype=text_dtype,
                                t5_max_length=t5_max_length)
  return Sampler(cfg, params, lora_tree, encoders, options, mesh=mesh,
                 source={"checkpoint": os.fspath(checkpoint), "lora": lora_file, "independent_refs": independent_refs})


def load_trained_sampler(path: str, options: SampleOptions, step: int | None = None, ema: bool = True,
                         attention_impl: str | None = None, mesh_shape=None) -> Sampler:
  """A sampler for the model of a training workdir or one of its step folders (workdir/trained.py):
  the demo, flux_random and the recipe alike, with the settings in effect after the workdir's resumes.
  attention_impl: None keeps the run's."""
  mesh = _mesh(mesh_shape)
  trained = load_trained(path, step=step, ema=ema, mesh=mesh)
  cfg = model_config.with_overrides(trained.cfg, {"attention_impl": attention_impl})
  return Sampler(cfg, trained.params, trained.lora, trained.encoders, options, mesh=mesh,
                 logical_rules=cfg.logical_rules, source=trained.source)
