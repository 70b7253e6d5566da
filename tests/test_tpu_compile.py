"""The train step compiled by the real TPU compiler for a TPU slice, on this CPU machine (libtpu's
compile-only devices): the first check that the Pallas splash kernel lowers for a TPU (elsewhere it
only runs in interpret mode). Same path as benchmarks/train_memory.py --topology."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import re

import jax
import jax.numpy as jnp
import pytest

from mosaic_jax import model, parallel
from mosaic_jax.configs import flux_ms
from mosaic_jax.model.autoencoder import Autoencoder
from mosaic_jax.model.vae import VaeConfig
from mosaic_jax.settings import settings_from_config
from mosaic_jax.settings import ConfigError
from mosaic_jax.train import compilation, metrics, remat_choice, tpu_compile

SLICE = "v5e-4"
_spec = importlib.util.spec_from_file_location(
    "hlo_costs", os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "hlo_costs.py"))
hlo_costs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hlo_costs)  # benchmarks/hlo_costs.py: the compiled HLO read back


def test_peak_flops_follow_the_device_kinds_jax_reports_for_tpus():
  # v5p reports "TPU v5", v5e "TPU v5 lite", v6e "TPU v6 lite" (the compile-only devices of each slice).
  assert [metrics.peak_tflops(kind) for kind in ("TPU v5", "TPU v5 lite", "TPU v6 lite")] == [459.0, 197.0, 918.0]


def _tiny_recipe():
  config = flux_ms.get_config("default")  # the recipe (LoRA, bf16 base) at a tiny size
  config.lora_rank, config.batch_size = 16, 4
  # Splash needs 128-token multiples: 128 text tokens, 256 px -> 16x16 = 256 target and reference tokens.
  config.text_len, config.resolution, config.ref_resolution = 128, 256, 256
  return config


def _tiny_transformer(remat: str):
  # Unrolled blocks so that the compiler's FLOP count covers every block (it counts a scan body once).
  return dataclasses.replace(model.config.tiny(), in_channels=64, attention_impl="splash", remat_policy=remat,
                             unroll_layers=True)


@functools.cache
def _tiny_recipe_step(remat: str):
  """The tiny recipe's step for one reference under policy `remat`, compiled for SLICE (once a module)."""
  devices = tpu_compile.slice_devices(SLICE)
  mesh = parallel.make_mesh(dict(data=1, fsdp=-1, tensor=1), devices)
  config, cfg = _tiny_recipe(), _tiny_transformer(remat)
  text_shapes = ((config.text_len, cfg.joint_attention_dim), (cfg.pooled_projection_dim,))
  settings = settings_from_config(config, Autoencoder("vae", VaeConfig(), {}), check_files=False)
  return compilation.compile_from_shapes(settings, cfg, mesh, [1], text_shapes)[1]


@pytest.mark.skipif(tpu_compile.libtpu_missing() is not None,
                    reason=f"compiles for a TPU slice: {tpu_compile.libtpu_missing()}")
def test_tiny_train_step_with_splash_compiles_for_a_tpu_slice():
  devices = tpu_compile.slice_devices(SLICE)
  assert len(devices) == tpu_compile.SLICES[SLICE].chips and devices[0].platform == "tpu"
  compiled = _tiny_recipe_step("full")
  config, cfg = _tiny_recipe(), _tiny_transformer("full")

  hlo = compiled.as_text()
  # The Pallas kernels compiled by Mosaic for the TPU (not the interpret-mode loop of plain HLO ops):
  # splash's forward and both backward kernels, for the main and the reference groups, in each of the 4
  # blocks, and the attention statistics' forward and backward kernels in each of the 2 double blocks.
  assert hlo.count('custom_call_target="tpu_custom_call"') >= 3 * 2 * 4 + 2 * 2
  assert hlo.count("mosaic_statistics_fwd") >= 2 and hlo.count("mosaic_statistics_bwd") >= 2

  report = tpu_compile.report(compiled)
  # Every chip holds at least its share of the frozen base.
  base_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(
      jax.eval_shape(lambda k: model.init_params(k, cfg, jnp.dtype(config.dtype)), jax.random.key(0))))
  assert base_bytes / len(devices) <= report.argument_bytes
  assert 0 < report.temp_bytes and report.total_bytes < 1 << 30
  # XLA's count misses the Pallas kernels (custom calls count nothing), so it falls short of the analytic
  # step here, where attention is a large share; the rest (projections, MLPs, LoRA, and the remat forward)
  # is counted. hlo_costs reads the same matmuls from the HLO, and adds the kernels' from their shapes:
  # then the step recomputes its forward pass ("full"), so it does more than the analytic FLOPs.
  analytic = metrics.train_step_flops(cfg, metrics.StepShape(4, 128, 256, 1, 256), 16, trains_base=False)
  assert 0.3 * analytic <= report.flops * len(devices) < analytic
  parsed = hlo_costs.Hlo(hlo)
  matmuls = sum(parsed.dot_flops(comp, i) for comp, instrs in parsed.computations.items() for i in instrs)
  # the cost analysis also counts elementwise FLOPs: a fifth here, at head_dim 16 (0.5% at FLUX.1-dev's size)
  assert 0.7 * report.flops <= matmuls <= report.flops
  estimate = hlo_costs.estimate(parsed, 1.0, 1.0)
  assert estimate.kernel_flops > 0 and analytic < estimate.flops * len(devices) < 2 * analytic
  # The time estimate is no faster than the chip's peak on the FLOPs it counts (this tiny step is bound
  # by memory and overheads, not by the matrix units), and far below a second.
  peak = metrics.peak_tflops(devices[0].device_kind) * 1e12
  assert report.flops / peak <= report.optimal_seconds < 1.0

  # "offload_kept" keeps what "recompute_mlp" keeps (projections, attention outputs, the kernels' softmax
  # statistics) in host memory: what it keeps moves to and from pinned host memory, and its backward
  # pass reruns fewer matmuls and fewer splash forward kernels than "full" (which reruns one per group
  # and block; seen: offload_kept reruns the reference group's, recompute_mlp none).
  kept = _tiny_recipe_step("offload_kept")
  forward_kernels = lambda executable: len(re.findall(r"^\s*(?:ROOT )?%splash_mha_fwd\S* = ", executable.as_text(),
                                                      re.MULTILINE))
  assert 2 * 4 <= forward_kernels(kept) < forward_kernels(compiled)
  assert tpu_compile.report(kept).flops < report.flops
  assert hlo_costs.host_transfers(hlo_costs.Hlo(kept.as_text())) > 0


@pytest.mark.skipif(tpu_compile.libtpu_missing() is not None,
                    reason=f"compiles for a TPU slice: {tpu_compile.libtpu_missing()}")
def test_remat_auto_keeps_the_fastest_by_the_estimate_and_drops_what_does_not_fit(capsys):
  """remat_policy "auto" on a TPU: each candidate's memory and the executable's own time estimate, the
  fastest of those that fit (exhaustive) whatever their order, the chosen executable handed back; with
  the device's memory set between two candidates' needs, the larger is dropped; the trainer's search
  stops at the first that fits; none fitting is one ConfigError naming each candidate."""
  device = tpu_compile.slice_devices(SLICE)[0]
  pair = ("full", "keep_all")
  chosen, executable, candidates = remat_choice.choose(_tiny_recipe_step, device, candidates=pair, exhaustive=True)
  seconds = {c.policy: c.seconds for c in candidates}
  assert all(s > 0 for s in seconds.values()) and seconds["full"] != seconds["keep_all"]
  assert chosen == min(seconds, key=seconds.get) and executable is _tiny_recipe_step(chosen)
  assert remat_choice.choose(_tiny_recipe_step, device, candidates=pair[::-1], exhaustive=True)[0] == chosen
  log = capsys.readouterr().out
  for policy in pair:
    assert re.search(rf"remat_policy auto: {policy}: [0-9.]+ GiB per device, fits .* estimated [0-9.]+ s", log), log
  assert re.search(rf"remat_policy auto: chose {chosen}, the fastest that fits by the estimate; [0-9.]+ s spent "
                   "compiling the others", log), log

  sizes = {c.policy: c.total_bytes for c in candidates}
  larger, smaller = sorted(pair, key=sizes.get, reverse=True)  # at this size "full" may hold more than keep_all
  between = int((sizes[larger] + sizes[smaller]) / 2 / (1 - remat_choice.HEADROOM))
  chosen, _, candidates = remat_choice.choose(_tiny_recipe_step, device, candidates=(larger, smaller),
                                              capacity_bytes=between, exhaustive=True)
  assert chosen == smaller and [(c.policy, c.fits) for c in candidates] == [(larger, False), (smaller, True)]
  first = remat_choice.choose(_tiny_recipe_step, device, candidates=(larger, smaller))
  assert first[0] == larger and [c.policy for c in first[2]] == [larger]
  assert f"(not compiled: {smaller})" in capsys.readouterr().out
  with pytest.raises(ConfigError, match=r"no remat policy fits .*: full [0-9.]+ GiB; keep_all [0-9.]+ GiB\. Use"):
    remat_choice.choose(_tiny_recipe_step, device, candidates=pair, capacity_bytes=sizes[smaller] // 2)
