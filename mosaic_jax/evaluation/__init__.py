"""Evaluation: CLIP and DINO feature extractors in JAX, the DreamBench protocol, reports."""
