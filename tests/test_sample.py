"""The sampler's core against diffusers: the shifted sigma schedule (FlowMatchEulerDiscreteScheduler with
FLUX.1-dev's config), the whole denoising loop (FluxPipeline, output_type="latent"), and the reference
KV cache (bit-exact in independent_refs mode, an approximation otherwise)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from mosaic_jax import model, sampling
from mosaic_jax.model.lora import init_lora

from conftest import relative_error

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# FLUX.1-dev's scheduler/scheduler_config.json.
FLUX_DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                          max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def diffusers_sigmas(num_steps, image_seq_len):
  """What FluxPipeline hands the scheduler (its own calculate_shift), and what the scheduler makes of it."""
  from diffusers.pipelines.flux.pipeline_flux import calculate_shift
  scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
  mu = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
  scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
  return scheduler.sigmas.numpy()


@pytest.mark.parametrize("num_steps", [1, 4, 28, 50])
@pytest.mark.parametrize("image_seq_len", [24, 256, 1024, 4096, 6144])
def test_sigmas_equal_the_flux_dev_scheduler(num_steps, image_seq_len):
  ours = sampling.flow_sigmas(num_steps, image_seq_len)
  ref = diffusers_sigmas(num_steps, image_seq_len)
  assert ours.shape == (num_steps + 1,) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
  assert ours[0] == 1.0 and ours[-1] == 0.0 and np.all(np.diff(ours) < 0)


def test_sigma_schedule_rejects_bad_counts():
  with pytest.raises(ValueError, match="num_steps=0"):
    sampling.flow_sigmas(0, 1024)
  with pytest.raises(ValueError, match="image_seq_len=0"):
    sampling.flow_sigmas(28, 0)


def test_no_reference_sampling_equals_diffusers_flux_pipeline(torch_flux, flux_params):
  """Same tiny weights, prompt embeddings and initial noise: FluxPipeline's latents are ours."""
  cfg, params = flux_params
  grid_h, grid_w, steps, guidance = 4, 6, 4, 3.5
  rng = np.random.default_rng(1)
  noise = rng.standard_normal((2, grid_h * grid_w, cfg.in_channels), np.float32)
  text = rng.standard_normal((2, 7, cfg.joint_attention_dim), np.float32)
  pooled = rng.standard_normal((2, cfg.pooled_projection_dim), np.float32)

  pipe = diffusers.FluxPipeline(
      scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER), vae=None, text_encoder=None,
      tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=torch_flux)
  with torch.no_grad():  # without a VAE the pipeline assumes downsample 8: 16 px per packed token
    ref = pipe(prompt_embeds=torch.from_numpy(text), pooled_prompt_embeds=torch.from_numpy(pooled),
               latents=torch.from_numpy(noise), height=16 * grid_h, width=16 * grid_w,
               num_inference_steps=steps, guidance_scale=guidance, output_type="latent").images.numpy()

  inputs = model.FluxInputs(target=noise, target_ids=model.image_ids(grid_h, grid_w), text=text,
                            text_ids=model.text_ids(7), pooled=pooled, timestep=None, guidance=guidance)
  ours = sampling.denoise(params, None, cfg, inputs, sampling.flow_sigmas(steps, grid_h * grid_w)).tokens
  assert ours.shape == ref.shape and ours.dtype == np.float32
  assert relative_error(ours, ref) < 2e-5, relative_error(ours, ref)


@pytest.fixture(scope="module")
def mosaic_inputs(flux_params):
  """A MOSAIC batch for the tiny model: 2 references, a random LoRA with non-zero B (so it acts)."""
  cfg, params = flux_params
  lora = init_lora(jax.random.key(0), params, cfg, rank=4)
  lora = jax.tree_util.tree_map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape), lora)
  rng = np.random.default_rng(2)
  n_refs, ref_grid, grid_h, grid_w = 2, 3, 4, 6
  inputs = model.FluxInputs(
      target=rng.standard_normal((2, grid_h * grid_w, cfg.in_channels), np.float32),
      text=rng.standard_normal((2, 5, cfg.joint_attention_dim), np.float32), text_ids=model.text_ids(5),
      pooled=rng.standard_normal((2, cfg.pooled_projection_dim), np.float32),
      target_ids=model.image_ids(grid_h, grid_w), timestep=None, guidance=np.float32(3.5),
      refs=rng.standard_normal((2, n_refs, ref_grid * ref_grid, cfg.in_channels), np.float32),
      ref_ids=model.reference_ids(n_refs, ref_grid, ref_grid))
  return params, lora, cfg, (inputs, sampling.flow_sigmas(5, grid_h * grid_w))


def test_reference_cache_is_exact_in_independent_refs_mode(mosaic_inputs):
  params, lora, cfg, inputs = mosaic_inputs
  independent = dataclasses.replace(cfg, independent_refs=True)
  inputs, sigmas = inputs
  full = np.asarray(sampling.denoise(params, lora, independent, inputs, sigmas).tokens)
  cached = np.asarray(sampling.denoise(params, lora, independent, inputs, sigmas, use_ref_cache=True).tokens)
  np.testing.assert_array_equal(cached, full)
  # Not vacuous: the references change the result.
  no_refs = np.asarray(sampling.denoise(params, lora, independent, inputs._replace(refs=None, ref_ids=None),
                                        sigmas).tokens)
  assert relative_error(no_refs, full) > 1e-3


def test_reference_cache_is_an_approximation_without_independent_refs(mosaic_inputs):
  """References that attend to the noisy target change across steps; the cache freezes them at step 0."""
  params, lora, cfg, inputs = mosaic_inputs
  assert not cfg.independent_refs
  inputs, sigmas = inputs
  full = np.asarray(sampling.denoise(params, lora, cfg, inputs, sigmas).tokens)
  cached = np.asarray(sampling.denoise(params, lora, cfg, inputs, sigmas, use_ref_cache=True).tokens)
  assert 1e-5 < relative_error(cached, full) < 0.5


def test_denoise_reports_each_step_to_the_host(mosaic_inputs):
  params, lora, cfg, inputs = mosaic_inputs
  inputs, sigmas = inputs
  seen = []
  sampling.denoise(params, lora, cfg, inputs._replace(refs=None, ref_ids=None), sigmas,
                   on_step=lambda step: seen.append(step))
  jax.effects_barrier()
  assert sorted(seen) == list(range(5))


def test_recorded_attention_is_the_step_mean_of_the_materialized_maps(mosaic_inputs):
  """denoise(record_attention=True): the same latents, and a_r(j) equal to an Euler loop stepped here
  with the materialized maps (forward(return_attention_maps=True), not the streamed statistics),
  averaged over every step; each map sums to 1 and the two references' maps differ."""
  from mosaic_jax.heatmaps import reference_attention_from_maps
  params, lora, cfg, (inputs, sigmas) = mosaic_inputs
  tokens, attention = sampling.denoise(params, lora, cfg, inputs, sigmas, record_attention=True)
  np.testing.assert_allclose(np.asarray(tokens), np.asarray(sampling.denoise(params, lora, cfg, inputs, sigmas).tokens),
                             rtol=1e-5, atol=1e-5)
  x, per_step = inputs.target, []
  batch = x.shape[0]
  forward = jax.jit(model.forward, static_argnames=("cfg", "return_attention_maps"))
  for step in range(len(sigmas) - 1):
    velocity, aux = forward(params, lora, cfg, model.FluxInputs(
        target=x, target_ids=inputs.target_ids, text=inputs.text, text_ids=inputs.text_ids,
        pooled=inputs.pooled, timestep=np.full((batch,), sigmas[step], np.float32),
        guidance=np.full((batch,), 3.5, np.float32), refs=inputs.refs, ref_ids=inputs.ref_ids),
        return_attention_maps=True)
    per_step.append(reference_attention_from_maps(aux["attention_maps"]))
    x = x + (sigmas[step + 1] - sigmas[step]) * np.asarray(velocity, np.float32)
  expected = np.mean(per_step, axis=0)
  attention = np.asarray(attention)
  assert attention.shape == (2, 2, 24)
  np.testing.assert_allclose(attention, expected, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-5)
  assert np.abs(attention[:, 0] - attention[:, 1]).max() > 1e-3
  assert np.abs(per_step[0] - per_step[-1]).max() > 1e-4  # the steps differ: the mean is not one step's
  with pytest.raises(ValueError, match="record_attention needs every step"):
    sampling.denoise(params, lora, cfg, inputs, sigmas, record_attention=True, use_ref_cache=True)
