"""The datasets a run reads: its split of the raw semalign_ms dataset (a synthetic one built on first
use), or the cached encoder features of it (launch/encode_dataset.py), and the input pipeline's settings
for the run.
"""

from __future__ import annotations

import contextlib
import io
import os

from mosaic_jax import cli
from mosaic_jax.settings import ConfigError, DatasetSettings, Settings
from mosaic_jax.train.fingerprint import cache_fingerprint


def open_dataset(settings: Settings, split: str, build_if_missing: bool = True):
  """(record source, per-record reference counts) of a split: the cached features of
  settings.dataset.cached_features when set, else the raw dataset (a synthetic one is built on first use)."""
  cached = settings.dataset.cached_features
  if cached:
    from mosaic_jax.data import cached_features
    try:
      return cached_features.open_split(cached, split, cache_fingerprint(settings))
    except cached_features.CacheError as error:
      raise ConfigError(f"{error} (--config.dataset.cached_features={cached})") from error
  return open_raw_dataset(settings.dataset, split, build_if_missing)


def open_raw_dataset(dataset: DatasetSettings, split: str, build_if_missing: bool = True):
  """(record source, per-record reference counts) of a raw split (pipeline.open_split's checks); builds a
  synthetic dataset on first use."""
  from mosaic_jax.data import pipeline
  if not dataset.data_dir:
    raise ConfigError("config.dataset.data_dir is empty: pass --config.dataset.data_dir=DIR (a directory "
                      "holding the built semalign_ms dataset; see launch/build_dataset.py).")
  builder = _builder(dataset)
  if not pipeline.is_built(builder):
    buildable = dataset.build.num_train > 0 and builder.builder_config.source == "synthetic"
    if not (build_if_missing and buildable):
      from mosaic_jax.data.semalign_ms import build_command
      raise ConfigError(
          f"dataset {dataset.name} is not built under {builder.data_dir}: build it with "
          f"`{build_command(builder.builder_config, os.path.expanduser(dataset.data_dir))}`, or pass "
          "--config.dataset.data_dir=DIR where it was built.")
    print(f"building {dataset.name} into {builder.data_dir} (first use)", flush=True)
    with _quiet_build():
      builder.download_and_prepare()
  try:
    return pipeline.open_split(dataset.name, split, builder=builder)
  except pipeline.DatasetError as error:
    raise ConfigError(f"{error} (--config.dataset.data_dir={dataset.data_dir})") from error


@contextlib.contextmanager
def _quiet_build():
  """Unless --verbose: without TFDS's progress bars and what the build prints on stdout (its report); the
  trainer says what it builds, where (TFDS's own lines are silenced in SemalignMs)."""
  if cli.verbose():
    yield
    return
  import tensorflow_datasets as tfds
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.display_progress_bar(True)


def _builder(dataset: DatasetSettings):
  """The tfds builder of the dataset: a registered `semalign_ms` config, or a custom synthetic one."""
  from mosaic_jax.data.semalign_ms import SemalignMs, SemalignMsConfig
  family, _, name = dataset.name.partition("/")
  if family != "semalign_ms" or not name:
    raise ConfigError(f"config.dataset.name={dataset.name!r}: expected 'semalign_ms/<config>'.")
  data_dir = os.path.expanduser(dataset.data_dir)
  if name in {c.name for c in SemalignMs.BUILDER_CONFIGS}:
    return SemalignMs(config=name, data_dir=data_dir)
  build = dataset.build
  return SemalignMs(config=SemalignMsConfig(
      name=name, source="synthetic", image_size=build.image_size, min_refs=build.min_refs,
      max_refs=build.max_refs, num_train=build.num_train, num_validation=build.num_validation,
      seed=build.seed), data_dir=data_dir)


def pipeline_config(settings: Settings, **changes):
  """The input pipeline's settings for the run's Settings (training's; `changes` for evaluation or
  encoding): pairs on the autoencoder's token grid (settings.token_pixels)."""
  from mosaic_jax.data.pipeline import PipelineConfig
  return PipelineConfig(**{**dict(
      target_size=settings.resolution, ref_size=settings.ref_resolution, global_batch_size=settings.batch_size,
      max_pairs=settings.dataset.max_pairs, token_pixels=settings.token_pixels, seed=settings.seed,
      read_threads=settings.dataset.read_threads, worker_processes=settings.dataset.worker_processes), **changes})
