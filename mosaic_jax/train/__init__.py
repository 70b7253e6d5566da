"""MOSAIC training: the run (trainer.py: setup.py makes one context, loop.py runs it, then the held-out
evaluation, evaluate.py, and sample panels, samples.py); what the run starts from (weights.py), its
compiled steps (compilation.py, tpu_compile.py), state and step (step.py),
checkpoints (checkpoint.py), logging and FLOPs (metrics.py); its data (datasets.py, batches.py) and
cached encoder features (fingerprint.py, encode_features.py). The settings are mosaic_jax/settings/."""

from mosaic_jax.settings import ConfigError, Settings, settings_from_config
from mosaic_jax.train.trainer import train_and_evaluate

__all__ = ["ConfigError", "Settings", "settings_from_config", "train_and_evaluate"]
