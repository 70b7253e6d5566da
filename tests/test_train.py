"""The trainer end to end on a tiny config and a tiny synthetic dataset (64 px, 2 references):
checkpoints, LoRA exports, logs, automatic resumption, SIGTERM + resume reproducing the uninterrupted
losses, and the configuration errors that must come before any compilation."""

from __future__ import annotations

import glob
import os
import signal
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))

import flux_ms  # noqa: E402
from mosaic_jax.train import ConfigError, train_and_evaluate  # noqa: E402
from mosaic_jax.train import trainer  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """The runs below compile one identical step: share it through the persistent cache."""
  previous = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  yield
  jax.config.update("jax_compilation_cache_dir", previous[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def tiny_config(data_dir, **changes):
  config = flux_ms.get_config("demo")
  config.dataset.data_dir = data_dir
  config.dataset.name = "semalign_ms/synthetic_test64"
  config.dataset.build.update(image_size=64, min_refs=2, max_refs=2, num_train=16, num_validation=4)
  config.dataset.max_pairs = 16
  config.dataset.read_threads = 1
  config.resolution = config.ref_resolution = 64
  config.batch_size = 2
  config.lora_rank = 4
  config.model_overrides.update(num_layers=1, num_single_layers=1, num_attention_heads=2)
  config.total_steps = 4
  config.checkpoint_every = 2
  config.log_every = 1
  config.sample_every = 0
  config.eval_examples = 0
  config.losses.mdl_ramp_start, config.losses.mdl_ramp_end = 1, 3  # every term in play by step 3
  for key, value in changes.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


@pytest.fixture(scope="module")
def first_run(data_dir, tmp_path_factory):
  """4 uninterrupted steps, with the final evaluation and sample panel."""
  workdir = str(tmp_path_factory.mktemp("run"))
  result = train_and_evaluate(tiny_config(data_dir, eval_examples=2, sample_steps=2), workdir)
  return workdir, result


def test_run_writes_checkpoints_lora_exports_logs_and_evaluation(first_run):
  workdir, result = first_run
  assert result["status"] == "done" and result["step"] == 4
  assert sorted(result["losses"]) == [1, 2, 3, 4]
  assert all(np.isfinite(v) for v in result["losses"].values())
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  for step in ("2", "4"):
    for name in ("lora.safetensors", "lora_ema.safetensors"):
      assert os.path.getsize(os.path.join(workdir, "lora", step, name)) > 0
  assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert os.path.exists(os.path.join(workdir, "samples", "final.png"))
  table = result["eval"]
  assert 0.0 <= table["correspondence_accuracy"] <= 1.0 and 0.0 < table["chance"] < 1.0
  assert table["pairs"] > 0 and 0.0 <= table["mean_pairwise_jsd"] <= np.log(2) + 1e-6


def _scalars(folder: str) -> dict[str, list[float]]:
  """Scalars of tensorboardX event files (TFRecord framing: length, crc, Event proto, crc)."""
  from tensorboardX.proto import event_pb2
  out: dict[str, list[float]] = {}
  for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
    data = open(path, "rb").read()
    offset = 0
    while offset < len(data):
      length = int.from_bytes(data[offset:offset + 8], "little")
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        if value.HasField("simple_value"):
          out.setdefault(value.tag, []).append(value.simple_value)
  return out


def test_tensorboard_holds_every_loss_term_and_throughput(first_run):
  scalars = _scalars(os.path.join(first_run[0], "tensorboard"))
  tags = set(scalars)
  expected = {"loss", "loss_mse", "loss_scal", "loss_mdl", "weight_scal", "weight_mdl", "learning_rate",
              "grad_norm", "mean_t", "step_time_s", "examples_per_s", "tflops_per_device"}
  assert expected <= tags, expected - tags
  # The k-th update uses w(k - 1) (steps count from 0, as in the official code): ramp 1 -> 3.
  assert scalars["weight_mdl"] == pytest.approx([0.0, 0.0, 0.5, 1.0])


def test_sigterm_then_resume_reproduces_the_uninterrupted_losses(first_run, data_dir, tmp_path):
  _, uninterrupted = first_run
  workdir = str(tmp_path / "interrupted")

  def preempt_after_step_2(step, metrics):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  stopped = train_and_evaluate(tiny_config(data_dir, checkpoint_every=100), workdir, on_step=preempt_after_step_2)
  assert stopped["status"] == "preempted" and stopped["step"] in (2, 3)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(stopped["step"])]
  resumed = train_and_evaluate(tiny_config(data_dir, checkpoint_every=100), workdir)
  assert resumed["status"] == "done" and min(resumed["losses"]) == stopped["step"] + 1
  losses = {**stopped["losses"], **resumed["losses"]}
  np.testing.assert_allclose([losses[s] for s in (1, 2, 3, 4)],
                             [uninterrupted["losses"][s] for s in (1, 2, 3, 4)], rtol=1e-6)


def test_rerun_with_more_steps_resumes_from_the_latest_checkpoint(first_run, data_dir):
  workdir, _ = first_run
  more = train_and_evaluate(tiny_config(data_dir, total_steps=5), workdir)
  assert more["status"] == "done" and sorted(more["losses"]) == [5]
  assert "5" in os.listdir(os.path.join(workdir, "checkpoints"))


@pytest.fixture
def no_compilation(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("compiled before reporting the bad input")
  monkeypatch.setattr(trainer, "compile_steps", fail)


def test_missing_checkpoint_path_is_one_clear_error(data_dir, tmp_path, no_compilation):
  config = flux_ms.get_config("default")
  config.dataset.data_dir = data_dir
  with pytest.raises(ConfigError, match=r"--config\.checkpoint="):
    train_and_evaluate(config, str(tmp_path))
  config.checkpoint = str(tmp_path / "no_such_flux")
  with pytest.raises(ConfigError, match=r"does not exist: pass --config\.checkpoint="):
    train_and_evaluate(config, str(tmp_path))
  config.checkpoint = str(tmp_path)
  config.dataset.data_dir = ""
  with pytest.raises(ConfigError, match=r"--config\.dataset\.data_dir="):
    train_and_evaluate(config, str(tmp_path))


def test_empty_dataset_is_one_clear_error(data_dir, tmp_path, no_compilation):
  """A split with no full batch (3 examples, batch 4) trains on nothing: an error, not a hang."""
  config = tiny_config(str(tmp_path / "small_tfds"), batch_size=4)
  config.dataset.name = "semalign_ms/synthetic_three"
  config.dataset.build.update(num_train=3, num_validation=1)
  with pytest.raises(ConfigError, match=r"gives no training batch.*--config\.batch_size=4"):
    train_and_evaluate(config, str(tmp_path / "run"))


def test_unknown_config_field_is_one_clear_error(data_dir, tmp_path, no_compilation):
  config = tiny_config(data_dir)
  config.optimizer.learnig_rate = 1e-3
  with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['optimizer.learnig_rate'\]"):
    train_and_evaluate(config, str(tmp_path))
