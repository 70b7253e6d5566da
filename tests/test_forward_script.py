"""launch/forward.py, the installation's smoke test, on the recipe's path: the default config (FLUX's
encoders from the checkpoint root, encoders="checkpoint") on a tiny random FLUX checkpoint root written
in the real layout, through the real command line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from flux_root_fixtures import build_flux_root  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_forward_runs_the_recipe_on_a_flux_checkpoint_root(tmp_path):
  root = tmp_path / "flux_root"
  build_flux_root(root, with_transformer=True)
  run = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "forward.py"), "--config", os.path.join(ROOT, "configs", "flux_ms.py"),
       f"--config.checkpoint={root}", "--config.resolution=32", "--config.ref_resolution=32", "--config.text_len=8",
       "--config.dtype=float32"], capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
  # The root's VAE downsamples by 8: 16 px tokens, 2x2 of them at 32 px; the root's transformer (one
  # double block, 64 channels per token) with its two references.
  assert "references: 2, prediction (1, 4, 64) float32, finite: True" in run.stdout, run.stdout
  assert "attention maps (per double block, head-averaged): (1, 1, 2, 4, 4)" in run.stdout, run.stdout
  assert "num_layers=1," in run.stdout and "attention_head_dim=16," in run.stdout
