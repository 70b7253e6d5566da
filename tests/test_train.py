"""The trainer end to end on a tiny config and a tiny synthetic dataset (64 px, 2 references):
checkpoints, LoRA exports, logs, automatic resumption, SIGTERM + resume reproducing the uninterrupted
losses, the NaN guard, multi-device meshes (in a 4-CPU-device child process), and the configuration
errors that must come before any compilation."""

from __future__ import annotations

import glob
import json
import os
import signal
import dataclasses
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from train_fixtures import compilation_cache, flux_ms, tensorboard_scalars, tiny_config  # noqa: F401
from mosaic_jax.encoders import make_encoders
from mosaic_jax.model.autoencoder import Autoencoder
from mosaic_jax.model.vae import VaeConfig
from mosaic_jax.train import ConfigError, settings_from_config, train_and_evaluate
from mosaic_jax.train import batches as batches_lib
from mosaic_jax.train import compilation
from mosaic_jax.train import evaluate as evaluate_lib
from mosaic_jax.train import metrics as metrics_lib
from mosaic_jax.train import step as step_lib


_FLUX_VAE = Autoencoder("vae", VaeConfig(), {})  # FLUX's autoencoder geometry, without weights


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def first_run(data_dir, tmp_path_factory):
  """4 uninterrupted steps, with the final evaluation and sample panel (and MFU against a 1 TFLOP/s peak).
  Tests read its workdir; a test that writes into it works on its own copy (tests run in any order)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  result = train_and_evaluate(tiny_config(data_dir, eval_examples=2, sample_steps=2, peak_tflops_per_device=1.0),
                              workdir)
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
  _check_attention_sheet(workdir)
  table = result["eval"]
  assert 0.0 <= table["correspondence_accuracy"] <= 1.0 and 0.0 < table["chance"] < 1.0
  assert table["pairs"] > 0 and 0.0 <= table["mean_pairwise_jsd"] <= np.log(2) + 1e-6


def _check_attention_sheet(workdir):
  """samples/final_attention.png: per sample (2 here) a heatmap panel (2 references framed on top; the
  sample, all heatmaps, each heatmap below; 128 px tiles) of the very samples in final.png."""
  from PIL import Image
  samples = np.asarray(Image.open(os.path.join(workdir, "samples", "final.png")))
  sheet = np.asarray(Image.open(os.path.join(workdir, "samples", "final_attention.png")))
  assert samples.shape == (2 * 128, 4 * 128, 3)  # per sample: 2 references | sample | real target
  assert sheet.shape == (2 * 2 * 128, 4 * 128, 3)
  for row in range(2):
    panel = sheet[row * 256:(row + 1) * 256]
    np.testing.assert_array_equal(panel[128:, :128], samples[row * 128:(row + 1) * 128, 256:384])
    for r in range(2):  # the reference framed above its own heatmap, which tints the sample
      np.testing.assert_array_equal(panel[8:120, (2 + r) * 128 + 8:(3 + r) * 128 - 8],
                                    samples[row * 128 + 8:row * 128 + 120, r * 128 + 8:(r + 1) * 128 - 8])
      assert np.abs(panel[128:, (2 + r) * 128:(3 + r) * 128].astype(int) - panel[128:, :128]).max() > 10


def _scalars(folder: str) -> dict[str, list[float]]:
  return {tag: [value for _, value in pairs] for tag, pairs in tensorboard_scalars(folder).items()}


def test_tensorboard_holds_every_loss_term_and_throughput(first_run):
  scalars = _scalars(os.path.join(first_run[0], "tensorboard"))
  tags = set(scalars)
  expected = {"loss", "loss_mse", "loss_scal", "loss_mdl", "weight_scal", "weight_mdl", "learning_rate",
              "grad_norm", "mean_t", "step_time_s", "examples_per_s", "tflops_per_device", "mfu"}
  assert expected <= tags, expected - tags
  # The k-th update uses w(k - 1) (steps count from 0, as in the official code): ramp 1 -> 3.
  assert scalars["weight_mdl"] == pytest.approx([0.0, 0.0, 0.5, 1.0])
  assert scalars["mfu"] == pytest.approx(scalars["tflops_per_device"])  # a 1 TFLOP/s peak


def test_console_line_has_maxtexts_fields_then_progress_and_eta(tmp_path, capsys):
  logger = metrics_lib.Logger(str(tmp_path), total_steps=10)
  values = dict(loss=1.5, loss_mse=1.25, loss_scal=2.5, loss_mdl=-0.125, weight_mdl=0.5, grad_norm=0.75,
                mean_t=0.5, tflops_per_device=2.0, mfu=0.25)
  logger.console(3, values, step_time=0.2)
  logger.console(4, {k: v for k, v in values.items() if k != "mfu"}, step_time=0.2)
  logger.close()
  first, second = capsys.readouterr().out.splitlines()
  assert first.startswith("step 3/10 (30%), loss: 1.5000, seconds: 0.200, TFLOP/s/device: 2.000, MFU: 25.00%, "
                          "terms: mse 1.2500, scal 2.5000, mdl -0.1250 (w_mdl 0.50), grad norm: 0.750"), first
  assert "MFU: n/a (peak unknown)" in second and ", eta: 00:00:" in second, second


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


def test_rerun_with_more_steps_resumes_from_the_latest_checkpoint(first_run, data_dir, tmp_path):
  """total_steps is safe to change on resume: allowed, and recorded beside the untouched config.json."""
  workdir = str(tmp_path / "run")
  shutil.copytree(first_run[0], workdir)  # the first run's workdir as it was, for this test alone
  first_config = open(os.path.join(workdir, "config.json")).read()
  more = train_and_evaluate(tiny_config(data_dir, total_steps=5), workdir)
  assert more["status"] == "done" and sorted(more["losses"]) == [5]
  assert "5" in os.listdir(os.path.join(workdir, "checkpoints"))
  assert open(os.path.join(workdir, "config.json")).read() == first_config
  history = [json.loads(line) for line in open(os.path.join(workdir, "config_history.jsonl"))]
  assert history[-1]["changed"]["total_steps"] == [4, 5] and history[-1]["config"]["total_steps"] == 5


def test_resuming_with_a_changed_model_or_optimizer_is_refused_before_anything_is_written(first_run, data_dir,
                                                                                         no_compilation):
  workdir, _ = first_run
  before = {name: open(os.path.join(workdir, name)).read() for name in ("config.json",)}
  with pytest.raises(ConfigError, match=r"cannot change \(lora_rank: 4 -> 8; optimizer\.learning_rate: "):
    train_and_evaluate(tiny_config(data_dir, lora_rank=8, **{"optimizer.learning_rate": 1e-2}), workdir)
  assert {name: open(os.path.join(workdir, name)).read() for name in before} == before


def test_a_resume_compares_model_overrides_one_by_one_and_the_sampler_follows_it(first_run, data_dir, tmp_path):
  """An override at the value in effect is no change, one of how the transformer runs may change; one of
  its architecture is refused through the command line naming that field alone (one line, status 2,
  nothing written). Sampling the workdir reads its settings after every resume: a resume that changed
  sample_steps samples with the new value (config.json keeps the first start's)."""
  import importlib.util
  from train_fixtures import train_command
  from mosaic_jax.workdir.config import resume_changes
  workdir = str(tmp_path / "run")
  shutil.copytree(first_run[0], workdir)
  first_config = open(os.path.join(workdir, "config.json")).read()
  same = dict(eval_examples=2, sample_steps=2, peak_tflops_per_device=1.0)  # first_run's
  refused = subprocess.run(train_command(data_dir, workdir, **same, **{"model_overrides.num_layers": 2,
                                                                     "model_overrides.attention_impl": "xla"}),
                           capture_output=True, text=True, timeout=300)
  errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
  assert refused.returncode == 2 and len(errors) == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
  assert "cannot change (model_overrides.num_layers: 1 -> 2): restore" in errors[0], errors[0]
  assert not os.path.exists(os.path.join(workdir, "config_history.jsonl"))

  settings = settings_from_config(tiny_config(data_dir, sample_steps=3, eval_examples=0,
                                              **{"model_overrides.attention_impl": "xla"}))
  chunked = dataclasses.replace(settings, model_overrides=tuple(sorted({**dict(settings.model_overrides),
                                                                        "attention_chunk": 8}.items())))
  assert resume_changes(chunked, workdir)["model_overrides.attention_chunk"] == [512, 8]  # allowed
  resumed = train_and_evaluate(settings, workdir)
  assert resumed["status"] == "done" and resumed["losses"] == {}
  history = [json.loads(line) for line in open(os.path.join(workdir, "config_history.jsonl"))]
  assert history[-1]["changed"] == {"eval_examples": [2, 0], "peak_tflops_per_device": [1.0, 0.0],
                                    "sample_steps": [2, 3]}
  assert open(os.path.join(workdir, "config.json")).read() == first_config

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("launch_sample", os.path.join(root, "launch", "sample.py"))
  launcher = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(launcher)
  written = launcher.main(["--checkpoint", workdir, "--prompt", "x", "--output", str(tmp_path / "out"),
                           "--no_progress"])
  run = json.load(open(os.path.join(os.path.dirname(written[0]), "run.json")))
  assert run["options"]["steps"] == 3 and run["model"]["step"] == 4


def test_remat_auto_is_chosen_once_recorded_and_an_explicit_policy_wins(data_dir, tmp_path, capsys):
  """remat_policy "auto" on the CPU: the first candidate (keep_all), nothing compiled to choose; the choice
  in config_history.jsonl with what it was made for (config.json keeps "auto"); a restart with "auto"
  takes it from there without choosing, also when it trains longer; an explicit policy on a resume wins,
  and "auto" after it chooses afresh (the TPU search itself: tests/test_tpu_compile.py)."""
  from mosaic_jax.train import remat_choice
  from mosaic_jax.workdir.config import record, resume_changes
  workdir = str(tmp_path / "run")
  history = lambda: [json.loads(line) for line in open(os.path.join(workdir, "config_history.jsonl"))]
  assert train_and_evaluate(tiny_config(data_dir, remat_policy="auto", total_steps=2), workdir)["step"] == 2
  log = capsys.readouterr().out
  assert "remat_policy auto: keep_all, the first of keep_all, recompute_mlp, keep_attention, full" in log
  assert log.count("compiled the train step") == 1  # one reference count in the data, one compile
  assert json.load(open(os.path.join(workdir, "config.json")))["remat_policy"] == "auto"
  (choice,) = history()
  assert choice["changed"] == {"remat_policy": ["auto", "keep_all"]} and choice["config"]["remat_policy"] == "keep_all"
  assert choice["choice"]["for"]["devices"] == f"{jax.device_count()} x {jax.devices()[0].device_kind}"

  assert train_and_evaluate(tiny_config(data_dir, remat_policy="auto", total_steps=3), workdir)["step"] == 3
  log = capsys.readouterr().out
  assert "remat_policy auto: keep_all, as chosen before" in log and "the first of" not in log
  assert "remat_policy='keep_all'" in log and log.count("compiled the train step") == 1
  assert history()[-1]["changed"] == {"total_steps": [2, 3]}  # no change of policy recorded

  explicit = settings_from_config(tiny_config(data_dir, remat_policy="full", total_steps=3))
  assert remat_choice.reuse(explicit, workdir) is explicit  # an explicit policy on a resume wins
  changed = resume_changes(explicit, workdir)
  assert changed == {"remat_policy": ["keep_all", "full"]}
  record(explicit, workdir, changed)  # as setup records a resume's changes
  asked = settings_from_config(tiny_config(data_dir, remat_policy="auto", total_steps=3))
  assert remat_choice.reuse(asked, workdir).remat_policy == "auto"  # the explicit policy replaced the choice


def test_flux_random_runs_the_recipe_step_with_random_weights(data_dir, tmp_path):
  """flux_random: LoRA-only on a frozen bf16 base, FLUX's VAE geometry and text widths, no checkpoint
  (shrunk here to a narrow 2-block transformer at 32 px)."""
  config = flux_ms.get_config("flux_random")
  assert (config.trainable, config.dtype, config.lora_rank, config.checkpoint) == ("lora", "bfloat16", 512, "")
  config.dataset.data_dir = data_dir
  config.dataset.name = "semalign_ms/synthetic_test_flux_random"
  config.dataset.build.update(image_size=64, min_refs=2, max_refs=2, num_train=4, num_validation=1)
  config.dataset.max_pairs = 4
  config.resolution = config.ref_resolution = 32  # 2x2 tokens through FLUX's /8 VAE
  config.text_len, config.lora_rank, config.total_steps, config.checkpoint_every = 16, 4, 3, 3
  config.losses.mdl_ramp_start, config.losses.mdl_ramp_end = 0, 1
  config.model_overrides.update(num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
                                axes_dims_rope=(8, 12, 12))
  encoders = make_encoders(settings_from_config(config))
  assert (encoders.autoencoder.kind, encoders.autoencoder.latent_channels, encoders.autoencoder.downsample_factor,
          encoders.t5_config.d_model, encoders.clip_config.hidden_size) == ("vae", 16, 8, 4096, 768)
  seen = []
  result = train_and_evaluate(config, str(tmp_path), on_step=lambda step, metrics: seen.append(metrics))
  assert result["status"] == "done" and all(np.isfinite(v) for v in result["losses"].values())
  assert seen[-1]["weight_mdl"] == 1.0 and seen[-1]["loss_mdl"] < 0.0  # every term in play
  assert os.path.getsize(os.path.join(str(tmp_path), "lora", "3", "lora.safetensors")) > 0

  # The sampler takes this workdir as it is: the run's random base recreated, its LoRA, its encoders.
  settings = _sample_workdir(str(tmp_path), tmp_path / "samples", ["--size", "32", "--ref_size", "32"])
  assert settings["model"]["base"].startswith("random (seed 0)") and settings["model"]["step"] == 3
  assert settings["options"]["guidance"] == 3.5  # a LoRA run samples with the recipe's guidance


def _sample_workdir(checkpoint: str, output, extra=()) -> dict:
  """launch/sample.py on a training workdir (or step folder) through the real command line, with two
  synthetic references; returns its run.json after checking the files it wrote."""
  from PIL import Image
  output.mkdir(parents=True, exist_ok=True)
  refs = []
  for name, colour in (("a.png", (200, 30, 30)), ("b.png", (20, 60, 220))):
    image = np.full((40, 40, 3), 255, np.uint8)
    image[8:32, 8:32] = colour
    Image.fromarray(image).save(output / name)
    refs += ["--ref", str(output / name)]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = subprocess.run([sys.executable, os.path.join(root, "launch", "sample.py"), "--checkpoint", checkpoint,
                        "--prompt", "two things", *refs, "--steps", "2", "--output", str(output / "out"),
                        "--no_progress", *extra], capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  (folder,) = os.listdir(output / "out")
  assert sorted(os.listdir(output / "out" / folder)) == ["0_seed0.png", "0_seed0_panel.png", "run.json"]
  return json.load(open(output / "out" / folder / "run.json"))


def test_the_sampler_takes_the_demo_workdir_and_its_step_folders(first_run, tmp_path):
  """The demo's trained base and LoRA come from the checkpoint (EMA by default), at the run's own size
  and guidance; a step folder picks that step; --no_ema the trained weights."""
  workdir, _ = first_run
  from PIL import Image
  settings = _sample_workdir(workdir, tmp_path / "latest")
  assert settings["model"]["workdir"] == workdir and settings["model"]["weights"] == "EMA"
  assert settings["model"]["base"] == f"trained, from checkpoints/{settings['model']['step']}"
  assert (settings["options"]["height"], settings["options"]["guidance"]) == (64, 1.0)  # the demo's own
  step2 = _sample_workdir(os.path.join(workdir, "checkpoints", "2"), tmp_path / "step2")
  assert step2["model"]["step"] == 2
  raw = _sample_workdir(os.path.join(workdir, "lora", "2"), tmp_path / "raw", ["--no_ema"])
  assert raw["model"]["step"] == 2 and raw["model"]["weights"] == "trained (not EMA)"
  image = lambda name: np.asarray(Image.open(next((tmp_path / name / "out").iterdir()) / "0_seed0.png"))
  assert image("step2").shape == (64, 64, 3) and not np.array_equal(image("step2"), image("raw"))


def test_the_sampler_takes_a_recipe_workdir_on_a_flux_root(data_dir, tmp_path):
  """The recipe (the default config: a frozen bf16 base from a FLUX checkpoint root, a LoRA on the
  references, the root's VAE and text encoders) for 2 steps on a tiny random root; then launch/sample.py
  on the workdir samples what the root plus the exported EMA LoRA file sample."""
  from flux_root_fixtures import build_flux_root
  root = tmp_path / "flux_root"
  build_flux_root(root, with_transformer=True)
  config = tiny_config(data_dir)  # its dataset, which the module's other runs share
  recipe = flux_ms.get_config("default")
  recipe.dataset = config.dataset
  recipe.update(checkpoint=str(root), resolution=32, ref_resolution=32, text_len=16, batch_size=2, lora_rank=4,
                total_steps=2, checkpoint_every=2, log_every=1, sample_every=0, eval_examples=0)
  workdir = str(tmp_path / "run")
  result = train_and_evaluate(recipe, workdir)
  assert result["status"] == "done" and all(np.isfinite(v) for v in result["losses"].values())

  from PIL import Image
  settings = _sample_workdir(workdir, tmp_path / "from_workdir")
  assert settings["model"]["base"] == str(root) and settings["model"]["step"] == 2
  assert settings["model"]["lora"].startswith("checkpoints/2 (EMA")
  assert (settings["options"]["height"], settings["options"]["guidance"]) == (32, 3.5)  # the run's size, recipe's guidance
  files = _sample_workdir(str(root), tmp_path / "from_files",
                          ["--lora", os.path.join(workdir, "lora", "2", "lora_ema.safetensors"), "--size", "32",
                           "--ref_size", "32", "--t5_max_length", "16"])
  assert files["model"]["lora"].endswith("lora_ema.safetensors")
  image = lambda name: np.asarray(Image.open(next((tmp_path / name / "out").iterdir()) / "0_seed0.png"), np.int16)
  assert image("from_workdir").shape == (32, 32, 3)
  np.testing.assert_array_equal(image("from_workdir"), image("from_files"))


@pytest.fixture
def no_compilation(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("compiled before reporting the bad input")
  monkeypatch.setattr(compilation, "compile_steps", fail)


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


def test_model_overrides_are_unset_until_given_on_the_command_line_and_checked_first(tmp_path):
  assert all(value is None for value in flux_ms.get_config("default").model_overrides.values())
  # A tuple, an int and a string from the command line; the bad string is refused before anything is
  # built, and only once the tuple and int were parsed (axes_dims_rope must sum to attention_head_dim).
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = subprocess.run(
      [sys.executable, os.path.join(root, "launch", "train.py"), "--config",
       os.path.join(root, "configs", "flux_ms.py") + ":flux_random", "--workdir", str(tmp_path),
       "--config.model_overrides.axes_dims_rope=(8,12,12)", "--config.model_overrides.attention_head_dim=32",
       "--config.model_overrides.attention_impl=cudn"], capture_output=True, text=True, timeout=120)
  assert run.returncode == 2  # a user error: one line, no traceback
  assert run.stderr.startswith("error: config.model_overrides: attention_impl='cudn'; expected one of"), \
      run.stderr[-2000:]
  assert "Traceback" not in run.stderr


def test_resolution_of_a_fraction_of_a_token_is_one_clear_error(data_dir, tmp_path, no_compilation):
  # The demo's pixel autoencoder with patch 4: 2 x 4 = 8 px per token.
  config = tiny_config(data_dir, pixel_patch_size=4, resolution=60)
  with pytest.raises(ConfigError, match=r"config\.resolution=60: expected a positive multiple of 8 px"):
    train_and_evaluate(config, str(tmp_path))


def test_transformer_channels_that_do_not_fit_the_autoencoder_are_one_clear_error(data_dir, tmp_path,
                                                                                  no_compilation):
  config = tiny_config(data_dir, pixel_patch_size=4)  # 48 latent channels: 192 per token, not 768
  with pytest.raises(ConfigError, match=r"takes 768 values per token.*gives 48 latent channels, 192 per"):
    train_and_evaluate(config, str(tmp_path))


def test_learning_rate_schedules():
  recipe = settings_from_config(flux_ms.get_config("default"), check_files=False, autoencoder=_FLUX_VAE)
  assert step_lib.learning_rate(recipe.optimizer, recipe.total_steps) == 8e-5  # a float: the recipe's state
  demo = settings_from_config(flux_ms.get_config("demo"), check_files=False)
  assert demo.total_steps == 1500
  schedule = step_lib.learning_rate(demo.optimizer, demo.total_steps)
  assert float(schedule(0)) == 0.0 and float(schedule(25)) == pytest.approx(1.5e-3)
  assert float(schedule(50)) == pytest.approx(3e-3) and float(schedule(775)) == pytest.approx(1.5e-3, rel=1e-3)
  assert float(schedule(1500)) == pytest.approx(0.0, abs=1e-9)
  warm = step_lib.learning_rate(dataclasses.replace(recipe.optimizer, learning_rate=1e-3, warmup_steps=10))
  assert float(warm(5)) == pytest.approx(5e-4) and float(warm(500)) == pytest.approx(1e-3)


def test_unknown_schedule_is_one_clear_error(data_dir, tmp_path, no_compilation):
  config = tiny_config(data_dir, **{"optimizer.schedule": "linear"})
  with pytest.raises(ConfigError, match=r"config\.optimizer\.schedule='linear': expected one of"):
    train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("patch", [2, 4])
def test_pairs_index_the_token_grid_of_the_autoencoder(data_dir, patch):
  """Pairs are derived on the grid the model sees: 64 px / (2 x patch) tokens a side, not FLUX's 16 px."""
  config = tiny_config(data_dir, pixel_patch_size=patch, eval_examples=4,  # 64 px
                       **{"model_overrides.in_channels": 4 * 3 * patch * patch})  # fits the autoencoder
  settings = settings_from_config(config)
  encoders = make_encoders(settings)
  grid = 64 // (2 * patch)
  batches = evaluate_lib.evaluation_batches(settings, encoders)
  rows = []
  for batch in batches:
    assert batch["target"].shape[1] == 2 * grid  # latent side; 2x2 packing gives grid x grid tokens
    valid = np.asarray(batch["pair_valid"])
    for key in ("pair_target_token", "pair_ref_token"):
      tokens = np.asarray(batch[key])[valid]
      assert (tokens < grid * grid).all()
      rows.append(tokens // grid)
  assert np.concatenate(rows).max() >= grid // 2  # pairs cover the grid, not just its first rows


# ---- the NaN guard ---------------------------------------------------------------------------------

def _saved_state(workdir: str, step: int) -> dict:
  """The train state on disk at `step`, read back as it was written (no target tree to cast it into)."""
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  try:
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  finally:
    manager.close()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the 1e39 learning rate
def test_nan_guard_stops_at_the_bad_step_and_keeps_the_last_good_checkpoint(first_run, data_dir, tmp_path,
                                                                             monkeypatch):
  """Two real ways to go non-finite after the good checkpoint of step 2 (steps 3 and 4 are checkpoint
  steps too): an inf target pixel from step 3 on (NaN loss and gradient), then, resuming, a learning rate
  that overflows float32 (finite loss and gradient, non-finite weights). Each run stops naming step 3,
  only step 2 is on disk and finite, and a clean rerun resumes from it with the uninterrupted losses."""
  _, uninterrupted = first_run
  workdir = str(tmp_path / "nan")
  real_host_inputs, calls = batches_lib.host_inputs, []

  def inf_from_step_3(host_batch, encoders, settings):
    batch = real_host_inputs(host_batch, encoders, settings)
    calls.append(1)
    if len(calls) >= 3:  # one pixel of one target image: inf latents, then NaN through the whole step
      batch["target_images"][0, 0, 0, 0] = np.inf
    return batch

  monkeypatch.setattr(batches_lib, "host_inputs", inf_from_step_3)
  with pytest.raises(FloatingPointError, match=r"at step 3 \(loss nan.*last good checkpoint \(step 2\)"):
    train_and_evaluate(tiny_config(data_dir), workdir)
  monkeypatch.undo()
  assert len(calls) == 4  # step 4 (a checkpoint step) was dispatched before step 3 was checked
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
  assert os.listdir(os.path.join(workdir, "lora")) == ["2"]

  # checkpoint_every=1: before the guard checked the updated weights, step 3 was saved with NaN weights.
  # A resume may not change the learning rate: without the workdir's config.json (a workdir from before
  # configs were recorded) nothing is compared.
  os.remove(os.path.join(workdir, "config.json"))
  with pytest.raises(FloatingPointError, match=r"at step 3 .*last good checkpoint \(step 2\)"):
    train_and_evaluate(tiny_config(data_dir, checkpoint_every=1, **{"optimizer.learning_rate": 1e39}), workdir)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]

  saved = _saved_state(workdir, 2)
  assert int(saved["step"]) == 2
  leaves = jax.tree_util.tree_leaves(saved)
  assert len(leaves) > 10 and all(np.isfinite(np.asarray(leaf)).all() for leaf in leaves)
  os.remove(os.path.join(workdir, "config.json"))  # back to the first run's learning rate
  resumed = train_and_evaluate(tiny_config(data_dir), workdir)
  assert resumed["status"] == "done" and sorted(resumed["losses"]) == [3, 4]
  np.testing.assert_allclose([resumed["losses"][s] for s in (3, 4)], [uninterrupted["losses"][s] for s in (3, 4)],
                             rtol=1e-6)


# ---- multi-device meshes ---------------------------------------------------------------------------

MESH_A, MESH_B = dict(data=1, fsdp=2, tensor=2), dict(data=2, fsdp=1, tensor=2)


def _multidevice_run(data_dir: str, workdir: str) -> dict:
  """In the 4-device child: a batch the (data, fsdp) axes cannot split; steps 1-2 on MESH_A; steps 3-4
  on MESH_B, resumed (resharded) from A's step-2 checkpoint; the shardings the compiled steps take."""
  jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py, for the 1-device run
  out = {"devices": jax.device_count(), "runs": []}
  config = tiny_config(data_dir)
  config.mesh.update(data=2, fsdp=2, tensor=1)
  try:
    train_and_evaluate(config, workdir + "_indivisible")
  except ConfigError as error:
    out["indivisible_batch_error"] = str(error)

  real_compile_steps, shardings = compilation.compile_steps, []

  def recording_compile_steps(cfg, state, *args, **kwargs):
    compiled = real_compile_steps(cfg, state, *args, **kwargs)
    state_in, _, batch_in = next(iter(compiled.values())).input_shardings[0]
    record = {}
    for (path, leaf), (_, sharding) in zip(jax.tree_util.tree_flatten_with_path(state)[0],
                                           jax.tree_util.tree_flatten_with_path(state_in)[0]):
      name = jax.tree_util.keystr(path)
      if name.endswith(("['transformer_blocks']['attn']['to_q']['kernel']",
                        "['transformer_blocks']['attn']['to_q']['lora_A']")):
        record[name] = dict(shape=list(leaf.shape), shard_shape=list(sharding.shard_shape(leaf.shape)),
                            devices=len(sharding.device_set))
    record["batch t5"] = dict(spec=str(batch_in["t5"].spec), devices=len(batch_in["t5"].device_set))
    shardings.append(record)
    return compiled

  compilation.compile_steps = recording_compile_steps
  for mesh, total_steps in ((MESH_A, 2), (MESH_B, 4)):
    config = tiny_config(data_dir, total_steps=total_steps)
    config.mesh.update(mesh)
    result = train_and_evaluate(config, workdir)
    out["runs"].append(dict(mesh=mesh, losses=result["losses"], shardings=shardings[-1]))
  return out


def test_multi_device_meshes_shard_the_state_and_reproduce_the_one_device_losses(first_run, data_dir, tmp_path):
  """4 CPU devices in a child process (the device count is fixed when JAX starts): fsdp x tensor and
  data x tensor meshes, a resume across meshes, against the 1-device run's losses (same seed and data)."""
  _, one_device = first_run
  flags = [os.environ.get("XLA_FLAGS"), "--xla_force_host_platform_device_count=4"]  # + conftest's fast compile
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(filter(None, flags)))
  child = subprocess.run([sys.executable, os.path.abspath(__file__), "multidevice", data_dir,
                          str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=600)
  assert child.returncode == 0 and "RESULT " in child.stdout, child.stdout[-4000:] + child.stderr[-4000:]
  result = json.loads(child.stdout.rsplit("RESULT ", 1)[1])
  assert result["devices"] == 4
  assert "config.batch_size=2 does not split" in result["indivisible_batch_error"]

  (run_a, run_b) = result["runs"]
  losses = {int(s): v for run in (run_a, run_b) for s, v in run["losses"].items()}
  assert sorted(run_a["losses"], key=int) == ["1", "2"] and sorted(run_b["losses"], key=int) == ["3", "4"]
  np.testing.assert_allclose([losses[s] for s in (1, 2, 3, 4)], [one_device["losses"][s] for s in (1, 2, 3, 4)],
                             rtol=1e-5)

  # The base kernel [1 layer, 64 embed, 64 mlp] with its Adam moments and EMA: (embed, mlp) over
  # (fsdp, tensor) on A, mlp over tensor on B; the LoRA's A [1, 64, 4]: embed over fsdp on A only.
  for run, kernel_fraction, lora_fraction in ((run_a, 4, 2), (run_b, 2, 1)):
    kernels = {k: v for k, v in run["shardings"].items() if k.endswith("['kernel']")}
    loras = {k: v for k, v in run["shardings"].items() if k.endswith("['lora_A']")}
    assert len(kernels) == 4 and len(loras) == 4, sorted(run["shardings"])  # weight, mu, nu, EMA
    for name, leaf in kernels.items():
      assert leaf["shape"] == [1, 64, 64] and leaf["devices"] == 4, (run["mesh"], name, leaf)
      assert np.prod(leaf["shape"]) == kernel_fraction * np.prod(leaf["shard_shape"]), (run["mesh"], name, leaf)
    for name, leaf in loras.items():
      assert np.prod(leaf["shape"]) == lora_fraction * np.prod(leaf["shard_shape"]), (run["mesh"], name, leaf)
  assert run_a["shardings"]["batch t5"]["spec"] == "P(('data', 'fsdp'),)"


if __name__ == "__main__":  # the child process of the multi-device test
  if sys.argv[1:2] == ["multidevice"]:
    print("RESULT " + json.dumps(_multidevice_run(*sys.argv[2:4])), flush=True)
