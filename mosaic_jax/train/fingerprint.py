"""What identifies cached encoder features: the settings that decide what the encoders make of the data
(the fields' `encodes`, mosaic_jax/settings/fields.py) under the run's encoder choice. A cache written under one
fingerprint is refused by a run with another, naming the field (data/cached_features.py).
"""

from __future__ import annotations

import hashlib
import os

from mosaic_jax.encoders import text_widths
from mosaic_jax.settings import ConfigError, Settings, encoding_fields

# The entry of a checkpoint's encoders, compared by content so that a checkpoint that moved still
# matches its cache.
CHECKPOINT_ENTRY = "checkpoint (its vae and text encoder configs)"


def cache_fingerprint(settings: Settings) -> dict:
  """{config field (or what it stands for): value} of the features the settings' encoders make."""
  fingerprint = encoding_fields(settings)
  if "checkpoint" in fingerprint:
    fingerprint[CHECKPOINT_ENTRY] = _encoder_configs_digest(fingerprint.pop("checkpoint"))
  if settings.encoders != "checkpoint":  # the file-free text encoders are built to the transformer's widths
    fingerprint["text widths (T5, CLIP)"] = list(text_widths(settings))
  return fingerprint


def _encoder_configs_digest(checkpoint: str) -> str:
  digest = hashlib.sha256()
  for folder in ("vae", "text_encoder", "text_encoder_2"):
    path = os.path.join(os.path.expanduser(checkpoint), folder, "config.json")
    if not os.path.exists(path):
      raise ConfigError(f"{path} not found: config.checkpoint must be a FLUX checkpoint root "
                        "(vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/).")
    with open(path, "rb") as f:
      digest.update(f.read())
  return digest.hexdigest()[:16]
