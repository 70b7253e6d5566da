"""The many-subject curve: how a trained demo model's attention holds up as references are added (R = 1..10).

The demo trains on synthetic scenes with 2 or 3 references (configs/flux_ms.py:demo); the architecture
has no fixed R. For each R, `--scenes` fresh synthetic scenes with exactly R subjects (not the training
data: their own seeds), measured like the demo's evaluation (mosaic_jax/train/evaluate.py) at noised
targets t in config.eval_timesteps, with A of docs/method.md, 'Statistics' (per double block, the softmax over
target keys, averaged over heads and blocks):
- correspondence accuracy per reference: for each correspondence pair of reference r, argmax_j A(i, j)
  within one token of the true target token j*; reported as the mean over pairs and the mean over
  references of each reference's own accuracy, with the chance level of the same hit region;
- mean pairwise JSD between the references' attention distributions a_r(j) = mean_i A(i, j);
- lost rate: the share of references whose attention mass on their own subject's visible target
  region (its mask, at token resolution) is below LOST_FACTOR x the region's share of the target
  (LOST_FACTOR = 1: no better than attention spread uniformly). Also the mean of that mass ratio.

  python benchmarks/many_subjects.py --workdir /tmp/mosaic_demo --max_refs 10 --scenes 16
Writes a table (stdout and <out>/many_subjects.md, .json), a plot <out>/many_subjects.png and, per R,
an attention panel of one scene <out>/many_subjects_attention/attention_R<R>.png.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from mosaic_jax import losses
from mosaic_jax.configs import flux_ms
from mosaic_jax.data import correspondence, schema, synthetic
from mosaic_jax.data.image_ops import encode_png
from mosaic_jax.data.pipeline import prepare_example, stack_examples
from mosaic_jax.encoders import make_encoders
from mosaic_jax.model import FluxInputs, forward, image_ids, pack_latents, reference_ids, text_ids
from mosaic_jax.settings import settings_from_config
from mosaic_jax.train.datasets import pipeline_config
from mosaic_jax.train.evaluate import _neighbourhood_hits, _neighbourhood_size, model_latents
from mosaic_jax.train.step import pack_references

LOST_FACTOR = 1.0


def load_trained(workdir: str, config, ema: bool):
  """(cfg, base params, lora) of the latest checkpoint of a demo workdir (restored as saved)."""
  import orbax.checkpoint as ocp
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  manager = ocp.CheckpointManager(directory)
  step = manager.latest_step()
  if step is None:
    raise SystemExit(f"{directory}: no checkpoint (train first: python launch/train.py --config "
                     "configs/flux_ms.py:demo --workdir ...).")
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  weights = state["ema" if ema else "trainable"]
  cfg = config.transformer_config()
  return cfg, weights["base"], weights.get("lora"), step


def scene_batch(config, encoders, num_refs: int, scenes: int, seed: int):
  """Model-latent batch of `scenes` synthetic scenes with exactly num_refs subjects, and the subjects'
  target regions at token resolution [B, R, N]."""
  size = config.dataset.build.image_size
  grid = correspondence.token_grid(config.resolution, config.token_pixels)
  ref_grid = correspondence.token_grid(config.ref_resolution, config.token_pixels)
  pipeline = pipeline_config(config, global_batch_size=scenes, dropout=False,
                             max_pairs=num_refs * ref_grid * ref_grid)
  examples, regions, pictures = [], [], []
  for index in range(scenes):
    scene = synthetic.make_scene(np.random.default_rng([seed, 7_777, num_refs, index]), num_refs, size)
    refs = [schema.reference(encode_png(image), encode_png(mask), (coords, coords))
            for image, mask, coords in zip(scene.refs, scene.masks, scene.coords)]
    record = schema.example(f"many-{num_refs}-{index}", scene.caption, encode_png(scene.target), refs)
    record["refs"] = {key: [r[key] for r in record["refs"]] for key in record["refs"][0]}  # as TFDS reads it
    examples.append(prepare_example(record, pipeline, np.random.default_rng(index)))
    pictures.append((scene.target, scene.refs))
    regions.append(np.stack([correspondence.mask_token_cells(m, config.resolution, grid).reshape(-1)
                             for m in scene.masks]))
  batch = model_latents(stack_examples(examples), encoders, config)
  return batch, jnp.asarray(np.stack(regions)), pictures


@functools.partial(jax.jit, static_argnames=("cfg",))
def measures(params, lora, cfg, batch, regions, t, noise):
  """Per reference [B, R]: hits, pairs, chance, own-region mass, region share; and per sample JSD sums."""
  x0 = pack_latents(batch["target"])
  refs = pack_references(batch["refs"])
  b, n = x0.shape[:2]
  num_refs, m = refs.shape[1], refs.shape[2]
  grid, ref_grid = int(round(n ** 0.5)), int(round(m ** 0.5))
  inputs = FluxInputs(target=(1.0 - t) * x0 + t * noise, target_ids=image_ids(grid, grid), text=batch["text"],
                      text_ids=text_ids(batch["text"].shape[1]), pooled=batch["pooled"],
                      timestep=jnp.full((b,), t, jnp.float32), guidance=jnp.ones((b,), jnp.float32),
                      refs=refs, ref_ids=reference_ids(num_refs, ref_grid, ref_grid))
  _, aux = forward(params, lora, cfg, inputs, return_attention_maps=True)
  attention = jnp.mean(aux["attention_maps"], axis=1)  # [B, R, M, N]
  rows = attention[jnp.arange(b)[:, None], batch["pair_ref"], batch["pair_ref_token"]]  # [B, K, N]
  valid = batch["pair_valid"]
  hit = _neighbourhood_hits(jnp.argmax(rows, -1), batch["pair_target_token"], grid) & valid
  chance = jnp.where(valid, _neighbourhood_size(batch["pair_target_token"], grid) / n, 0.0)
  owner = jax.nn.one_hot(batch["pair_ref"], num_refs) * valid[..., None]  # [B, K, R]
  per_ref = jnp.mean(attention, axis=2)  # a_r: [B, R, N]
  mass = jnp.sum(per_ref * regions, axis=-1)
  share = jnp.sum(regions, axis=-1) / n
  jsd = losses.jensen_shannon(per_ref[:, :, None], per_ref[:, None, :])
  upper = jnp.triu(jnp.ones((num_refs, num_refs), bool), k=1)
  return (jnp.einsum("bk,bkr->br", hit.astype(jnp.float32), owner), jnp.sum(owner, axis=1),
          jnp.einsum("bk,bkr->br", chance, owner), mass, share, jnp.sum(jnp.where(upper, jsd, 0.0), axis=(1, 2)),
          per_ref)


def curve(params, lora, cfg, config, encoders, max_refs: int, scenes: int, seed: int,
          heatmap_dir: str | None = None) -> list[dict]:
  """The table's rows; with heatmap_dir, also each R's first scene as an attention panel (the maps at
  the middle timestep over the real target, one colour per reference)."""
  from mosaic_jax.heatmaps import attention_panel
  rows = []
  for num_refs in range(1, max_refs + 1):
    batch, regions, pictures = scene_batch(config, encoders, num_refs, scenes, seed)
    hits = pairs = chance = jsd = 0.0
    masses, shares = [], []
    for k, t in enumerate(config.eval_timesteps):
      x0 = pack_latents(batch["target"])
      noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), k), x0.shape, jnp.float32)
      h, p, c, mass, share, j, maps = (np.asarray(v) for v in measures(params, lora, cfg, batch, regions,
                                                                        jnp.float32(t), noise))
      if heatmap_dir and k == len(config.eval_timesteps) // 2:
        grid = int(round(maps.shape[-1] ** 0.5))
        target, refs = pictures[0]
        os.makedirs(heatmap_dir, exist_ok=True)
        Image.fromarray(attention_panel(target, maps[0], (grid, grid), refs)).save(
            os.path.join(heatmap_dir, f"attention_R{num_refs}.png"))
      hits, pairs, chance, jsd = hits + h, pairs + p, chance + c, jsd + j.sum()
      masses.append(mass)
      shares.append(share)
    ratio = np.concatenate(masses) / np.maximum(np.concatenate(shares), 1e-9)
    shares_all = np.concatenate(shares)
    present = shares_all > 0  # a subject fully hidden in the target has no region to look at
    per_ref_acc = np.where(pairs > 0, hits / np.maximum(pairs, 1), np.nan)
    n_t = len(config.eval_timesteps)
    rows.append({
        "refs": num_refs, "scenes": scenes, "pairs": int(pairs.sum() / n_t),
        "accuracy": float(hits.sum() / max(pairs.sum(), 1)), "chance": float(chance.sum() / max(pairs.sum(), 1)),
        "per_reference_accuracy": float(np.nanmean(per_ref_acc)),
        "worst_reference_accuracy": float(np.nanmean(np.nanmin(per_ref_acc, axis=1))),
        "mean_pairwise_jsd": float(jsd / max(scenes * n_t * num_refs * (num_refs - 1) / 2, 1)) if num_refs > 1 else None,
        "lost_rate": float(np.mean(ratio[present] < LOST_FACTOR)),
        "own_region_mass_ratio": float(np.mean(ratio[present])),
    })
    print(format_row(rows[-1]), flush=True)
  return rows


HEADER = (f"{'R':>3} {'pairs':>6} {'acc.':>6} {'chance':>7} {'acc./ref':>9} {'worst ref':>10} "
          f"{'JSD':>7} {'lost':>6} {'mass/share':>11}")


def format_row(r: dict) -> str:
  jsd = "-" if r["mean_pairwise_jsd"] is None else f"{r['mean_pairwise_jsd']:.4f}"
  return (f"{r['refs']:>3} {r['pairs']:>6} {r['accuracy']:>6.3f} {r['chance']:>7.3f} "
          f"{r['per_reference_accuracy']:>9.3f} {r['worst_reference_accuracy']:>10.3f} {jsd:>7} "
          f"{r['lost_rate']:>6.3f} {r['own_region_mass_ratio']:>11.2f}")


def plot(rows: list[dict], path: str, trained_max: int) -> None:
  """Accuracy, worst-reference accuracy, chance, JSD/ln2 and lost rate against R, on [0, 1]."""
  width, height, left, bottom, top = 640, 400, 60, 50, 20
  image = Image.new("RGB", (width, height), "white")
  d = ImageDraw.Draw(image)
  max_r = rows[-1]["refs"]
  x = lambda r: left + (r - 1) / max(max_r - 1, 1) * (width - left - 140)
  y = lambda v: height - bottom - v * (height - bottom - top)
  d.line([(left, top), (left, height - bottom), (width - 140, height - bottom)], fill="black")
  for v in (0, 0.25, 0.5, 0.75, 1.0):
    d.text((left - 35, y(v) - 6), f"{v:.2f}", fill="black")
  for r in range(1, max_r + 1):
    d.text((x(r) - 3, height - bottom + 6), str(r), fill="black")
  d.text((width // 2 - 80, height - 22), "references R", fill="black")
  d.line([(x(trained_max), top), (x(trained_max), height - bottom)], fill=(200, 200, 200))
  d.text((x(trained_max) + 3, top), "trained up to here", fill=(150, 150, 150))
  series = [("accuracy", "accuracy", (0, 114, 178)), ("worst ref acc.", "worst_reference_accuracy", (86, 180, 233)),
            ("chance", "chance", (150, 150, 150)), ("JSD / ln 2", "mean_pairwise_jsd", (0, 158, 115)),
            ("lost rate", "lost_rate", (213, 94, 0))]
  for i, (label, key, colour) in enumerate(series):
    points = [(x(r["refs"]), y(r[key] / (np.log(2) if key == "mean_pairwise_jsd" else 1)))
              for r in rows if r[key] is not None]
    if len(points) > 1:
      d.line(points, fill=colour, width=2)
    for px, py in points:
      d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
    d.line([(width - 130, top + 10 + 18 * i), (width - 110, top + 10 + 18 * i)], fill=colour, width=3)
    d.text((width - 105, top + 4 + 18 * i), label, fill="black")
  image.save(path)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a trained demo workdir")
  p.add_argument("--variant", default="demo", help="the config variant it was trained with")
  p.add_argument("--max_refs", type=int, default=10)
  p.add_argument("--scenes", type=int, default=16)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--ema", action="store_true", help="the EMA weights instead of the trained ones")
  p.add_argument("--out", help="folder for the table and plot (default: the workdir)")
  args = p.parse_args()
  config = settings_from_config(flux_ms.get_config(args.variant), check_files=False)
  cfg, params, lora, step = load_trained(args.workdir, config, args.ema)
  encoders = make_encoders(config)
  print(f"{args.workdir} at step {step}; lost = own-region mass < {LOST_FACTOR} x region share; "
        f"t in {tuple(config.eval_timesteps)}\n{HEADER}", flush=True)
  out = args.out or args.workdir
  rows = curve(params, lora, cfg, config, encoders, args.max_refs, args.scenes, args.seed,
               heatmap_dir=os.path.join(out, "many_subjects_attention"))
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "many_subjects.md"), "w") as f:
    f.write("```\n" + HEADER + "\n" + "\n".join(format_row(r) for r in rows) + "\n```\n")
  with open(os.path.join(out, "many_subjects.json"), "w") as f:
    json.dump({"workdir": args.workdir, "step": step, "lost_factor": LOST_FACTOR, "rows": rows}, f, indent=2)
  plot(rows, os.path.join(out, "many_subjects.png"), config.dataset.build.max_refs)
  print(f"wrote {out}/many_subjects.md, .json, .png")


if __name__ == "__main__":
  main()
