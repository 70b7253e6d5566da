"""MOSAIC on FLUX: `get_config(arg)` variants, selected as `--config configs/flux_ms.py:ARG`
(that file re-exports this module; `from mosaic_jax.configs import flux_ms` imports it).

Variants (combine with commas, e.g. `demo,independent_refs`):
  default           the MOSAIC recipe (docs/method.md, 'Recipe'): FLUX.1-dev, LoRA rank 512 on reference
                    tokens, 512 px target and references, up to 6 references, AdamW 8e-5, EMA 0.99,
                    SCAL 0.1, MDL ramp 10k -> 11k, bf16 base, on `semalign_ms/subjects200k_multi`
                    (2 to 6 released Subjects200K pairs composed per example: docs/data.md). Needs
                    `--config.checkpoint` (a FLUX checkpoint root: transformer/, vae/, text_encoder*/,
                    tokenizer*/) and `--config.dataset.data_dir` where that set was built
                    (`python launch/build_dataset.py --config subjects200k_multi --manual_dir
                    RELEASED_DIR --data_dir DIR`).
  synthetic         the recipe on the synthetic multi-subject set `semalign_ms/synthetic` instead
                    (`python launch/build_dataset.py --config synthetic --data_dir DIR`).
  demo              a tiny DiT trained from scratch (base + reference LoRA) on the synthetic dataset
                    (built on first use) at 32 px, 4 px per token, with the exact pixel autoencoder
                    (patch 2) and tiny random text encoders: needs no downloaded file; 1500 steps,
                    about 9 minutes on 2 CPU cores.
  demo_diffusion    demo with the diffusion loss only (SCAL and MDL weights 0).
  demo_scal         demo with diffusion + SCAL (MDL weight 0).
  flux_random       the recipe's exact shapes (FLUX.1-dev transformer, LoRA rank 512, FLUX's VAE
                    geometry, 512 px, 1 to 6 references) with random weights and tiny random text
                    encoders of FLUX's widths, on a small synthetic set built on first use: a check
                    that a machine runs the recipe (memory, speed, checkpoints) before any weights
                    are downloaded. 20 steps, one checkpoint, no evaluation; what it learns means
                    nothing. benchmarks/accelerator_check.sh runs it on a lent GPU.
  independent_refs  references attend to themselves only, which makes their keys and values
                    cacheable across sampling steps (`sampling.denoise(..., use_ref_cache=True)`).

Any field can be overridden on the command line, e.g. `--config.checkpoint=/ckpt/FLUX.1-dev`.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from mosaic_jax.model import config as model_config
from mosaic_jax.parallel.sharding import DEFAULT_LOGICAL_RULES, DEFAULT_PARAM_RULES

VARIANTS = ("default", "synthetic", "demo", "demo_diffusion", "demo_scal", "flux_random", "independent_refs")


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
  variants = [v for v in (arg or "default").split(",") if v]
  for variant in variants:
    if variant not in VARIANTS:
      raise ValueError(f"configs/flux_ms.py: unknown variant {variant!r}; use one of {VARIANTS}.")
  config = ml_collections.ConfigDict()
  for section in (_model, _sequence, _trained, _data, _optimization, _parallelism, _reporting):
    section(config)
  for variant in variants:
    if variant == "synthetic":
      config.dataset.name = "semalign_ms/synthetic"
    if variant.startswith("demo"):
      _demo(config)
    if variant == "demo_diffusion":
      config.losses.scal_weight = 0.0
      config.losses.mdl_weight = 0.0
    if variant == "demo_scal":
      config.losses.mdl_weight = 0.0
    if variant == "flux_random":
      _flux_random(config)
    if variant == "independent_refs":
      config.model_overrides.independent_refs = True
  return config


def _model(config: ml_collections.ConfigDict) -> None:
  # The transformer: a preset from mosaic_jax.model.config (random weights) unless `checkpoint` names
  # a FLUX checkpoint root (training also reads its vae/, text encoders and tokenizers), a diffusers
  # transformer folder or a BFL single .safetensors file (forward.py).
  config.model = "flux1_dev"
  # FluxConfig fields replacing the preset's (or the checkpoint's): each one unset (None) until a variant
  # or `--config.model_overrides.FIELD=VALUE` sets it, e.g. `--config.model_overrides.attention_impl=cudnn`.
  config.model_overrides = ml_collections.ConfigDict(
      {name: config_dict.placeholder(kind) for name, kind in model_config.field_types().items()})
  config.checkpoint = ""
  config.lora = ""  # a diffusers-format MOSAIC LoRA file: used by forward.py, and to start training from
  config.dtype = "bfloat16"  # the frozen base and the compute; the LoRA stays float32
  config.seed = 0
  # "checkpoint": the FLUX VAE, T5 and CLIP of `checkpoint`; "demo": the exact pixel autoencoder
  # (2 x pixel_patch_size px per token; 8 matches FLUX's 16) and tiny random T5/CLIP with a byte tokenizer;
  # "random": FLUX's VAE geometry with random weights and those tiny text encoders (flux_random).
  config.encoders = "checkpoint"
  config.pixel_patch_size = 8


def _sequence(config: ml_collections.ConfigDict) -> None:
  # The packed sequence (docs/method.md, 'Sequence'), sizes in pixels: multiples of one token (2x2 latent pixels:
  # 16 px with FLUX's VAE, 2 x pixel_patch_size with the demo's pixel autoencoder).
  config.batch_size = 1  # global batch (the official code: 1 per device)
  config.resolution = 512
  config.ref_resolution = 512
  config.num_refs = 2  # forward.py only; training takes R from the data (1 to 6)
  config.text_len = 512
  config.guidance = 3.5  # sampling; training uses 1.0 on every branch


def _trained(config: ml_collections.ConfigDict) -> None:
  # What is trained. "lora": the MOSAIC recipe (base frozen in `dtype`, never in the optimizer).
  # "base+lora" and "base": the base is trained too (float32): only for the demo's tiny random DiT.
  config.trainable = "lora"
  config.lora_rank = 512


def _data(config: ml_collections.ConfigDict) -> None:
  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "semalign_ms/subjects200k_multi"  # composed from the released pairs: docs/data.md
  config.dataset.data_dir = ""
  config.dataset.train_split = "train"
  config.dataset.eval_split = "validation"
  config.dataset.max_pairs = 2048
  config.dataset.read_threads = 2
  config.dataset.worker_processes = 0
  # A directory of precomputed encoder features (launch/encode_dataset.py with this config): training
  # reads it instead of running the VAE, T5 and CLIP every step, and does not load the text encoders.
  config.dataset.cached_features = ""
  # A dataset name that semalign_ms does not register is a synthetic config with these settings, built on
  # first use when it is missing (0 train examples: never build).
  config.dataset.build = ml_collections.ConfigDict(dict(
      image_size=512, min_refs=1, max_refs=6, num_train=0, num_validation=0, seed=0))


def _optimization(config: ml_collections.ConfigDict) -> None:
  # Official defaults.
  config.total_steps = 20_000
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=8e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, grad_clip_norm=1.0,
      schedule="constant", warmup_steps=0))  # schedule: constant | cosine (to 0 at total_steps)
  config.ema_decay = 0.99
  config.losses = ml_collections.ConfigDict(dict(
      scal_weight=0.1, mdl_weight=1.0, mdl_ramp_start=10_000, mdl_ramp_end=11_000))
  # What each block keeps for its backward pass: a policy of model/remat.py (none, keep_all, recompute_mlp,
  # keep_attention, full, offload_mlp, offload_kept, ...) or "auto": the run compiles the candidates in
  # order for its own devices, mesh, batch and references and keeps the first that fits in the device's
  # memory less 10% (train/remat_choice.py), recorded in the workdir so a restart does not choose again.
  # A v5p-8 fits keep_all (est. 52% MFU at 6 references against 36.5% for "full", by
  # benchmarks/train_memory.py's per-op roofline); docs/performance.md has the table per slice. See the choice ahead of
  # time with benchmarks/train_memory.py --topology v5p-8 --remat auto.
  config.remat_policy = "auto"


def _parallelism(config: ml_collections.ConfigDict) -> None:
  # docs/method.md, 'Scale'. Fully sharded by default: the batch, the frozen base, the LoRA and its optimizer
  # state and EMA all split over every device (with data=-1 each device would hold the 22 GiB base and
  # 28 GiB of LoRA state at rank 512). The base's all-gathers cost about 24 GB of traffic per device per step.
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  config.sharding = ml_collections.ConfigDict()
  config.sharding.param_rules = tuple(DEFAULT_PARAM_RULES)
  config.sharding.logical_rules = tuple(DEFAULT_LOGICAL_RULES)
  config.peak_tflops_per_device = 0.0  # for MFU; 0: from the device kind (H100, TPU v5p, ...) if known


def _reporting(config: ml_collections.ConfigDict) -> None:
  # Checkpoints, logging, evaluation.
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  config.log_every = 50
  config.sample_every = 2000  # 0: never
  config.sample_steps = 28
  config.eval_examples = 64  # held-out examples in the final evaluation (0: skip)
  config.eval_timesteps = (0.25, 0.5, 0.75)


def _demo(config: ml_collections.ConfigDict) -> None:
  """A tiny DiT trained from scratch on 32 px synthetic scenes with 2 or 3 references (8x8 tokens).

  4 px per token (pixel autoencoder, patch 2): 48 values per token, well below the hidden size 128.
  The velocity lives in the span of proj_out, at most `hidden` of a token's values: with patch 8
  (768 values per token) the noise in the other 640 was never removed and samples stayed noise.
  """
  config.model = "tiny"
  config.model_overrides.update(dict(
      in_channels=48,  # pixel autoencoder, patch 2: 12 latent channels x 2x2 packing
      num_layers=3, num_single_layers=1, attention_head_dim=32, num_attention_heads=4,
      joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(8, 12, 12)))
  config.dtype = "float32"
  config.encoders = "demo"
  config.pixel_patch_size = 2
  config.resolution = 32  # the 128 px scenes, downscaled by the pipeline
  config.ref_resolution = 32
  config.text_len = 16
  config.batch_size = 8
  config.trainable = "base+lora"  # the tiny base is random: train it from scratch, with the LoRA
  config.remat_policy = "none"  # tiny activations: nothing to save by recomputing
  config.lora_rank = 16
  config.dataset.name = "semalign_ms/synthetic_demo128"
  config.dataset.data_dir = "~/tensorflow_datasets"
  config.dataset.max_pairs = 192
  config.dataset.build = ml_collections.ConfigDict(dict(
      image_size=128, min_refs=2, max_refs=3, num_train=2048, num_validation=64, seed=0))
  config.total_steps = 1500
  # A high peak, then a cosine decay: the run is short, and the samples want settled weights.
  config.optimizer.learning_rate = 3e-3
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 50
  # The MDL ramp, scaled from 10k -> 11k of 20k steps to the demo length.
  config.losses.mdl_ramp_start = 750
  config.losses.mdl_ramp_end = 825
  config.checkpoint_every = 500
  config.log_every = 50
  config.sample_every = 500
  config.sample_steps = 16
  config.eval_examples = 64


def _flux_random(config: ml_collections.ConfigDict) -> None:
  """The recipe's shapes and step with random weights, on a small synthetic set at 512 px."""
  config.encoders = "random"
  config.dataset.name = "semalign_ms/synthetic_flux_random"
  config.dataset.data_dir = "~/tensorflow_datasets"
  config.dataset.build = ml_collections.ConfigDict(dict(
      image_size=512, min_refs=1, max_refs=6, num_train=24, num_validation=4, seed=0))
  config.total_steps = 20
  config.losses.mdl_ramp_start = 10  # every loss term within the 20 steps
  config.losses.mdl_ramp_end = 15
  config.checkpoint_every = 20  # once, at the end: the rank-512 LoRA's train state is 30 GB
  config.keep_checkpoints = 1
  config.log_every = 5
  config.sample_every = 0
  config.eval_examples = 0
