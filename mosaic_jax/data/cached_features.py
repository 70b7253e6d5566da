"""Cached encoder features: a SemAlign-MS split with the VAE, T5 and CLIP outputs precomputed.

The official loop runs three encoders on every step; with a cache, training reads stored features and
only draws the target's posterior sample. `launch/encode_dataset.py` writes a cache; the input pipeline
reads one exactly like a raw split (`open_split` here, then `pipeline.make_iterator`), and the batches
carry features instead of images:

  target_mean, target_std  float32 [B, h, w, C]   raw VAE posterior of the target (a fresh sample each step)
  ref_means                float32 [B, R, h_r, w_r, C]
  t5                       [B, L, D] (the encoder's dtype), pooled [B, P]: of "" where drop_caption
  pair_*, drop_refs, drop_caption, caption, example_id, record_index: as for raw records

Dropout and pair subsampling are the raw pipeline's own (`pipeline.randomize_example`), drawn from the
same (seed, epoch, record) numbers, so a cached run sees the very batches an on-the-fly run would.

Layout of a cache directory (every tensor an ordinary safetensors file, memory-mapped when read):
  cache.json                       written last: format, fingerprint, geometry, splits, captions
  captions/t5.safetensors          [C, L, D] one row per distinct caption; row 0 is "" (dropout)
  captions/pooled.safetensors      [C, P]
  {split}/target_mean.safetensors  [N, h, w, C]; target_std likewise
  {split}/ref_means.safetensors    [sum of R, h_r, w_r, C]
  {split}/index.safetensors        ref_offset [N + 1], pair_offset [N + 1], pair_ref, pair_ref_token,
                                   pair_target_token [total pairs], caption_index [N]
Records keep the source split's order, so record i is source record i (and `num_refs` lines up).
Captions are stored once each: at FLUX size one T5 row is 4 MiB in bf16.
"""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

import grain
import numpy as np

from mosaic_jax.data.pipeline import PipelineConfig, decode_record, randomize_example
from mosaic_jax.interop.safetensors_io import RowWriter, SafetensorsFile, save_safetensors

FORMAT = "mosaic_jax.cached_features/1"
CACHE_FILE = "cache.json"


class CacheError(ValueError):
  """A cache that is missing, incomplete or built for another configuration; the message says which."""


def geometry_of(config: PipelineConfig) -> dict:
  """The pipeline settings that stored features and pairs depend on."""
  return {"target_size": config.target_size, "ref_size": config.ref_size, "token_pixels": config.token_pixels,
          "pad_refs_to_square": config.pad_refs_to_square}


# ---- reading --------------------------------------------------------------------------------------

def read_spec(directory: str) -> dict:
  path = os.path.join(os.path.expanduser(directory), CACHE_FILE)
  if not os.path.exists(path):
    what = "an unfinished or interrupted encode" if os.path.isdir(os.path.dirname(path)) else "missing"
    raise CacheError(f"{path} not found ({what}): write the cache with launch/encode_dataset.py.")
  with open(path) as f:
    spec = json.load(f)
  if spec.get("format") != FORMAT:
    raise CacheError(f"{path}: format {spec.get('format')!r}, expected {FORMAT!r}.")
  return spec


def check_fingerprint(spec: dict, expected: dict, directory: str) -> None:
  """Raises if the cache was encoded under settings that differ from `expected` (config field -> value)."""
  stored = spec["fingerprint"]
  wrong = [f"{key}: cache {stored.get(key)!r}, config {value!r}" for key, value in sorted(expected.items())
           if stored.get(key) != value]
  if wrong:
    raise CacheError(f"cached features in {directory} were encoded with other settings ({'; '.join(wrong)}): "
                     "pass the cache's values as --config.<field> overrides, or encode again with "
                     "launch/encode_dataset.py.")


class CaptionTable:
  """T5 states and pooled CLIP vector by caption index (0 is the empty caption)."""

  def __init__(self, directory: str, captions: Sequence[str]):
    self._t5 = SafetensorsFile(os.path.join(directory, "captions", "t5.safetensors"))
    self._pooled = SafetensorsFile(os.path.join(directory, "captions", "pooled.safetensors"))
    self.t5, self.pooled = self._t5.read("t5"), self._pooled.read("pooled")
    self.captions = list(captions)
    if not len(self.t5) == len(self.pooled) == len(self.captions):
      raise CacheError(f"{directory}: {len(self.captions)} captions but {len(self.t5)} T5 rows and "
                       f"{len(self.pooled)} pooled rows (cache damaged; encode again).")


class FeatureSource:
  """Random access to one cached split: record i -> stored features, pairs and caption index.

  Picklable (reopens its memory maps by path), so grain worker processes can use it. Defines
  `prepare_example`, which the input pipeline calls instead of decoding images.
  """

  def __init__(self, directory: str, split: str):
    self.directory, self.split = os.path.expanduser(directory), split
    self.spec = read_spec(self.directory)
    if split not in self.spec["splits"]:
      raise CacheError(f"{self.directory} has no split {split!r} (has {sorted(self.spec['splits'])}).")
    self._open()

  def _open(self):
    folder = os.path.join(self.directory, self.split)
    self._files = {name: SafetensorsFile(os.path.join(folder, f"{name}.safetensors"))
                   for name in ("target_mean", "target_std", "ref_means", "index")}
    self._arrays = {name: self._files[name].read(name) for name in ("target_mean", "target_std", "ref_means")}
    index = self._files["index"]
    self._index = {key: index.read(key) for key in index.keys()}
    self.ids = json.loads(index.metadata["example_ids"])
    self.captions = CaptionTable(self.directory, self.spec["captions"])

  def __getstate__(self):
    return {"directory": self.directory, "split": self.split, "spec": self.spec}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open()

  @property
  def num_refs(self) -> np.ndarray:
    return np.diff(self._index["ref_offset"])

  def __len__(self) -> int:
    return len(self._arrays["target_mean"])

  def __getitem__(self, i: int) -> dict:
    index = self._index
    r0, r1 = int(index["ref_offset"][i]), int(index["ref_offset"][i + 1])
    p0, p1 = int(index["pair_offset"][i]), int(index["pair_offset"][i + 1])
    which = index["pair_ref"][p0:p1]
    ref_tokens, target_tokens = index["pair_ref_token"][p0:p1], index["pair_target_token"][p0:p1]
    pairs = [(ref_tokens[which == r], target_tokens[which == r]) for r in range(r1 - r0)]
    return {"target_mean": self._arrays["target_mean"][i], "target_std": self._arrays["target_std"][i],
            "ref_means": self._arrays["ref_means"][r0:r1], "pairs": pairs,
            "caption_index": int(index["caption_index"][i]), "example_id": self.ids[i]}

  def prepare_example(self, record: dict, config: PipelineConfig, rng: np.random.Generator) -> dict:
    """A cached record -> the batch fields (module docstring), with the raw pipeline's randomness."""
    geometry = self.spec["geometry"]
    asked = geometry_of(config)
    if asked != geometry:
      raise CacheError(f"{self.directory} was encoded for {geometry}, but the pipeline asks for {asked}.")
    caption_index = record["caption_index"]
    example = {"pairs": record["pairs"], "caption": self.captions.captions[caption_index],
               "example_id": record["example_id"]}
    out = randomize_example(example, config, rng)
    if out["drop_caption"]:
      caption_index = 0
    out.update({"target_mean": np.array(record["target_mean"], np.float32),
                "target_std": np.array(record["target_std"], np.float32),
                "ref_means": np.array(record["ref_means"], np.float32),
                "t5": np.array(self.captions.t5[caption_index]),
                "pooled": np.array(self.captions.pooled[caption_index])})
    return out


def open_split(directory: str, split: str, fingerprint: dict | None = None):
  """(FeatureSource, per-record reference counts) of a cached split; `fingerprint` (config field ->
  value) must match what the cache was encoded with."""
  source = FeatureSource(directory, split)
  if fingerprint is not None:
    check_fingerprint(source.spec, fingerprint, source.directory)
  num_refs = source.num_refs
  if len(num_refs) == 0:
    raise CacheError(f"cached split {split!r} in {source.directory} is empty.")
  return source, num_refs


# ---- writing --------------------------------------------------------------------------------------

class _CaptionWriter:
  """Distinct captions in first-seen order, encoded once each; row 0 is ""."""

  def __init__(self, directory: str, encoders, max_rows: int, batch_size: int):
    self.directory, self.encoders, self.max_rows, self.batch_size = directory, encoders, max_rows, batch_size
    self.rows: dict[str, int] = {}
    self._writers = None
    self.index([""])

  def index(self, captions: Sequence[str]) -> list[int]:
    new = list(dict.fromkeys(c for c in captions if c not in self.rows))
    if new:
      t5_states, pooled = self.encoders.encode_captions(new, self.batch_size)
      if self._writers is None:
        os.makedirs(os.path.join(self.directory, "captions"), exist_ok=True)
        self._writers = {name: RowWriter(os.path.join(self.directory, "captions", f"{name}.safetensors"), name,
                                         array.dtype, array.shape[1:], self.max_rows)
                         for name, array in (("t5", t5_states), ("pooled", pooled))}
      start = len(self.rows)
      self._writers["t5"].rows[start:start + len(new)] = t5_states
      self._writers["pooled"].rows[start:start + len(new)] = pooled
      self.rows.update({caption: start + i for i, caption in enumerate(new)})
    return [self.rows[c] for c in captions]

  def row_shape(self, name: str) -> tuple[int, ...]:
    return self._writers[name].row_shape

  def close(self) -> list[str]:
    for writer in self._writers.values():
      writer.close(len(self.rows))
    return list(self.rows)


def _encode_split(source, num_refs: np.ndarray, split: str, directory: str, encoders, config: PipelineConfig,
                  captions: _CaptionWriter, batch_size: int, read_threads: int, dtype) -> None:
  n = len(source)
  if n == 0:
    raise CacheError(f"split {split!r} of the source dataset is empty: nothing to encode.")
  folder = os.path.join(directory, split)
  os.makedirs(folder, exist_ok=True)
  decoded = grain.MapDataset.range(n).map(lambda i: decode_record(source[int(i)], config)).to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * batch_size))
  writers = None
  ref_offset, pair_offset = [0], [0]
  pairs: dict[str, list[np.ndarray]] = {"pair_ref": [], "pair_ref_token": [], "pair_target_token": []}
  caption_index, ids = [], []
  start, done = time.perf_counter(), 0
  iterator = iter(decoded)
  while done < n:
    examples = [next(iterator) for _ in range(min(batch_size, n - done))]
    target = encoders.encode_images(np.stack([e["target"] for e in examples]), batch_size)
    refs = encoders.encode_images(np.concatenate([e["refs"] for e in examples]), batch_size).mean
    if writers is None:
      shapes = {"target_mean": (target.mean.shape[1:], n), "target_std": (target.std.shape[1:], n),
                "ref_means": (refs.shape[1:], int(np.sum(num_refs)))}
      writers = {name: RowWriter(os.path.join(folder, f"{name}.safetensors"), name, dtype, shape, rows)
                 for name, (shape, rows) in shapes.items()}
    r0 = ref_offset[-1]
    writers["target_mean"].rows[done:done + len(examples)] = target.mean
    if np.any(target.std):  # a deterministic autoencoder's zeros stay holes of the sparse file: no disk
      writers["target_std"].rows[done:done + len(examples)] = target.std
    writers["ref_means"].rows[r0:r0 + len(refs)] = refs
    for example in examples:
      if len(example["refs"]) != num_refs[len(ids)]:
        raise CacheError(f"{split} record {len(ids)} ({example['example_id']}) has {len(example['refs'])} "
                         f"references but the dataset metadata says {num_refs[len(ids)]}.")
      ref_offset.append(ref_offset[-1] + len(example["refs"]))
      for r, (ref_tokens, target_tokens) in enumerate(example["pairs"]):
        pairs["pair_ref"].append(np.full(len(ref_tokens), r, np.int32))
        pairs["pair_ref_token"].append(np.asarray(ref_tokens, np.int32))
        pairs["pair_target_token"].append(np.asarray(target_tokens, np.int32))
      pair_offset.append(pair_offset[-1] + sum(len(t) for t, _ in example["pairs"]))
      ids.append(example["example_id"])
    caption_index += captions.index([e["caption"] for e in examples])
    done += len(examples)
    elapsed = time.perf_counter() - start
    if done == n or done // batch_size % 50 == 0:
      print(f"  {split}: {done}/{n} examples, {done / elapsed:.1f}/s, {len(captions.rows)} distinct captions",
            flush=True)
  for writer in writers.values():
    writer.close(writer.rows.shape[0])
  index = {key: np.concatenate(parts) if parts else np.zeros(0, np.int32) for key, parts in pairs.items()}
  index.update(ref_offset=np.asarray(ref_offset, np.int64), pair_offset=np.asarray(pair_offset, np.int64),
               caption_index=np.asarray(caption_index, np.int64))
  save_safetensors(os.path.join(folder, "index.safetensors"), index, {"example_ids": json.dumps(ids)})


def encode_dataset(splits: dict, directory: str, encoders, config: PipelineConfig, fingerprint: dict,
                   batch_size: int = 8, read_threads: int = 2, dtype=np.float32) -> dict:
  """Writes a cache of `splits` ({name: (raw source, num_refs)}) encoded by `encoders` (FluxEncoders) at
  `config`'s sizes into a new `directory`; returns the spec written to cache.json.

  `fingerprint` (config field -> value) records what produced the features, so training can refuse a
  cache made for other settings. `dtype` stores the image latents (float32: exactly the on-the-fly
  values; bfloat16 halves the size); text features keep the encoders' dtype.
  """
  directory = os.path.expanduser(directory)
  if os.path.exists(directory) and os.listdir(directory):
    raise CacheError(f"{directory} exists and is not empty: choose a new directory for the cache "
                     "(an existing one is never overwritten).")
  os.makedirs(directory, exist_ok=True)
  total = sum(len(source) for source, _ in splits.values())
  captions = _CaptionWriter(directory, encoders, total + 1, batch_size)
  for split, (source, num_refs) in splits.items():
    _encode_split(source, np.asarray(num_refs), split, directory, encoders, config, captions, batch_size,
                  read_threads, np.dtype(dtype))
  spec = {"format": FORMAT, "fingerprint": fingerprint,
          "geometry": geometry_of(config),
          "splits": {split: len(source) for split, (source, _) in splits.items()},
          "text": {"t5": list(captions.row_shape("t5")), "pooled": list(captions.row_shape("pooled"))},
          "captions": captions.close()}
  with open(os.path.join(directory, CACHE_FILE), "w") as f:
    json.dump(spec, f)
  return spec
