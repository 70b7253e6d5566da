"""A training workdir, below both the trainer and the sampler: its config record (config.py: config.json,
config_history.jsonl, what a resume may change), its committed steps read back (steps.py), and the model
it holds, ready to sample (trained.py). The trainer writes it (train/); the sampler reads it (sampling/)."""

from mosaic_jax.workdir.config import in_effect, record, resume_changes
from mosaic_jax.workdir.trained import (TrainedModel, TrainedModelError, find_run, load_trained, read_settings,
                                        sampling_guidance)

__all__ = ["TrainedModel", "TrainedModelError", "find_run", "in_effect", "load_trained", "read_settings", "record",
           "resume_changes", "sampling_guidance"]
