"""Weights in and out: diffusers and BFL FLUX checkpoints, diffusers-format LoRA files, safetensors."""

from mosaic_jax.interop.flux_checkpoint import CheckpointError, load_flux_transformer
from mosaic_jax.interop.lora_file import LoraFileError, load_lora, save_lora
from mosaic_jax.interop.safetensors_io import SafetensorsError, SafetensorsFile, save_safetensors

__all__ = [
    "CheckpointError", "LoraFileError", "SafetensorsError", "SafetensorsFile", "load_flux_transformer",
    "load_lora", "save_lora", "save_safetensors",
]
