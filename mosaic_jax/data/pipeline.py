"""Input pipeline: SemAlign-MS records -> deterministic, resumable, bucketed numpy batches.

    source, num_refs = open_split("semalign_ms/synthetic", "train", data_dir=DIR)
    batches = make_iterator(source, num_refs, PipelineConfig(global_batch_size=8),
                            process_index=jax.process_index(), process_count=jax.process_count())
    for batch in batches: ...                 # dict of numpy arrays, see below
    state = batches.get_state()               # JSON-able; store it with the checkpoint
    batches.set_state(state)                  # the next batch is the one after the saved step

Each batch (B = global_batch_size / process_count, this process's share; R = this batch's
reference count; K = max_pairs; G = target_size // token_pixels, G_r = ref_size // token_pixels):
  target             float32 [B, H, W, 3] in [-1, 1]
  refs               float32 [B, R, H_r, W_r, 3] in [-1, 1] (never zeroed here: see drop_refs)
  caption            object [B] of str; "" where drop_caption
  pair_ref           int32 [B, K], reference index 0..R-1
  pair_ref_token     int32 [B, K], row * G_r + col in the reference token grid
  pair_target_token  int32 [B, K], row * G + col in the target token grid
  pair_valid         bool [B, K]
  drop_refs          bool [B]: the trainer sets this sample's reference latents to 0
  drop_caption       bool [B]: the caption is already ""
  record_index       int64 [B], example_id object [B]: which records these are

How it works. A `BatchPlan` turns (seed, epoch) into the epoch's global batches: a seeded
permutation of all records, split into buckets by reference count, each bucket cut into global
batches (a bucket's last partial batch is dropped for that epoch), the batches shuffled. Every process
computes the same plan and loads slice [p * B, (p + 1) * B) of each global batch, so processes read
disjoint records that together cover the global batch, and every process holds the same R at each
step (one compiled shape per R). Per-example randomness (dropout, pair subsampling) comes from
(seed, epoch, record index), so results do not depend on process count, threads or resumption.
The state is just the step, which is why restoring after N batches yields batch N + 1 exactly.
A source of cached encoder features (`cached_features.open_split`) goes through the same plan and
randomness; its batches hold features (target_mean, target_std, ref_means, t5, pooled) instead of
target, refs (see cached_features.py).
Decoding runs in grain (threads, or worker processes with `worker_processes`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds

from mosaic_jax.data import correspondence, image_ops

# Official classifier-free dropout: u < 0.05 drop refs; < 0.10 drop caption; < 0.15 drop both.
REF_DROP_RATE = 0.05
CAPTION_DROP_RATE = 0.05
BOTH_DROP_RATE = 0.05


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  target_size: int = 512
  ref_size: int = 512
  global_batch_size: int = 8
  max_pairs: int = 2048  # K; pairs beyond K are subsampled uniformly (seeded)
  token_pixels: int = 16  # pixels per token side: 2 x the autoencoder's downsample factor (FLUX: 16)
  seed: int = 0
  shuffle: bool = True
  dropout: bool = True  # classifier-free dropout (training); False for evaluation
  pad_refs_to_square: bool = False  # the sampling preprocessing; pairs follow the transform
  num_epochs: int | None = None  # None: repeat forever
  read_threads: int = 2
  prefetch_buffer: int = 16
  worker_processes: int = 0  # > 0: grain worker processes decode instead of threads


class _RawBytes(tfds.decode.Decoder):
  """Leaves encoded images as bytes, so the pipeline decodes them (once, with PIL) itself."""

  def decode_example(self, serialized):
    return serialized

  def decode_example_np(self, serialized):
    return serialized

  def decode_batch_example_np(self, serialized):
    return serialized


RAW_IMAGE_DECODERS = {"target": _RawBytes(), "refs": {"image": _RawBytes(), "target_mask": _RawBytes()}}


class DatasetError(ValueError):
  """A split that is not built, is empty, or whose reference counts do not match its records."""


def is_built(builder) -> bool:
  return os.path.exists(os.path.join(builder.data_dir, "dataset_info.json"))


def open_split(name: str, split: str, data_dir: str | None = None, builder=None):
  """(random-access source of undecoded records, per-record reference counts) of a built split, checked:
  built, the split present and non-empty, one reference count per record. `builder`: the dataset's tfds
  builder where the registry cannot make it from `name` (a custom synthetic config); by default
  tfds.builder(name, data_dir)."""
  from mosaic_jax.data import semalign_ms  # pylint: disable=import-outside-toplevel  # registers the builder
  if builder is None:
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except (ValueError, tfds.core.registered.DatasetNotFoundError) as error:  # an unknown config, not built there
      raise DatasetError(f"dataset {name} in {data_dir}: not built there, and not a registered config "
                         f"({str(error).splitlines()[0]})") from error
  where = f"dataset {name} in {builder.data_dir}"
  if not is_built(builder):
    command = semalign_ms.build_command(builder.builder_config, str(builder.data_dir_root))
    raise DatasetError(f"{where}: not built (no dataset_info.json); build it with `{command}`.")
  per_split = (builder.info.metadata or {}).get("num_refs", {})
  if split not in per_split:
    raise DatasetError(f"{where}: metadata.json has no num_refs for split {split!r} (has {sorted(per_split)}); "
                       "was it built by mosaic_jax.data.semalign_ms?")
  num_refs = np.asarray(per_split[split], np.int64)
  if len(num_refs) == 0:
    raise DatasetError(f"{where}: split {split!r} is empty.")
  source = builder.as_data_source(split, decoders=RAW_IMAGE_DECODERS)
  if len(num_refs) != len(source):
    raise DatasetError(f"{where}: split {split!r} has {len(source)} records but {len(num_refs)} num_refs entries.")
  return source, num_refs


class BatchPlan:
  """Which records form each global batch; a pure function of (num_refs, batch size, seed, epoch)."""

  def __init__(self, num_refs: Sequence[int], global_batch_size: int, seed: int, shuffle: bool = True):
    self.num_refs = np.asarray(num_refs, np.int64)
    self.global_batch_size = global_batch_size
    self.seed = seed
    self.shuffle = shuffle
    counts = {int(r): int((self.num_refs == r).sum()) for r in np.unique(self.num_refs)}
    self.batches_per_reference_count = {r: n // global_batch_size for r, n in counts.items()}
    self.batches_per_epoch = sum(self.batches_per_reference_count.values())
    if self.batches_per_epoch == 0:
      raise ValueError(f"no reference count has {global_batch_size} examples (counts by R: {counts}); "
                       "use a smaller global_batch_size or more data")

  @property
  def reference_counts(self) -> list[int]:
    return sorted(r for r, n in self.batches_per_reference_count.items() if n)

  @functools.lru_cache(maxsize=4)
  def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(records [batches, global_batch_size], reference count [batches]) of one epoch."""
    rng = np.random.default_rng([self.seed, epoch, 0x9E3779B9])
    order = rng.permutation(len(self.num_refs)) if self.shuffle else np.arange(len(self.num_refs))
    batches, counts = [], []
    for r in sorted(self.batches_per_reference_count):
      members = order[self.num_refs[order] == r]
      n = self.batches_per_reference_count[r]
      batches.append(members[:n * self.global_batch_size].reshape(n, self.global_batch_size))
      counts += [r] * n
    records = np.concatenate(batches)
    counts = np.asarray(counts, np.int64)
    if self.shuffle:
      mix = rng.permutation(len(records))
      records, counts = records[mix], counts[mix]
    return records, counts

  def records(self, step: int) -> np.ndarray:
    epoch, index = divmod(step, self.batches_per_epoch)
    return self.epoch(epoch)[0][index]

  def epoch_of(self, step: int) -> int:
    return step // self.batches_per_epoch


def dropout_flags(rng: np.random.Generator) -> tuple[bool, bool]:
  u = rng.random()
  drop_refs = u < REF_DROP_RATE or REF_DROP_RATE + CAPTION_DROP_RATE <= u < (
      REF_DROP_RATE + CAPTION_DROP_RATE + BOTH_DROP_RATE)
  drop_caption = REF_DROP_RATE <= u < REF_DROP_RATE + CAPTION_DROP_RATE + BOTH_DROP_RATE
  return bool(drop_refs), bool(drop_caption)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _padded_reference_tokens(transform: image_ops.PixelTransform, original_hw: tuple[int, int],
                             ref_size: int, ref_grid: int):
  """Reference 64-grid cell -> token of the padded square, through the cell centre."""
  height, width = original_hw
  token_pixels = ref_size / ref_grid

  def tokens(cells: np.ndarray) -> np.ndarray:
    y = (cells[:, 0] + 0.5) * height / correspondence.COORD_GRID
    x = (cells[:, 1] + 0.5) * width / correspondence.COORD_GRID
    new_y, new_x = transform.apply(y, x)
    row = np.clip(np.floor(new_y / token_pixels), 0, ref_grid - 1).astype(np.int64)
    col = np.clip(np.floor(new_x / token_pixels), 0, ref_grid - 1).astype(np.int64)
    return row * ref_grid + col
  return tokens


def decode_record(record: dict, config: PipelineConfig) -> dict:
  """One undecoded record -> its deterministic part: images resized to the training sizes and every
  token pair per reference (before subsampling). This is also what launch/encode_dataset.py encodes."""
  example_id = _text(record["id"])
  refs = record["refs"]
  num_refs = len(refs["image"])
  target_grid = correspondence.token_grid(config.target_size, config.token_pixels)
  ref_grid = correspondence.token_grid(config.ref_size, config.token_pixels)
  target = image_ops.resize_normalize(
      image_ops.decode_rgb(record["target"], f"{example_id} target"), config.target_size)

  images, pairs = [], []
  for index in range(num_refs):
    image = image_ops.decode_rgb(refs["image"][index], f"{example_id} ref {index}")
    token_of_cells = None
    if config.pad_refs_to_square:
      original_hw = (image.height, image.width)
      image, transform = image_ops.pad_to_square_on_white(image, config.ref_size)
      token_of_cells = _padded_reference_tokens(transform, original_hw, config.ref_size, ref_grid)
    images.append(image_ops.resize_normalize(image, config.ref_size))
    if not bool(refs["has_coords"][index]):
      pairs.append((np.zeros(0, np.int32), np.zeros(0, np.int32)))
      continue
    if bool(refs["has_mask"][index]):
      mask = np.asarray(image_ops.decode_rgb(refs["target_mask"][index], f"{example_id} mask {index}"
                                             ).convert("L"))
      cells = correspondence.mask_token_cells(mask, config.target_size, target_grid)
    else:
      cells = np.ones((target_grid, target_grid), bool)
    pairs.append(correspondence.derive_token_pairs(
        np.asarray(refs["coord_dift"][index]), np.asarray(refs["coord_geoaware"][index]), cells,
        ref_grid, token_of_cells))
  return {"target": target, "refs": np.stack(images), "pairs": pairs, "caption": _text(record["caption"]),
          "example_id": example_id}


def randomize_example(example: dict, config: PipelineConfig, rng: np.random.Generator) -> dict:
  """The per-step random part, shared by raw and cached records: classifier-free dropout, then pair
  subsampling (in this order, so both forms draw the same numbers). Returns the batch fields other
  than the images or features."""
  drop_refs, drop_caption = dropout_flags(rng) if config.dropout else (False, False)
  out = correspondence.pack_pairs(example["pairs"], config.max_pairs, rng)
  out.update({
      "caption": "" if drop_caption else example["caption"],
      "drop_refs": np.bool_(drop_refs),
      "drop_caption": np.bool_(drop_caption),
      "example_id": example["example_id"],
  })
  return out


def prepare_example(record: dict, config: PipelineConfig, rng: np.random.Generator) -> dict:
  """One undecoded record -> fixed-shape numpy arrays (see the module docstring)."""
  example = decode_record(record, config)
  out = randomize_example(example, config, rng)
  out.update({"target": example["target"], "refs": example["refs"]})
  return out


def stack_examples(examples: Sequence[dict]) -> dict:
  batch = {}
  for key in examples[0]:
    values = [example[key] for example in examples]
    if isinstance(values[0], str):
      batch[key] = np.array(values, dtype=object)
    else:
      batch[key] = np.stack(values)
  return batch


class _LoadElement:
  """Local element k (step k // B, slot k % B) -> prepared example; picklable for grain workers."""

  def __init__(self, source, plan: BatchPlan, config: PipelineConfig, process_index: int,
               local_batch_size: int):
    self.source = source
    self.plan = plan
    self.config = config
    self.process_index = process_index
    self.local_batch_size = local_batch_size
    # A source of cached features (cached_features.FeatureSource) prepares its own records.
    self._prepare = getattr(source, "prepare_example", prepare_example)

  def __call__(self, element: int) -> dict:
    step, slot = divmod(int(element), self.local_batch_size)
    record_index = int(self.plan.records(step)[self.process_index * self.local_batch_size + slot])
    rng = np.random.default_rng([self.config.seed, self.plan.epoch_of(step), record_index])
    example = self._prepare(self.source[record_index], self.config, rng)
    example["record_index"] = np.int64(record_index)
    return example


class InputIterator:
  """Iterator over this process's batches, with `get_state` / `set_state` (the step)."""

  def __init__(self, source, num_refs: Sequence[int], config: PipelineConfig, process_index: int = 0,
               process_count: int = 1):
    if config.global_batch_size % process_count:
      raise ValueError(f"global_batch_size={config.global_batch_size} is not divisible by "
                       f"process_count={process_count}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    self.config = config
    self.local_batch_size = config.global_batch_size // process_count
    self.plan = BatchPlan(num_refs, config.global_batch_size, config.seed, config.shuffle)
    epochs = config.num_epochs if config.num_epochs is not None else 10 ** 9
    self.num_steps = epochs * self.plan.batches_per_epoch
    self._elements = grain.MapDataset.range(self.num_steps * self.local_batch_size).map(
        _LoadElement(source, self.plan, config, process_index, self.local_batch_size))
    self._fingerprint = {"seed": config.seed, "global_batch_size": config.global_batch_size,
                         "num_records": len(self.plan.num_refs), "shuffle": config.shuffle,
                         "batches_per_epoch": self.plan.batches_per_epoch}
    self._iterator = None
    self.set_state({"step": 0, **self._fingerprint})

  @property
  def reference_counts(self) -> list[int]:
    """The reference counts R that batches can have (one compiled shape each)."""
    return self.plan.reference_counts

  @property
  def step(self) -> int:
    return self._step

  def _start(self, step: int):
    elements = self._elements.slice(slice(step * self.local_batch_size, None))
    if self.config.worker_processes > 0:
      from absl import flags  # pylint: disable=import-outside-toplevel
      if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app
        flags.FLAGS.mark_as_parsed()   # they must count as parsed (defaults)
      dataset = elements.to_iter_dataset().mp_prefetch(
          grain.MultiprocessingOptions(num_workers=self.config.worker_processes,
                                       per_worker_buffer_size=self.local_batch_size))
    else:
      dataset = elements.to_iter_dataset(grain.ReadOptions(
          num_threads=self.config.read_threads, prefetch_buffer_size=self.config.prefetch_buffer))
    return iter(dataset.batch(self.local_batch_size, drop_remainder=True, batch_fn=stack_examples))

  def get_state(self) -> dict[str, Any]:
    return {"step": self._step, **self._fingerprint}

  def set_state(self, state: dict[str, Any]) -> None:
    for key, value in self._fingerprint.items():
      if key in state and state[key] != value:
        raise ValueError(f"input pipeline state has {key}={state[key]!r} but this pipeline has "
                         f"{value!r}; restore with the same data and configuration")
    step = int(state["step"])
    if not 0 <= step <= self.num_steps:
      raise ValueError(f"input pipeline state step={step} outside [0, {self.num_steps}]")
    self._step = step
    self._iterator = None  # started lazily, so restoring never decodes batches it will not use

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._step >= self.num_steps:
      raise StopIteration
    if self._iterator is None:
      self._iterator = self._start(self._step)
    batch = next(self._iterator)
    self._step += 1
    return batch


def make_iterator(source, num_refs: Sequence[int], config: PipelineConfig, process_index: int = 0,
                  process_count: int = 1) -> InputIterator:
  return InputIterator(source, num_refs, config, process_index, process_count)


__all__ = ["DatasetError", "PipelineConfig", "BatchPlan", "InputIterator", "make_iterator", "open_split",
           "prepare_example", "stack_examples", "dropout_flags"]
