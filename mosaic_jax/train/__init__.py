"""MOSAIC training: state and step (step.py), checkpoints (checkpoint.py), logging and FLOPs
(metrics.py), evaluation (evaluate.py), inputs (inputs.py), and the loop (trainer.py)."""

from mosaic_jax.train.inputs import ConfigError
from mosaic_jax.train.trainer import check_config, train_and_evaluate

__all__ = ["ConfigError", "check_config", "train_and_evaluate"]
