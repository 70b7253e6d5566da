"""What the demo measures on held-out samples (the eval split, as model latents: `evaluation_batches`).

Correspondence accuracy: for every valid pair (reference r, reference token i, target token j*),
whether argmax_j A(i, j) lies on j* or one of its 8 grid neighbours, where A is the attention of docs/method.md
('Statistics': each double block's softmax over target keys, averaged over heads and blocks) of the model under
evaluation at a noised target. Chance level: the same hit region's share of the N target tokens
(what a uniformly random argmax scores). Separation: mean over reference pairs r < s of
JSD(a_r, a_s), a_r(j) = mean_i A(i, j) (what MDL maximizes; ln 2 = 0.693 is the maximum).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mosaic_jax import losses
from mosaic_jax.data import make_iterator
from mosaic_jax.encoders import training_latents
from mosaic_jax.model import FluxInputs, forward, image_ids, pack_latents, reference_ids, text_ids
from mosaic_jax.parallel import on_mesh
from mosaic_jax.settings import Settings
from mosaic_jax.train.batches import step_batch
from mosaic_jax.train.datasets import open_dataset, pipeline_config
from mosaic_jax.train.step import pack_references


def model_latents(host_batch, encoders, settings: Settings, mesh=None):
  """Pipeline batch -> deterministic model latents (posterior means) and text features, replicated on
  `mesh` when given (every process holds the same whole evaluation batch)."""
  features = step_batch(host_batch, encoders, settings)
  latents = training_latents({**features, "target_std": np.zeros_like(features["target_std"])},
                             settings.latent_scaling, settings.latent_shift, jax.random.key(0))
  batch = {"target": latents["target"], "refs": latents["refs"], "text": latents["text"],
           "pooled": latents["pooled"], **{k: features[k] for k in
                                           ("pair_ref", "pair_ref_token", "pair_target_token", "pair_valid")}}
  if mesh is None:
    return {k: jnp.asarray(v) for k, v in batch.items()}
  with jax.set_mesh(mesh):
    return on_mesh(batch)


def evaluation_batches(settings: Settings, encoders, mesh=None) -> list[dict]:
  """The held-out batches (at most eval_examples examples, batches of at most 8) as model latents."""
  source, num_refs = open_dataset(settings, settings.dataset.eval_split)
  batch_size = min(settings.batch_size, 8)
  iterator = make_iterator(source, num_refs, pipeline_config(
      settings, global_batch_size=batch_size, shuffle=False, dropout=False, num_epochs=1, worker_processes=0))
  batches = []
  for host_batch in iterator:
    if len(batches) * batch_size >= settings.eval_examples:
      break
    batches.append(model_latents(host_batch, encoders, settings, mesh))
  return batches


def _neighbourhood_hits(pred_token, true_token, grid: int):
  dy = jnp.abs(pred_token // grid - true_token // grid)
  dx = jnp.abs(pred_token % grid - true_token % grid)
  return (dy <= 1) & (dx <= 1)


def _neighbourhood_size(true_token, grid: int):
  row, col = true_token // grid, true_token % grid
  rows = jnp.minimum(row + 1, grid - 1) - jnp.maximum(row - 1, 0) + 1
  cols = jnp.minimum(col + 1, grid - 1) - jnp.maximum(col - 1, 0) + 1
  return rows * cols


@functools.partial(jax.jit, static_argnames=("cfg",))
def attention_measures(params, lora, cfg, batch, t, noise):
  """Per batch: (hits, chance, pair count, JSD sum, JSD pair count) at noise level t."""
  x0 = pack_latents(batch["target"])
  refs = pack_references(batch["refs"])
  b, n = x0.shape[:2]
  num_refs, m = refs.shape[1], refs.shape[2]
  grid, ref_grid = int(round(n ** 0.5)), int(round(m ** 0.5))
  x_t = (1.0 - t) * x0 + t * noise
  inputs = FluxInputs(target=x_t, target_ids=image_ids(grid, grid), text=batch["text"],
                      text_ids=text_ids(batch["text"].shape[1]), pooled=batch["pooled"],
                      timestep=jnp.full((b,), t, jnp.float32), guidance=jnp.ones((b,), jnp.float32),
                      refs=refs, ref_ids=reference_ids(num_refs, ref_grid, ref_grid))
  _, aux = forward(params, lora, cfg, inputs, return_attention_maps=True)
  attention = jnp.mean(aux["attention_maps"], axis=1)  # [B, R, M, N]: A of docs/method.md
  rows = attention[jnp.arange(b)[:, None], batch["pair_ref"], batch["pair_ref_token"]]  # [B, K, N]
  predicted = jnp.argmax(rows, axis=-1)
  valid = batch["pair_valid"]
  hits = jnp.sum(_neighbourhood_hits(predicted, batch["pair_target_token"], grid) & valid)
  chance = jnp.sum(jnp.where(valid, _neighbourhood_size(batch["pair_target_token"], grid) / n, 0.0))
  per_ref = jnp.mean(attention, axis=2)  # [B, R, N]
  jsd = losses.jensen_shannon(per_ref[:, :, None], per_ref[:, None, :])
  upper = jnp.triu(jnp.ones((num_refs, num_refs), bool), k=1)
  return hits, chance, jnp.sum(valid), jnp.sum(jnp.where(upper, jsd, 0.0)), b * jnp.sum(upper)


def evaluate_attention(params, lora, cfg, batches, timesteps, seed: int = 0) -> dict:
  """Accuracy, chance and JSD over the given model-latent batches, averaged over `timesteps`."""
  totals = np.zeros(5)
  for index, batch in enumerate(batches):
    for t in timesteps:
      key = jax.random.fold_in(jax.random.key(seed), index)
      noise = on_mesh(jax.random.normal(key, jax.eval_shape(pack_latents, batch["target"]).shape, jnp.float32))
      measures = attention_measures(params, lora, cfg, batch, on_mesh(np.float32(t)), noise)
      totals += np.asarray([float(v) for v in measures])
  hits, chance, pairs, jsd, jsd_pairs = totals
  return {"correspondence_accuracy": hits / max(pairs, 1), "chance": chance / max(pairs, 1),
          "mean_pairwise_jsd": jsd / max(jsd_pairs, 1), "pairs": int(pairs / max(len(timesteps), 1))}


def format_table(rows: dict[str, dict]) -> str:
  lines = [f"{'run':<22} {'corr. accuracy':>15} {'chance':>8} {'mean pairwise JSD':>18} {'pairs':>7}"]
  for name, r in rows.items():
    lines.append(f"{name:<22} {r['correspondence_accuracy']:>15.3f} {r['chance']:>8.3f} "
                 f"{r['mean_pairwise_jsd']:>18.4f} {r['pairs']:>7d}")
  return "\n".join(lines)
