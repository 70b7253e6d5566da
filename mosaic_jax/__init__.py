"""mosaic_jax: MOSAIC multi-subject personalization on FLUX.1, in JAX."""

from mosaic_jax import encoders, interop, losses, model, text

__all__ = ["encoders", "interop", "losses", "model", "text"]
