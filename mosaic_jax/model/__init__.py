"""The FLUX MM-DiT for MOSAIC's multi-branch sequence, as pure functions of parameter pytrees."""

from mosaic_jax.model.config import FluxConfig, flux1_dev, tiny
from mosaic_jax.model.embeddings import image_ids, reference_ids, text_ids
from mosaic_jax.model.lora import init_lora, lora_shapes, target_modules
from mosaic_jax.model.transformer import FluxInputs, forward, init_params, param_shapes

__all__ = [
    "FluxConfig", "FluxInputs", "flux1_dev", "tiny", "forward", "init_params", "param_shapes",
    "init_lora", "lora_shapes", "target_modules", "image_ids", "reference_ids", "text_ids",
]
