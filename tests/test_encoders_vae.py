"""The FLUX VAE against diffusers' AutoencoderKL (FLUX settings, tiny random config), loaded from files
that diffusers' save_pretrained wrote; the pixel autoencoder's exact inversion; loader errors."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaic_jax.interop.safetensors_io import SafetensorsFile, save_safetensors
from mosaic_jax.interop.tensor_table import CheckpointError
from mosaic_jax.interop.vae_checkpoint import load_vae
from mosaic_jax.model import pixel_autoencoder, vae
from mosaic_jax.model.autoencoder import Autoencoder
from mosaic_jax.model.latents import from_model_latents, sample_posterior, to_model_latents

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# Tiny, FLUX-structured: 4 blocks (downsample 8), 16 latent channels, no quant convs, mid attention.
TINY = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[8, 16, 16, 16],
            layers_per_block=1, norm_num_groups=4, down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, use_quant_conv=False, use_post_quant_conv=False,
            scaling_factor=0.3611, shift_factor=0.1159, mid_block_add_attention=True)


def randomize_(module, seed):
  """Every weight random and non-zero, norms included, with a scale that keeps activations O(1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in module.named_parameters():
      noise = torch.randn(param.shape, generator=gen)
      if param.ndim == 1 and ("norm" in name or name.endswith("layer_norm.weight")):
        param.copy_((1.0 + 0.3 * noise) if name.endswith("weight") else 0.2 * noise)
      elif param.ndim == 1:
        param.copy_(0.1 * noise)
      else:
        param.copy_(noise * (param[0].numel() ** -0.5))


def assert_close(ours, ref, what):
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  scale = max(float(np.max(np.abs(ref))), 1e-6)
  err = float(np.max(np.abs(ours - ref)))
  assert err <= 1e-4 * scale, f"{what}: max abs error {err:.3g} > 1e-4 x output scale {scale:.3g}"
  return err / scale


@pytest.fixture(scope="module")
def saved_vae(tmp_path_factory):
  model = diffusers.AutoencoderKL(**TINY).eval()
  randomize_(model, seed=0)
  root = tmp_path_factory.mktemp("flux_ckpt")
  model.save_pretrained(str(root / "vae"))
  return model, root


@pytest.fixture(scope="module")
def loaded_vae(saved_vae):
  _, root = saved_vae
  return load_vae(str(root))  # the checkpoint root: finds vae/ itself


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(1).uniform(-1, 1, (2, 32, 24, 3)).astype(np.float32)


def test_config_from_diffusers_folder(loaded_vae):
  cfg, _ = loaded_vae
  assert cfg.latent_channels == 16 and cfg.downsample_factor == 8
  assert (cfg.scaling_factor, cfg.shift_factor) == (0.3611, 0.1159)
  assert vae.VaeConfig() == vae.VaeConfig(block_out_channels=(128, 256, 512, 512))  # FLUX defaults


def test_encode_and_decode_match_diffusers(saved_vae, loaded_vae, images):
  model, _ = saved_vae
  cfg, params = loaded_vae
  with torch.no_grad():
    dist = model.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
    ref_mean = dist.mean.permute(0, 2, 3, 1).numpy()
    ref_std = dist.std.permute(0, 2, 3, 1).numpy()
  posterior = jax.jit(lambda p, x: vae.encode(p, cfg, x))(params, images)
  assert posterior.mean.shape == (2, 4, 3, 16)
  assert_close(posterior.mean, ref_mean, "posterior mean")
  assert_close(posterior.std, ref_std, "posterior std")

  latents = np.random.default_rng(2).normal(size=(2, 4, 3, 16)).astype(np.float32)
  with torch.no_grad():
    ref_images = model.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
  decoded = jax.jit(lambda p, z: vae.decode(p, cfg, z))(params, latents)
  assert_close(decoded, ref_images, "decode")


def test_posterior_sample_and_flux_latent_map():
  mean = jnp.full((1, 2, 2, 16), 0.5)
  posterior = vae.Posterior(mean=mean, std=jnp.full_like(mean, 0.25))
  draws = jnp.stack([sample_posterior(posterior, jax.random.key(i)) for i in range(64)])
  assert abs(float(draws.mean()) - 0.5) < 0.05 and abs(float(draws.std()) - 0.25) < 0.03
  z = jnp.linspace(-2, 2, 16)
  np.testing.assert_allclose(to_model_latents(z, 0.3611, 0.1159), (z - 0.1159) * 0.3611, rtol=1e-6)
  np.testing.assert_allclose(from_model_latents(to_model_latents(z, 0.3611, 0.1159), 0.3611, 0.1159), z,
                             rtol=1e-5, atol=1e-6)


def test_bf16_loading_keeps_norms_in_float32(saved_vae, images):
  _, root = saved_vae
  cfg, params = load_vae(str(root / "vae"), dtype=jnp.bfloat16)
  enc = params["encoder"]
  assert enc["conv_in"]["kernel"].dtype == jnp.bfloat16
  assert enc["conv_norm_out"]["scale"].dtype == jnp.float32
  assert enc["mid_block"]["resnets"]["0"]["norm1"]["bias"].dtype == jnp.float32
  _, params32 = load_vae(str(root / "vae"))
  ours = vae.encode(params, cfg, jnp.asarray(images, jnp.bfloat16)).mean
  ref = vae.encode(params32, cfg, images).mean
  assert ours.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(ours - ref))) < 0.1 * float(jnp.max(jnp.abs(ref)))


def test_autoencoder_facade_is_a_pytree(loaded_vae, images):
  cfg, params = loaded_vae
  ae = Autoencoder("vae", cfg, params)
  latents = jax.jit(lambda a, x: a.encode_to_model_latents(x))(ae, images)
  np.testing.assert_allclose(latents, (vae.encode(params, cfg, images).mean - 0.1159) * 0.3611,
                             rtol=1e-5, atol=1e-6)
  assert ae.decode_model_latents(latents).shape == images.shape


def test_checkpoint_errors_name_every_bad_key(saved_vae, tmp_path):
  _, root = saved_vae
  src = SafetensorsFile(str(root / "vae" / "diffusion_pytorch_model.safetensors"))
  tensors = {k: np.array(src.read(k)) for k in src.keys()}
  src.close()
  del tensors["decoder.conv_out.bias"]
  tensors["encoder.quant_conv.weight"] = np.zeros((32, 32, 1, 1), np.float32)
  tensors["encoder.conv_in.weight"] = np.zeros((8, 3, 1, 1), np.float32)
  bad = tmp_path / "vae"
  bad.mkdir()
  save_safetensors(str(bad / "diffusion_pytorch_model.safetensors"), tensors)
  (bad / "config.json").write_text((root / "vae" / "config.json").read_text())
  with pytest.raises(CheckpointError) as info:
    load_vae(str(bad))
  message = str(info.value)
  for needle in ("decoder.conv_out.bias", "encoder.quant_conv.weight",
                 "encoder.conv_in.weight: file (8, 3, 1, 1), model (8, 3, 3, 3)"):
    assert needle in message

  config = json.loads((root / "vae" / "config.json").read_text())
  config["use_quant_conv"] = True
  (bad / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match="use_quant_conv"):
    load_vae(str(bad))
  os.remove(bad / "config.json")
  with pytest.raises(CheckpointError, match="no config.json"):
    load_vae(str(bad))


# ---- the exact pixel autoencoder ------------------------------------------------------------------

@pytest.mark.parametrize("patch_size, latent_channels", [(2, 16), (8, 192)])
def test_pixel_autoencoder_inverts_exactly(patch_size, latent_channels):
  cfg = pixel_autoencoder.PixelAutoencoderConfig(patch_size=patch_size, latent_channels=latent_channels)
  images = np.random.default_rng(3).uniform(-1, 1, (2, 32, 48, 3)).astype(np.float32)
  ae = Autoencoder("pixel", cfg, pixel_autoencoder.init_params())
  posterior = ae.encode(images)
  assert posterior.mean.shape == (2, 32 // patch_size, 48 // patch_size, latent_channels)
  assert float(jnp.max(posterior.std)) == 0.0
  np.testing.assert_array_equal(np.asarray(ae.decode(posterior.mean)), images)
  np.testing.assert_array_equal(np.asarray(ae.decode_model_latents(ae.encode_to_model_latents(images))), images)


def test_pixel_autoencoder_layout_and_errors():
  cfg = pixel_autoencoder.PixelAutoencoderConfig()
  images = np.arange(1 * 2 * 2 * 3, dtype=np.float32).reshape(1, 2, 2, 3)
  latent = np.asarray(pixel_autoencoder.encode({}, cfg, images).mean)[0, 0, 0]
  # channel-major within the patch (c, row, col), like FLUX's 2x2 packing; then zero padding.
  np.testing.assert_array_equal(latent[:12], images[0].transpose(2, 0, 1).reshape(-1))
  np.testing.assert_array_equal(latent[12:], 0)
  with pytest.raises(ValueError, match="latent_channels >= 48"):
    pixel_autoencoder.PixelAutoencoderConfig(patch_size=4, latent_channels=16)
  with pytest.raises(ValueError, match="multiples of 2"):
    pixel_autoencoder.encode({}, cfg, np.zeros((1, 3, 4, 3), np.float32))


def test_pack_latents_matches_diffusers_flux_packing():
  from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
  from mosaic_jax.model.latents import pack_latents, unpack_latents
  z = np.random.default_rng(4).normal(size=(2, 6, 4, 16)).astype(np.float32)  # NHWC
  ref = FluxPipeline._pack_latents(torch.from_numpy(z).permute(0, 3, 1, 2), 2, 16, 6, 4).numpy()
  tokens = pack_latents(jnp.asarray(z))
  np.testing.assert_array_equal(np.asarray(tokens), ref)
  np.testing.assert_array_equal(np.asarray(unpack_latents(tokens, 6, 4)), z)
  unpacked_ref = FluxPipeline._unpack_latents(torch.from_numpy(ref), 48, 32, 8).permute(0, 2, 3, 1).numpy()
  np.testing.assert_array_equal(unpacked_ref, z)
