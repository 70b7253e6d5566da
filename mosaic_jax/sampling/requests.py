"""What a user asks the sampler for, read and checked before anything is loaded or compiled: cases (a
prompt and its reference image paths; the official cases file), the sampling options, and the
reference images as the official sampler prepares them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np

from mosaic_jax import cli

# Official sampling defaults (the recipe: 28 Euler steps at guidance 3.5, 512 px).
DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 3.5
DEFAULT_SIZE = 512
REFERENCE_FILL = 0.9
# The official recipe trains with up to 6 references; more are allowed only when asked for.
DEFAULT_MAX_REFS = 6


class SampleInputError(ValueError):
  """Bad sampling input (a path, a size, a count); the message names the value and what was expected."""


@dataclasses.dataclass(frozen=True)
class Case:
  """One prompt and its reference images (the official cases file: {"index", "prompt", "image_paths"})."""
  index: str
  prompt: str
  image_paths: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class SampleOptions:
  """What to sample. ref_cache: True, False, or None for "when exact" (cfg.independent_refs)."""
  height: int = DEFAULT_SIZE
  width: int = DEFAULT_SIZE
  ref_size: int = DEFAULT_SIZE
  steps: int = DEFAULT_STEPS
  guidance: float = DEFAULT_GUIDANCE
  seeds: tuple[int, ...] = (0,)
  batch_size: int = 1
  ref_cache: Optional[bool] = None
  max_refs: int = DEFAULT_MAX_REFS
  save_attention: bool = False


def read_cases(path: str) -> list[Case]:
  """Cases from an official-format JSON file: a list of {"index", "prompt", "image_paths"}.

  Relative image paths are taken from the current folder or, failing that, from the file's folder.
  """
  path = os.fspath(path)
  entries = cli.read_json(path, SampleInputError)
  if not isinstance(entries, list):
    raise SampleInputError(f"{path}: expected a JSON list of {{\"index\", \"prompt\", \"image_paths\"}} "
                           f"objects, got {type(entries).__name__}.")
  base = os.path.dirname(os.path.abspath(path))
  cases = []
  for position, entry in enumerate(entries):
    where = f"{path}: entry {position}"
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
      raise SampleInputError(f"{where}: expected an object with a string \"prompt\", got {entry!r}.")
    image_paths = entry.get("image_paths", [])
    if not isinstance(image_paths, list) or not all(isinstance(p, str) for p in image_paths):
      raise SampleInputError(f"{where}: \"image_paths\" must be a list of strings, got {image_paths!r}.")
    resolved = []
    for p in image_paths:
      beside_file = os.path.join(base, p)
      resolved.append(beside_file if not os.path.isabs(p) and not os.path.exists(p)
                      and os.path.exists(beside_file) else p)
    cases.append(Case(str(entry.get("index", position)), entry["prompt"], tuple(resolved)))
  return cases


def validate_request(cases: Sequence[Case], options: SampleOptions, size_multiple: int = 16) -> None:
  """Every check that needs no model: raised before anything is loaded or compiled.

  size_multiple: pixels per packed latent token (16 for FLUX: VAE downsample 8, then 2x2 packing).
  """
  if not cases:
    raise SampleInputError("no cases to sample: the prompt list is empty (give --prompt or a cases file "
                           "with at least one entry).")
  _check_options(options, size_multiple)
  indices = [c.index for c in cases]
  duplicated = sorted({i for i in indices if indices.count(i) > 1})
  if duplicated:
    raise SampleInputError(f"case indices {duplicated} repeat; each case needs its own index (file names).")
  for case in cases:
    if len(case.image_paths) > options.max_refs:
      raise SampleInputError(
          f"case {case.index}: {len(case.image_paths)} references, but the model supports at most "
          f"{options.max_refs} (MOSAIC trains with up to {DEFAULT_MAX_REFS}; raise max_refs to try more).")
    for path in case.image_paths:
      _read_rgb(path, f"case {case.index}")


def _check_options(options: SampleOptions, size_multiple: int) -> None:
  for name in ("height", "width", "ref_size"):
    value = getattr(options, name)
    if not isinstance(value, int) or value <= 0 or value % size_multiple:
      raise SampleInputError(f"{name}={value!r}: expected a positive multiple of {size_multiple} pixels "
                             f"(the VAE downsamples by {size_multiple // 2}, then 2x2 patches are packed).")
  if options.steps < 1:
    raise SampleInputError(f"steps={options.steps!r}: expected at least 1.")
  if options.batch_size < 1:
    raise SampleInputError(f"batch_size={options.batch_size!r}: expected at least 1.")
  if not options.seeds:
    raise SampleInputError("seeds: expected at least one seed.")
  if len(set(options.seeds)) != len(options.seeds):
    raise SampleInputError(f"seeds={list(options.seeds)}: repeated seeds would give identical images.")


def _read_rgb(path: str, what: str):
  """The image at `path` as RGB (transparency on white); a missing or unreadable file is one
  SampleInputError naming it."""
  from PIL import Image
  from mosaic_jax.data.image_ops import to_rgb
  try:
    with open(path, "rb"):
      pass
  except OSError as e:
    raise SampleInputError(f"{what}: reference image {path}: cannot read it ({e.strerror or e}).") from e
  try:
    image = Image.open(path)  # by its path, so that PIL's own message names the file
    image.load()
  except Exception as e:  # PIL raises many types for bad bytes
    raise SampleInputError(f"{what}: reference image {path}: not a readable image ({type(e).__name__}: {e}).") from e
  return to_rgb(image)


def load_reference(path: str, size: int) -> np.ndarray:
  """A reference image as the official sampler prepares it: RGB with transparency on white, cropped to
  its non-white box, Lanczos-scaled by f = 0.9 * size / long side (each side int(side * f)), centred on
  a white square.
  Returns float32 [size, size, 3] in [-1, 1]. A missing or unreadable file is an error naming it."""
  from mosaic_jax.data.image_ops import pad_to_square_on_white
  image = _read_rgb(path, "load_reference")
  square, _ = pad_to_square_on_white(image, size, REFERENCE_FILL)
  return np.asarray(square, np.float32) * np.float32(1 / 127.5) - np.float32(1.0)
