"""Encoding a dataset once (launch/encode_dataset.py): the run's encoders over its raw splits, written as
cached features (data/cached_features.py) under the settings' fingerprint, so that training skips the
VAE, T5 and CLIP.
"""

from __future__ import annotations

import jax.numpy as jnp

from mosaic_jax.encoders import make_encoders
from mosaic_jax.settings import Settings
from mosaic_jax.train.datasets import open_raw_dataset, pipeline_config
from mosaic_jax.train.fingerprint import cache_fingerprint


def encode_dataset(settings: Settings, out: str, splits=None, batch_size: int = 8, dtype: str = "float32") -> dict:
  """Writes the cached features of the settings' dataset splits (default: the train and eval splits) into
  the new directory `out`, with the settings' encoders and sizes; returns the cache spec."""
  from mosaic_jax.data import cached_features
  splits = list(splits or dict.fromkeys([settings.dataset.train_split, settings.dataset.eval_split]))
  sources = {split: open_raw_dataset(settings.dataset, split) for split in splits}
  return cached_features.encode_dataset(sources, out, make_encoders(settings, text_encoders=True),
                                        pipeline_config(settings), cache_fingerprint(settings),
                                        batch_size=batch_size, read_threads=settings.dataset.read_threads,
                                        dtype=jnp.dtype(dtype))
