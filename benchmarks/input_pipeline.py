"""Input pipeline throughput: examples/s and per-example decoding cost at 512 px.

Builds (in a temporary directory) a `synthetic` set with 4 references per example, a released-layout
`subjects200k` set (one reference per example, as released: JPEG diptychs, PNG masks, .pt grids) and
a `folder` set whose examples carry 4 released-format references each, then prints for each:
the single-thread cost of one example (record read + decode/resize + pairs) and the pipeline's
examples/s with grain threads and with grain worker processes.

  python benchmarks/input_pipeline.py [--examples 48] [--batches 12] [--size 512]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

from mosaic_jax.data import pipeline
from mosaic_jax.data.semalign_ms import SemalignMs, SemalignMsConfig


def _photo_like(rng, height, width):
  small = rng.integers(0, 256, size=(height // 24 + 1, width // 24 + 1, 3), dtype=np.uint8)
  image = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.float32)
  image += rng.normal(0, 12, image.shape)  # texture, so PNG/JPEG sizes are realistic
  return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def write_released_layout(root, count, rng):
  import pyarrow as pa
  import pyarrow.parquet as pq
  import torch
  for sub in ("data", "mask", "coord/dift", "coord/geoaware"):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  rows = []
  grid = rng.integers(0, 64, size=(4096, 2))
  for index in range(count):
    diptych = _photo_like(rng, 528, 1056)
    buffer = io.BytesIO()
    diptych.save(buffer, format="JPEG", quality=95)
    item, caption = f"item {index}", f"a photo of item {index}"
    crop = io.BytesIO()
    Image.open(io.BytesIO(buffer.getvalue())).crop((8, 8, 520, 520)).save(crop, format="PNG")
    uid = hashlib.sha256(
        f"{item}_{caption}_{hashlib.sha256(crop.getvalue()).hexdigest()[:8]}".encode()).hexdigest()
    mask = np.zeros((512, 512), np.uint8)
    mask[64:448, 96:416] = 255
    Image.fromarray(mask).save(os.path.join(root, "mask", f"{uid}.png"))
    for matcher in ("dift", "geoaware"):
      torch.save(torch.from_numpy(grid).long(), os.path.join(root, "coord", matcher, f"{uid}_ref0.pt"))
    rows.append({"image": {"bytes": buffer.getvalue(), "path": f"{index}.jpg"},
                 "description": {"item": item, "description_0": caption, "description_1": "r"},
                 "collection": "collection_2",
                 "quality_assessment": {"compositeStructure": 5, "objectConsistency": 5,
                                        "imageQuality": 5}})
  pq.write_table(pa.Table.from_pylist(rows), os.path.join(root, "data", "train-00000.parquet"))


def write_folder(root, count, refs, rng):
  import torch
  os.makedirs(os.path.join(root, "img"), exist_ok=True)
  grid = rng.integers(0, 64, size=(4096, 2))
  torch.save(torch.from_numpy(grid).long(), os.path.join(root, "img", "coord.pt"))
  mask = np.zeros((512, 512), np.uint8)
  mask[64:448, 96:416] = 255
  Image.fromarray(mask).save(os.path.join(root, "img", "mask.png"))
  with open(os.path.join(root, "train.jsonl"), "w") as handle:
    for index in range(count):
      names = []
      for k in range(refs + 1):
        name = f"img/{index}_{k}.jpg"
        _photo_like(rng, 512, 512).save(os.path.join(root, name), quality=95)
        names.append(name)
      coord = {"dift": "img/coord.pt", "geoaware": "img/coord.pt"}
      handle.write(json.dumps({"target": names[0], "refs": names[1:], "caption": f"example {index}",
                               "mask": "img/mask.png", "coords": [coord] * refs}) + "\n")


def build(config, data_dir, manual_dir=None):
  import tensorflow_datasets as tfds
  start = time.perf_counter()
  builder = SemalignMs(config=config, data_dir=data_dir)
  with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
                                 if manual_dir else None)
  return time.perf_counter() - start


def measure(name, data_dir, size, batches, label):
  source, num_refs = pipeline.open_split(f"semalign_ms/{name}", "train", data_dir)
  config = pipeline.PipelineConfig(target_size=size, ref_size=size, global_batch_size=4, seed=0)
  # single-thread cost per example, split into record read and decode + resize + pairs
  count = min(len(source), 16)
  read = prepare = 0.0
  for index in range(count):
    start = time.perf_counter()
    record = source[index]
    middle = time.perf_counter()
    pipeline.prepare_example(record, config, np.random.default_rng(index))
    read += middle - start
    prepare += time.perf_counter() - middle
  refs = float(np.mean(num_refs))
  print(f"{label}: R={refs:g}, single thread: record read {1e3 * read / count:.1f} ms + decode/resize/"
        f"pairs {1e3 * prepare / count:.1f} ms = {1e3 * (read + prepare) / count:.1f} ms per example "
        f"({1e3 * (read + prepare) / count / (1 + refs):.1f} ms per image)")
  for mode, overrides in (("2 threads", {"read_threads": 2}), ("2 processes", {"worker_processes": 2})):
    iterator = pipeline.make_iterator(source, num_refs, pipeline.PipelineConfig(
        **{**config.__dict__, **overrides}))
    next(iterator)  # start-up (and worker spawn) excluded
    start = time.perf_counter()
    for _ in range(batches):
      next(iterator)
    elapsed = time.perf_counter() - start
    print(f"{label}: pipeline with {mode}: {batches * 4 / elapsed:.1f} examples/s")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--examples", type=int, default=48)
  parser.add_argument("--batches", type=int, default=10)
  parser.add_argument("--size", type=int, default=512)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  print(f"cpu cores: {os.cpu_count()}; {args.size} px targets and references; batches of 4")
  with tempfile.TemporaryDirectory() as root:
    data_dir = os.path.join(root, "tfds")
    seconds = build(SemalignMsConfig(name="synthetic_bench", source="synthetic", image_size=args.size,
                                     min_refs=4, max_refs=4, num_train=args.examples,
                                     num_validation=1), data_dir)
    print(f"synthetic build: {args.examples / seconds:.1f} examples/s (4 refs, {args.size} px)")
    measure("synthetic_bench", data_dir, args.size, args.batches, "synthetic (4 refs)")

    released = os.path.join(root, "released")
    write_released_layout(released, args.examples, rng)
    seconds = build("subjects200k", data_dir, released)
    print(f"subjects200k build: {args.examples / seconds:.1f} examples/s")
    measure("subjects200k", data_dir, args.size, args.batches, "released layout (1 ref, as released)")

    folder = os.path.join(root, "folder")
    write_folder(folder, args.examples, 4, rng)
    seconds = build("folder", data_dir, folder)
    print(f"folder build: {args.examples / seconds:.1f} examples/s")
    measure("folder", data_dir, args.size, args.batches, "released-format files, 4 refs (folder)")


if __name__ == "__main__":
  main()
