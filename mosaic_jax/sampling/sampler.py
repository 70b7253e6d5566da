"""The Sampler: loaded models and a mesh in, uint8 images of cases (a prompt and reference images) out,
in batches of (case, seed) pairs over the devices and processes. Used by launch/sample.py (through
sample_driver.py, which writes the files) and by evaluation; loaders.py builds one from files.

With options.save_attention each result also gets its references' attention over the target (the
loop's record_attention, loop.py); such a run samples without the reference KV cache (run.json says so).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mosaic_jax import images, parallel
from mosaic_jax.model.config import FluxConfig
from mosaic_jax.model.embeddings import image_ids, reference_ids, text_ids
from mosaic_jax.model.latents import pack_latents, to_model_latents
from mosaic_jax.model.transformer import FluxInputs
from mosaic_jax.sampling.loop import denoise
from mosaic_jax.sampling.requests import Case, SampleInputError, SampleOptions, load_reference, validate_request
from mosaic_jax.schedule import flow_sigmas


@functools.partial(jax.jit, static_argnames=("scaling_factor", "shift_factor"))
def _encode_references(autoencoder, images, scaling_factor: float, shift_factor: float):
  """Images [R, S, S, 3] -> packed reference tokens [R, M, C] from the posterior mean."""
  return pack_latents(to_model_latents(autoencoder.encode(images).mean, scaling_factor, shift_factor))


def _initial_noise(seed: int, latent_height: int, latent_width: int, channels: int) -> np.ndarray:
  """N(0, 1) latents of one seed, packed to tokens [N, 4C]; independent of how seeds are batched."""
  z = jax.random.normal(jax.random.key(seed), (1, latent_height, latent_width, channels), jnp.float32)
  return np.asarray(pack_latents(z))[0]


class _StepRelay:
  """The sampler's one `on_step` for the loop (a static argument: one trace per sampler, not one per
  call): forwards each step to the listener of the call in progress, if any."""

  def __init__(self):
    self.listener: Callable[[int], None] | None = None

  def __call__(self, step: int) -> None:
    if self.listener is not None:
      self.listener(step)


class Sampler:
  """The loaded transformer, LoRA and encoders, and the sampling loop over cases.

  encoders: an encoders.FluxEncoders with text encoders (captions -> T5 and pooled CLIP).
  mesh:     where the transformer runs (parallel.make_mesh; default: every device on the data axis).
            The base and the LoRA are placed with the training rules (`param_rules`, `logical_rules`:
            fsdp and tensor split them, so FLUX.1-dev fits chips smaller than its 24 GB), and each batch
            of `options.batch_size` (case, seed) pairs is split over the batch axes. The mesh may span
            several processes: every process runs every batch, prepares (prompts, references, noise)
            only the rows its devices hold, and writes only the rows it owns, so each image is written
            once. Text encoders and the autoencoder run on each process's own devices.
  """

  def __init__(self, cfg: FluxConfig, params, lora, encoders, options: SampleOptions, mesh=None,
               param_rules=parallel.sharding.DEFAULT_PARAM_RULES,
               logical_rules=parallel.sharding.DEFAULT_LOGICAL_RULES, source: dict | None = None):
    self.encoders, self.options = encoders, options
    self.source = source or {}  # where the model came from (recorded in run.json)
    self.cfg = dataclasses.replace(cfg, logical_rules=parallel.hashable_rules(logical_rules))
    self.size_multiple = 2 * encoders.autoencoder.downsample_factor
    _check_encoders(cfg, encoders)
    self.use_ref_cache, self.cache_dropped_for_attention = _ref_cache(cfg, options)
    self.mesh = mesh if mesh is not None else parallel.make_mesh({"data": -1})
    self.batch_sharding = parallel.batch_sharding(self.mesh, logical_rules)
    self.held_rows, self.owned_rows = _rows(self.batch_sharding, self.mesh, options.batch_size)
    place = functools.partial(parallel.place, mesh=self.mesh, param_rules=param_rules, logical_rules=logical_rules)
    self.params, self.lora = place(params), (None if lora is None else place(lora))
    self._relay = _StepRelay()

  def check(self, cases: Sequence[Case]) -> None:
    validate_request(cases, self.options, self.size_multiple)

  def encode_references(self, paths: Sequence[str]) -> np.ndarray | None:
    """Packed reference tokens [R, M, C] (posterior mean), or None without references."""
    if not paths:
      return None
    images = np.stack([load_reference(p, self.options.ref_size) for p in paths])
    cfg = self.encoders.autoencoder.config
    return np.asarray(_encode_references(self.encoders.autoencoder, images, float(cfg.scaling_factor),
                                         float(cfg.shift_factor)))

  def latent_geometry(self) -> tuple[int, int, int]:
    """(latent height, latent width, reference token grid side) of the options' sizes."""
    opts = self.options
    latent_h, latent_w = opts.height // (self.size_multiple // 2), opts.width // (self.size_multiple // 2)
    return latent_h, latent_w, opts.ref_size // self.size_multiple

  def sample_batch(self, items: Sequence[tuple[Case, int]], on_step: Callable[[int], None] | None = None,
                   attention: dict | None = None) -> dict[int, np.ndarray]:
    """One batch of exactly batch_size (case, seed) pairs, every case with the same reference count.
    Every process calls it with the same items. Returns {row: uint8 image [H, W, 3]} for the rows this
    process holds. With options.save_attention and references, `attention` (a dict) receives
    {row: a_r(j) [R, N] float32} for the same rows. `on_step(step)` is called after each step."""
    b = self.options.batch_size
    if len(items) != b or len({len(case.image_paths) for case, _ in items}) != 1:
      raise ValueError(f"sample_batch: expected {b} items with one reference count, got {len(items)}.")
    inputs = self._inputs([items[r] for r in self.held_rows])
    record = self.options.save_attention and inputs.refs is not None
    self._relay.listener = on_step
    try:
      with jax.set_mesh(self.mesh):
        sigmas = parallel.on_mesh(flow_sigmas(self.options.steps, inputs.target_ids.shape[0]))
        denoised = denoise(self.params, self.lora, self.cfg, inputs, sigmas, use_ref_cache=self.use_ref_cache,
                           record_attention=record, on_step=self._relay if on_step is not None else None)
    finally:
      self._relay.listener = None
    if record and attention is not None:
      attention.update(_local_rows(denoised.attention, b))
    rows = _local_rows(denoised.tokens, b)  # this process's rows, decoded on its own devices
    order = sorted(rows)
    latent_h, latent_w, _ = self.latent_geometry()
    decoded = np.asarray(images.decode_tokens(self.encoders.autoencoder, np.stack([rows[r] for r in order]),
                                              latent_h, latent_w))
    return dict(zip(order, decoded))

  def _inputs(self, local: Sequence[tuple[Case, int]]) -> FluxInputs:
    """The loop's inputs of a batch, global arrays over the mesh from the rows this process holds."""
    b = self.options.batch_size
    latent_h, latent_w, ref_grid = self.latent_geometry()
    t5_states, pooled = self.encoders.encode_captions([case.prompt for case, _ in local], batch_size=len(local))
    noise = np.stack([_initial_noise(seed, latent_h, latent_w, self.encoders.autoencoder.latent_channels)
                      for _, seed in local])
    refs = [self.encode_references(case.image_paths) for case, _ in local]
    refs = None if refs[0] is None else np.stack(refs)
    to_global = lambda x: jax.make_array_from_process_local_data(
        self.batch_sharding, np.asarray(x), (b,) + np.shape(x)[1:])
    with jax.set_mesh(self.mesh):
      return FluxInputs(
          target=to_global(noise), target_ids=parallel.on_mesh(image_ids(latent_h // 2, latent_w // 2)),
          text=to_global(t5_states), text_ids=parallel.on_mesh(text_ids(t5_states.shape[1])),
          pooled=to_global(pooled), timestep=None, guidance=parallel.on_mesh(np.float32(self.options.guidance)),
          refs=None if refs is None else to_global(refs),
          ref_ids=None if refs is None else parallel.on_mesh(reference_ids(refs.shape[1], ref_grid, ref_grid)))

  def batches(self, cases: Sequence[Case]) -> list[list[tuple[Case, int] | None]]:
    """Every (case, seed) pair once, in batches of batch_size with one reference count each; a short
    last batch of a group is padded with None (rows sampled as copies and never written)."""
    groups: dict[int, list[tuple[Case, int]]] = {}
    for case in cases:
      for seed in self.options.seeds:
        groups.setdefault(len(case.image_paths), []).append((case, seed))
    b = self.options.batch_size
    out = []
    for items in groups.values():
      for start in range(0, len(items), b):
        chunk = items[start:start + b]
        out.append(chunk + [None] * (b - len(chunk)))
    return out

  def _run_batch(self, batch, on_step=None, attention=None):
    real = [item for item in batch if item is not None]
    padded = real + [real[-1]] * (len(batch) - len(real))
    images = self.sample_batch(padded, on_step, attention)
    return {r: (batch[r], image) for r, image in images.items() if batch[r] is not None}

  def sample_owned(self, cases: Sequence[Case], on_step: Callable[[int], None] | None = None,
                   attention: dict | None = None):
    """Yields ((case, seed), uint8 image) for every pair this process owns, in batches over the mesh;
    every process must iterate it to the end (each batch is a collective). With options.save_attention,
    `attention` (a dict) receives each yielded pair's a_r(j) [R, N] under (case.index, seed) first
    (pairs without references have none)."""
    for batch in self.batches(cases):
      maps = {}
      results = self._run_batch(batch, on_step, maps)
      for r in self.owned_rows:
        if r in results:
          if attention is not None and r in maps:
            (case, seed), _ = results[r]
            attention[(case.index, seed)] = maps[r]
          yield results[r]

  def generate(self, case: Case, seeds: Sequence[int] | None = None,
               on_step: Callable[[int], None] | None = None) -> np.ndarray:
    """uint8 images [len(seeds), H, W, 3] of one case (one process; several processes use sample_driver.write_run)."""
    if jax.process_count() > 1:
      raise RuntimeError("Sampler.generate returns every image to one process; with several processes "
                         "use sample_driver.write_run, where each process writes its own share.")
    seeds = list(self.options.seeds if seeds is None else seeds)
    validate_request([case], dataclasses.replace(self.options, seeds=tuple(seeds)), self.size_multiple)
    sampler = self if tuple(seeds) == self.options.seeds else _with_options(
        self, dataclasses.replace(self.options, seeds=tuple(seeds)))
    out = {}
    for batch in sampler.batches([case]):
      for (_, seed), image in sampler._run_batch(batch, on_step).values():
        out[seed] = image
    return np.stack([out[s] for s in seeds])


def _check_encoders(cfg: FluxConfig, encoders) -> None:
  """The transformer takes what the autoencoder and the text encoders give."""
  ae = encoders.autoencoder
  if cfg.in_channels != 4 * ae.latent_channels:
    raise SampleInputError(f"the transformer takes {cfg.in_channels} channels per token, but the "
                           f"autoencoder gives {ae.latent_channels} latent channels (x4 after packing).")
  widths = (
      ("T5 width", cfg.joint_attention_dim, getattr(encoders.t5_config, "d_model", None)),
      ("CLIP pooled width", cfg.pooled_projection_dim, getattr(encoders.clip_config, "hidden_size", None)))
  for what, ours, theirs in widths:
    if theirs is not None and ours != theirs:
      raise SampleInputError(f"the transformer expects {what} {ours}, the text encoder gives {theirs}.")


def _ref_cache(cfg: FluxConfig, options: SampleOptions) -> tuple[bool, bool]:
  """(whether to use the reference KV cache, whether it was dropped to record the attention)."""
  use = cfg.independent_refs if options.ref_cache is None else bool(options.ref_cache)
  # Recording the attention needs the references at every step: such a run goes without the cache.
  if use and options.save_attention:
    logging.warning("save_attention: the reference KV cache's steps run without the references' queries, so "
                    "this run samples without the cache to record their attention at every step.")
    return False, True
  if use and not cfg.independent_refs:
    logging.warning(
        "Reference KV cache on a model without independent_refs: references are computed once, at the "
        "first step, although in this model they attend to the (changing) target. The result is an "
        "approximation of full sampling; turn the cache off for exact results.")
  return use, False


def _rows(batch_sharding, mesh, batch: int) -> tuple[list[int], list[int]]:
  """(rows of a batch whose inputs this process's devices hold: it prepares them, the rows it owns:
  the lowest process holding a row writes it)."""
  try:
    batch_sharding.shard_shape((batch,))
  except ValueError as error:
    raise SampleInputError(
        f"batch_size={batch} does not split over the batch axes {batch_sharding.spec} of "
        f"the mesh {dict(mesh.shape)}: use a multiple of their size (or another --mesh).") from error
  held = sorted({r for index in batch_sharding.addressable_devices_indices_map((batch,)).values()
                 for r in range(batch)[index[0]]})
  if held != list(range(held[0], held[-1] + 1)):
    raise SampleInputError(f"mesh {dict(mesh.shape)}: this process holds batch rows {held}, not one "
                           "contiguous block; order the devices by process.")
  owner = {}
  for device, index in batch_sharding.devices_indices_map((batch,)).items():
    for r in range(batch)[index[0]]:
      owner[r] = min(owner.get(r, device.process_index), device.process_index)
  return held, [r for r in held if owner[r] == jax.process_index()]


def _local_rows(array, batch: int) -> dict[int, np.ndarray]:
  """{row: host copy} of the batch rows of a [B, ...] array that this process's devices hold."""
  rows = {}
  for shard in array.addressable_shards:
    for offset, r in enumerate(range(batch)[shard.index[0]]):
      rows.setdefault(r, np.asarray(shard.data[offset]))
  return rows


def _with_options(sampler: Sampler, options: SampleOptions) -> Sampler:
  """The same loaded sampler with other options (the placed weights and the step relay are shared)."""
  other = object.__new__(Sampler)
  other.__dict__.update(sampler.__dict__, options=options)
  return other
