"""The flow-matching sampling loop of MOSAIC (docs/method.md, 'Sampling': the official sampler's Euler
steps on FLUX's shifted schedule): the whole loop in one jit, for anyone who already has embeddings and
latents (the Sampler, the trainer's sample panels, benchmarks).

Reference KV cache (`use_ref_cache`): the first step runs the full model and keeps every block's
reference keys and values; the remaining steps run only text and target tokens against them. That is
exact when `cfg.independent_refs` (references attend only to themselves, so their keys and values do
not depend on the step) and an approximation otherwise (references then see the noisy target).

Attention (`record_attention`): each reference's attention over the target, a_r(j) = mean over r's
tokens of A(i, j) with A the losses' statistic (model/attention_stats.py: per double block the softmax
over target keys, averaged over heads and double blocks), recorded at every denoising step (at that
step's noisy target) and averaged over all of them; each reference's map sums to 1 over the target
tokens. The cached steps run without reference queries, so recording needs the cache off.

Progress (`on_step`): a host function called with each step's index, through one debug callback. It
is a static argument, so jit's cache sees it: a trace is reused only with the same function (the
Sampler keeps one for its lifetime), never with another's.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from mosaic_jax.model.attention_stats import Correspondences
from mosaic_jax.model.config import FluxConfig
from mosaic_jax.model.transformer import FluxInputs, forward


class Denoised(NamedTuple):
  """What `denoise` returns. tokens: the final latent tokens [B, N, C] float32 (unpack_latents and the
  autoencoder decode them); attention: a_r(j) [B, R, N] float32 with record_attention, else [B, 0, N]."""
  tokens: jax.Array
  attention: jax.Array


@functools.partial(jax.jit, static_argnames=("cfg", "use_ref_cache", "record_attention", "on_step"))
def denoise(params, lora, cfg: FluxConfig, inputs: FluxInputs, sigmas, use_ref_cache: bool = False,
            record_attention: bool = False, on_step: Callable[[int], None] | None = None) -> Denoised:
  """Runs the Euler flow-matching loop from noise to clean latent tokens; one compile per shape.

  params, lora: the transformer (interop.load_flux_transformer) and MOSAIC LoRA pytree (or None).
  cfg:          its FluxConfig (static).
  inputs:       the sample's model.FluxInputs, with `target` the initial noise [B, N, C] (packed latent
                tokens of N(0, 1) latents) and no `timestep` (each step sets it); `guidance` may be a
                scalar (3.5 is the recipe's); references always get t = 0 (and `ref_guidance`, 1.0).
  sigmas:       [steps + 1] from flow_sigmas(steps, N); traced, so schedules of one length share a compile.
  use_ref_cache, record_attention, on_step: the module docstring. The latents stay float32 between
  steps whatever the parameter dtype.
  """
  x, has_refs = _start(cfg, inputs, sigmas)
  batch, num_tokens = x.shape[:2]
  if record_attention:
    if has_refs and use_ref_cache:
      raise ValueError("denoise: record_attention needs every step to run the references (the cached steps "
                       "have no reference queries); turn use_ref_cache off.")
    return _recording_loop(params, lora, cfg, inputs, sigmas, x, has_refs, on_step)
  no_attention = jnp.zeros((batch, 0, num_tokens), jnp.float32)
  if has_refs and use_ref_cache:
    return Denoised(_cached_loop(params, lora, cfg, inputs, sigmas, x, on_step), no_attention)

  def full_step(step, x):
    velocity, _ = forward(params, lora, cfg, _at(inputs, x, sigmas, step, has_refs))
    return _euler(x, sigmas, step, velocity, on_step)

  return Denoised(jax.lax.fori_loop(0, sigmas.shape[0] - 1, full_step, x), no_attention)


def _start(cfg: FluxConfig, inputs: FluxInputs, sigmas) -> tuple[jax.Array, bool]:
  """(the float32 starting latents, whether there are references), the shapes checked at trace time."""
  noise, target_ids, refs, ref_ids = inputs.target, inputs.target_ids, inputs.refs, inputs.ref_ids
  batch, num_tokens, channels = noise.shape
  if sigmas.ndim != 1 or sigmas.shape[0] < 2:
    raise ValueError(f"denoise: sigmas must have shape [steps + 1] with steps >= 1, got {sigmas.shape}.")
  if channels != cfg.in_channels or target_ids.shape != (num_tokens, 3):
    raise ValueError(f"denoise: noise tokens {noise.shape} / target_ids {target_ids.shape} do not "
                     f"fit the model (expected [B, N, {cfg.in_channels}] and [N, 3]).")
  has_refs = refs is not None and refs.shape[1] > 0
  if has_refs and (ref_ids is None or refs.shape[0] != batch or ref_ids.shape != refs.shape[1:3] + (3,)):
    raise ValueError(f"denoise: refs {refs.shape} need ref_ids [R, M, 3] "
                     f"(got {None if ref_ids is None else ref_ids.shape}) and batch {batch}.")
  return noise.astype(jnp.float32), has_refs


def _at(inputs: FluxInputs, x, sigmas, step, with_refs: bool) -> FluxInputs:
  """The model's inputs at `step`: latents x at that step's sigma, with or without the references."""
  batch = x.shape[0]
  return inputs._replace(
      target=x, timestep=jnp.broadcast_to(sigmas[step].astype(jnp.float32), (batch,)),
      guidance=jnp.broadcast_to(jnp.asarray(inputs.guidance, jnp.float32), (batch,)),
      refs=inputs.refs if with_refs else None, ref_ids=inputs.ref_ids if with_refs else None,
      ref_guidance=inputs.ref_guidance if with_refs else None)


def _euler(x, sigmas, step, velocity, on_step):
  if on_step is not None:
    jax.debug.callback(lambda index: on_step(int(index)), step)
  sigmas = sigmas.astype(jnp.float32)
  return x + (sigmas[step + 1] - sigmas[step]) * velocity.astype(jnp.float32)


def _cached_loop(params, lora, cfg, inputs, sigmas, x, on_step):
  """Step 0 runs the full model (so it equals the uncached step) and keeps the references' keys and
  values; the other steps reuse them."""
  velocity, aux = forward(params, lora, cfg, _at(inputs, x, sigmas, 0, True), return_ref_kv=True)
  cache = aux["ref_kv"]
  x = _euler(x, sigmas, 0, velocity, on_step)

  def cached_step(step, x):
    velocity, _ = forward(params, lora, cfg, _at(inputs, x, sigmas, step, False), ref_kv=cache)
    return _euler(x, sigmas, step, velocity, on_step)

  return jax.lax.fori_loop(1, sigmas.shape[0] - 1, cached_step, x)


def _recording_loop(params, lora, cfg, inputs, sigmas, x, has_refs, on_step) -> Denoised:
  """The full loop, each step's reference attention summed, then averaged over the steps."""
  batch, num_tokens = x.shape[:2]
  num_steps = sigmas.shape[0] - 1
  num_refs = inputs.refs.shape[1] if has_refs else 0
  # One padding pair per row: the statistics' reference attention is what is kept, pairs are unused.
  no_pairs = Correspondences(*(jnp.zeros((batch, 1), jnp.int32),) * 3, jnp.zeros((batch, 1), bool))

  def recorded_step(step, carry):
    x, total = carry
    velocity, aux = forward(params, lora, cfg, _at(inputs, x, sigmas, step, has_refs), correspondences=no_pairs)
    if has_refs:
      total = total + aux["attention_statistics"].reference_attention.astype(jnp.float32)
    return _euler(x, sigmas, step, velocity, on_step), total

  x, total = jax.lax.fori_loop(0, num_steps, recorded_step,
                               (x, jnp.zeros((batch, num_refs, num_tokens), jnp.float32)))
  return Denoised(x, total / num_steps)
