"""The run settings (mosaic_jax/settings/): the schema agrees with configs/flux_ms.py, every
bad field is one ConfigError naming it, and the token size comes from the autoencoder. Nothing is
compiled here."""

from __future__ import annotations

import dataclasses
import json

import pytest

from train_fixtures import flux_ms  # noqa: F401  # configs/ on sys.path
from mosaic_jax.model.autoencoder import Autoencoder
from mosaic_jax.model.vae import VaeConfig
from mosaic_jax.train import ConfigError, settings_from_config
from mosaic_jax import settings as settings_lib

FLUX_VAE = Autoencoder("vae", VaeConfig(), {})  # FLUX's geometry, no weights


@pytest.mark.parametrize("variant", flux_ms.VARIANTS)
def test_every_config_variant_has_exactly_the_fields_settings_reads(variant):
  config = flux_ms.get_config(variant)
  assert set(settings_lib.config_fields(config)) == settings_lib.known_fields()


def test_settings_are_typed_frozen_and_hashable():
  settings = settings_from_config(flux_ms.get_config("demo"), check_files=False)
  assert (settings.token_pixels, settings.latent_channels, settings.latent_size) == (4, 12, 16)  # patch 2, 32 px
  assert isinstance(settings.optimizer.learning_rate, float) and isinstance(settings.dataset.build.seed, int)
  assert dict(settings.model_overrides)["axes_dims_rope"] == (8, 12, 12)
  with pytest.raises(dataclasses.FrozenInstanceError):
    settings.batch_size = 4  # type: ignore[misc]
  assert hash(settings) == hash(settings_from_config(flux_ms.get_config("demo"), check_files=False))
  # The transformer: the preset with the overrides and the run's remat policy (an override of it wins).
  cfg = settings.transformer_config()
  assert (cfg.num_layers, cfg.in_channels, cfg.remat_policy) == (3, 48, "none")
  recipe = settings_from_config(flux_ms.get_config("default"), FLUX_VAE, check_files=False)
  # The recipe's "auto": the trainer chooses (train/remat_choice.py); until then the preset's policy stands.
  assert recipe.remat_policy == "auto" and recipe.transformer_config().remat_policy == "none"
  assert recipe.transformer_config().num_layers == 19


def test_a_workdir_config_json_gives_the_same_settings(tmp_path):
  """What launch/sample.py reads back from a training workdir: JSON lists where the config had tuples."""
  config = flux_ms.get_config("demo")
  from_json = json.loads(json.dumps(config.to_dict()))
  assert settings_from_config(from_json, check_files=False) == settings_from_config(config, check_files=False)


def test_wrong_type_missing_field_and_bad_choice_are_one_error_naming_the_field():
  config = json.loads(json.dumps(flux_ms.get_config("demo").to_dict()))
  with pytest.raises(ConfigError, match=r"^config\.batch_size='8': expected an integer\.$"):
    settings_from_config({**config, "batch_size": "8"}, check_files=False)
  with pytest.raises(ConfigError, match=r"^config\.optimizer\.b1=None: expected a number\.$"):
    settings_from_config({**config, "optimizer": {**config["optimizer"], "b1": None}}, check_files=False)
  with pytest.raises(ConfigError, match=r"^config\.eval_timesteps is missing"):
    settings_from_config({k: v for k, v in config.items() if k != "eval_timesteps"}, check_files=False)
  with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['dataset\.biuld'\].*--config\.dataset\.build"):
    settings_from_config({**config, "dataset": {**config["dataset"], "biuld": 1}}, check_files=False)
  with pytest.raises(ConfigError, match=r"^config\.encoders='vae': expected one of"):
    settings_from_config({**config, "encoders": "vae"}, check_files=False)
  with pytest.raises(ConfigError, match=r"^config\.remat_policy='fastest': expected one of \(.*'full', .*'auto'\)"):
    settings_from_config({**config, "remat_policy": "fastest"}, check_files=False)


def test_token_size_comes_from_the_checkpoints_autoencoder(tmp_path):
  """A FLUX root whose VAE downsamples by 4 (three blocks) has 8 px tokens: 40 px is a whole 5x5 grid,
  which FLUX's 16 px would refuse; only vae/config.json is read."""
  (tmp_path / "vae").mkdir()
  (tmp_path / "vae" / "config.json").write_text(json.dumps(dict(
      _class_name="AutoencoderKL", in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[8, 16, 16],
      layers_per_block=1, norm_num_groups=4, down_block_types=["DownEncoderBlock2D"] * 3,
      up_block_types=["UpDecoderBlock2D"] * 3, use_quant_conv=False, use_post_quant_conv=False,
      scaling_factor=0.5, shift_factor=0.25)))
  config = flux_ms.get_config("default")
  config.update(checkpoint=str(tmp_path), resolution=40, ref_resolution=40)
  config.dataset.data_dir = str(tmp_path)
  settings = settings_from_config(config)
  assert (settings.token_pixels, settings.latent_size, settings.latent_scaling, settings.latent_shift) == (8, 10, 0.5, 0.25)
  with pytest.raises(ConfigError, match=r"config\.resolution=40: expected a positive multiple of 16 px"):
    settings_from_config(config, FLUX_VAE)


def test_what_a_resume_may_change_and_what_the_step_reads_come_from_the_fields():
  """Declared once, on the fields: a part's mark covers its fields; each model override is a field of
  its own (how the transformer runs may change on resume, what it computes may not); for_step fixes
  exactly the fields the step never reads."""
  safe = [name for name in sorted(settings_lib.known_fields()) if settings_lib.resume_safe(name)]
  assert {"total_steps", "mesh.fsdp", "sharding.logical_rules", "dataset.data_dir", "dataset.read_threads",
          "guidance", "sample_steps", "model_overrides.attention_impl", "model_overrides.attention_chunk",
          "model_overrides.stats_chunk"} <= set(safe)
  for refused in ("lora_rank", "dataset.name", "dataset.build.seed", "optimizer.learning_rate", "seed",
                  "model_overrides.num_layers", "model_overrides.independent_refs", "no_such_field"):
    assert not settings_lib.resume_safe(refused), refused
  settings = settings_from_config(flux_ms.get_config("demo"), check_files=False)
  settings = dataclasses.replace(settings, peak_tflops_per_device=1.0,  # the demo's are 0 already
                                 dataset=dataclasses.replace(settings.dataset, worker_processes=2))
  for_step = settings.for_step()
  unread = {name for name, value in settings_lib.config_fields(for_step.to_config()).items()
            if value != settings_lib.config_fields(settings.to_config())[name]}
  assert unread == {"checkpoint_every", "keep_checkpoints", "log_every", "sample_every", "sample_steps",
                    "eval_examples", "eval_timesteps", "peak_tflops_per_device", "guidance", "dataset.data_dir",
                    "dataset.read_threads", "dataset.worker_processes"}, unread
  assert for_step.for_step() == for_step


def test_settings_give_back_the_config_they_were_made_from():
  """What a workdir's config.json holds (Settings.to_config): every field, unset overrides as None."""
  config = flux_ms.get_config("demo,independent_refs")
  settings = settings_from_config(config, check_files=False)
  as_config = settings.to_config()
  assert set(settings_lib.config_fields(as_config)) == settings_lib.known_fields()
  assert settings_lib.config_fields(as_config) == json.loads(json.dumps(settings_lib.config_fields(config.to_dict())))
  assert settings_from_config(as_config, check_files=False) == settings


def test_counts_are_checked_one_by_one():
  config = json.loads(json.dumps(flux_ms.get_config("demo").to_dict()))
  with pytest.raises(ConfigError, match=r"^config\.batch_size=0: expected a positive integer \(the global batch\)\.$"):
    settings_from_config({**config, "batch_size": 0}, check_files=False)
  for rank in (0, -1):
    with pytest.raises(ConfigError, match=rf"^config\.lora_rank={rank}: expected a positive integer"):
      settings_from_config({**config, "lora_rank": rank}, check_files=False)
  base_only = settings_from_config({**config, "lora_rank": 0, "trainable": "base"}, check_files=False)
  assert base_only.lora_rank == 0  # no LoRA, no rank to check
