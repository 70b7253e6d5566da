"""MOSAIC's matching rule (mosaic_jax.correspondence.matching) against the official scripts' steps.

The reference is tests/matching_torch_reference.py, a torch/PIL statement of
preprocess/dift_point_matching.py, preprocess/geoaware_point_matching.py and the Subjects200K dataset
class (ref_size = tgt_size = 1024): CI has neither torchvision nor the official repository. That statement
was checked once against the official code itself, run with the real torchvision
(tests/official_matching_oneoff.py, whose docstring has the commands):

  /tmp/match_tv_venv/bin/python tests/official_matching_oneoff.py official \
      --mirror /work/.mirror/bytedance-fanqie-ai+MOSAIC/repo --out /tmp/official_matching.npz
  PYTHONPATH=$PWD /work/main/.venv/bin/python tests/official_matching_oneoff.py compare \
      --npz /tmp/official_matching.npz

Compared here, bit for bit: the prepared images (masked target; reference with its white background
zeroed by each script's rule), the stored grids from the same feature maps (dot product and cosine), and
the token pairs those grids give through data/correspondence.py at 512 px and at 64 cells.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

import matching_torch_reference as reference  # noqa: E402  (tests/ is on sys.path under pytest)
from official_matching_oneoff import scene, soft_mask, subject_on_white  # noqa: E402
from mosaic_jax.correspondence import matching  # noqa: E402
from mosaic_jax.data import correspondence  # noqa: E402

# (target shape, reference shape, mask kind): the released crops (512 squares) and users' own shapes;
# the mask at half the target's size, as masks often come, or missing (the official full mask).
CASES = [((512, 512), (512, 512), "soft"), ((384, 700), (700, 700), "missing"), ((1100, 1300), (512, 256), "soft")]


GRID_CASES = (0, 1)


@pytest.fixture(scope="module")
def prepared():
  """Per case: inputs, our prepared images, the reference's prepared images."""
  rng = np.random.default_rng(7)
  out = []
  for (th, tw), (rh, rw), kind in CASES:
    target = Image.fromarray(scene(rng, th, tw))
    ref = Image.fromarray(subject_on_white(rng, rh, rw))
    mask = None if kind == "missing" else Image.fromarray(soft_mask(rng, th // 2, tw // 2, kind))
    out.append({
        "target": target, "ref": ref, "mask": mask,
        "ours": {"target": matching.prepare_target(target, mask),
                 "dift": matching.prepare_reference(ref, "dift"),
                 "geoaware": matching.prepare_reference(ref, "geoaware")},
        "theirs": {"target": np.asarray(reference.target_image(target, mask)),
                   "dift": np.asarray(reference.dift_reference_image(ref)),
                   "geoaware": np.asarray(reference.geoaware_reference_image(ref))},
    })
  return out


def test_prepared_images_equal_the_scripts_bit_for_bit(prepared):
  for case in prepared:
    for key in ("target", "dift", "geoaware"):
      ours, theirs = case["ours"][key], case["theirs"][key]
      assert ours.shape == theirs.shape == (1024, 1024, 3) and ours.dtype == np.uint8
      np.testing.assert_array_equal(ours, theirs, err_msg=key)
  # the two white rules really differ, and zero something: the reference's background is gone
  dift, geoaware = prepared[0]["ours"]["dift"], prepared[0]["ours"]["geoaware"]
  assert (dift == 0).all(axis=-1).mean() > 0.3 and (geoaware != dift).any()


def test_white_tolerance_edges_follow_each_script():
  """Flat patches at 244..255: DIFT zeroes a pixel when every channel is >= 250 (5 of 255), GeoAware
  when every channel is within 10/255 of 1.0 in float32, which the loader's float round trip decides."""
  values = np.arange(240, 256, dtype=np.uint8)
  ref = Image.fromarray(np.repeat(np.repeat(values[None, :, None], 3, axis=2), 1024, axis=0).repeat(64, axis=1))
  for slot, prepare in (("dift", reference.dift_reference_image), ("geoaware", reference.geoaware_reference_image)):
    ours = matching.prepare_reference(ref, slot)
    np.testing.assert_array_equal(ours, np.asarray(prepare(ref)))
    zeroed = [int(v) for v, column in zip(values, range(32, 1024, 64)) if not ours[:, column].any()]
    assert zeroed == ([250, 251, 252, 253, 254, 255] if slot == "dift" else list(range(245, 256))), slot


def test_an_empty_mask_is_skipped_as_the_scripts_do():
  target = Image.fromarray(np.full((64, 96, 3), 90, np.uint8))
  assert matching.prepare_target(target, Image.fromarray(np.zeros((64, 96), np.uint8))) is None
  assert reference.target_image(target, Image.fromarray(np.zeros((64, 96), np.uint8))) is None
  # grey 127 is below the 0.5 threshold too; 128 is above
  assert matching.prepare_target(target, Image.fromarray(np.full((64, 96), 127, np.uint8))) is None
  assert matching.prepare_target(target, Image.fromarray(np.full((64, 96), 128, np.uint8))) is not None


@pytest.fixture(scope="module")
def grids(prepared):
  """Our grids (both slots, both similarities) and the reference's, from the same feature maps, for the
  released shape with a mask and a non-square one without (each grid costs seconds here)."""
  return [(prepared[index], *_grids(prepared[index])) for index in GRID_CASES]


def _grids(case, depth=48):
  ours, theirs = {}, {}
  target_features = reference.planted_features(case["ours"]["target"], depth)
  for slot in ("dift", "geoaware"):
    ref_features = reference.planted_features(case["ours"][slot], depth)
    for similarity in matching.SIMILARITIES:
      cells = matching.match_cells(target_features[None], ref_features[None], similarity)
      ours[slot, similarity] = matching.stored_grid(np.asarray(cells)[0])
      as_torch = [torch.from_numpy(f).permute(2, 0, 1) for f in (target_features, ref_features)]
      theirs[slot, similarity] = reference.match(*as_torch, cosine=similarity == "cosine").numpy()
  return ours, theirs


def test_grids_equal_the_scripts_argmax_for_dot_and_cosine(grids):
  for _, ours, theirs in grids:
    for key in ours:
      np.testing.assert_array_equal(ours[key].reshape(-1, 2).astype(np.int64), theirs[key], err_msg=str(key))
    # dot product and cosine really pick different cells on these features
    assert (ours["dift", "dot"] != ours["dift", "cosine"]).any()


@pytest.mark.parametrize("size", [512, 1024])
def test_token_pairs_of_our_grids_equal_the_official_loader(grids, size):
  """Our stored grids -> data/correspondence.py pairs == the official loader on the scripts' grids (both
  slots cosine, the default: their prepared references differ only at the white rules' edges)."""
  total = 0
  for case, ours, theirs in grids:
    dift, geoaware = ours["dift", "cosine"], ours["geoaware", "cosine"]
    grid = correspondence.token_grid(size)
    mask = case["mask"]
    mask_cells = (correspondence.mask_token_cells(np.asarray(mask), size, grid) if mask is not None
                  else np.ones((grid, grid), bool))
    ref_tokens, target_tokens = correspondence.derive_token_pairs(dift, geoaware, mask_cells, grid)
    expected = reference.token_pairs(torch.from_numpy(theirs["dift", "cosine"]),
                                     torch.from_numpy(theirs["geoaware", "cosine"]), mask, size)
    assert dict(zip(ref_tokens.tolist(), target_tokens.tolist())) == expected
    total += len(expected)
  assert total > 100  # the two slots agree on most cells: many pairs are really compared


def test_match_cells_is_a_per_pair_argmax_over_a_batch():
  rng = np.random.default_rng(0)
  targets = rng.standard_normal((3, 4, 5, 8)).astype(np.float32)
  refs = rng.standard_normal((3, 6, 7, 8)).astype(np.float32)
  cells = np.asarray(matching.match_cells(targets, refs, "dot"))
  assert cells.shape == (3, 4, 5, 2)
  for b in range(3):
    scores = targets[b].reshape(-1, 8) @ refs[b].reshape(-1, 8).T
    best = scores.argmax(axis=1)
    np.testing.assert_array_equal(cells[b].reshape(-1, 2), np.stack([best // 7, best % 7], axis=1))


def test_bad_settings_are_named():
  with pytest.raises(ValueError, match="similarity 'l2'"):
    matching.check_similarity("l2")
  with pytest.raises(ValueError, match="slot 'dino'"):
    matching.prepare_reference(Image.new("RGB", (8, 8)), "dino")
  with pytest.raises(ValueError, match=r"\(64, 64, 2\)"):
    matching.stored_grid(np.zeros((32, 32, 2)))
