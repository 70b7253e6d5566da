"""Point correspondences for images that have none: feature extractors, MOSAIC's matching rule, accuracy."""
