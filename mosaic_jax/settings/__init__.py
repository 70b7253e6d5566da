"""The run's settings: one typed, frozen object made from the config (a ConfigDict, or a workdir's
config.json) at a program's door, and read by everything past it: training, sampling a workdir,
forward.py, encoding a dataset. Its fields and what the program knows about each (fields.py: what a
resume may change, what the train step reads, what decides cached features), and the config checked
into it (from_config.py: every error a user can fix, before anything is built)."""

from mosaic_jax.settings.fields import (ENCODER_CHOICES, REMAT_AUTO, RESUME_SAFE_OVERRIDES, SCHEDULES, TRAINABLE_CHOICES,
                                        BuildSettings, ConfigError, DatasetSettings, LossSettings, MeshSettings,
                                        OptimizerSettings, Settings, ShardingSettings, config_fields, encoding_fields,
                                        field_value, known_fields, resume_safe)
from mosaic_jax.settings.from_config import (autoencoder_geometry, check_batch_splits, checkpoint_transformer_config,
                                             settings_from_config)

__all__ = ["ENCODER_CHOICES", "REMAT_AUTO", "RESUME_SAFE_OVERRIDES", "SCHEDULES", "TRAINABLE_CHOICES", "BuildSettings", "ConfigError",
           "DatasetSettings", "LossSettings", "MeshSettings", "OptimizerSettings", "Settings", "ShardingSettings",
           "autoencoder_geometry", "check_batch_splits", "checkpoint_transformer_config", "config_fields",
           "encoding_fields", "field_value", "known_fields", "resume_safe", "settings_from_config"]
