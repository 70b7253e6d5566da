"""Sampling MOSAIC: the jitted flow-matching loop with its reference KV cache (loop.py), what a user asks
for, read and checked (requests.py: cases, options, reference images), the Sampler over devices and
processes (sampler.py), and samplers from files: a FLUX root and a LoRA, or a training workdir
(loaders.py). The shifted schedule is schedule.py's `flow_sigmas`."""

from mosaic_jax.sampling.loaders import load_sampler, load_trained_sampler, resolve_lora_file
from mosaic_jax.sampling.loop import Denoised, denoise
from mosaic_jax.sampling.requests import (DEFAULT_GUIDANCE, DEFAULT_MAX_REFS, DEFAULT_SIZE, DEFAULT_STEPS, Case,
                                          SampleInputError, SampleOptions, load_reference, read_cases,
                                          validate_request)
from mosaic_jax.sampling.sampler import Sampler
from mosaic_jax.schedule import flow_sigmas

__all__ = ["DEFAULT_GUIDANCE", "DEFAULT_MAX_REFS", "DEFAULT_SIZE", "DEFAULT_STEPS", "Case", "Denoised", "SampleInputError",
           "SampleOptions", "Sampler", "denoise", "flow_sigmas", "load_reference", "load_sampler",
           "load_trained_sampler", "read_cases", "resolve_lora_file", "validate_request"]
