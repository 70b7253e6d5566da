"""DiTF features of our FLUX against the same extraction through diffusers in PyTorch (the tiny random
FluxTransformer2DModel of conftest, and a tiny random AutoencoderKL for the images path), with the same
noise on both sides; that the blocks after the chosen one never run; one-line errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from conftest import relative_error  # noqa: E402
from mosaic_jax import cli  # noqa: E402
from mosaic_jax.correspondence import flux_features  # noqa: E402
from mosaic_jax.correspondence.flux_features import DitfConfig, FluxFeatureError  # noqa: E402

TOL = 1e-4
GRID = (4, 6)
COPIES = 3
# The tiny model has 32 channels; two of them play FLUX.1-dev's massive-activation channels (154, 1446).
CHANNELS = (3, 17)

_features = jax.jit(flux_features.image_features, static_argnames=("flux_cfg", "cfg", "grid"))


@pytest.fixture(scope="module")
def case():
  """Two images as packed latent tokens, COPIES noise draws each, and one prompt's text features."""
  rng = np.random.default_rng(5)
  return dict(tokens=rng.standard_normal((2, GRID[0] * GRID[1], 16), np.float32),
              noise=rng.standard_normal((2, COPIES, GRID[0] * GRID[1], 16), np.float32),
              text=rng.standard_normal((1, 5, 24), np.float32), pooled=rng.standard_normal((1, 12), np.float32))


def _config(block, adaln, discard):
  return DitfConfig(block=block, copies=COPIES, adaln_normalize=adaln, discard_massive=discard,
                    massive_channels=CHANNELS)


def torch_features(model, tokens, noise, text, pooled, cfg: DitfConfig):
  """The extraction restated in PyTorch: diffusers' forward on the noisy copies, the input of block
  `cfg.block` taken by a forward pre-hook (image tokens: `hidden_states` of a double or single block, or
  of `norm_out`), averaged over the copies, channels zeroed, then that module's own AdaLN."""
  batch, count, channels = tokens.shape
  noisy = ((1 - cfg.timestep) * torch.from_numpy(tokens)[:, None]
           + cfg.timestep * torch.from_numpy(noise)).reshape(-1, count, channels)
  sequences = noisy.shape[0]
  modules = [*model.transformer_blocks, *model.single_transformer_blocks, model.norm_out]
  captured = {}

  def grab(module, args, kwargs):
    del module
    captured["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    captured["temb"] = kwargs["temb"] if "temb" in kwargs else args[1]

  handle = modules[cfg.block].register_forward_pre_hook(grab, with_kwargs=True)
  rows, cols = np.meshgrid(np.arange(GRID[0]), np.arange(GRID[1]), indexing="ij")
  img_ids = torch.tensor(np.stack([np.zeros_like(rows), rows, cols], -1).reshape(-1, 3), dtype=torch.float32)
  try:
    with torch.no_grad():
      model(hidden_states=noisy, encoder_hidden_states=torch.from_numpy(text).expand(sequences, -1, -1),
            pooled_projections=torch.from_numpy(pooled).expand(sequences, -1),
            timestep=torch.full((sequences,), cfg.timestep), img_ids=img_ids, txt_ids=torch.zeros(text.shape[1], 3),
            guidance=torch.full((sequences,), cfg.guidance))
  finally:
    handle.remove()
  hidden = captured["hidden"].reshape(batch, cfg.copies, count, -1).mean(1)
  temb = captured["temb"][::cfg.copies]  # the copies of an image share t, guidance and prompt
  if cfg.discard_massive:
    hidden[..., list(cfg.massive_channels)] = 0.0
  if cfg.adaln_normalize:
    with torch.no_grad():
      module = modules[cfg.block]
      if cfg.block < len(model.transformer_blocks):
        hidden = module.norm1(hidden, emb=temb)[0]
      elif cfg.block < len(modules) - 1:
        hidden = module.norm(hidden, emb=temb)[0]
      else:
        hidden = module(hidden, temb)
  return hidden.reshape(batch, *GRID, -1).numpy()


# Double block 1 (the output of double block 0), single block 1 (block 3: the output of single block 0),
# and the output layer (block 4), each raw and with the remedies.
@pytest.mark.parametrize("block,adaln,discard", [(1, False, False), (1, True, True), (3, False, True),
                                                 (3, True, False), (3, True, True), (4, True, True)])
def test_features_match_diffusers(torch_flux, flux_params, case, block, adaln, discard):
  flux_cfg, params = flux_params
  cfg = _config(block, adaln, discard)
  ours = _features(params, flux_cfg, case["tokens"], case["text"], case["pooled"], None, cfg, GRID, case["noise"])
  expected = torch_features(torch_flux, case["tokens"], case["noise"], case["text"], case["pooled"], cfg)
  assert ours.shape == (2, *GRID, flux_cfg.hidden_size) and ours.dtype == jnp.float32
  assert relative_error(ours, expected) <= TOL
  if discard and not adaln:
    assert not np.asarray(ours)[..., list(CHANNELS)].any()
  if block == 3 and adaln and discard:
    # The remedies change the features: without the discard the LayerNorm statistics differ everywhere.
    plain = torch_features(torch_flux, case["tokens"], case["noise"], case["text"], case["pooled"],
                           _config(block, True, False))
    assert relative_error(plain, expected) > 100 * TOL


def test_blocks_after_the_chosen_one_never_run(flux_params, case):
  """NaN weights in every block from the chosen one on (its AdaLN linear excepted) and in the output
  layer change nothing: the extraction stops where the features are read."""
  flux_cfg, params = flux_params
  cfg = _config(1, True, True)

  def poison(path, x):
    names = [getattr(p, "key", None) for p in path]
    if names[0] == "transformer_blocks":
      keep = names[1:3] == ["norm1", "linear"]
      return x if keep else x.at[1:].set(jnp.nan)
    if names[0] in ("single_transformer_blocks", "norm_out", "proj_out"):
      return jnp.full_like(x, jnp.nan)
    return x
  poisoned = jax.tree_util.tree_map_with_path(poison, params)
  args = (flux_cfg, case["tokens"], case["text"], case["pooled"], None, cfg, GRID, case["noise"])
  clean = np.asarray(_features(params, *args))
  assert np.isfinite(clean).all()
  np.testing.assert_array_equal(np.asarray(_features(poisoned, *args)), clean)


def test_noise_from_a_key_and_images_batch_independently(flux_params, case):
  flux_cfg, params = flux_params
  cfg = _config(3, True, True)
  common = (case["text"], case["pooled"])
  one = lambda i, noise: _features(params, flux_cfg, case["tokens"][i:i + 1], *common, None, cfg, GRID,
                                   noise[i:i + 1])
  both = _features(params, flux_cfg, case["tokens"], *common, None, cfg, GRID, case["noise"])
  for i in range(2):
    np.testing.assert_allclose(one(i, case["noise"]), both[i:i + 1], rtol=1e-5, atol=1e-5)
  drawn = [np.asarray(_features(params, flux_cfg, case["tokens"], *common, jax.random.key(k), cfg, GRID))
           for k in (0, 0, 1)]
  np.testing.assert_array_equal(drawn[0], drawn[1])
  assert relative_error(drawn[2], drawn[0]) > 1e-3  # another key, other noise


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
  """A random diffusers AutoencoderKL with 4 latent channels (the tiny FLUX takes 2x2 x 4 = 16), saved
  and loaded back as our Autoencoder."""
  diffusers = pytest.importorskip("diffusers")
  from mosaic_jax.interop.vae_checkpoint import load_vae
  from mosaic_jax.model.autoencoder import Autoencoder
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8, 8, 8], layers_per_block=1,
      norm_num_groups=4, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
      use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159).eval()
  gen = torch.Generator().manual_seed(2)
  with torch.no_grad():
    for name, p in vae.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1 + 0.2 * noise if p.ndim == 1 and "norm" in name and name.endswith("weight")
              else 0.1 * noise if p.ndim == 1 else noise * p[0].numel() ** -0.5)
  root = tmp_path_factory.mktemp("ditf_vae")
  vae.save_pretrained(str(root / "vae"))
  vae_cfg, vae_params = load_vae(str(root))
  return vae, Autoencoder("vae", vae_cfg, vae_params)


def test_images_path_matches_diffusers(torch_flux, flux_params, tiny_vae, case):
  """Images -> posterior mean -> (z - shift) * scale -> 2x2 packing -> features, on both sides."""
  flux_cfg, params = flux_params
  vae, autoencoder = tiny_vae
  images = np.random.default_rng(6).uniform(-1, 1, (2, 16 * GRID[0], 16 * GRID[1], 3)).astype(np.float32)
  cfg = _config(3, True, True)
  ours = jax.jit(flux_features.image_features_from_images, static_argnames=("flux_cfg", "cfg"))(
      autoencoder, params, flux_cfg, images, case["text"], case["pooled"], None, cfg, case["noise"])
  with torch.no_grad():
    z = vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist.mean
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
  b, c, h, w = z.shape
  tokens = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
  expected = torch_features(torch_flux, tokens.numpy(), case["noise"], case["text"], case["pooled"], cfg)
  assert relative_error(ours, expected) <= TOL


def test_settings_and_inputs_that_do_not_fit_are_one_line_errors(flux_params, case):
  flux_cfg, params = flux_params
  tokens, text, pooled, noise = case["tokens"], case["text"], case["pooled"], case["noise"]
  call = lambda cfg=_config(1, True, True), **kw: flux_features.image_features(
      params, flux_cfg, kw.get("tokens", tokens), kw.get("text", text), pooled, None, cfg, kw.get("grid", GRID),
      kw.get("noise", noise))
  for cfg, message in ((_config(5, True, True), r"block=5: this model has blocks 0..3 .* 4 for the output layer"),
                       (dataclasses.replace(_config(1, True, True), massive_channels=(3, 32)),
                        r"massive_channels \[32\]: outside the model's 32 channels")):
    with pytest.raises(FluxFeatureError, match=message):
      call(cfg)
  with pytest.raises(FluxFeatureError, match=r"need grid=\(rows, cols\) with rows \* cols = 24") as raised:
    call(grid=(5, 5))
  assert cli.is_user_error(raised.value)  # a launch script prints the line and exits 2
  with pytest.raises(FluxFeatureError, match=r"noise \(2, 2, 24, 16\): expected \(2, 3, 24, 16\)"):
    call(noise=noise[:, :2])
  with pytest.raises(FluxFeatureError, match=r"text \(3, 5, 24\): expected a leading axis of 1 .* or 2"):
    call(text=np.repeat(text, 3, 0))
  with pytest.raises(FluxFeatureError, match="needs a jax.random key or the noise itself"):
    call(noise=None)
  with pytest.raises(FluxFeatureError, match="copies=0"):
    DitfConfig(copies=0)
  with pytest.raises(FluxFeatureError, match=r"timestep=1.5"):
    DitfConfig(timestep=1.5)
