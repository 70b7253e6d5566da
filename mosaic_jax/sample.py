"""The flow-matching sampler of MOSAIC (DESIGN section 3 "Sampling"), with a reference KV cache.

Two layers:

- The jittable core, for anyone who already has embeddings and latents (the trainer logs samples
  with it): `flow_sigmas` (the shifted schedule, from schedule.py) and `denoise` (the whole Euler loop
  in one jit).
- The sampler of cases (prompt + reference image paths) -> uint8 images, used by launch/sample.py
  (through sample_driver.py, which writes the files) and by evaluation: `validate_request` checks
  every input before anything is loaded or compiled, `load_reference` does the official reference
  preprocessing, `Sampler` holds the loaded models and the mesh and samples cases in batches.

Reference KV cache: with `use_ref_cache`, the first step runs the full model and keeps every block's
reference keys and values; the remaining steps run only text and target tokens against them. That is
exact when `cfg.independent_refs` (references attend only to themselves, so their keys and values do
not depend on the step) and an approximation otherwise (references then see the noisy target).

Attention heatmaps (`SampleOptions.save_attention`): each reference's attention over the target,
a_r(j) = mean over r's tokens of A(i, j) with A the losses' statistic (model/attention_stats.py: per
double block the softmax over target keys, averaged over heads and double blocks), recorded at every
denoising step (at that step's noisy target) and averaged over all of them; each reference's map sums
to 1 over the target tokens. The cached steps run without reference queries, so a run that records
the attention samples without the reference KV cache (run.json says so).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import re
from typing import Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mosaic_jax import images, parallel
from mosaic_jax.model import config as model_config
from mosaic_jax.model.attention_stats import Correspondences
from mosaic_jax.model.latents import pack_latents, to_model_latents
from mosaic_jax.model.config import FluxConfig
from mosaic_jax.model.embeddings import image_ids, reference_ids, text_ids
from mosaic_jax.model.transformer import FluxInputs, forward
from mosaic_jax.schedule import flow_shift_mu, flow_sigmas  # noqa: F401  # this module's names too

# Official sampling defaults (DESIGN section 3).
DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 3.5
DEFAULT_SIZE = 512
REFERENCE_FILL = 0.9
# The official recipe trains with up to 6 references; more are allowed only when asked for.
DEFAULT_MAX_REFS = 6


class SampleInputError(ValueError):
  """Bad sampling input (a path, a size, a count); the message names the value and what was expected."""


# ---- the jittable core -----------------------------------------------------------------------------

# Progress of the jitted loop reaches the host through one fixed debug callback (a callable passed
# into the jit would be a new static argument, hence a recompile, on every call).
_step_listeners: list[Callable[[int], None]] = []


def _report_step(step) -> None:
  for listener in list(_step_listeners):
    listener(int(step))


@contextlib.contextmanager
def step_listener(fn: Callable[[int], None]) -> Iterator[None]:
  """Within the block, `fn(step)` is called on the host after each denoising step of a `denoise`
  traced with `report_steps=True` (steps may arrive out of order on some backends)."""
  _step_listeners.append(fn)
  try:
    yield
  finally:
    _step_listeners.remove(fn)


@functools.partial(jax.jit, static_argnames=("cfg", "use_ref_cache", "report_steps", "record_attention"))
def denoise(params, lora, cfg: FluxConfig, noise_tokens, text, text_ids, pooled, target_ids, sigmas,
            guidance, refs=None, ref_ids=None, use_ref_cache: bool = False,
            report_steps: bool = False, record_attention: bool = False):
  """Runs the Euler flow-matching loop from noise to clean latent tokens; one compile per shape.

  params, lora: the transformer (interop.load_flux_transformer) and MOSAIC LoRA pytree (or None).
  cfg:          its FluxConfig (static).
  noise_tokens: [B, N, C] initial noise, packed latent tokens (model.pack_latents of N(0, 1) latents).
  text:         [B, S, joint_attention_dim] T5 states;  text_ids: [S, 3] (model.text_ids).
  pooled:       [B, pooled_projection_dim] CLIP pooled;  target_ids: [N, 3] (model.image_ids).
  sigmas:       [steps + 1] from flow_sigmas(steps, N); traced, so schedules of one length share a compile.
  guidance:     scalar or [B]: the guidance of text and target (3.5); references always get 1.0 and t=0.
  refs:         [B, R, M, C] clean reference latent tokens, or None;  ref_ids: [R, M, 3]
                (model.reference_ids).
  use_ref_cache: compute the references' keys and values at the first step only (module docstring).
  report_steps: call the host listeners of `step_listener` after each step.
  record_attention: also return each reference's attention over the target, a_r(j) [B, R, N] float32
                (the losses' statistic, module docstring), averaged over every step; not with the cache.

  Returns the final latent tokens [B, N, C] in float32 (unpack_latents + the VAE decode them), and
  with record_attention the attention as well. The latents stay float32 between steps whatever the
  parameter dtype.
  """
  batch, num_tokens, channels = noise_tokens.shape
  if sigmas.ndim != 1 or sigmas.shape[0] < 2:
    raise ValueError(f"denoise: sigmas must have shape [steps + 1] with steps >= 1, got {sigmas.shape}.")
  if channels != cfg.in_channels or target_ids.shape != (num_tokens, 3):
    raise ValueError(f"denoise: noise_tokens {noise_tokens.shape} / target_ids {target_ids.shape} do not "
                     f"fit the model (expected [B, N, {cfg.in_channels}] and [N, 3]).")
  has_refs = refs is not None and refs.shape[1] > 0
  if has_refs and (ref_ids is None or refs.shape[0] != batch or ref_ids.shape != refs.shape[1:3] + (3,)):
    raise ValueError(f"denoise: refs {refs.shape} need ref_ids [R, M, 3] "
                     f"(got {None if ref_ids is None else ref_ids.shape}) and batch {batch}.")
  num_steps = sigmas.shape[0] - 1
  sigmas = sigmas.astype(jnp.float32)
  guidance = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (batch,))

  def inputs_at(x, step, with_refs):
    return FluxInputs(
        target=x, target_ids=target_ids, text=text, text_ids=text_ids, pooled=pooled,
        timestep=jnp.broadcast_to(sigmas[step], (batch,)), guidance=guidance,
        refs=refs if with_refs else None, ref_ids=ref_ids if with_refs else None)

  def euler(x, step, velocity):
    if report_steps:
      jax.debug.callback(_report_step, step)
    return x + (sigmas[step + 1] - sigmas[step]) * velocity.astype(jnp.float32)

  x = noise_tokens.astype(jnp.float32)
  if record_attention:
    if has_refs and use_ref_cache:
      raise ValueError("denoise: record_attention needs every step to run the references (the cached steps "
                       "have no reference queries); turn use_ref_cache off.")
    num_refs = refs.shape[1] if has_refs else 0
    # One padding pair per row: the statistics' reference attention is what is kept, pairs are unused.
    no_pairs = Correspondences(*(jnp.zeros((batch, 1), jnp.int32),) * 3, jnp.zeros((batch, 1), bool))

    def recorded_step(step, carry):
      x, total = carry
      velocity, aux = forward(params, lora, cfg, inputs_at(x, step, has_refs), correspondences=no_pairs)
      if has_refs:
        total = total + aux["attention_statistics"].reference_attention.astype(jnp.float32)
      return euler(x, step, velocity), total

    x, total = jax.lax.fori_loop(0, num_steps, recorded_step,
                                 (x, jnp.zeros((batch, num_refs, num_tokens), jnp.float32)))
    return x, total / num_steps

  if has_refs and use_ref_cache:
    # Step 0 runs the full model (so it equals the uncached step) and keeps the references' keys/values.
    velocity, aux = forward(params, lora, cfg, inputs_at(x, 0, True), return_ref_kv=True)
    cache = aux["ref_kv"]
    x = euler(x, 0, velocity)

    def cached_step(step, x):
      velocity, _ = forward(params, lora, cfg, inputs_at(x, step, False), ref_kv=cache)
      return euler(x, step, velocity)

    return jax.lax.fori_loop(1, num_steps, cached_step, x)

  def full_step(step, x):
    velocity, _ = forward(params, lora, cfg, inputs_at(x, step, has_refs))
    return euler(x, step, velocity)

  return jax.lax.fori_loop(0, num_steps, full_step, x)


# ---- inputs: cases, options, references ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
  """One prompt and its reference images (the official cases file: {"index", "prompt", "image_paths"})."""
  index: str
  prompt: str
  image_paths: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class SampleOptions:
  """What to sample. ref_cache: True, False, or None for "when exact" (cfg.independent_refs)."""
  height: int = DEFAULT_SIZE
  width: int = DEFAULT_SIZE
  ref_size: int = DEFAULT_SIZE
  steps: int = DEFAULT_STEPS
  guidance: float = DEFAULT_GUIDANCE
  seeds: tuple[int, ...] = (0,)
  batch_size: int = 1
  ref_cache: Optional[bool] = None
  max_refs: int = DEFAULT_MAX_REFS
  save_attention: bool = False


def validate_request(cases: Sequence[Case], options: SampleOptions, size_multiple: int = 16) -> None:
  """Every check that needs no model: raised before anything is loaded or compiled.

  size_multiple: pixels per packed latent token (16 for FLUX: VAE downsample 8, then 2x2 packing).
  """
  if not cases:
    raise SampleInputError("no cases to sample: the prompt list is empty (give --prompt or a cases file "
                           "with at least one entry).")
  for name in ("height", "width", "ref_size"):
    value = getattr(options, name)
    if not isinstance(value, int) or value <= 0 or value % size_multiple:
      raise SampleInputError(f"{name}={value!r}: expected a positive multiple of {size_multiple} pixels "
                             f"(the VAE downsamples by {size_multiple // 2}, then 2x2 patches are packed).")
  if options.steps < 1:
    raise SampleInputError(f"steps={options.steps!r}: expected at least 1.")
  if options.batch_size < 1:
    raise SampleInputError(f"batch_size={options.batch_size!r}: expected at least 1.")
  if not options.seeds:
    raise SampleInputError("seeds: expected at least one seed.")
  if len(set(options.seeds)) != len(options.seeds):
    raise SampleInputError(f"seeds={list(options.seeds)}: repeated seeds would give identical images.")
  indices = [c.index for c in cases]
  duplicated = sorted({i for i in indices if indices.count(i) > 1})
  if duplicated:
    raise SampleInputError(f"case indices {duplicated} repeat; each case needs its own index (file names).")
  for case in cases:
    if len(case.image_paths) > options.max_refs:
      raise SampleInputError(
          f"case {case.index}: {len(case.image_paths)} references, but the model supports at most "
          f"{options.max_refs} (MOSAIC trains with up to {DEFAULT_MAX_REFS}; raise max_refs to try more).")
    for path in case.image_paths:
      _read_rgb(path, f"case {case.index}")


def _read_rgb(path: str, what: str):
  from mosaic_jax.data.image_ops import ImageDecodeError, decode_rgb
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise SampleInputError(f"{what}: reference image {path}: cannot read it ({e.strerror or e}).") from e
  try:
    return decode_rgb(data, path)
  except ImageDecodeError as e:
    raise SampleInputError(f"{what}: reference image {path}: not a readable image ({e}).") from e


def load_reference(path: str, size: int) -> np.ndarray:
  """A reference image as the official sampler prepares it: RGB with transparency on white, cropped to
  its non-white box, Lanczos-scaled by f = 0.9 * size / long side (each side int(side * f)), centred on
  a white square.
  Returns float32 [size, size, 3] in [-1, 1]. A missing or unreadable file is an error naming it."""
  from mosaic_jax.data.image_ops import pad_to_square_on_white
  image = _read_rgb(path, "load_reference")
  square, _ = pad_to_square_on_white(image, size, REFERENCE_FILL)
  return np.asarray(square, np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


def resolve_lora_file(path: str) -> str:
  """A LoRA file, or the LoRA inside a training workdir (the trainer writes `lora/<step>/lora.safetensors`
  and `lora_ema.safetensors`): the highest step number in the path, the EMA at equal steps, then the
  newest file."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return path
  if not os.path.isdir(path):
    raise SampleInputError(f"LoRA {path}: no such file or folder (expected a diffusers-format LoRA "
                           ".safetensors file or a training workdir holding one).")
  found = [os.path.join(d, f) for d, _, files in os.walk(path) for f in files if f.endswith(".safetensors")]
  if not found:
    raise SampleInputError(f"LoRA {path}: the folder holds no .safetensors LoRA file.")

  def preference(file):
    steps = [int(n) for n in re.findall(r"\d+", os.path.relpath(file, path))]
    return (max(steps, default=-1), "ema" in os.path.basename(file).lower(), os.path.getmtime(file))

  return max(found, key=preference)


# ---- the sampler: models in, images out -----------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("scaling_factor", "shift_factor"))
def _encode_references(autoencoder, images, scaling_factor: float, shift_factor: float):
  """Images [R, S, S, 3] -> packed reference tokens [R, M, C] from the posterior mean."""
  return pack_latents(to_model_latents(autoencoder.encode(images).mean, scaling_factor, shift_factor))


def _initial_noise(seed: int, latent_height: int, latent_width: int, channels: int) -> np.ndarray:
  """N(0, 1) latents of one seed, packed to tokens [N, 4C]; independent of how seeds are batched."""
  z = jax.random.normal(jax.random.key(seed), (1, latent_height, latent_width, channels), jnp.float32)
  return np.asarray(pack_latents(z))[0]


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
    ae = encoders.autoencoder
    self.size_multiple = 2 * ae.downsample_factor
    if cfg.in_channels != 4 * ae.latent_channels:
      raise SampleInputError(f"the transformer takes {cfg.in_channels} channels per token, but the "
                             f"autoencoder gives {ae.latent_channels} latent channels (x4 after packing).")
    widths = (
        ("T5 width", cfg.joint_attention_dim, getattr(encoders.t5_config, "d_model", None)),
        ("CLIP pooled width", cfg.pooled_projection_dim, getattr(encoders.clip_config, "hidden_size", None)))
    for what, ours, theirs in widths:
      if theirs is not None and ours != theirs:
        raise SampleInputError(f"the transformer expects {what} {ours}, the text encoder gives {theirs}.")
    self.use_ref_cache = cfg.independent_refs if options.ref_cache is None else bool(options.ref_cache)
    # Recording the attention needs the references at every step: such a run goes without the cache.
    self.cache_dropped_for_attention = self.use_ref_cache and options.save_attention
    if self.cache_dropped_for_attention:
      logging.warning("save_attention: the reference KV cache's steps run without the references' queries, so "
                      "this run samples without the cache to record their attention at every step.")
      self.use_ref_cache = False
    if self.use_ref_cache and not cfg.independent_refs:
      logging.warning(
          "Reference KV cache on a model without independent_refs: references are computed once, at the "
          "first step, although in this model they attend to the (changing) target. The result is an "
          "approximation of full sampling; turn the cache off for exact results.")
    self.mesh = mesh if mesh is not None else parallel.make_mesh({"data": -1})
    self.batch_sharding = parallel.batch_sharding(self.mesh, logical_rules)
    try:
      self.batch_sharding.shard_shape((options.batch_size,))
    except ValueError as error:
      raise SampleInputError(
          f"batch_size={options.batch_size} does not split over the batch axes {self.batch_sharding.spec} of "
          f"the mesh {dict(self.mesh.shape)}: use a multiple of their size (or another --mesh).") from error
    place = functools.partial(parallel.place, mesh=self.mesh, param_rules=param_rules, logical_rules=logical_rules)
    self.params, self.lora = place(params), (None if lora is None else place(lora))
    # Rows of a batch whose inputs this process's devices hold (it prepares them), and the rows it owns
    # (the lowest process holding a row writes it).
    b = options.batch_size
    held = sorted({r for index in self.batch_sharding.addressable_devices_indices_map((b,)).values()
                   for r in range(b)[index[0]]})
    if held != list(range(held[0], held[-1] + 1)):
      raise SampleInputError(f"mesh {dict(self.mesh.shape)}: this process holds batch rows {held}, not one "
                             "contiguous block; order the devices by process.")
    self.held_rows = held
    owner = {}
    for device, index in self.batch_sharding.devices_indices_map((b,)).items():
      for r in range(b)[index[0]]:
        owner[r] = min(owner.get(r, device.process_index), device.process_index)
    self.owned_rows = [r for r in held if owner[r] == jax.process_index()]

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
                   report_steps: bool = False, attention: dict | None = None) -> dict[int, np.ndarray]:
    """One batch of exactly batch_size (case, seed) pairs, every case with the same reference count.
    Every process calls it with the same items. Returns {row: uint8 image [H, W, 3]} for the rows this
    process holds. With options.save_attention and references, `attention` (a dict) receives
    {row: a_r(j) [R, N] float32} for the same rows (module docstring)."""
    opts, b = self.options, self.options.batch_size
    if len(items) != b or len({len(case.image_paths) for case, _ in items}) != 1:
      raise ValueError(f"sample_batch: expected {b} items with one reference count, got {len(items)}.")
    latent_h, latent_w, ref_grid = self.latent_geometry()
    grid_h, grid_w = latent_h // 2, latent_w // 2
    local = [items[r] for r in self.held_rows]
    t5_states, pooled = self.encoders.encode_captions([case.prompt for case, _ in local], batch_size=len(local))
    noise = np.stack([_initial_noise(seed, latent_h, latent_w, self.encoders.autoencoder.latent_channels)
                      for _, seed in local])
    refs = [self.encode_references(case.image_paths) for case, _ in local]
    refs = None if refs[0] is None else np.stack(refs)
    to_global = lambda x: jax.make_array_from_process_local_data(
        self.batch_sharding, np.asarray(x), (b,) + np.shape(x)[1:])
    record = opts.save_attention and refs is not None
    with jax.set_mesh(self.mesh), step_listener(on_step) if on_step else contextlib.nullcontext():
      tokens = denoise(
          self.params, self.lora, self.cfg, to_global(noise), to_global(t5_states),
          parallel.on_mesh(text_ids(t5_states.shape[1])), to_global(pooled), parallel.on_mesh(image_ids(grid_h, grid_w)),
          parallel.on_mesh(flow_sigmas(opts.steps, grid_h * grid_w)), parallel.on_mesh(np.float32(opts.guidance)),
          None if refs is None else to_global(refs),
          None if refs is None else parallel.on_mesh(reference_ids(refs.shape[1], ref_grid, ref_grid)),
          use_ref_cache=self.use_ref_cache, report_steps=report_steps, record_attention=record)
    if record:
      tokens, maps = tokens
      if attention is not None:
        attention.update(_local_rows(maps, b))
    rows = _local_rows(tokens, b)  # this process's rows, decoded on its own devices
    order = sorted(rows)
    decoded = np.asarray(images.decode_tokens(self.encoders.autoencoder, np.stack([rows[r] for r in order]),
                                        latent_h, latent_w))
    return dict(zip(order, decoded))

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

  def _run_batch(self, batch, on_step=None, report_steps=False, attention=None):
    real = [item for item in batch if item is not None]
    padded = real + [real[-1]] * (len(batch) - len(real))
    images = self.sample_batch(padded, on_step, report_steps, attention)
    return {r: (batch[r], image) for r, image in images.items() if batch[r] is not None}

  def sample_owned(self, cases: Sequence[Case], on_step: Callable[[int], None] | None = None,
                   attention: dict | None = None):
    """Yields ((case, seed), uint8 image) for every pair this process owns, in batches over the mesh;
    every process must iterate it to the end (each batch is a collective). With options.save_attention,
    `attention` (a dict) receives each yielded pair's a_r(j) [R, N] under (case.index, seed) first
    (pairs without references have none)."""
    for batch in self.batches(cases):
      maps = {}
      results = self._run_batch(batch, on_step, on_step is not None, maps)
      for r in self.owned_rows:
        if r in results:
          if attention is not None and r in maps:
            (case, seed), _ = results[r]
            attention[(case.index, seed)] = maps[r]
          yield results[r]

  def generate(self, case: Case, seeds: Sequence[int] | None = None,
               on_step: Callable[[int], None] | None = None) -> np.ndarray:
    """uint8 images [len(seeds), H, W, 3] of one case (one process; several processes use `run`)."""
    if jax.process_count() > 1:
      raise RuntimeError("Sampler.generate returns every image to one process; with several processes "
                         "use sample_driver.write_run, where each process writes its own share.")
    seeds = list(self.options.seeds if seeds is None else seeds)
    validate_request([case], dataclasses.replace(self.options, seeds=tuple(seeds)), self.size_multiple)
    sampler = self if tuple(seeds) == self.options.seeds else _with_options(
        self, dataclasses.replace(self.options, seeds=tuple(seeds)))
    out = {}
    for batch in sampler.batches([case]):
      for (_, seed), image in sampler._run_batch(batch, on_step, on_step is not None).values():
        out[seed] = image
    return np.stack([out[s] for s in seeds])

def _local_rows(array, batch: int) -> dict[int, np.ndarray]:
  """{row: host copy} of the batch rows of a [B, ...] array that this process's devices hold."""
  rows = {}
  for shard in array.addressable_shards:
    for offset, r in enumerate(range(batch)[shard.index[0]]):
      rows.setdefault(r, np.asarray(shard.data[offset]))
  return rows


def _with_options(sampler: Sampler, options: SampleOptions) -> Sampler:
  """The same loaded sampler with other options (the placed weights are shared, not copied)."""
  other = object.__new__(Sampler)
  other.__dict__.update(sampler.__dict__, options=options)
  return other


def load_sampler(checkpoint: str, lora: str | None, options: SampleOptions, dtype=jnp.bfloat16,
                 independent_refs: bool = False, t5_max_length: int = 512,
                 text_dtype=jnp.bfloat16, attention_impl: str = "xla", mesh_shape=None) -> Sampler:
  """Reads a FLUX checkpoint root (transformer/, vae/, text_encoder(_2)/, tokenizer(_2)/) and a LoRA file
  or training workdir. Nothing is compiled here: a LoRA that does not fit fails first.

  independent_refs: the LoRA was trained with independent_refs (then the reference KV cache is exact).
  attention_impl: "xla", "cudnn" (NVIDIA, bf16; it never holds the [queries, keys] logits, which is what
  makes the cache pay off) or "splash" (TPU).
  mesh_shape: {"data", "fsdp", "tensor"} sizes (one may be -1); default every device on data. Each
  transformer tensor goes straight from the file to its shards, never whole onto one device."""
  from mosaic_jax.encoders import load_flux_encoders
  from mosaic_jax.interop import load_flux_transformer, load_lora, lora_trained_independent_refs
  if not os.path.isdir(checkpoint):
    raise SampleInputError(f"checkpoint {checkpoint}: no such folder (expected a FLUX checkpoint root with "
                           "transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/).")
  try:
    mesh = parallel.make_mesh(dict(mesh_shape or {"data": -1}))
  except ValueError as error:
    raise SampleInputError(f"--mesh: {error}") from error

  def place(name, array):
    sharding = parallel.sharding_for(name.replace(".", "/"), array.shape, mesh)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

  cfg, params = load_flux_transformer(checkpoint, dtype=dtype, place=place)
  lora_file = resolve_lora_file(lora) if lora else None
  if lora_file and not independent_refs:  # the LoRA file says how it was trained (files we exported)
    independent_refs = bool(lora_trained_independent_refs(lora_file))
  cfg = model_config.with_overrides(cfg, {"independent_refs": independent_refs, "attention_impl": attention_impl})
  lora_tree = load_lora(lora_file, cfg, dtype=dtype) if lora_file else None
  encoders = load_flux_encoders(checkpoint, t5_dtype=text_dtype, clip_dtype=text_dtype,
                                t5_max_length=t5_max_length)
  return Sampler(cfg, params, lora_tree, encoders, options, mesh=mesh,
                 source={"checkpoint": os.fspath(checkpoint), "lora": lora_file, "independent_refs": independent_refs})


def load_trained_sampler(path: str, options: SampleOptions, step: int | None = None, ema: bool = True,
                         attention_impl: str | None = None, mesh_shape=None) -> Sampler:
  """A sampler for the model of a training workdir or one of its step folders (train/trained_model.py):
  the demo, flux_random and the recipe alike."""
  from mosaic_jax.train.trained_model import load_trained
  try:
    mesh = parallel.make_mesh(dict(mesh_shape or {"data": -1}))
  except ValueError as error:
    raise SampleInputError(f"--mesh: {error}") from error
  trained = load_trained(path, step=step, ema=ema, mesh=mesh)
  cfg = model_config.with_overrides(trained.cfg, {"attention_impl": attention_impl})  # None: the run's
  return Sampler(cfg, trained.params, trained.lora, trained.encoders, options, mesh=mesh,
                 logical_rules=cfg.logical_rules, source=trained.source)
