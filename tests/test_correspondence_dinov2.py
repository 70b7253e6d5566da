"""DINOv2 patch features (correspondence/dinov2.py) against transformers' Dinov2Model in PyTorch.

The full ViT-B/14 (random weights, saved by save_pretrained) at GeoAware's 896 px in the transformers
position rule; the torch.hub rule against the same torch model with the hub's interpolation restated here
and patched in; PyTorch's F.interpolate for both rules (and the antialiased one of register models);
registers, an S/14-wide model and a classification folder on small configs; the preprocessing against
PIL and torch by hand; bad folders and inputs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from evaluation_fixtures import randomize_
from test_encoders_text import assert_close

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = torch.nn.functional

from mosaic_jax.correspondence import dinov2  # noqa: E402
from mosaic_jax.interop.tensor_table import CheckpointError  # noqa: E402

features = jax.jit(dinov2.patch_features, static_argnames=("layer", "positions"))


def hub_interpolation(patch_pos_embed, grid_h: int, grid_w: int):
  """The torch.hub DINOv2's resize (facebookresearch/dinov2 `interpolate_pos_encoding`, interpolate_offset
  0.1, no antialias), restated: [1, D, M, M] -> [1, D, grid_h, grid_w] by a scale factor per side; the
  checkpoint's own grid is used as it is."""
  m = patch_pos_embed.shape[-1]
  if (grid_h, grid_w) == (m, m):
    return patch_pos_embed
  return F.interpolate(patch_pos_embed, scale_factor=((grid_h + 0.1) / m, (grid_w + 0.1) / m), mode="bicubic",
                       align_corners=False)


@contextlib.contextmanager
def hub_positions(model):
  """Within the block, a transformers Dinov2Model adds position embeddings resized the hub's way."""
  embeddings = model.embeddings

  def interpolate_pos_encoding(tokens, height, width):
    table = embeddings.position_embeddings
    m, d = math.isqrt(table.shape[1] - 1), table.shape[-1]
    grid_h, grid_w = height // embeddings.patch_size, width // embeddings.patch_size
    grid = table[:, 1:].reshape(1, m, m, d).permute(0, 3, 1, 2)
    grid = hub_interpolation(grid, grid_h, grid_w).permute(0, 2, 3, 1).reshape(1, -1, d)
    return torch.cat([table[:, :1], grid], dim=1)

  embeddings.interpolate_pos_encoding = interpolate_pos_encoding
  try:
    yield model
  finally:
    del embeddings.interpolate_pos_encoding  # the class's method again


def torch_patch_tokens(model, pixels, layer: int, registers: int = 0):
  """hidden_states[layer + 1] (block `layer`'s output, before the final norm), patches only, as a grid."""
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))),
                output_hidden_states=True)
  tokens = out.hidden_states[layer + 1][:, 1 + registers:].numpy()
  patch = model.config.patch_size
  return tokens.reshape(pixels.shape[0], pixels.shape[1] // patch, pixels.shape[2] // patch, -1)


def random_image(height, width, seed):
  """A smooth random picture (blurred noise upsampled), so resizes and features see structure."""
  rng = np.random.default_rng(seed)
  small = Image.fromarray(rng.integers(0, 256, (max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8))
  noise = rng.integers(-20, 21, (height, width, 3))
  return Image.fromarray(np.clip(np.asarray(small.resize((width, height), Image.BICUBIC)) + noise, 0, 255)
                         .astype(np.uint8))


def save_random(model_class, config, folder, seed):
  """(torch model, folder): built on the meta device (transformers' own init of B/14 takes 15 s here and
  is overwritten anyway), every weight random, saved by save_pretrained."""
  with torch.device("meta"):
    model = model_class(config)
  model = model.to_empty(device="cpu").eval()
  randomize_(model, seed)
  model.save_pretrained(str(folder))
  return model, str(folder)


@pytest.fixture(scope="module")
def b14(tmp_path_factory):
  """(torch Dinov2Model at ViT-B/14's full shape, our loaded model): every weight random."""
  torch_model, folder = save_random(transformers.Dinov2Model, transformers.Dinov2Config(image_size=518),
                                    tmp_path_factory.mktemp("dinov2") / "b14", seed=11)
  return torch_model, dinov2.load_dinov2(folder)


# ---- position embeddings --------------------------------------------------------------------------

@pytest.mark.parametrize("registers", [0, 4])
def test_position_resizes_equal_torch_interpolate(registers):
  cfg = dinov2.dinov2_vitb14(registers)
  table = np.random.default_rng(0).standard_normal((1 + 37 * 37, 6)).astype(np.float32)
  grid = torch.from_numpy(table[1:].reshape(1, 37, 37, 6)).permute(0, 3, 1, 2)
  params = {"position_embedding": {"embedding": jnp.asarray(table)}}
  for grid_h, grid_w in [(64, 64), (16, 16), (32, 50), (37, 37), (10, 80)]:
    size_rule = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False,
                              antialias=bool(registers))
    expected = {"transformers": size_rule,
                "hub": size_rule if registers else hub_interpolation(grid, grid_h, grid_w)}
    for positions, ref in expected.items():
      ours = np.asarray(dinov2.position_embeddings(params, cfg, grid_h, grid_w, positions))
      np.testing.assert_array_equal(ours[0], table[0])
      ref = ref.permute(0, 2, 3, 1).reshape(-1, 6).numpy()
      # Exact up to float32 summation order: a few units in the last place of values up to ~4.
      np.testing.assert_allclose(ours[1:], ref, rtol=0, atol=2e-6, err_msg=f"{positions} {grid_h}x{grid_w}")
  if not registers:  # the two rules really differ (the test above could not pass with one for the other)
    ours = [np.asarray(dinov2.position_embeddings(params, cfg, 64, 64, p)) for p in ("hub", "transformers")]
    assert np.max(np.abs(ours[0] - ours[1])) > 0.1


def test_interpolation_matrix_refuses_a_scale_factor_that_makes_another_size():
  with pytest.raises(ValueError, match="makes 63 cells from 37, not 64"):
    dinov2.interpolation_matrix(37, 64, 63.9 / 37)


# ---- full ViT-B/14 ---------------------------------------------------------------------------------

def test_b14_at_896_px_equals_transformers_hidden_state_12(b14):
  torch_model, ours = b14
  assert ours.config == dinov2.dinov2_vitb14()
  pixels = dinov2.preprocess(random_image(700, 500, seed=1))[None]
  assert pixels.shape == (1, 896, 896, 3)
  ref = torch_patch_tokens(torch_model, pixels, layer=11)
  # 1024 queries at a time (4097 padded to 5120): the chunked attention, at half the peak memory.
  got = features(ours.with_attention("xla", query_chunk=1024), pixels, layer=11, positions="transformers")
  assert got.shape == (1, 64, 64, 768) and got.dtype == jnp.float32
  assert_close(got, ref, "B/14 layer 11 patch tokens at 896 px (transformers rule)")


def test_b14_hub_rule_equals_transformers_with_the_hubs_position_resize(b14):
  # 448 px (a 32x32 grid) keeps the test affordable: the resize itself is checked at 64x64 above and
  # growing the grid through the model on the S/14-wide model below.
  torch_model, ours = b14
  pixels = dinov2.preprocess(random_image(400, 600, seed=2), size=448)[None]
  with hub_positions(torch_model):
    ref = torch_patch_tokens(torch_model, pixels, layer=11)
  assert_close(features(ours, pixels), ref, "B/14 layer 11 patch tokens at 448 px (hub rule, the default)")


# ---- tiny configs ----------------------------------------------------------------------------------

def test_registers_model_equals_transformers(tmp_path):
  config = transformers.Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                  image_size=56, patch_size=14, num_register_tokens=3)
  torch_model, folder = save_random(transformers.Dinov2WithRegistersModel, config, tmp_path / "reg", seed=5)
  ours = dinov2.load_dinov2(folder)
  assert ours.config.num_register_tokens == 3 and ours.params["register_tokens"]["embedding"].shape == (3, 32)
  pixels = np.stack([dinov2.preprocess(random_image(60, 90, seed=s), size=98, squash=128) for s in (3, 4)])
  for layer, positions in ((0, "transformers"), (1, "hub")):  # register models resize one way under both rules
    ref = torch_patch_tokens(torch_model, pixels, layer, registers=3)
    assert_close(dinov2.patch_features(ours, pixels, layer, positions), ref, f"registers, block {layer}")


def test_s14_wide_model_shrinking_and_growing_the_position_grid(tmp_path):
  config = transformers.Dinov2Config(hidden_size=384, num_attention_heads=6, num_hidden_layers=2, image_size=518)
  torch_model, folder = save_random(transformers.Dinov2Model, config, tmp_path / "s14", seed=6)
  ours = dinov2.load_dinov2(folder)
  assert ours.config.vit.intermediate_size == 1536 and ours.config.vit.head_dim == 64
  pixels = dinov2.preprocess(random_image(224, 224, seed=7), size=224)[None]  # 16x16 from 37x37
  assert_close(dinov2.patch_features(ours, pixels, 0, "transformers"), torch_patch_tokens(torch_model, pixels, 0),
               "S/14 block 0 at 224 px (transformers rule)")
  pixels = dinov2.preprocess(random_image(300, 200, seed=8), size=644)[None]  # 46x46, GeoAware-like growth
  with hub_positions(torch_model):
    ref = torch_patch_tokens(torch_model, pixels, 1)
  assert_close(dinov2.patch_features(ours, pixels, 1, "hub"), ref, "S/14 block 1 at 644 px (hub rule)")


def test_a_classification_folder_loads_its_backbone(tmp_path):
  config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                                     num_labels=3)
  torch_model, folder = save_random(transformers.Dinov2ForImageClassification, config, tmp_path / "cls", seed=9)
  ours = dinov2.load_dinov2(folder)  # the `dinov2.` prefix dropped, the classifier skipped
  np.testing.assert_array_equal(ours.params["final_norm"]["scale"], torch_model.dinov2.layernorm.weight.detach().numpy())
  np.testing.assert_array_equal(ours.params["layers"]["layer_scale2"]["scale"][0],
                                torch_model.dinov2.encoder.layer[0].layer_scale2.lambda1.detach().numpy())


# ---- preprocessing ---------------------------------------------------------------------------------

def by_hand(image, squash, size):
  """MOSAIC's squash (PIL bicubic), GeoAware's LANCZOS resize, then ToTensor + Normalize as torch ops."""
  image = image.convert("RGB").resize((squash, squash), Image.BICUBIC).resize((size, size), Image.LANCZOS)
  pixels = torch.from_numpy(np.array(image)).to(torch.float32).div(255)
  mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
  return ((pixels - mean) / std).numpy()


def test_preprocess_equals_the_official_resizes_by_hand():
  image = random_image(300, 200, seed=8)
  ours = dinov2.preprocess(image)
  assert ours.shape == (896, 896, 3) and ours.dtype == np.float32
  np.testing.assert_array_equal(ours, by_hand(image, 1024, 896))
  # Already 1024 px (as the matcher prepares images): only the LANCZOS resize; arrays and RGBA accepted.
  square = random_image(1024, 1024, seed=9)
  np.testing.assert_array_equal(dinov2.preprocess(np.asarray(square)), by_hand(square, 1024, 896))
  np.testing.assert_array_equal(dinov2.preprocess(square.convert("RGBA")), dinov2.preprocess(square))
  with pytest.raises(ValueError, match="expected uint8"):
    dinov2.preprocess(np.zeros((8, 8, 3), np.float32))


# ---- bad input -------------------------------------------------------------------------------------

def test_bad_folders_and_inputs_are_named(b14, tmp_path):
  _, ours = b14
  with pytest.raises(CheckpointError, match="no config.json; expected a transformers Dinov2Model folder"):
    dinov2.load_dinov2(str(tmp_path))
  from safetensors import safe_open
  from safetensors.torch import save_file
  broken = tmp_path / "broken"
  broken.mkdir()
  config = json.load(open(os.path.join(ours.folder, "config.json")))
  (broken / "config.json").write_text(json.dumps(config))
  with safe_open(os.path.join(ours.folder, "model.safetensors"), "pt") as saved:  # the saved file, one tensor less
    save_file({k: saved.get_tensor(k) for k in saved.keys() if k != "encoder.layer.7.norm2.weight"},
              str(broken / "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"1 missing keys:\n    encoder.layer.7.norm2.weight"):
    dinov2.load_dinov2(str(broken))
  (broken / "config.json").write_text(json.dumps({**config, "model_type": "vit"}))
  with pytest.raises(CheckpointError, match=r"config.json: model_type is 'vit', expected one of"):
    dinov2.load_dinov2(str(broken))
  (broken / "config.json").write_text(json.dumps({**config, "use_swiglu_ffn": True}))
  with pytest.raises(CheckpointError, match="use_swiglu_ffn=True"):
    dinov2.load_dinov2(str(broken))
  with pytest.raises(ValueError, match=r"pixels of shape \(1, 900, 896, 3\)"):
    dinov2.patch_features(ours, np.zeros((1, 900, 896, 3), np.float32))
  with pytest.raises(ValueError, match="layer=12: this DINOv2 has blocks 0..11"):
    dinov2.patch_features(ours, np.zeros((1, 896, 896, 3), np.float32), layer=12)
  with pytest.raises(ValueError, match="positions='timm'"):
    dinov2.patch_features(ours, np.zeros((1, 896, 896, 3), np.float32), positions="timm")
