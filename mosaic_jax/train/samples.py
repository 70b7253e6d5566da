"""The sample panels a run writes: held-out examples sampled by the model being trained (every
sample_every steps and at the end), drawn beside their references and real targets
(`samples/step_N.png`, `samples/final.png`), each beside the attention heatmaps of the same samples
(`samples/step_N_attention.png`), and logged to tensorboard.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mosaic_jax import images
from mosaic_jax.model import FluxInputs, image_ids, pack_latents, reference_ids, text_ids
from mosaic_jax.parallel import on_mesh
from mosaic_jax.parallel.distributed import is_leader
from mosaic_jax.sampling.loop import Denoised, denoise
from mosaic_jax.schedule import flow_sigmas
from mosaic_jax.settings import Settings
from mosaic_jax.train.evaluate import evaluation_batches
from mosaic_jax.train.step import pack_references
from mosaic_jax.workdir.trained import sampling_guidance


def sample_targets(params, lora, cfg, batch, num_steps: int, guidance: float, seed: int = 0,
                   record_attention: bool = False) -> Denoised:
  """The sampling loop on a model-latent batch's text and references: target latent tokens [B, N, C] and,
  with record_attention, each reference's attention over the target a_r(j) [B, R, N], averaged over
  every step (else [B, 0, N])."""
  x0 = pack_latents(batch["target"])
  refs = pack_references(batch["refs"])
  noise = on_mesh(jax.random.normal(jax.random.key(seed), x0.shape, jnp.float32))
  grid, ref_grid = int(round(x0.shape[1] ** 0.5)), int(round(refs.shape[2] ** 0.5))
  inputs = FluxInputs(target=noise, target_ids=on_mesh(image_ids(grid, grid)), text=batch["text"],
                      text_ids=on_mesh(text_ids(batch["text"].shape[1])), pooled=batch["pooled"], timestep=None,
                      guidance=on_mesh(np.full((x0.shape[0],), guidance, np.float32)), refs=refs,
                      ref_ids=on_mesh(reference_ids(refs.shape[1], ref_grid, ref_grid)))
  return denoise(params, lora, cfg, inputs, on_mesh(flow_sigmas(num_steps, x0.shape[1])),
                 record_attention=record_attention)


def write_samples(path, params, lora, cfg, encoders, batch, settings: Settings, logger=None, step=0):
  """Every process samples (the model is split over all of them); process 0 draws and writes the panel
  at `path` and, beside it (`<name>_attention.png`), each sample's attention heatmaps."""
  tokens, attention = sample_targets(params, lora, cfg, batch, settings.sample_steps, sampling_guidance(settings),
                                     settings.seed, record_attention=True)
  tokens = multihost_utils.process_allgather(tokens, tiled=True)  # whole on every host
  attention = multihost_utils.process_allgather(attention, tiled=True)
  if not is_leader():
    return path
  host_batch = {k: multihost_utils.process_allgather(batch[k], tiled=True) for k in ("target", "refs")}
  panel = images.sample_panel(encoders.autoencoder, host_batch, tokens)
  images.write_png(path, panel)
  if logger is not None:
    logger.image(step, "samples", panel)
  if attention.shape[1]:  # a batch with references
    sheet = images.attention_sheet(encoders.autoencoder, host_batch, tokens, attention)
    images.write_png(attention_path(path), sheet)
    if logger is not None:
      logger.image(step, "attention", sheet)
  return path


def attention_path(samples_path: str) -> str:
  """samples/step_N.png -> samples/step_N_attention.png (the heatmaps of the same samples)."""
  stem, extension = os.path.splitext(samples_path)
  return f"{stem}_attention{extension}"


class PeriodicSamples:
  """The panels of every sample_every-th step, on the first held-out batch (read on first use)."""

  def __init__(self, settings: Settings, encoders, mesh, workdir: str, logger):
    self.settings, self.encoders, self.mesh, self.workdir, self.logger = settings, encoders, mesh, workdir, logger
    self.batches = None

  def due(self, step: int) -> bool:
    every = self.settings.sample_every
    return bool(every) and step % every == 0 and step < self.settings.total_steps

  def write(self, step: int, params, lora, cfg) -> None:
    with jax.set_mesh(self.mesh):  # the sampler is traced here
      if self.batches is None:
        self.batches = evaluation_batches(self.settings, self.encoders, self.mesh)[:1]
      if self.batches:
        write_samples(os.path.join(self.workdir, "samples", f"step_{step}.png"), params, lora, cfg, self.encoders,
                      self.batches[0], self.settings, self.logger, step)
