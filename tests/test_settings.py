"""The training settings (mosaic_jax/train/settings.py): the schema agrees with configs/flux_ms.py, every
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
from mosaic_jax.train import settings as settings_lib

FLUX_VAE = Autoencoder("vae", VaeConfig(), {})  # FLUX's geometry, no weights


@pytest.mark.parametrize("variant", flux_ms.VARIANTS)
def test_every_config_variant_has_exactly_the_fields_settings_reads(variant):
  config = flux_ms.get_config(variant)
  assert settings_lib._config_fields(config) == settings_lib.known_fields()  # pylint: disable=protected-access


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
  assert recipe.transformer_config().remat_policy == "full" and recipe.transformer_config().num_layers == 19


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
