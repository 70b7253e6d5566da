"""Weights in and out: diffusers and BFL FLUX checkpoints, the FLUX VAE and text encoders,
diffusers-format LoRA files, and safetensors itself."""

from mosaic_jax.interop.flux_checkpoint import load_flux_transformer
from mosaic_jax.interop.lora_file import LoraFileError, load_lora, lora_trained_independent_refs, save_lora
from mosaic_jax.interop.safetensors_io import SafetensorsError, SafetensorsFile, save_safetensors
from mosaic_jax.interop.tensor_table import CheckpointError
from mosaic_jax.interop.text_encoder_checkpoint import load_clip_text_encoder, load_t5_encoder
from mosaic_jax.interop.vae_checkpoint import load_vae

__all__ = [
    "CheckpointError", "LoraFileError", "SafetensorsError", "SafetensorsFile", "load_clip_text_encoder",
    "load_flux_transformer", "load_lora", "load_t5_encoder", "load_vae", "lora_trained_independent_refs",
    "save_lora", "save_safetensors",
]
