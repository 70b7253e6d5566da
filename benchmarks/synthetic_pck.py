"""PCK@0.1 of the FLUX-feature (DiTF) matcher on synthetic scenes, whose exact correspondences are known.

  python launch/train.py --config configs/flux_ms.py:demo --workdir /tmp/mosaic_demo      # once, ~10 min
  python benchmarks/synthetic_pck.py --workdir /tmp/mosaic_demo [--scenes 48]

Scenes: data/synthetic.py at 128 px (the demo's data), from a seed the demo never trained on; every
reference matched by MOSAIC's rule (matching.py: the target under that reference's mask, the reference's
white background zeroed, both at 1024 px). The demo DiT was trained at 32 px with its pixel autoencoder
(4 px per token: an 8x8 token grid), so the prepared images are resized to 32 px (PIL bilinear, as the
training pipeline resizes) and the DiTF features are its 8x8 token grid; a target cell of the 64x64 grid
takes its token's match, and the matched reference token stands for the reference cell at its centre.
PCK@0.1 counts a target cell inside the reference's visible mask as correct when that reference cell lies
within 0.1 x the reference subject's bounding-box side of the exact one. "exact" is the exact grid put
through the same 8x8 token quantization: the ceiling at this resolution.

Two grids for the official agreement rule: no DINOv2 weights exist here, so the second grid is the same
model read at another depth (grid A: the input of block 2 of the demo's 4, half way as DiTF's block 28 of
57 on FLUX.1-dev; grid B: the input of block 3, the single block). Like MOSAIC's two matchers, two views
of one image whose errors need not coincide: where they agree the pair is kept. Reported per grid and
for the kept pairs: kept fraction (of masked target cells) and precision (PCK@0.1 among them). DiTF's
other settings: t = 0.26, 8 copies, AdaLN normalization on, no channel discard (the demo has no known
massive-activation channels), guidance 1.0 (what the demo was trained with). Rows: the trained demo
(EMA weights), random weights of the same architecture, and the exact pairs; both similarities.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from mosaic_jax.correspondence import extractors, flux_features, matchers, matching, pck  # noqa: E402
from mosaic_jax.data import synthetic  # noqa: E402
from mosaic_jax.data.correspondence import COORD_GRID  # noqa: E402

SCENE_SIZE = 128
GRID_A = flux_features.DitfConfig(block=2, timestep=0.26, copies=8, guidance=1.0, discard_massive=False)
GRID_B = dataclasses.replace(GRID_A, block=3)


def token_cells(token_matches: np.ndarray) -> np.ndarray:
  """Per-token matches [g, g, 2] (reference token (y, x)) -> the 64x64 cell grid: each target cell takes its
  token's match; a reference token stands for the cell at its centre."""
  grid = token_matches.shape[0]
  per_cell = COORD_GRID // grid
  expanded = np.repeat(np.repeat(token_matches, per_cell, axis=0), per_cell, axis=1)
  return (expanded * per_cell + per_cell // 2).astype(np.int64)


def quantized(exact: np.ndarray, grid: int) -> np.ndarray:
  """The exact grid seen through a grid x grid token quantization on both sides."""
  per_cell = COORD_GRID // grid
  tokens = exact.reshape(grid, per_cell, grid, per_cell, 2)[:, per_cell // 2, :, per_cell // 2] // per_cell
  return token_cells(tokens)


def scenes(count: int, seed: int):
  for index in range(count):
    yield synthetic.scene_for_index(seed, "pck", index, 2, 3, SCENE_SIZE)


def prepared_pairs(count: int, seed: int, size: int):
  """(scene, reference index, target [size, size, 3], reference [size, size, 3]) prepared by the rule."""
  for scene in scenes(count, seed):
    for index in range(len(scene.refs)):
      target = matching.prepare_target(Image.fromarray(scene.target), Image.fromarray(scene.masks[index]))
      if target is None:
        continue
      reference = matching.prepare_reference(Image.fromarray(scene.refs[index]), "dift")
      small = [np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR)) for image in (target, reference)]
      yield scene, index, small[0], small[1]


def evaluate(runners: dict, pairs: list, similarity: str, grid: int) -> dict:
  """PCK per grid and of the agreement-kept cells, pooled over every masked target cell of every reference."""
  totals = {"a": [], "b": [], "kept": [], "kept_hits": []}
  for scene, index, target, reference in pairs:
    exact = scene.coords[index].astype(np.int64)
    mask = pck.mask_cells_64(scene.masks[index])
    side = pck.box_side_cells(synthetic.silhouette(scene.subjects[index], scene.ref_placements[index], SCENE_SIZE))
    grids = {}
    for name, runner in runners.items():
      if runner is None:
        grids[name] = quantized(exact, grid)
        continue
      features = runner.image_features(np.stack([target, reference]))
      tokens = np.asarray(matching.match_cells(features[:1], features[1:], similarity))[0]
      grids[name] = token_cells(tokens)
    hits_a = pck.grid_hits(grids["a"], exact, mask, side)
    hits_b = pck.grid_hits(grids["b"], exact, mask, side)
    agree = np.all(grids["a"][mask] == grids["b"][mask], axis=-1)
    totals["a"].append(hits_a)
    totals["b"].append(hits_b)
    totals["kept"].append(agree)
    totals["kept_hits"].append(hits_a[agree])
  pooled = {key: np.concatenate(values) for key, values in totals.items()}
  per_reference = [hits.mean() for hits in totals["a"] if len(hits)]
  return {"pck_a": pooled["a"].mean(), "pck_b": pooled["b"].mean(), "pck_a_per_ref": float(np.mean(per_reference)),
          "kept": pooled["kept"].mean(), "precision": pooled["kept_hits"].mean() if len(pooled["kept_hits"]) else 0.0,
          "references": len(totals["a"]), "cells": len(pooled["a"])}


def demo_runners(params, trained, size: int) -> dict:
  text, pooled = trained.encoders.encode_captions([""], batch_size=1)

  def downscaled(images):
    return matchers.unit_range(np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
                                         for image in images]))
  runners = {}
  for name, cfg in (("a", GRID_A), ("b", GRID_B)):
    matcher = extractors.ditf_matcher(params, trained.cfg, trained.encoders.autoencoder, text, pooled, cfg)
    runners[name] = matchers.MeshMatcher(dataclasses.replace(matcher, host_inputs=downscaled), batch_size=2)
  return runners


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="the demo's training workdir (launch/train.py ...:demo)")
  parser.add_argument("--scenes", type=int, default=48)
  parser.add_argument("--seed", type=int, default=1234)
  parser.add_argument("--sizes", default="32,128", help="feature image sizes in px (the demo trained at 32)")
  args = parser.parse_args(argv)
  from mosaic_jax import model
  from mosaic_jax.workdir.trained import load_trained
  trained = load_trained(args.workdir)
  random_params = model.init_params(jax.random.key(args.seed), trained.cfg, jax.numpy.float32)
  token_pixels = 2 * trained.encoders.autoencoder.downsample_factor
  print(f"synthetic scenes at {SCENE_SIZE} px from {args.scenes} scenes (seed {args.seed}); demo step {trained.step} "
        f"(trained at {trained.settings.resolution} px); PCK@0.1 over masked target cells, pooled")
  print(f"{'size':>5} {'tokens':>7} {'weights':<15} {'similarity':<10} {'PCK grid A':>10} {'per ref':>8} "
        f"{'PCK grid B':>10} {'kept':>6} {'precision':>9}")
  for size in (int(value) for value in args.sizes.split(",")):
    grid = size // token_pixels
    pairs = list(prepared_pairs(args.scenes, args.seed, size))
    rows = [("trained demo", demo_runners(trained.params, trained, size)),
            ("random weights", demo_runners(random_params, trained, size)),
            ("exact pairs", {"a": None, "b": None})]
    for name, runners in rows:
      for similarity in matching.SIMILARITIES:
        if name == "exact pairs" and similarity == "dot":
          continue
        result = evaluate(runners, pairs, similarity, grid)
        shown = similarity if name != "exact pairs" else "-"
        print(f"{size:>5} {f'{grid}x{grid}':>7} {name:<15} {shown:<10} {100 * result['pck_a']:>10.1f} "
              f"{100 * result['pck_a_per_ref']:>8.1f} {100 * result['pck_b']:>10.1f} {100 * result['kept']:>6.1f} "
              f"{100 * result['precision']:>9.1f}", flush=True)
  print(f"({len(pairs)} references; grid A reads the input of block {GRID_A.block}, grid B of block {GRID_B.block}; "
        "'exact pairs': the exact grid through the same token quantization, the ceiling at that size)")


if __name__ == "__main__":
  main()
