"""Host batches -> what the train step reads (step.batch_spec): the input pipeline's batch (images and
captions, or their cached encoder features; the correspondence pairs) as typed numpy arrays, and each
step's batch as global arrays over the mesh, the encoders run on the devices when they run on the fly.
"""

from __future__ import annotations

import jax
import numpy as np

from mosaic_jax import parallel
from mosaic_jax.data import to_global_arrays
from mosaic_jax.encoders import FEATURE_KEYS, FluxEncoders
from mosaic_jax.settings import Settings
from mosaic_jax.train.step import batch_spec

PAIR_KEYS = ("pair_ref", "pair_ref_token", "pair_target_token", "pair_valid", "drop_refs")
RAW_KEYS = ("target_images", "ref_images", "t5_ids", "clip_ids")  # FluxEncoders.raw_inputs


def _host_spec(host_batch: dict, settings: Settings) -> dict:
  """step.batch_spec for a host batch of any size and pair count (evaluation's are smaller)."""
  (b, k), r = np.shape(host_batch["pair_ref"]), np.shape(host_batch["ref_means" if "ref_means" in host_batch
                                                                      else "refs"])[1]
  text = (np.shape(host_batch["t5"])[1:], np.shape(host_batch["pooled"])[1:]) if "t5" in host_batch else ((), ())
  return batch_spec(settings, r, text, batch_size=b, max_pairs=k)


def step_batch(host_batch: dict, encoders: FluxEncoders, settings: Settings) -> dict:
  """Pipeline batch (images and captions, or their cached features; pairs) -> the numpy arrays the
  train step reads (step.batch_spec), encoded on the host."""
  if "target_mean" in host_batch:  # cached features
    features = {key: host_batch[key] for key in FEATURE_KEYS}
  else:
    features = encoders.batch_features(host_batch, batch_size=len(host_batch["target"]))
  arrays = {**features, **{k: host_batch[k] for k in PAIR_KEYS}}
  spec = _host_spec(arrays, settings)
  out = {key: np.asarray(arrays[key], spec[key].dtype) for key in spec}
  for key, value in out.items():
    if key not in ("t5", "pooled") and value.shape != spec[key].shape:
      raise ValueError(f"step_batch: {key} has shape {value.shape}, the step reads {spec[key].shape}.")
  return out


def host_inputs(host_batch: dict, encoders: FluxEncoders, settings: Settings) -> dict[str, np.ndarray]:
  """What the trainer sends to the devices each step: cached features (float32), or, with encoders
  run on the fly, the images and token ids they encode inside the step's mesh
  (`FluxEncoders.features_from_raw`); plus the pairs, typed as step.batch_spec says."""
  if "target_mean" in host_batch:
    return step_batch(host_batch, encoders, settings)
  spec = _host_spec(host_batch, settings)
  return {**encoders.raw_inputs(host_batch), **{k: np.asarray(host_batch[k], spec[k].dtype) for k in PAIR_KEYS}}


def text_feature_shapes(settings: Settings, encoders: FluxEncoders, source) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(T5 states [L, D], pooled [P]) of one example: from the cache, or from the text encoders."""
  spec = getattr(source, "spec", None)
  if spec is not None:
    return tuple(spec["text"]["t5"]), tuple(spec["text"]["pooled"])
  return (settings.text_len, encoders.t5_config.d_model), (encoders.clip_config.hidden_size,)


def example_host_batch(settings: Settings, num_refs: int) -> dict:
  """A pipeline batch of the right shapes (zeros), to trace the on-device encoders for their dtypes."""
  b, s, sr = settings.batch_size, settings.resolution, settings.ref_resolution
  return {"target": np.zeros((b, s, s, 3), np.float32), "refs": np.zeros((b, num_refs, sr, sr, 3), np.float32),
          "caption": np.array([""] * b, object)}


class DeviceBatches:
  """Each step's host batch -> its batch on the devices: global arrays split like the batch (each process
  sends its own rows). Encoders run on the fly (the recipe's default) run on the step's mesh too, on the
  batch's shards, so their features never leave the devices and keep the encoders' dtypes."""

  def __init__(self, settings: Settings, encoders: FluxEncoders, mesh, num_refs: int):
    rules = settings.sharding.param_rules, settings.sharding.logical_rules
    self.settings, self.encoders, self.mesh = settings, encoders, mesh
    self.sharding = parallel.batch_sharding(mesh, rules[1])
    self.encode = self.parts = self.feature_dtypes = None  # none with cached features
    if not settings.dataset.cached_features:
      self.parts = parallel.place(encoders.device_parts(), mesh, *rules)
      self.encode = jax.jit(encoders.features_from_raw, out_shardings=self.sharding)
      raw = encoders.raw_inputs(example_host_batch(settings, num_refs))
      self.feature_dtypes = {k: v.dtype for k, v in jax.eval_shape(encoders.features_from_raw, self.parts,
                                                                   raw).items()}

  def __call__(self, host_batch: dict) -> dict:
    inputs = to_global_arrays(host_inputs(host_batch, self.encoders, self.settings), self.sharding)
    if self.encode is None:
      return inputs
    raw = {k: inputs.pop(k) for k in RAW_KEYS}
    with jax.set_mesh(self.mesh):
      return {**self.encode(self.parts, raw), **inputs}
