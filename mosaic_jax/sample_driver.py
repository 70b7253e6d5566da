"""The command-line sampler's files (launch/sample.py): a cases file in, a run folder out.

`write_run` samples every case and seed with a `sampling.Sampler` (the library: models, mesh, batches;
sampling.read_cases reads the official cases file) into a fresh `run-<UTC time>` folder of PNG files
(each result, its panel with the references, optionally the attention heatmaps and maps) and a
run.json that records the model, the options and the cases.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
from typing import Sequence

import jax
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from mosaic_jax import images
from mosaic_jax.sampling import Case, SampleInputError, Sampler, load_reference


def write_run(sampler: Sampler, cases: Sequence[Case], output_dir: str, progress: bool = True) -> list[str]:
  """Samples every case and seed with `sampler` into one fresh run folder under output_dir (the same
  folder for every process); returns the files this process wrote: `<index>_seed<seed>.png` and
  `<index>_seed<seed>_panel.png` (references, then the result); with options.save_attention, for a
  case with references, `<index>_seed<seed>_attention.png` (heatmaps.attention_panel: the
  references framed in their colours above the result, all references' heatmaps, then each one's)
  and `<index>_seed<seed>_attention.npy` (the maps, float32 [R, grid height, grid width], each
  summing to 1)."""
  sampler.check(cases)
  leader = jax.process_index() == 0
  run_dir = _shared_run_dir(output_dir)
  if leader:
    with open(os.path.join(run_dir, "run.json"), "w", encoding="utf-8") as f:
      json.dump(_run_record(sampler, cases), f, indent=2)
  bar = tqdm(total=len(sampler.batches(cases)) * sampler.options.steps, desc="steps", unit="step",
             disable=not (progress and leader))
  written, attention = [], {}
  on_step = (lambda _: bar.update(1)) if progress else None
  for (case, seed), image in sampler.sample_owned(cases, on_step, attention):
    written += _write_result(sampler, run_dir, case, seed, image, attention.pop((case.index, seed), None))
  bar.close()
  return written


def _run_record(sampler: Sampler, cases: Sequence[Case]) -> dict:
  """run.json: the model, the options, the cases, and with save_attention what the maps are."""
  record = {"model": sampler.source, "options": dataclasses.asdict(sampler.options),
            "ref_cache": sampler.use_ref_cache, "independent_refs": sampler.cfg.independent_refs,
            "mesh": dict(sampler.mesh.shape), "processes": jax.process_count(),
            "cases": [dataclasses.asdict(c) for c in cases]}
  if sampler.options.save_attention:
    record["attention"] = {
        "maps": "a_r(j): mean over reference r's tokens of the softmax over target keys, averaged over "
                "heads and double blocks (the SCAL/MDL statistic), recorded at every denoising step "
                "and averaged over the steps; each map sums to 1 over the target tokens",
        "steps": list(range(sampler.options.steps)),
        "ref_cache_dropped": sampler.cache_dropped_for_attention,
        "files": [f"{_safe_name(c.index)}_seed{s}_attention{x}" for c in cases if c.image_paths
                  for s in sampler.options.seeds for x in (".png", ".npy")]}
  return record


def _write_result(sampler: Sampler, run_dir: str, case: Case, seed: int, image: np.ndarray,
                  maps: np.ndarray | None) -> list[str]:
  """One result's files (write_run's docstring); returns their paths."""
  refs = [Image.fromarray(images.to_uint8(load_reference(p, sampler.options.ref_size))) for p in case.image_paths]
  result = Image.fromarray(image)
  stem = os.path.join(run_dir, f"{_safe_name(case.index)}_seed{seed}")
  pictures = [("", result), ("_panel", images.side_by_side(refs + [result]))]
  written = []
  if maps is not None:
    grid = tuple(side // 2 for side in sampler.latent_geometry()[:2])
    pictures.append(("_attention", Image.fromarray(_attention_panel(image, maps, grid, refs))))
    np.save(f"{stem}_attention.npy", maps.reshape(len(refs), *grid))
    written.append(f"{stem}_attention.npy")
  for suffix, picture in pictures:
    picture.save(f"{stem}{suffix}.png")
    written.append(f"{stem}{suffix}.png")
  return written


def _attention_panel(image: np.ndarray, maps: np.ndarray, grid: tuple[int, int], refs) -> np.ndarray:
  """The heatmap panel of one result: tiles of the result's size, at least 128 px, at most 512 px."""
  from mosaic_jax.heatmaps import attention_panel
  tile = min(max(128, *image.shape[:2]), 512)
  return attention_panel(image, maps, grid, [np.asarray(r) for r in refs], tile=tile)


def _shared_run_dir(output_dir: str) -> str:
  """new_run_dir on process 0, its name broadcast to the others."""
  if jax.process_count() == 1:
    return new_run_dir(output_dir)
  from jax.experimental import multihost_utils
  name = new_run_dir(output_dir).encode() if jax.process_index() == 0 else b""
  encoded = np.zeros(4096, np.uint8)
  encoded[:len(name)] = np.frombuffer(name, np.uint8)
  name = bytes(np.asarray(multihost_utils.broadcast_one_to_all(encoded))).rstrip(b"\0").decode()
  return name


def _safe_name(index: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", index).strip("._") or "case"


def new_run_dir(output_dir: str) -> str:
  """A folder that did not exist before, `<output_dir>/run-<UTC time>[-k]`: reruns never overwrite."""
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("run-%Y%m%d-%H%M%S")
  os.makedirs(output_dir, exist_ok=True)
  for k in range(1, 10_000):
    candidate = os.path.join(output_dir, stamp if k == 1 else f"{stamp}-{k}")
    try:
      os.makedirs(candidate)
      return candidate
    except FileExistsError:
      continue
  raise SampleInputError(f"{output_dir}: could not create a fresh run folder.")
