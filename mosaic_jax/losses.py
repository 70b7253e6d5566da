"""MOSAIC's training losses: flow matching, SCAL, MDL, and the loss-weight schedule (docs/method.md, 'Losses').

Every loss returns one value per sample ([B]); the trainer averages over samples (the official code
trains with batch 1 per device, so a per-sample mean reproduces it at any batch size).
"""

from __future__ import annotations

import jax.numpy as jnp

SCAL_FLOOR = 1e-9
JSD_EPS = 1e-8


def flow_matching_loss(pred, noise, x0):
  """Mean squared error of the velocity prediction against (noise - x0), per sample."""
  err = jnp.square(pred.astype(jnp.float32) - (noise - x0).astype(jnp.float32))
  return jnp.mean(err.reshape(err.shape[0], -1), axis=-1)


def scal_loss(pair_attention, pair_valid):
  """Mean over the sample's valid pairs of -log(A(i, j*) + 1e-9); 0 for a sample with no pair."""
  valid = pair_valid.astype(jnp.float32)
  nll = -jnp.log(pair_attention.astype(jnp.float32) + SCAL_FLOOR)
  count = jnp.sum(valid, axis=-1)
  return jnp.sum(jnp.where(pair_valid, nll, 0.0), axis=-1) / jnp.maximum(count, 1.0)


def jensen_shannon(p, q, eps=JSD_EPS):
  """JSD(p, q) over the last axis, natural log, eps inside every log: log(p + eps) - log(m + eps), m = (p + q) / 2."""
  m = 0.5 * (p + q)
  log_m = jnp.log(m + eps)
  return 0.5 * jnp.sum(p * (jnp.log(p + eps) - log_m), -1) + 0.5 * jnp.sum(q * (jnp.log(q + eps) - log_m), -1)


def mdl_loss(reference_attention, ref_valid=None):
  """Minus the mean JSD over all pairs r < s of the sample's valid references; 0 with fewer than 2.

  reference_attention: [B, R, N] (each a_r a distribution over target tokens); ref_valid: [B, R] bool.
  """
  a = reference_attention.astype(jnp.float32)
  num_refs = a.shape[1]
  if ref_valid is None:
    ref_valid = jnp.ones(a.shape[:2], bool)
  jsd = jensen_shannon(a[:, :, None, :], a[:, None, :, :])  # [B, R, R]
  upper = jnp.triu(jnp.ones((num_refs, num_refs), bool), k=1)
  pair_ok = upper[None] & ref_valid[:, :, None] & ref_valid[:, None, :]
  count = jnp.sum(pair_ok, axis=(1, 2)).astype(jnp.float32)
  return -jnp.sum(jnp.where(pair_ok, jsd, 0.0), axis=(1, 2)) / jnp.maximum(count, 1.0)


def ramp_weight(step, start: int, end: int, final: float = 1.0):
  """0 before `start`, linear to `final` at `end`, then `final` (MDL: 10,000 -> 11,000)."""
  if end <= start:
    return jnp.where(step >= start, final, 0.0)
  return final * jnp.clip((jnp.asarray(step, jnp.float32) - start) / (end - start), 0.0, 1.0)
