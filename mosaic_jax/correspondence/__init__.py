"""Dense correspondences from JAX image features (DINOv2, FLUX diffusion features) and MOSAIC's matching rule."""
