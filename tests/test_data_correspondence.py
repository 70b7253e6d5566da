"""The official token-pair rule: bit-exact against PyTorch, and fixed-shape packing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mosaic_jax.data import correspondence

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _torch_resize_long(grid: np.ndarray, size: int) -> np.ndarray:
  """The official loader's resize of a [4096, 2] grid, in PyTorch."""
  tensor = torch.from_numpy(grid.reshape(4096, 2)).reshape(1, 64, 64, 2).permute(0, 3, 1, 2).float()
  tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)
  return tensor.permute(0, 2, 3, 1).reshape(size * size, 2).long().numpy()


def _torch_pairs(dift, geoaware, mask_pil, target_size, ref_size):
  """An independent PyTorch statement of the official rule, returning {ref token: target token}."""
  grid, ref_grid = target_size // 16, ref_size // 16
  dift_t = torch.from_numpy(_torch_resize_long(dift, grid)) if grid != 64 else torch.from_numpy(
      dift.reshape(-1, 2))
  geo_t = torch.from_numpy(_torch_resize_long(geoaware, grid)) if grid != 64 else torch.from_numpy(
      geoaware.reshape(-1, 2))
  resized = mask_pil.resize((target_size, target_size), Image.NEAREST)
  mask = (torch.from_numpy(np.asarray(resized, np.float32) / 255.0) > 0.5).float()[None, None]
  cells = F.interpolate(mask, size=(grid, grid), mode="nearest")[0, 0].reshape(-1) > 0
  agree = (dift_t == geo_t).all(dim=1) & cells
  result = {}
  for target_token in torch.nonzero(agree)[:, 0].tolist():
    y, x = (dift_t[target_token] * ref_grid // 64).tolist()
    result.setdefault(y * ref_grid + x, target_token)
  return result


@pytest.mark.parametrize("size", [8, 12, 16, 24, 32, 40, 48, 56, 64])
def test_resize_matches_torch_bilinear_then_long(size):
  rng = np.random.default_rng(size)
  for _ in range(5):
    grid = rng.integers(0, 64, size=(64, 64, 2))
    ours = correspondence.resize_coordinate_grid(grid, size).reshape(-1, 2)
    np.testing.assert_array_equal(ours, _torch_resize_long(grid, size))


@pytest.mark.parametrize("mask_size,target_size", [(512, 512), (512, 256), (512, 768), (300, 512)])
def test_mask_cells_match_torchvision_nearest_then_torch_nearest(mask_size, target_size):
  rng = np.random.default_rng(mask_size + target_size)
  mask = (rng.random((mask_size // 8, mask_size // 8)) > 0.5).astype(np.uint8) * 255
  mask = np.asarray(Image.fromarray(mask).resize((mask_size, mask_size), Image.NEAREST))
  grid = target_size // 16
  resized = Image.fromarray(mask).resize((target_size, target_size), Image.NEAREST)
  tensor = (torch.from_numpy(np.asarray(resized, np.float32) / 255.0) > 0.5).float()[None, None]
  expected = F.interpolate(tensor, size=(grid, grid), mode="nearest")[0, 0].numpy() > 0
  np.testing.assert_array_equal(correspondence.mask_token_cells(mask, target_size, grid), expected)


@pytest.mark.parametrize("target_size,ref_size", [(512, 512), (256, 512), (768, 384), (1024, 512)])
def test_pairs_match_an_independent_torch_statement_of_the_rule(target_size, ref_size):
  rng = np.random.default_rng(target_size + ref_size)
  dift = rng.integers(0, 64, size=(64, 64, 2))
  # Smooth-ish agreement pattern: GeoAware agrees on about 70% of 8x8 patches.
  agree = np.kron(rng.random((8, 8)) < 0.7, np.ones((8, 8), bool))
  geoaware = np.where(agree[..., None], dift, (dift + 1) % 64)
  mask = np.kron((rng.random((16, 16)) < 0.6).astype(np.uint8) * 255, np.ones((32, 32), np.uint8))
  mask_pil = Image.fromarray(mask)
  grid = target_size // 16
  cells = correspondence.mask_token_cells(mask, target_size, grid)
  ref_tokens, target_tokens = correspondence.derive_token_pairs(dift, geoaware, cells, ref_size // 16)
  expected = _torch_pairs(dift, geoaware, mask_pil, target_size, ref_size)
  assert len(expected) > 20  # the case is not trivial
  assert dict(zip(ref_tokens.tolist(), target_tokens.tolist())) == expected
  assert list(target_tokens) == sorted(target_tokens)  # official order: by first target token


def test_pack_pairs_pads_and_subsamples_reproducibly():
  per_ref = [(np.arange(5, dtype=np.int32), np.arange(5, dtype=np.int32) + 100),
             (np.arange(3, dtype=np.int32), np.arange(3, dtype=np.int32) + 200)]
  packed = correspondence.pack_pairs(per_ref, 10, np.random.default_rng(0))
  assert packed["pair_valid"].tolist() == [True] * 8 + [False] * 2
  assert packed["pair_ref"][:8].tolist() == [0] * 5 + [1] * 3
  assert packed["pair_target_token"][:8].tolist() == [100, 101, 102, 103, 104, 200, 201, 202]
  small_a = correspondence.pack_pairs(per_ref, 4, np.random.default_rng(1))
  small_b = correspondence.pack_pairs(per_ref, 4, np.random.default_rng(1))
  for key in small_a:
    np.testing.assert_array_equal(small_a[key], small_b[key])
  assert small_a["pair_valid"].all()
  # every kept pair is one of the inputs
  originals = {(0, t, t + 100) for t in range(5)} | {(1, t, t + 200) for t in range(3)}
  kept = set(zip(small_a["pair_ref"].tolist(), small_a["pair_ref_token"].tolist(),
                 small_a["pair_target_token"].tolist()))
  assert kept <= originals and len(kept) == 4


def test_token_grid_rejects_sizes_that_are_not_whole_tokens():
  assert correspondence.token_grid(512) == 32
  with pytest.raises(ValueError, match="multiple of 16"):
    correspondence.token_grid(500)


def test_token_grid_follows_the_pixels_per_token():
  # The demo's pixel autoencoder with patch 4 gives 8 px per token; FLUX's 16 stays the default.
  assert correspondence.token_grid(64, token_pixels=8) == 8
  assert correspondence.token_grid(64) == 4
  with pytest.raises(ValueError, match="multiple of 8"):
    correspondence.token_grid(60, token_pixels=8)
