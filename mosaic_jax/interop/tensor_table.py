"""A checkpoint as a table {name: Entry(shape, read)} read lazily, and the one check every loader uses.

Loaders describe a checkpoint (any format) as such a table before reading a tensor, check it against
what the model expects with `check_entries` (every missing key, unexpected key and shape mismatch in
one error), then read tensor by tensor in the target dtype.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping, NamedTuple

import numpy as np

from mosaic_jax.interop.safetensors_io import SafetensorsFile

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
TRANSFORMERS_WEIGHTS = "model.safetensors"
TRANSFORMERS_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
  """A checkpoint that does not fit the model; the message names every offending key."""


class Entry(NamedTuple):
  shape: tuple[int, ...]
  read: Callable[[np.dtype], np.ndarray]  # the tensor in the file's (torch) layout, as dtype


def check_entries(entries: Mapping[str, Entry], expected: Mapping[str, tuple[int, ...]], title: str):
  """Raises CheckpointError listing all missing keys, unexpected keys and shape mismatches."""
  missing = sorted(n for n in expected if n not in entries)
  unexpected = sorted(n for n in entries if n not in expected)
  mismatched = sorted(f"{name}: file {tuple(entries[name].shape)}, model {tuple(shape)}"
                      for name, shape in expected.items()
                      if name in entries and tuple(entries[name].shape) != tuple(shape))
  if missing or unexpected or mismatched:
    lines = [f"{title}:"]
    for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatches", mismatched)):
      if items:
        lines.append(f"  {len(items)} {what}:")
        lines.extend(f"    {item}" for item in items)
    raise CheckpointError("\n".join(lines))


def file_entries(files: list[SafetensorsFile]) -> dict[str, Entry]:
  entries = {}
  for f in files:
    for name in f.keys():
      entries[name] = Entry(f.shape(name), lambda dtype, f=f, name=name: f.read(name, dtype))
  return entries


def folder_entries(folder: str, weights_name: str, index_name: str) -> dict[str, Entry]:
  """Entries of a diffusers/transformers folder: one `weights_name` file, or shards listed by `index_name`."""
  index_path = os.path.join(folder, index_name)
  single_path = os.path.join(folder, weights_name)
  if os.path.isfile(index_path):
    with open(index_path) as f:
      try:
        weight_map = json.load(f).get("weight_map")
      except json.JSONDecodeError as e:
        raise CheckpointError(f"{index_path}: not valid JSON ({e}).") from e
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index_path}: no 'weight_map' object.")
    shard_names = sorted(set(weight_map.values()))
    missing = [s for s in shard_names if not os.path.isfile(os.path.join(folder, s))]
    if missing:
      raise CheckpointError(f"{index_path} names shard files that do not exist: {missing}.")
    entries = file_entries([SafetensorsFile(os.path.join(folder, s)) for s in shard_names])
    stray = sorted(k for k in weight_map if k not in entries)
    if stray:
      raise CheckpointError(f"{index_path} lists keys that no shard holds: {stray}.")
    return entries
  if os.path.isfile(single_path):
    return file_entries([SafetensorsFile(single_path)])
  raise CheckpointError(f"{folder}: neither {weights_name} nor {index_name} is there.")


def resolve_folder(path: str, subfolder: str, what: str) -> str:
  """The model folder itself (it holds config.json), or a checkpoint root holding `subfolder/`."""
  folder = os.fspath(path)
  if not os.path.isdir(folder):
    raise CheckpointError(f"{folder}: no such folder (expected a {what} `{subfolder}/` folder).")
  if (not os.path.isfile(os.path.join(folder, "config.json"))
      and os.path.isdir(os.path.join(folder, subfolder))):
    folder = os.path.join(folder, subfolder)
  return folder


def read_config_json(folder: str, what: str, weights_name: str, index_name: str) -> dict:
  """config.json of a diffusers/transformers folder, with errors that say what was expected."""
  config_path = os.path.join(folder, "config.json")
  if not os.path.isfile(config_path):
    raise CheckpointError(f"{folder}: no config.json; expected a {what} folder "
                          f"(config.json + {weights_name} or {index_name}).")
  with open(config_path) as f:
    try:
      config = json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{config_path}: not valid JSON ({e}).") from e
  if not isinstance(config, dict):
    raise CheckpointError(f"{config_path}: expected a JSON object.")
  return config
