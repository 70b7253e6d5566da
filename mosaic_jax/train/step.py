"""The MOSAIC training step: timesteps, noising, velocity MSE + SCAL + MDL, AdamW on the trainable part.

State (a dict pytree, what is checkpointed and donated to every step):
  step       int32 scalar
  trainable  {"lora": LoRA pytree (float32)} in the recipe; {"base": ..., "lora": ...} for the demo's
             from-scratch tiny DiT. The frozen base is *not* here: it is a separate, never-donated
             argument, so it is never in the optimizer, the gradient or the checkpoint.
  opt_state  optax state of grad-norm clipping + AdamW over `trainable` only
  ema        exponential moving average of `trainable` (decay settings.ema_decay, every step)

The batch (`batch_spec`): the encoders' features (raw posterior statistics, so every step draws its own
target sample, and the text features) and the pipeline's correspondence pairs and dropout flags.

The step is a pure function of (state, frozen base, batch); its randomness (timesteps, noise, the
target's posterior sample) comes from fold_in(seed, step), so a resumed run draws exactly what an
uninterrupted one draws.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mosaic_jax import losses
from mosaic_jax.encoders import training_latents
from mosaic_jax.model import Correspondences, FluxConfig, FluxInputs, forward, image_ids, pack_latents
from mosaic_jax.model import reference_ids, text_ids
from mosaic_jax.schedule import training_timesteps
from mosaic_jax.settings import OptimizerSettings, Settings


def batch_spec(settings: Settings, num_refs: int, text_shapes, batch_size: int | None = None,
               max_pairs: int | None = None, feature_dtypes=None) -> dict[str, jax.ShapeDtypeStruct]:
  """What the step reads from a batch with R = num_refs references (the step is compiled once per R):
  {key: ShapeDtypeStruct}. text_shapes: (T5 states [L, D], pooled [P]) of one example; batch_size and
  max_pairs: default the settings' (evaluation and benchmarks batch otherwise); feature_dtypes:
  {feature: dtype} of features made on device (default float32, as the host sends them)."""
  b, k = batch_size or settings.batch_size, max_pairs or settings.dataset.max_pairs
  h, hr, c = settings.latent_size, settings.ref_latent_size, settings.latent_channels
  dtype = lambda name: jnp.dtype((feature_dtypes or {}).get(name, jnp.float32))
  spec = lambda name, shape, kind=None: jax.ShapeDtypeStruct(shape, kind or dtype(name))
  return {
      "target_mean": spec("target_mean", (b, h, h, c)), "target_std": spec("target_std", (b, h, h, c)),
      "ref_means": spec("ref_means", (b, num_refs, hr, hr, c)),
      "t5": spec("t5", (b, *text_shapes[0])), "pooled": spec("pooled", (b, *text_shapes[1])),
      "pair_ref": spec("", (b, k), jnp.int32), "pair_ref_token": spec("", (b, k), jnp.int32),
      "pair_target_token": spec("", (b, k), jnp.int32), "pair_valid": spec("", (b, k), jnp.bool_),
      "drop_refs": spec("", (b,), jnp.bool_),
  }


def learning_rate(optimizer: OptimizerSettings, total_steps: int = 0):
  """The learning rate: the float `learning_rate` (constant, the official recipe), or an optax schedule
  with `warmup_steps` of linear warmup and, for schedule "cosine", a cosine decay to 0 at `total_steps`
  (the demo: a short from-scratch run ends on settled weights). A float keeps the recipe's optimizer
  state as it was (a schedule adds a step count to it)."""
  peak, warmup = optimizer.learning_rate, optimizer.warmup_steps
  if optimizer.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), end_value=0.0)
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                [warmup])
  return peak


def make_optimizer(optimizer: OptimizerSettings, total_steps: int = 0) -> optax.GradientTransformation:
  """Grad-norm clipping then AdamW; constant learning rate unless the settings ask for a schedule."""
  return optax.chain(
      optax.clip_by_global_norm(optimizer.grad_clip_norm),
      optax.adamw(learning_rate(optimizer, total_steps), b1=optimizer.b1, b2=optimizer.b2, eps=optimizer.eps,
                  weight_decay=optimizer.weight_decay))


def init_state(trainable: dict, optimizer: optax.GradientTransformation) -> dict:
  return {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
          "opt_state": optimizer.init(trainable),
          "ema": jax.tree_util.tree_map(jnp.copy, trainable)}


def pack_references(refs):
  """[B, R, h, w, C] model latents -> [B, R, (h/2)(w/2), 4C] tokens."""
  b, r = refs.shape[:2]
  return pack_latents(refs.reshape((b * r,) + refs.shape[2:])).reshape((b, r) + (-1, refs.shape[-1] * 4))


def loss_terms(trainable: dict, frozen_base: Any, batch: dict, key, step, cfg: FluxConfig, settings: Settings):
  """(total loss, metrics) of one batch: docs/method.md's 'Recipe' and 'Losses', each term averaged over samples."""
  params = trainable["base"] if "base" in trainable else frozen_base
  lora = trainable.get("lora")
  posterior_key, time_key, noise_key = jax.random.split(key, 3)
  latents = training_latents(batch, settings.latent_scaling, settings.latent_shift, posterior_key)
  x0 = pack_latents(latents["target"])
  refs = pack_references(latents["refs"])
  b, n = x0.shape[:2]
  num_refs, ref_tokens = refs.shape[1], refs.shape[2]
  drop_refs = batch["drop_refs"]
  # Classifier-free dropout of the references: their latents are zeroed (the official recipe); such
  # a sample has no meaningful reference attention, so its pairs and references leave SCAL and MDL.
  refs = jnp.where(drop_refs[:, None, None, None], 0.0, refs)

  t = training_timesteps(time_key, b, n)
  noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
  x_t = (1.0 - t[:, None, None]) * x0 + t[:, None, None] * noise
  grid, ref_grid = int(round(n ** 0.5)), int(round(ref_tokens ** 0.5))
  inputs = FluxInputs(
      target=x_t, target_ids=image_ids(grid, grid), text=latents["text"],
      text_ids=text_ids(latents["text"].shape[1]), pooled=latents["pooled"], timestep=t,
      guidance=jnp.ones((b,), jnp.float32), refs=refs,
      ref_ids=reference_ids(num_refs, ref_grid, ref_grid))
  pair_valid = batch["pair_valid"] & ~drop_refs[:, None]
  pairs = Correspondences(batch["pair_ref"], batch["pair_ref_token"], batch["pair_target_token"], pair_valid)

  pred, aux = forward(params, lora, cfg, inputs, correspondences=pairs)
  stats = aux["attention_statistics"]
  mse = losses.flow_matching_loss(pred, noise, x0)
  scal = losses.scal_loss(stats.pair_attention, pair_valid)
  ref_valid = jnp.broadcast_to(~drop_refs[:, None], (b, num_refs))
  mdl = losses.mdl_loss(stats.reference_attention, ref_valid)
  weights = settings.losses
  scal_weight = jnp.float32(weights.scal_weight)
  mdl_weight = losses.ramp_weight(step, weights.mdl_ramp_start, weights.mdl_ramp_end, weights.mdl_weight)
  total = jnp.mean(mse) + scal_weight * jnp.mean(scal) + mdl_weight * jnp.mean(mdl)
  metrics = {"loss": total, "loss_mse": jnp.mean(mse), "loss_scal": jnp.mean(scal),
             "loss_mdl": jnp.mean(mdl), "weight_scal": scal_weight, "weight_mdl": mdl_weight,
             "mean_t": jnp.mean(t), "pairs_per_sample": jnp.mean(jnp.sum(pair_valid, -1))}
  return total, metrics


def train_step(state: dict, frozen_base: Any, batch: dict, *, cfg: FluxConfig, settings: Settings,
               optimizer: optax.GradientTransformation):
  """One optimizer step; a non-finite loss, gradient or updated weight leaves the state untouched
  (metrics say so)."""
  step = state["step"]
  key = jax.random.fold_in(jax.random.key(settings.seed), step)
  compute = functools.partial(loss_terms, cfg=cfg, settings=settings)  # remat: per block, cfg.remat_policy
  (loss, metrics), grads = jax.value_and_grad(compute, has_aux=True)(
      state["trainable"], frozen_base, batch, key, step)
  grad_norm = optax.global_norm(grads)
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
  trainable = optax.apply_updates(state["trainable"], updates)
  decay = settings.ema_decay
  ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], trainable)
  new_state = {"step": step + 1, "trainable": trainable, "opt_state": opt_state, "ema": ema}
  # A finite gradient can still give non-finite weights (a learning rate that overflows float32), which
  # would then be committed and checkpointed: the new trainable values are checked too. (The moments
  # and the EMA need no check: clipped gradients and a convex average of finite weights stay finite.)
  weights_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(trainable)]))
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & weights_finite
  # The NaN guard: keep the previous state (the state buffers are donated, so this select is what
  # preserves the last good values); the host stops the run on `finite == False`.
  new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  # the rate of this step's update (the schedule counts from 0)
  lr = learning_rate(settings.optimizer, settings.total_steps)
  metrics.update(grad_norm=grad_norm, finite=finite,
                 learning_rate=jnp.asarray(lr(step) if callable(lr) else lr, jnp.float32))
  return new_state, metrics
