"""The flow-matching schedule shared by training and sampling (docs/method.md, 'Recipe', 'Sampling'): FLUX's
resolution-dependent shift, the training timesteps and the sampling sigmas.

Training and sampling must shift t by the same mu for the same target token count L; keeping both here,
below the train step and the sampler, is what guarantees it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# FLUX.1-dev's scheduler config (scheduler/scheduler_config.json): resolution-dependent shift.
BASE_IMAGE_SEQ_LEN, MAX_IMAGE_SEQ_LEN = 256, 4096
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15


def flow_shift_mu(image_seq_len: int) -> float:
  """mu of FLUX's resolution-dependent shift, linear in the target token count L."""
  slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_IMAGE_SEQ_LEN - BASE_IMAGE_SEQ_LEN)
  return BASE_SHIFT + (image_seq_len - BASE_IMAGE_SEQ_LEN) * slope


def training_timesteps(key, batch: int, image_seq_len: int):
  """[batch] float32 training timesteps: t = sigmoid(n), n ~ N(0, 1), then shifted:
  t = e^mu / (e^mu + (1/t - 1)), mu = flow_shift_mu(L)."""
  t = jax.nn.sigmoid(jax.random.normal(key, (batch,), jnp.float32))
  mu = flow_shift_mu(image_seq_len)
  return jnp.exp(mu) / (jnp.exp(mu) + (1.0 / t - 1.0))


def flow_sigmas(num_steps: int, image_seq_len: int) -> np.ndarray:
  """The N+1 sigmas of an N-step FLUX sampling run, float32, from 1 down to a final 0.

  `linspace(1, 1/N, N)`, each t shifted to `e^mu / (e^mu + (1/t - 1))` with mu = flow_shift_mu(L),
  L = target token count, then 0 appended: what diffusers' FlowMatchEulerDiscreteScheduler gives
  with FLUX.1-dev's config. A count that is not a positive integer is a ValueError naming it.
  """
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f"num_steps={num_steps!r}: expected a positive integer.")
  if int(image_seq_len) != image_seq_len or image_seq_len < 1:
    raise ValueError(f"image_seq_len={image_seq_len!r}: expected a positive token count.")
  # float32 first, as diffusers does, so the shifted values round identically.
  t = np.linspace(1.0, 1.0 / num_steps, int(num_steps)).astype(np.float32).astype(np.float64)
  e_mu = math.exp(flow_shift_mu(int(image_seq_len)))
  shifted = e_mu / (e_mu + (1.0 / t - 1.0))
  return np.append(shifted, 0.0).astype(np.float32)
