"""mosaic_jax: MOSAIC multi-subject personalization on FLUX.1, in JAX."""

from mosaic_jax import interop, model

__all__ = ["interop", "model"]
