"""Point correspondences between images, made in JAX: DINOv2 and FLUX features and the matching rule."""
