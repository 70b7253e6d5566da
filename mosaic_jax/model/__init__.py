"""The networks, as pure functions of parameter pytrees: the multi-branch FLUX MM-DiT (transformer),
its attention and statistics, LoRA, the encoders (VAE, pixel autoencoder, T5, CLIP) and the ViT image
towers (vit.py: CLIP's, DINO's, DINOv2's)."""

from mosaic_jax.model import clip, pixel_autoencoder, t5, vae
from mosaic_jax.model.attention_stats import AttentionStatistics, Correspondences
from mosaic_jax.model.autoencoder import Autoencoder
from mosaic_jax.model.clip import ClipTextConfig
from mosaic_jax.model.config import FluxConfig, flux1_dev, tiny
from mosaic_jax.model.embeddings import image_ids, reference_ids, text_ids
from mosaic_jax.model.latents import (Posterior, from_model_latents, pack_latents, sample_posterior,
                                      to_model_latents, unpack_latents)
from mosaic_jax.model.lora import init_lora, lora_shapes, target_modules
from mosaic_jax.model.pixel_autoencoder import PixelAutoencoderConfig
from mosaic_jax.model.t5 import T5Config
from mosaic_jax.model.transformer import FluxInputs, forward, init_params, param_shapes
from mosaic_jax.model.vae import VaeConfig

__all__ = [
    "AttentionStatistics", "Autoencoder", "ClipTextConfig", "Correspondences", "FluxConfig",
    "FluxInputs", "PixelAutoencoderConfig", "Posterior", "T5Config", "VaeConfig", "clip", "flux1_dev",
    "forward", "from_model_latents", "image_ids", "init_lora", "init_params", "lora_shapes",
    "pack_latents", "param_shapes", "pixel_autoencoder", "reference_ids", "sample_posterior", "t5",
    "target_modules", "text_ids", "tiny", "to_model_latents", "unpack_latents", "vae",
]
