"""The composed config `subjects200k_multi` (mosaic_jax/data/composition.py) on a released layout of 28
planted pairs plus bad rows, written by the test (data_fixtures.released_multi_layout). Every composed
mask and coordinate grid is predicted from the example's provenance and the planted source pairs alone;
token pairs derived by the official rule at five training resolutions land where inverse placement says;
the build report accounts for every row; builds are reproducible; `subjects200k` keeps its schema; and
the recipe config asks for the composed set, naming the command that builds it."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

pytest.importorskip("torch")  # the fixture writes .pt files, as released

import data_fixtures  # noqa: E402
from mosaic_jax import cli  # noqa: E402
from mosaic_jax.configs import flux_ms  # noqa: E402
from mosaic_jax.data import build_report, composition, correspondence, pipeline  # noqa: E402
from mosaic_jax.data.composition import CompositionSettings  # noqa: E402
from mosaic_jax.data.semalign_ms import SemalignMs, SemalignMsConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = CompositionSettings(min_pairs=1, min_pairs_at=((512, 32), (64, 8)), max_uses=2, validation_fraction=0.25)
CONFIG = SemalignMsConfig(name="multi_test", source="subjects200k_multi", seed=5, composition=SETTINGS)
# (training resolution, token grid): the matchers' own 64 grid (FLUX at 1024 px; exact there), FLUX at
# 512 px, and demo-sized grids.
GRIDS = [(512, 64), (512, 32), (64, 8), (64, 4)]


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _build_dataset_script():
  spec = importlib.util.spec_from_file_location("build_dataset", os.path.join(ROOT, "launch", "build_dataset.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
  """CONFIG built by launch/build_dataset.py's main, as a user builds it."""
  layout = data_fixtures.released_multi_layout()
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    _build_dataset_script().main([
        "--config", "subjects200k_multi", "--name", CONFIG.name, "--seed", str(CONFIG.seed), "--manual_dir",
        layout["dir"], "--data_dir", data_dir, "--compose", "min_pairs=1", "--compose", "min_pairs_at=512x32,64x8",
        "--compose", "max_uses=2", "--compose", "validation_fraction=0.25"])
  builder = SemalignMs(config=CONFIG, data_dir=data_dir)
  metadata = dict(builder.info.metadata)
  assert metadata["composition"] == json.loads(json.dumps({**dataclasses.asdict(SETTINGS), "seed": CONFIG.seed}))
  records = {split: list(builder.as_data_source(split)) for split in ("train", "validation")}
  return layout, data_dir, printed.getvalue(), metadata, records


def _provenance(record, r: int) -> dict:
  prov = record["refs"]["provenance"]
  return {"uid": _text(prov["source_id"][r]), "row": _text(prov["source_row"][r]), "role": _text(prov["role"][r]),
          "order": int(prov["stack_order"][r]), "scale": float(prov["scale"][r]),
          "offset": np.asarray(prov["offset"][r], np.float64), "visible": float(prov["visible_fraction"][r])}


def _placed(mask: np.ndarray, scale: float, offset: np.ndarray) -> np.ndarray:
  """Composite pixel -> the source mask pixel under its inverse-placed centre (written out in 2-D)."""
  y, x = np.meshgrid(np.arange(512) + 0.5, np.arange(512) + 0.5, indexing="ij")
  sy, sx = np.floor((y - offset[0]) / scale).astype(int), np.floor((x - offset[1]) / scale).astype(int)
  inside = (sy >= 0) & (sy < 512) & (sx >= 0) & (sx < 512)
  placed = np.zeros((512, 512), bool)
  placed[inside] = mask[sy[inside], sx[inside]]
  return placed


def _expected(record, layout) -> list[dict]:
  """Per reference: provenance, its source pair, visible mask and both grids, predicted independently."""
  refs = [dict(_provenance(record, r)) for r in range(int(record["num_refs"]))]
  for ref in refs:
    ref["pair"] = layout["pairs"][ref["uid"]]
    ref["placed"] = _placed(ref["pair"]["mask"], ref["scale"], ref["offset"])
  for ref in refs:
    later = [other["placed"] for other in refs if other["order"] > ref["order"]]
    ref["visible_mask"] = ref["placed"] & ~np.any(later, axis=0) if later else ref["placed"]
    dift = np.zeros((64, 64, 2), np.uint8)
    geoaware = np.full((64, 64, 2), 63, np.uint8)
    for i in range(64):
      for j in range(64):
        if ref["visible_mask"][8 * i + 4, 8 * j + 4]:
          cell_y = int(np.floor((8 * i + 4.5 - ref["offset"][0]) / ref["scale"])) // 8
          cell_x = int(np.floor((8 * j + 4.5 - ref["offset"][1]) / ref["scale"])) // 8
          dift[i, j] = geoaware[i, j] = ref["pair"]["grid"][cell_y, cell_x]
    ref["grids"] = (dift, geoaware)
  return refs


def _crops(diptych: bytes) -> tuple[np.ndarray, np.ndarray]:
  image = Image.open(io.BytesIO(diptych)).convert("RGB")
  return np.asarray(image.crop((8, 8, 520, 520))), np.asarray(image.crop((528, 8, 1040, 520)))


def test_masks_grids_images_and_captions_follow_the_provenance(composed):
  layout, _, _, _, records = composed
  checked = 0
  for record in records["train"] + records["validation"]:
    refs = _expected(record, layout)
    assert [ref["order"] for ref in refs] == list(range(len(refs)))
    assert [ref["role"] for ref in refs] == ["scene"] + ["pasted"] * (len(refs) - 1)
    assert refs[0]["scale"] == 1.0 and not refs[0]["offset"].any()
    assert all(0 < ref["scale"] <= 1.0 for ref in refs)
    target = record["target"]
    scene_target, _ = _crops(refs[0]["pair"]["diptych"])
    pasted_anywhere = np.any([ref["placed"] for ref in refs[1:]], axis=0)
    np.testing.assert_array_equal(target[~pasted_anywhere], scene_target[~pasted_anywhere])
    for r, ref in enumerate(refs):
      np.testing.assert_array_equal(record["refs"]["target_mask"][r][..., 0], ref["visible_mask"] * 255)
      np.testing.assert_array_equal(record["refs"]["coord_dift"][r], ref["grids"][0])
      np.testing.assert_array_equal(record["refs"]["coord_geoaware"][r], ref["grids"][1])
      assert ref["visible"] == pytest.approx(ref["visible_mask"].sum() / ref["placed"].sum(), rel=1e-6)
      assert ref["visible"] >= SETTINGS.min_visible and ref["row"] == f"{ref['pair']['shard']} row {ref['pair']['row']}"
      source_target, reference = _crops(ref["pair"]["diptych"])
      np.testing.assert_array_equal(record["refs"]["image"][r], reference)
      if r:  # a pasted subject shows its own pixels (flat rectangles: Lanczos keeps their values)
        seen = ref["visible_mask"]
        y, x = np.nonzero(seen)
        sy = np.floor((y + 0.5 - ref["offset"][0]) / ref["scale"]).astype(int)
        sx = np.floor((x + 0.5 - ref["offset"][1]) / ref["scale"]).astype(int)
        close = np.abs(target[y, x].astype(int) - source_target[sy, sx]).max(axis=-1) <= 2
        assert close.mean() > 0.9
      checked += 1
    items = [ref["pair"]["item"] for ref in refs]
    listed = [f"the {item}" for item in items[1:]]
    listing = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " and " + listed[-1]
    assert _text(record["caption"]) == refs[0]["pair"]["caption"][:-1] + f", together with {listing}."
  assert checked >= 20


def _row_split(shard: str, row: int) -> str:
  """The documented split rule, written again: sha256 of 'shard:row', first 8 bytes below the fraction."""
  value = int.from_bytes(hashlib.sha256(f"{shard}:{row}".encode()).digest()[:8], "big")
  return "validation" if value < SETTINGS.validation_fraction * 2 ** 64 else "train"


def test_build_report_accounts_for_every_row_and_reuse_stays_within_limits(composed):
  layout, data_dir, printed, metadata, records = composed
  reports = metadata["build_report"]
  total = collections.Counter()
  for split in ("train", "validation"):
    counts = reports[split]["counts"]
    total.update(counts)
    assert counts["written"] == len(records[split]) == len(metadata["num_refs"][split])
    by_refs = collections.Counter(int(record["num_refs"]) for record in records[split])
    assert {k: v for k, v in counts.items() if k.startswith("written_with_")} == {
        build_report.written_with(r): n for r, n in by_refs.items()}
    assert set(by_refs) <= set(SETTINGS.refs)
    uses, scenes = collections.Counter(), collections.Counter()
    for record in records[split]:
      provenance = [_provenance(record, r) for r in range(int(record["num_refs"]))]
      uses.update(p["uid"] for p in provenance)
      scenes[provenance[0]["uid"]] += 1
      items = [layout["pairs"][p["uid"]]["item"].lower() for p in provenance]
      assert len(set(items)) == len(items)  # "Mug" and "mug" never meet
    assert max(uses.values()) <= SETTINGS.max_uses and max(scenes.values()) <= SETTINGS.max_scene_uses
    good_here = {uid for uid, pair in layout["pairs"].items() if _row_split(pair["shard"], pair["row"]) == split}
    assert set(uses) <= good_here  # the splits share no pair
    assert counts[build_report.PAIRS_USED] == len(uses)
    assert len(uses) + counts.get(build_report.PAIR_NO_ROOM, 0) + counts.get(build_report.PAIR_POOL_EXHAUSTED, 0) \
        == len(good_here)
    assert f"build report for split '{split}': {counts['written']} written, " in printed
  for _, reason in data_fixtures.MULTI_BAD_ROWS:
    assert total[reason] == 1, reason
  assert "source pairs skipped" in printed and metadata["composition"]["max_uses"] == 2
  # the command says what it builds; TFDS's "Downloading and preparing dataset Unknown size" does not
  assert f"building semalign_ms/{CONFIG.name}/1.0.0 into {data_dir}" in printed
  assert "Downloading and preparing" not in printed and "downloaded and prepared" not in printed


def _pair_sets(record, size: int, grid: int):
  config = pipeline.PipelineConfig(target_size=size, ref_size=size, token_pixels=size // grid, max_pairs=6 * 4096,
                                   dropout=False)
  example = pipeline.prepare_example(record, config, np.random.default_rng(0))
  valid = example["pair_valid"]
  return zip(example["pair_ref"][valid], example["pair_ref_token"][valid], example["pair_target_token"][valid])


def test_token_pairs_land_where_inverse_placement_says_at_every_grid(composed):
  """At the matchers' own 64 grid every pair is exactly the planted coordinate of the inverse-placed cell;
  on coarser grids (bilinear resize of the grids) within one token of it, never on a token the reference
  does not show; and every reference of every R has pairs at the grids the build checks (min_pairs_at)."""
  layout, data_dir, _, _, _ = composed
  builder = SemalignMs(config=CONFIG, data_dir=data_dir)
  per_r = collections.defaultdict(lambda: collections.defaultdict(list))
  for split in ("train", "validation"):
    source, num_refs = pipeline.open_split("semalign_ms/multi_test", split, builder=builder)
    decoded = builder.as_data_source(split)
    for index in range(len(source)):
      refs = _expected(decoded[index], layout)
      for size, grid in GRIDS:
        counts = [0] * num_refs[index]
        for r, ref_token, target_token in _pair_sets(source[index], size, grid):
          ref = refs[r]
          counts[r] += 1
          row, col = divmod(int(target_token), grid)
          centre = (np.array([row, col]) + 0.5) * 512 / grid + (0.5 if grid == 64 else 0.0)  # 64: the sample pixel
          cell = np.clip(np.floor((centre - ref["offset"]) / ref["scale"] / 8).astype(int), 0, 63)
          expected = ref["pair"]["grid"][cell[0], cell[1]].astype(int) * grid // 64
          derived = np.array(divmod(int(ref_token), grid))
          if grid == 64:
            np.testing.assert_array_equal(derived, expected)
          else:
            assert np.abs(derived - expected).max() <= 1, (size, grid, derived, expected)
          near = ref["visible_mask"][max(0, int(centre[0]) - 8):int(centre[0]) + 9,
                                     max(0, int(centre[1]) - 8):int(centre[1]) + 9]
          assert near.any(), (size, grid, r, target_token)  # not on a covered or empty part of the target
        per_r[(size, grid)][int(num_refs[index])].append(counts)
  for size, grid in SETTINGS.min_pairs_at:
    by_r = per_r[(size, grid)]
    assert set(by_r) == set(SETTINGS.refs)  # the fixture gives every R
    for r, examples in by_r.items():
      assert all(min(counts) >= SETTINGS.min_pairs for counts in examples), (size, grid, r, examples)


def _decoded(png: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(png)))


def test_builds_are_reproducible_for_a_seed(composed):
  """Composing the same directory again with the same seed gives the stored records, field by field;
  another seed composes other examples."""
  layout, _, _, _, records = composed
  for split in ("train", "validation"):
    again = list(composition.compose_released(layout["dir"], split, SETTINGS, CONFIG.seed,
                                              build_report.BuildReport(split)))
    assert len(again) == len(records[split])
    for stored, example in zip(records[split], again):
      assert _text(stored["id"]) == example["id"] and _text(stored["caption"]) == example["caption"]
      np.testing.assert_array_equal(stored["target"], _decoded(example["target"]))
      for r, ref in enumerate(example["refs"]):
        np.testing.assert_array_equal(stored["refs"]["image"][r], _decoded(ref["image"]))
        np.testing.assert_array_equal(stored["refs"]["target_mask"][r][..., 0], _decoded(ref["target_mask"]))
        for key in ("coord_dift", "coord_geoaware"):
          np.testing.assert_array_equal(stored["refs"][key][r], ref[key])
        for key, value in ref["provenance"].items():
          stored_value = stored["refs"]["provenance"][key][r]
          assert (_text(stored_value) == value if isinstance(value, str)
                  else np.array_equal(np.asarray(stored_value), np.asarray(value))), key
  other = composition.compose_released(layout["dir"], "train", SETTINGS, CONFIG.seed + 1,
                                       build_report.BuildReport("train"))
  placements = lambda examples: [(r["provenance"]["source_id"], float(r["provenance"]["offset"][0]))
                                 for example in examples for r in example["refs"]]
  mine = [(_text(p["source_id"][r]), float(p["offset"][r][0])) for record in records["train"]
          for p in [record["refs"]["provenance"]] for r in range(int(record["num_refs"]))]
  assert placements(other) != mine


def test_subjects200k_keeps_its_schema_and_the_composed_one_only_adds_provenance(composed):
  _, multi_dir, _, _, _ = composed
  single_dir, _, _ = data_fixtures.build("subjects200k", manual_dir=data_fixtures.released_layout()["dir"])

  def stored_features(data_dir, name):
    (path,) = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(data_dir, "semalign_ms", name))
               for f in files if f == "features.json"]
    return json.load(open(path))["featuresDict"]["features"]

  single, multi = stored_features(single_dir, "subjects200k"), stored_features(multi_dir, "multi_test")
  single_refs = single["refs"]["sequence"]["feature"]["featuresDict"]["features"]
  multi_refs = multi["refs"]["sequence"]["feature"]["featuresDict"]["features"]
  assert sorted(single) == ["caption", "id", "num_refs", "refs", "target"]
  assert sorted(single_refs) == ["coord_dift", "coord_geoaware", "has_coords", "has_mask", "image", "target_mask"]
  provenance = multi_refs.pop("provenance")["featuresDict"]["features"]
  assert sorted(provenance) == ["offset", "role", "scale", "source_id", "source_row", "stack_order",
                                "visible_fraction"]
  assert multi_refs == single_refs and {k: v for k, v in multi.items() if k != "refs"} == {
      k: v for k, v in single.items() if k != "refs"}
  for record in tfds.data_source("semalign_ms/subjects200k", data_dir=single_dir)["train"]:
    assert sorted(record) == sorted(single) and sorted(record["refs"]) == sorted(single_refs)


def test_a_directory_that_gives_no_example_is_one_line_naming_it(tmp_path):
  """The single-subject fixture has one usable pair: nothing to compose it with."""
  layout = data_fixtures.released_layout()
  builder = SemalignMs(config="subjects200k_multi", data_dir=str(tmp_path))
  with pytest.raises(composition.CompositionError) as raised, \
      open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=layout["dir"]))
  message = str(raised.value)
  assert message.startswith(f"{layout['dir']}: no train example could be composed") and "\n" not in message
  assert "skipped_pair_missing_mask 1" in message and "skipped_pair_pool_exhausted 1" in message
  assert cli.is_user_error(raised.value)


def test_settings_and_caption_rules_and_the_build_command_s_checks(capsys):
  with pytest.raises(ValueError, match=r"CompositionSettings\.refs=\(1, 2\): expected distinct reference counts"):
    CompositionSettings(refs=(1, 2))
  with pytest.raises(ValueError, match=r"CompositionSettings\.refs_weights=\(1\.0,\): expected \(\) or 2 non-negative"):
    CompositionSettings(refs=(3, 4), refs_weights=(1.0,))
  with pytest.raises(ValueError, match=r"CompositionSettings\.min_pairs_at=\(\(500, 32\),\): expected .* a multiple"):
    CompositionSettings(min_pairs_at=((500, 32),))
  parsed = CompositionSettings().replace(["refs=2,6", "refs_weights=1,3", "min_pairs_at=512x32,64x8",
                                          "distinct_items=false", "occlusion=forbid", "subject_size=0.2, 0.4"])
  assert (parsed.refs, parsed.refs_weights, parsed.min_pairs_at, parsed.distinct_items, parsed.occlusion,
          parsed.subject_size) == ((2, 6), (1.0, 3.0), ((512, 32), (64, 8)), False, "forbid", (0.2, 0.4))
  assert composition.caption("items", "A cat on a sofa.", ["cat", "red hat", "guitar"]) == \
      "A photo of the cat, the red hat and the guitar."
  assert composition.caption("scene_with_items", "A cat on a sofa. ", ["cat", "red hat"]) == \
      "A cat on a sofa, together with the red hat."
  build_dataset = _build_dataset_script()
  for argv, message in (
      (["--compose", "max_use=3", "--name", "x"], "--compose 'max_use=3': expected FIELD=VALUE with FIELD one of"),
      (["--compose", "max_uses=0", "--name", "x"], "CompositionSettings.max_uses=0: expected at least 1"),
      (["--compose", "max_uses=3"], "--compose needs --name"),
  ):
    with pytest.raises(SystemExit) as raised:
      build_dataset.main(["--config", "subjects200k_multi", "--manual_dir", "/nowhere", "--data_dir", "/nowhere",
                          *argv])
    assert raised.value.code == 2 and message in capsys.readouterr().err
  with pytest.raises(cli.UserError, match=r"--manual_dir /nowhere: no \*\.parquet shards under /nowhere"):
    build_dataset.main(["--config", "subjects200k_multi", "--manual_dir", "/nowhere", "--data_dir", "/nowhere"])


def test_source_disagreements_stay_and_uncovered_cells_carry_no_pair():
  """composite_grids on a scene (identity placement): a planted disagreement is kept as released; a cell
  whose sample pixel is not visible gets the no-pair marks, which the agreement rule drops at every grid
  even where the mask lets everything through."""
  grid = data_fixtures.symmetry_grid(1)
  other = grid.copy()
  other[10:14, 20:24, 0] = (other[10:14, 20:24, 0] + 7) % 64
  visible = np.ones((512, 512), bool)
  visible[:, 256:] = False
  dift, geoaware = composition.composite_grids((grid, other), composition.PixelTransform(), visible)
  np.testing.assert_array_equal(dift[:, :32], grid[:, :32])
  np.testing.assert_array_equal(geoaware[:, :32], other[:, :32])
  assert (dift[:, 32:] == 0).all() and (geoaware[:, 32:] == 63).all()
  for _, token_grid in GRIDS:
    _, target_tokens = correspondence.derive_token_pairs(dift, geoaware, np.ones((token_grid, token_grid), bool),
                                                         token_grid)
    rows, cols = np.divmod(target_tokens, token_grid)
    assert len(target_tokens) and (cols < token_grid // 2).all(), token_grid
    if token_grid == 64:
      assert not ((rows >= 10) & (rows < 14) & (cols >= 20) & (cols < 24)).any()


def test_the_recipe_trains_on_the_composed_set_and_says_how_to_build_it(tmp_path):
  assert flux_ms.get_config().dataset.name == "semalign_ms/subjects200k_multi"
  assert flux_ms.get_config("synthetic").dataset.name == "semalign_ms/synthetic"
  assert flux_ms.get_config("demo").dataset.name == "semalign_ms/synthetic_demo128"
  assert flux_ms.get_config("flux_random").dataset.name == "semalign_ms/synthetic_flux_random"
  command = (f"`python launch/build_dataset.py --config subjects200k_multi --manual_dir RELEASED_DIR "
             f"--data_dir {tmp_path}`")
  # The recipe with random encoders (no checkpoint needed) reaches the data step of a real run.
  run = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config",
                        os.path.join(ROOT, "configs", "flux_ms.py"), "--workdir", str(tmp_path / "run"),
                        "--config.encoders=random", f"--config.dataset.data_dir={tmp_path}"],
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 2, run.stderr[-3000:]
  (line,) = run.stderr.strip().splitlines()
  assert line.startswith("error: dataset semalign_ms/subjects200k_multi is not built under ") and command in line
  with pytest.raises(pipeline.DatasetError, match="build it with `python launch/build_dataset.py --config "
                                                  "subjects200k_multi --manual_dir RELEASED_DIR --data_dir "):
    pipeline.open_split("semalign_ms/subjects200k_multi", "train", str(tmp_path))
