"""Shared fixtures: one tiny random FLUX saved by diffusers, loaded once per test session."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import numpy as np
import pytest

# Tests run on the CPU with float32 matmuls at full precision.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is bound by compilation, not by running: LLVM at -O0, and the classic CPU fusion emitters
# where this XLA still has the switch (jaxlib < 0.11; an unknown flag aborts), compile about 3x faster.
# Results stay float32 with the same ops (only summation order may differ). Child processes inherit it.
_FAST_COMPILE = ["--xla_backend_optimization_level=0"]
if tuple(int(p) for p in importlib.metadata.version("jaxlib").split(".")[:2]) < (0, 11):
  _FAST_COMPILE.append("--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_FAST_COMPILE]).strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The PyTorch references the parity tests compare against (requirements-test.txt). Without them more
# than half of the suite would skip and the run would pass having checked little, so a missing one
# stops the run with one line, unless MOSAIC_SKIP_REFERENCES=1 asks for the tests that do not need them.
REFERENCES = ("torch", "diffusers", "transformers", "peft", "safetensors")


def _missing(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is None
  except ValueError:  # sys.modules[name] is None: Python's mark of a module that must not be imported
    return True


def pytest_configure(config):
  del config
  missing = [name for name in REFERENCES if _missing(name)]
  if missing and os.environ.get("MOSAIC_SKIP_REFERENCES") != "1":
    raise pytest.UsageError(
        f"the PyTorch references {', '.join(missing)} are not installed: pip install -r requirements-test.txt "
        "(or MOSAIC_SKIP_REFERENCES=1 runs only the tests that do not need them)")


TINY_FLUX = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12,
                 guidance_embeds=True, axes_dims_rope=(4, 6, 6))


@pytest.fixture(scope="session")
def torch_flux():
  """The diffusers FluxTransformer2DModel (tiny, every weight random) and the folder it was saved to."""
  torch = pytest.importorskip("torch")
  from diffusers import FluxTransformer2DModel

  from flux_torch_reference import randomize_
  model = FluxTransformer2DModel(**TINY_FLUX).eval()
  randomize_(model, torch.Generator().manual_seed(0))
  return model


@pytest.fixture(scope="session")
def flux_folder(torch_flux, tmp_path_factory):
  folder = tmp_path_factory.mktemp("flux") / "transformer"
  torch_flux.save_pretrained(folder)
  return str(folder)


@pytest.fixture(scope="session")
def flux_params(flux_folder):
  from mosaic_jax.interop import load_flux_transformer
  import jax.numpy as jnp
  return load_flux_transformer(flux_folder, dtype=jnp.float32)


@pytest.fixture(scope="session")
def batch_np():
  """Random inputs for the tiny model: batch 2, 5 text tokens, a 4x6 target grid, 3x3 reference grids."""
  rng = np.random.default_rng(0)
  return dict(
      target=rng.standard_normal((2, 24, 16), np.float32),
      text=rng.standard_normal((2, 5, 24), np.float32),
      pooled=rng.standard_normal((2, 12), np.float32),
      timestep=np.array([0.3, 0.8], np.float32),
      guidance=np.array([3.5, 1.0], np.float32),
      refs=rng.standard_normal((2, 8, 9, 16), np.float32),
      target_hw=(4, 6), ref_hw=(3, 3), text_len=5)


def relative_error(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())
