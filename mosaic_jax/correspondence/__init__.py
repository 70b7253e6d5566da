"""Dense correspondences between images from JAX feature extractors (DINOv2, FLUX diffusion features) and MOSAIC's matching rule."""
