"""What the benchmark scripts share, so that no script imports another: the timer, the recipe's step at
FLUX.1-dev scale from shapes alone, and the scaled step that is compared with the official PyTorch step.

A script imports it as `import common` (its own folder is first on sys.path when run as `python
benchmarks/NAME.py`). Nothing here imports jax at import time: scripts set JAX_PLATFORMS and XLA_FLAGS
(fake CPU devices, thread counts) before jax starts, so every jax import is inside a function.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def best_time(fn, *args, repeats: int = 5) -> float:
  """Seconds of the fastest of `repeats` calls of fn(*args), after one warm-up (compile) call."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


# ---- the recipe at FLUX.1-dev scale, from shapes (train_memory.py, compile_phases.py) ---------------

FLUX_TEXT_SHAPES = ((512, 4096), (768,))  # T5-XXL states (the recipe's text_len 512), pooled CLIP-L


def flux_vae():
  """FLUX's VAE geometry (/8, 16 channels) with no weights: all the settings of a step compiled from
  shapes need of it."""
  from mosaic_jax.model.autoencoder import Autoencoder  # pylint: disable=import-outside-toplevel
  from mosaic_jax.model.vae import VaeConfig  # pylint: disable=import-outside-toplevel
  return Autoencoder("vae", VaeConfig(), {})


def flux_transformer(remat: str, attention: str, layers: tuple[int, int] | None = None,
                     attention_chunk: int | None = None):
  """FLUX.1-dev's transformer config with the recipe's choices: `remat` policy, `attention` impl,
  optionally `layers` (double, single) blocks instead of 19, 38 and another xla `attention_chunk`."""
  from mosaic_jax import model  # pylint: disable=import-outside-toplevel
  cfg = dataclasses.replace(model.config.flux1_dev(), remat_policy=remat, attention_impl=attention)
  if attention_chunk is not None:
    cfg = dataclasses.replace(cfg, attention_chunk=attention_chunk)
  if layers:
    cfg = dataclasses.replace(cfg, num_layers=layers[0], num_single_layers=layers[1])
  return cfg


def compile_recipe_step(config, cfg, mesh, reference_counts, autoencoder, text_shapes) -> dict:
  """{R: the train step of `config` for transformer `cfg` on `mesh`}, compiled from shapes alone, as the
  trainer compiles it (train/compilation.py); `autoencoder` gives only the latent geometry, and no file
  the config names is read. A checkout from before the settings package (a --baseline of
  official_compare.py) compiles it with its own trainer.compile_from_shapes, which made the settings."""
  try:
    from mosaic_jax.settings import settings_from_config  # pylint: disable=import-outside-toplevel
    from mosaic_jax.train.compilation import compile_from_shapes  # pylint: disable=import-outside-toplevel
  except ImportError:
    from mosaic_jax.train import trainer  # pylint: disable=import-outside-toplevel
    return trainer.compile_from_shapes(config, cfg, mesh, reference_counts, autoencoder, text_shapes)
  settings = settings_from_config(config, autoencoder, check_files=False)
  return compile_from_shapes(settings, cfg, mesh, reference_counts, text_shapes)


def flux_recipe(mesh_sizes: str, batch: int, devices=None):
  """(the recipe's config, its mesh over `devices` (None: jax's)): mesh_sizes "data,fsdp,tensor" (-1:
  the remaining devices), batch 0 for one example per device."""
  from mosaic_jax import parallel  # pylint: disable=import-outside-toplevel
  from mosaic_jax.configs import flux_ms  # pylint: disable=import-outside-toplevel
  config = flux_ms.get_config("default")
  config.mesh.update(dict(zip(("data", "fsdp", "tensor"), (int(s) for s in mesh_sizes.split(",")))))
  mesh = parallel.make_mesh(config.mesh.to_dict(), devices)
  config.batch_size = batch or mesh.size
  return config, mesh


# ---- the step compared with the official PyTorch step (official_compare.py, profile_step.py) --------

# The comparison's shapes, in ../shared/bench/official_step.py's keys (its BENCH_CFG).
COMPARISON_SHAPES = dict(hidden_heads=8, head_dim=64, double=2, single=4, txt=64, tgt_hw=16, ref_hw=16, R=3, rank=64)
PAIRS_PER_REF = 40
TEXT_WIDTH, POOLED_WIDTH = 256, 128
LORA_PARAMS = 4_100_096  # both sides must train exactly this many


def _recipe_config(code: str):
  """The recipe config of checkout `code`, read from its configs/flux_ms.py as `--config` reads it (a
  baseline checkout may predate the config's move into the package)."""
  spec = importlib.util.spec_from_file_location("flux_ms", os.path.join(code, "configs", "flux_ms.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("default")


def comparison_step(remat: str | None = None, code: str = ROOT):
  """(compiled step, state, base, batch, lora parameter count, model config) of the trainer's step on
  COMPARISON_SHAPES, with the recipe config of checkout `code` (whose mosaic_jax this process imports:
  the installed one, or a baseline's that official_compare.py puts on PYTHONPATH)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from mosaic_jax import model, parallel  # pylint: disable=import-outside-toplevel
  # mosaic_jax.train's name, which a baseline from before the settings package has too
  from mosaic_jax.train import settings_from_config  # pylint: disable=import-outside-toplevel
  from mosaic_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel

  c = COMPARISON_SHAPES
  config = _recipe_config(code)  # the recipe: remat policy, optimizer, EMA, loss weights
  config.dtype = "float32"
  config.lora_rank = c["rank"]
  config.batch_size = 1
  config.mesh.update(dict(data=1, fsdp=1, tensor=1))
  vae = flux_vae()  # FLUX's latent geometry: 16 px per token, 64 channels
  token_px = 2 * vae.downsample_factor
  config.resolution, config.ref_resolution = c["tgt_hw"] * token_px, c["ref_hw"] * token_px
  config.dataset.max_pairs = PAIRS_PER_REF * c["R"]
  config.text_len = c["txt"]
  # The official step weighs MDL 1.0 from the first step; the recipe ramps it in from step 10,000.
  config.losses.mdl_ramp_start = config.losses.mdl_ramp_end = 0
  if remat is not None:
    config.remat_policy = remat
  head_dim = c["head_dim"]
  cfg = dataclasses.replace(
      model.config.flux1_dev(), num_layers=c["double"], num_single_layers=c["single"], attention_head_dim=head_dim,
      num_attention_heads=c["hidden_heads"], joint_attention_dim=TEXT_WIDTH, pooled_projection_dim=POOLED_WIDTH,
      axes_dims_rope=(8, (head_dim - 8) // 2, (head_dim - 8) // 2))
  mesh = parallel.make_mesh(config.mesh.to_dict(), jax.devices()[:1])
  text_shapes = ((c["txt"], TEXT_WIDTH), (POOLED_WIDTH,))
  step = lambda policy: compile_recipe_step(config, dataclasses.replace(cfg, remat_policy=policy), mesh, [c["R"]], vae,
                                            text_shapes)[c["R"]]
  compiled = None
  if config.remat_policy == "auto":  # the trainer's choice on this machine (on the CPU: the first candidate)
    from mosaic_jax.train import remat_choice  # pylint: disable=import-outside-toplevel
    config.remat_policy, compiled, _ = remat_choice.choose(step, jax.devices()[0])
  cfg = dataclasses.replace(cfg, remat_policy=config.remat_policy)
  compiled = compiled if compiled is not None else step(config.remat_policy)

  # Real values with the shapes the step was compiled for, placed as the executable expects.
  settings = settings_from_config(config, vae, check_files=False)  # the trainer's own
  base = model.init_params(jax.random.key(0), cfg, jnp.float32)
  lora = model.init_lora(jax.random.key(1), base, cfg, c["rank"])
  state = step_lib.init_state({"lora": lora}, step_lib.make_optimizer(settings.optimizer, settings.total_steps))
  shardings = compiled.input_shardings[0]
  state, base = jax.device_put((state, base), (shardings[0], shardings[1]))
  rng = np.random.default_rng(0)
  latent = lambda *s: rng.standard_normal(s).astype(np.float32)
  h, hr, ch = 2 * c["tgt_hw"], 2 * c["ref_hw"], vae.latent_channels
  n_t, n_r = c["tgt_hw"] ** 2, c["ref_hw"] ** 2
  pair_ref = np.repeat(np.arange(c["R"]), PAIRS_PER_REF)[None].astype(np.int32)
  pair_ref_token = np.concatenate([rng.choice(n_r, PAIRS_PER_REF, replace=False) for _ in range(c["R"])])
  batch = {"target_mean": latent(1, h, h, ch), "target_std": np.zeros((1, h, h, ch), np.float32),
           "ref_means": latent(1, c["R"], hr, hr, ch), "t5": latent(1, c["txt"], TEXT_WIDTH),
           "pooled": latent(1, POOLED_WIDTH), "pair_ref": pair_ref,
           "pair_ref_token": pair_ref_token[None].astype(np.int32),
           "pair_target_token": rng.integers(0, n_t, (1, pair_ref.shape[1])).astype(np.int32),
           "pair_valid": np.ones(pair_ref.shape, bool), "drop_refs": np.zeros((1,), bool)}
  batch = jax.device_put(batch, shardings[2])
  lora_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(lora))
  return compiled, state, base, batch, lora_params, cfg
