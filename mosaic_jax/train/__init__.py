"""MOSAIC training: settings (settings.py), state and step (step.py), checkpoints (checkpoint.py),
logging and FLOPs (metrics.py), evaluation (evaluate.py), inputs (inputs.py), and the loop (trainer.py)."""

from mosaic_jax.settings import ConfigError, Settings, settings_from_config
from mosaic_jax.train.trainer import train_and_evaluate

__all__ = ["ConfigError", "Settings", "settings_from_config", "train_and_evaluate"]
