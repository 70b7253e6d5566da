"""Composition throughput of `subjects200k_multi`: examples/s building composed multi-subject examples from
a released layout of realistic size, and the build report.

Writes (in a temporary directory) `--pairs` released pairs as the release has them: 1056x528 JPEG
diptychs of photo-like texture in parquet, a 512 px PNG subject mask per pair (a blob of two or three
ellipses covering 10 to 40% of the crop) and both matchers' [4096, 2] .pt grids (a smooth map from target
to reference cells, with GeoAware disagreeing with DIFT on a random 40% of the subject's cells, as real
matchers do). Then it times one pass that only reads the pairs (decode, official uid, mask and grid
files, the unscaled token-pair check), and the whole build through the TFDS builder (that pass again,
placement, pasting, PNG encoding, array_record writing) with the config's default settings or
`--compose FIELD=VALUE` changes.

  python benchmarks/composition.py [--pairs 240] [--compose max_uses=2 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from mosaic_jax import cli
from mosaic_jax.data import build_report, composition
from mosaic_jax.data.semalign_ms import SemalignMs, SemalignMsConfig


def _photo_like(rng: np.random.Generator, height: int, width: int) -> Image.Image:
  small = rng.integers(0, 256, size=(height // 24 + 1, width // 24 + 1, 3), dtype=np.uint8)
  image = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.float32)
  image += rng.normal(0, 12, image.shape)  # texture, so PNG and JPEG sizes are realistic
  return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def _subject_mask(rng: np.random.Generator) -> np.ndarray:
  y, x = np.meshgrid(np.arange(512) + 0.5, np.arange(512) + 0.5, indexing="ij")
  area = rng.uniform(0.1, 0.4) * 512 * 512
  mask = np.zeros((512, 512), bool)
  centre = rng.uniform(180, 332, 2)
  for _ in range(int(rng.integers(2, 4))):
    ry, rx = np.sqrt(area / np.pi) * rng.uniform(0.6, 1.2, 2)
    cy, cx = centre + rng.normal(0, 40, 2)
    mask |= ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1
  return mask


def _matcher_grids(rng: np.random.Generator, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """A random similarity map target cell -> reference cell, and a copy that disagrees on 40% of the
  subject's cells (random elsewhere, as the matchers' argmax over a masked-out target is)."""
  i, j = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
  angle, scale = rng.uniform(-0.4, 0.4), rng.uniform(0.8, 1.2)
  y = 32 + scale * (np.cos(angle) * (i - 32) - np.sin(angle) * (j - 32)) + rng.normal(0, 0.5, i.shape)
  x = 32 + scale * (np.sin(angle) * (i - 32) + np.cos(angle) * (j - 32)) + rng.normal(0, 0.5, i.shape)
  dift = np.clip(np.stack([y, x], -1).round(), 0, 63).astype(np.int64)
  inside = mask[4::8, 4::8]
  dift[~inside] = rng.integers(0, 64, (int((~inside).sum()), 2))
  geoaware = dift.copy()
  disagree = inside & (rng.random(inside.shape) < 0.4)
  geoaware[disagree] = rng.integers(0, 64, (int(disagree.sum()), 2))
  return dift, geoaware


def write_released_layout(root: str, count: int, rng: np.random.Generator) -> None:
  import pyarrow as pa
  import pyarrow.parquet as pq
  import torch
  for sub in ("data", "mask", "coord/dift", "coord/geoaware"):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  rows = []
  for index in range(count):
    buffer = io.BytesIO()
    _photo_like(rng, 528, 1056).save(buffer, format="JPEG", quality=95)
    item, caption = f"item {index}", f"A photo of item {index} on a table."
    crop = io.BytesIO()
    Image.open(io.BytesIO(buffer.getvalue())).crop((8, 8, 520, 520)).save(crop, format="PNG")
    uid = hashlib.sha256(f"{item}_{caption}_{hashlib.sha256(crop.getvalue()).hexdigest()[:8]}".encode()).hexdigest()
    mask = _subject_mask(rng)
    Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(root, "mask", f"{uid}.png"))
    for matcher, grid in zip(("dift", "geoaware"), _matcher_grids(rng, mask)):
      torch.save(torch.from_numpy(grid.reshape(-1, 2)), os.path.join(root, "coord", matcher, f"{uid}_ref0.pt"))
    rows.append({"image": {"bytes": buffer.getvalue(), "path": f"{index}.jpg"},
                 "description": {"item": item, "description_0": caption, "description_1": "elsewhere"},
                 "collection": "collection_2",
                 "quality_assessment": {"compositeStructure": 9, "objectConsistency": 9, "imageQuality": 9}})
  pq.write_table(pa.Table.from_pylist(rows), os.path.join(root, "data", "train-00000.parquet"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pairs", type=int, default=240, help="released pairs to write and compose")
  parser.add_argument("--compose", action="append", default=[], metavar="FIELD=VALUE",
                      help="a composition setting (as launch/build_dataset.py takes it)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  cli.quiet_third_party_logs()
  # No validation split: every pair goes to train, so the figures are one split's.
  settings = composition.CompositionSettings().replace(["validation_fraction=0", *args.compose])
  print(f"cpu cores: {os.cpu_count()}; {args.pairs} released pairs (512 px crops, 64x64 grids); settings: {settings}")
  with tempfile.TemporaryDirectory() as root:
    released = os.path.join(root, "released")
    write_released_layout(released, args.pairs, np.random.default_rng(args.seed))

    start, cpu = time.perf_counter(), time.process_time()
    usable = sum(1 for _ in composition.released_pairs(released, "train", settings, build_report.BuildReport("train")))
    reading, reading_cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"reading pairs alone: {args.pairs / reading:.1f} pairs/s, {1e3 * reading_cpu / args.pairs:.0f} ms of CPU "
          f"per pair ({usable} of {args.pairs} usable)")

    import tensorflow_datasets as tfds
    builder = SemalignMs(config=SemalignMsConfig(name="multi_bench", source="subjects200k_multi", seed=args.seed,
                                                 composition=settings), data_dir=os.path.join(root, "tfds"))
    printed = io.StringIO()
    start, cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=released))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    num_refs = builder.info.metadata["num_refs"]["train"]
    print(f"build: {len(num_refs)} examples in {seconds:.1f} s: {len(num_refs) / seconds:.2f} examples/s, "
          f"{sum(num_refs) / seconds:.1f} references/s, {args.pairs / seconds:.1f} source pairs/s "
          f"(mean R {np.mean(num_refs):.2f}); CPU time {cpu:.1f} s, {cpu / len(num_refs):.2f} s per example "
          f"(the machine's load average: {os.getloadavg()[0]:.1f})")
    report = [line for line in printed.getvalue().splitlines() if line.startswith(("build report", "  "))]
    print("\n".join(report))
    sizes = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(builder.data_dir) for f in files)
    print(f"stored: {sizes / len(num_refs) / 2 ** 20:.2f} MiB per example")
  return 0


if __name__ == "__main__":
  sys.exit(main())
