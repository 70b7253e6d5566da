"""Step FLOP count, MFU, tensorboardX scalars/images, and the one-line console log.

The FLOP count is analytic ("model FLOPs": what the math needs, rematerialization not counted), from
the shapes of one step. Per sample, with S text, N target and R references of M tokens, hidden D,
MLP width F, L double + L' single blocks, head_dim h, LoRA rank r:

  every token, every block:  linear 2 (4 D^2 + 2 D F)      (q, k, v, out; MLP up and down)
  reference tokens add LoRA: 2 r (in + out) per adapted module (6 per block, plus x_embedder)
  attention per block:       4 D [(S + N)(S + N + R M) + R M (S + N + M)]     (QK^T and PV; the
                             masked ref_i x ref_j blocks are never computed, so not counted)
  SCAL/MDL statistics:       2 D R M N per double block (logits against target keys)
  embedders / output:        2 C D (N + R M) + 2 D_text D S + 2 D C N

  step = 3 x forward when the base is trained (forward, activation and weight gradients),
         2 x base forward + 3 x LoRA forward when only the LoRA is (no base weight gradient),
  and 4 x the statistics' forward (3 x, plus their recomputation in the backward pass).
MFU = step FLOPs / (step time x devices x peak FLOP/s per device).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np

# Dense bf16 peak FLOP/s per device (vendor figures), for MFU when config.peak_tflops_per_device is 0.
# Matched in order as substrings of jax's device_kind: v5e reports "TPU v5 lite" and v6e "TPU v6 lite",
# v5p plain "TPU v5", so that entry comes after the lite one.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0,
               "TPU v5e": 197.0, "TPU v4": 275.0, "TPU v6": 918.0, "TPU v5": 459.0}


def peak_tflops(device_kind: str, configured: float = 0.0) -> float | None:
  if configured:
    return float(configured)
  for name, value in PEAK_TFLOPS.items():
    if name.lower() in device_kind.lower():
      return value
  return None


@dataclasses.dataclass(frozen=True)
class StepShape:
  batch: int
  text_tokens: int
  target_tokens: int
  num_refs: int
  ref_tokens: int


def forward_flops(cfg, shape: StepShape, lora_rank: int = 0) -> tuple[float, float, float]:
  """(forward FLOPs excluding LoRA and statistics, LoRA FLOPs, statistics FLOPs) for the whole batch."""
  d, f, c = cfg.hidden_size, cfg.mlp_hidden_size, cfg.in_channels
  s, n, r, m = shape.text_tokens, shape.target_tokens, shape.num_refs, shape.ref_tokens
  blocks = cfg.num_layers + cfg.num_single_layers
  rm = r * m
  per_token_block = 2 * (4 * d * d + 2 * d * f)
  linear = blocks * per_token_block * (s + n + rm)
  attention = blocks * 4 * d * ((s + n) * (s + n + rm) + rm * (s + n + m))
  embed = 2 * c * d * (n + rm) + 2 * cfg.joint_attention_dim * d * s + 2 * d * c * n
  # LoRA modules (in, out) per block kind; single proj_out reads concat[attn, mlp].
  double_lora = [(d, 6 * d), (d, d), (d, d), (d, d), (d, d), (f, d)]
  single_lora = [(d, 3 * d), (d, f), (d + f, d), (d, d), (d, d), (d, d)]
  lora = 0.0
  if lora_rank:
    lora = rm * 2 * lora_rank * (cfg.num_layers * sum(i + o for i, o in double_lora)
                                 + cfg.num_single_layers * sum(i + o for i, o in single_lora) + c + d)
  stats = cfg.num_layers * 2 * d * rm * n
  return shape.batch * float(linear + attention + embed), shape.batch * float(lora), shape.batch * float(stats)


def train_step_flops(cfg, shape: StepShape, lora_rank: int, trains_base: bool) -> float:
  base, lora, stats = forward_flops(cfg, shape, lora_rank)
  if trains_base:
    return 3 * (base + lora) + 4 * stats
  return 2 * base + 3 * lora + 4 * stats


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch whenever it is
  installed (only to accept torch tensors; we log numpy), which cost 1-4 s at every start of a run.
  torch is kept out of that one import only, and stays importable afterwards."""
  if "torch" in sys.modules:  # already paid for
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    del sys.modules["torch"]
  return SummaryWriter


def console_line(step: int, total_steps: int, values: dict, step_time: float) -> str:
  """maxtext's step line (step, loss, step time, TFLOP/s per device, MFU), then progress and MOSAIC's
  loss terms. MFU needs the device's peak (config.peak_tflops_per_device, or a known device kind)."""
  get = lambda name: float(values.get(name, 0.0))
  mfu = f"{100 * get('mfu'):.2f}%" if "mfu" in values else "n/a (peak unknown)"
  terms = ", ".join(f"{k.removeprefix('loss_')} {get(k):.4f}" for k in ("loss_mse", "loss_scal", "loss_mdl")
                    if k in values)
  return (f"step {step}/{total_steps} ({100 * step / total_steps:.0f}%), loss: {get('loss'):.4f}, "
          f"seconds: {step_time:.3f}, TFLOP/s/device: {get('tflops_per_device'):.3f}, MFU: {mfu}, "
          f"terms: {terms} (w_mdl {get('weight_mdl'):.2f}), grad norm: {get('grad_norm'):.3f}, "
          f"mean t: {get('mean_t'):.2f}")


class Logger:
  """tensorboardX scalars and images (process 0) and the console line with progress and ETA."""

  def __init__(self, workdir: str, total_steps: int, enabled: bool = True):
    """enabled: whether this process writes (process 0 of a multi-process job; the others stay silent)."""
    self.total_steps = total_steps
    self.enabled = enabled
    self.writer = None
    if enabled:
      self.writer = _summary_writer_class()(os.path.join(workdir, "tensorboard"))
    self.first_step = self.started = None  # the first console line's step and time: the ETA's origin

  def scalars(self, step: int, values: dict) -> None:
    if self.writer is not None:
      for name, value in values.items():
        self.writer.add_scalar(name, float(value), step)
      self.writer.flush()

  def image(self, step: int, name: str, image_hwc: np.ndarray) -> None:
    if self.writer is not None:
      self.writer.add_image(name, image_hwc, step, dataformats="HWC")
      self.writer.flush()

  def console(self, step: int, values: dict, step_time: float) -> None:
    if not self.enabled:
      return
    if self.first_step is None:
      self.first_step, self.started = step, time.perf_counter()
    # The ETA from the average step time since the first logged step (compilation excluded): a window
    # of recent steps swings with every checkpoint and sample.
    done = step - self.first_step
    average = (time.perf_counter() - self.started) / done if done else step_time
    remaining = max(self.total_steps - step, 0) * average
    eta = time.strftime("%H:%M:%S", time.gmtime(remaining))
    print(console_line(step, self.total_steps, values, step_time) + f", eta: {eta}", flush=True)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
