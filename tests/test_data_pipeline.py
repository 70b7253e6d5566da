"""The input pipeline: shapes, bucketing, dropout, determinism, resume, process slices, global arrays."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import data_fixtures
from mosaic_jax.data import global_batch, pipeline

CONFIG = pipeline.PipelineConfig(target_size=128, ref_size=64, global_batch_size=2, max_pairs=96,
                                 seed=5, read_threads=2, prefetch_buffer=4)


@pytest.fixture(scope="module")
def split():
  data_dir, _, _ = data_fixtures.tiny_synthetic()
  return pipeline.open_split("semalign_ms/synthetic_tiny", "train", data_dir)


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batches_have_fixed_shapes_one_reference_count_and_valid_pairs(split):
  source, num_refs = split
  iterator = pipeline.make_iterator(source, num_refs, CONFIG)
  seen_counts = set()
  for batch in _take(iterator, 2 * iterator.plan.batches_per_epoch):
    b, r = batch["refs"].shape[:2]
    seen_counts.add(r)
    assert batch["target"].shape == (2, 128, 128, 3) and batch["target"].dtype == np.float32
    assert batch["refs"].shape == (2, r, 64, 64, 3)
    assert -1 <= batch["target"].min() and batch["target"].max() <= 1
    assert -1 <= batch["refs"].min() and batch["refs"].max() <= 1
    assert (num_refs[batch["record_index"]] == r).all()  # bucketing: every sample has R references
    for key in ("pair_ref", "pair_ref_token", "pair_target_token"):
      assert batch[key].shape == (2, 96) and batch[key].dtype == np.int32
    valid = batch["pair_valid"]
    assert valid.any(axis=1).all()
    assert (batch["pair_ref"][valid] < r).all()
    assert (batch["pair_ref_token"][valid] < 4 * 4).all()  # 64 px reference: 4x4 tokens
    assert (batch["pair_target_token"][valid] < 8 * 8).all()
    assert (batch["pair_ref"][~valid] == 0).all()
    assert batch["caption"].shape == (2,) and batch["drop_refs"].dtype == bool
    for caption, dropped in zip(batch["caption"], batch["drop_caption"]):
      assert (caption == "") == bool(dropped)
  assert seen_counts == set(iterator.reference_counts) and len(seen_counts) > 1


def test_each_reference_contributes_pairs_in_multi_reference_samples(split):
  source, num_refs = split
  config = pipeline.PipelineConfig(target_size=128, ref_size=128, max_pairs=1024, dropout=False)
  record = int(np.argmax(num_refs))
  example = pipeline.prepare_example(source[record], config, np.random.default_rng(0))
  refs_with_pairs = set(example["pair_ref"][example["pair_valid"]].tolist())
  assert refs_with_pairs == set(range(int(num_refs[record])))


def test_same_seed_gives_the_same_batches_and_another_seed_does_not(split):
  source, num_refs = split
  first = _take(pipeline.make_iterator(source, num_refs, CONFIG), 4)
  again = _take(pipeline.make_iterator(source, num_refs, CONFIG), 4)
  _assert_same(first, again)
  other = _take(pipeline.make_iterator(source, num_refs, pipeline.PipelineConfig(
      **{**CONFIG.__dict__, "seed": 6})), 4)
  assert any(not np.array_equal(a["record_index"], b["record_index"]) for a, b in zip(first, other))


@pytest.mark.parametrize("stop_after", [3, 6])  # 6 crosses the epoch boundary (5 batches/epoch)
def test_restoring_after_n_batches_gives_batch_n_plus_1(split, stop_after):
  source, num_refs = split
  uninterrupted = _take(pipeline.make_iterator(source, num_refs, CONFIG), stop_after + 2)
  first_run = pipeline.make_iterator(source, num_refs, CONFIG)
  _take(first_run, stop_after)
  state = first_run.get_state()
  assert state["step"] == stop_after
  resumed = pipeline.make_iterator(source, num_refs, CONFIG)
  resumed.set_state(state)
  _assert_same(_take(resumed, 2), uninterrupted[stop_after:])


def test_restoring_a_state_from_other_data_is_refused(split):
  source, num_refs = split
  iterator = pipeline.make_iterator(source, num_refs, CONFIG)
  with pytest.raises(ValueError, match="global_batch_size=4 but this pipeline has 2"):
    iterator.set_state({**iterator.get_state(), "global_batch_size": 4})


def test_two_processes_read_disjoint_slices_that_cover_each_global_batch(split):
  source, num_refs = split
  config = pipeline.PipelineConfig(**{**CONFIG.__dict__, "global_batch_size": 2})
  single = pipeline.make_iterator(source, num_refs, config)
  processes = [pipeline.make_iterator(source, num_refs, config, process_index=p, process_count=2)
               for p in range(2)]
  for _ in range(single.plan.batches_per_epoch + 1):
    whole = next(single)
    parts = [next(process) for process in processes]
    assert parts[0]["refs"].shape == parts[1]["refs"].shape  # same R on every process
    assert not set(parts[0]["record_index"]) & set(parts[1]["record_index"])
    combined = {key: np.concatenate([part[key] for part in parts]) for key in whole}
    _assert_same([combined], [whole])


def test_every_record_at_most_once_per_epoch_and_buckets_lose_less_than_a_batch(split):
  _, num_refs = split
  plan = pipeline.BatchPlan(num_refs, global_batch_size=2, seed=1)
  records, counts = plan.epoch(0)
  assert len(np.unique(records)) == records.size
  assert (num_refs[records] == counts[:, None]).all()
  for r in np.unique(num_refs):
    assert (num_refs == r).sum() - (counts == r).sum() * 2 < 2
  assert not np.array_equal(plan.epoch(0)[0], plan.epoch(1)[0])


def test_dropout_follows_the_official_rates():
  flags = np.array([pipeline.dropout_flags(np.random.default_rng([0, i])) for i in range(20000)])
  refs_only = (flags[:, 0] & ~flags[:, 1]).mean()
  caption_only = (~flags[:, 0] & flags[:, 1]).mean()
  both = (flags[:, 0] & flags[:, 1]).mean()
  for rate in (refs_only, caption_only, both):
    assert abs(rate - 0.05) < 0.008


def _paired_patch_differences(source, config):
  """Mean colour difference of each pair's reference and target token patches (first 6 records), and
  the same with the reference patches shuffled (the no-correspondence baseline); square images."""
  token_pixels, grid = config.token_pixels, config.target_size // config.token_pixels
  rng = np.random.default_rng(0)
  matched, shuffled = [], []
  for record in range(6):
    example = pipeline.prepare_example(source[record], config, np.random.default_rng(0))
    valid = example["pair_valid"]
    assert (example["pair_ref_token"][valid] < grid * grid).all()
    assert (example["pair_target_token"][valid] < grid * grid).all()

    def patch_mean(image, token):
      row, col = divmod(int(token), grid)
      return image[token_pixels * row:token_pixels * (row + 1), token_pixels * col:token_pixels * (col + 1)].mean((0, 1))

    ref_means = np.stack([patch_mean(example["refs"][ref], token) for ref, token in zip(
        example["pair_ref"][valid], example["pair_ref_token"][valid])])
    target_means = np.stack([patch_mean(example["target"], token)
                             for token in example["pair_target_token"][valid]])
    matched.append(np.abs(ref_means - target_means).mean(1))
    shuffled.append(np.abs(ref_means[rng.permutation(len(ref_means))] - target_means).mean(1))
  return np.concatenate(matched), np.concatenate(shuffled)


def test_padding_references_to_square_moves_pairs_with_the_image(split):
  """With padded references, paired reference and target patches still show the same colours."""
  source, _ = split
  config = pipeline.PipelineConfig(target_size=128, ref_size=128, max_pairs=1024, dropout=False,
                                   pad_refs_to_square=True)
  matched, shuffled = _paired_patch_differences(source, config)
  assert len(matched) > 30
  assert np.median(matched) < 0.5 * np.median(shuffled)


def test_pairs_follow_the_token_size(split):
  """8 px per token (the demo's pixel autoencoder, patch 4): 64 px images have 8x8 token grids and
  paired 8x8 px reference and target patches show the same colours."""
  source, _ = split
  config = pipeline.PipelineConfig(target_size=64, ref_size=64, max_pairs=256, dropout=False, token_pixels=8)
  matched, shuffled = _paired_patch_differences(source, config)  # also checks the 8x8 token range
  assert len(matched) > 30
  assert np.median(matched) < 0.5 * np.median(shuffled)


def test_global_arrays_carry_the_sharding_and_values(split):
  source, num_refs = split
  batch = next(pipeline.make_iterator(source, num_refs, CONFIG))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  arrays = global_batch.to_global_arrays(batch, sharding)
  assert isinstance(arrays["target"], jax.Array) and arrays["target"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(arrays["pair_target_token"]), batch["pair_target_token"])
  assert arrays["caption"] is batch["caption"]  # text stays on the host
  with pytest.raises(ValueError, match="batch\\['target'\\]"):
    global_batch.to_global_arrays(
        {"target": batch["target"]},
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, None, None, "data")))


def test_open_split_refuses_a_split_it_cannot_read_whole(tmp_path):
  """One opener with one set of checks: a folder never built, and metadata.json edited so that a split
  is missing, empty, or has one reference count too few."""
  import glob
  import json
  import shutil
  data_dir, _, _ = data_fixtures.tiny_synthetic()
  name = "semalign_ms/synthetic_tiny"
  with pytest.raises(pipeline.DatasetError, match=r"synthetic_tiny in .*nothing: not built there"):
    pipeline.open_split(name, "train", str(tmp_path / "nothing"))  # a custom config: only its files define it
  with pytest.raises(pipeline.DatasetError, match=r"not built \(no dataset_info.json\)"):
    pipeline.open_split("semalign_ms/synthetic", "train", str(tmp_path / "nothing"))  # a registered one
  copy = tmp_path / "copy"
  shutil.copytree(data_dir, copy)
  (metadata_path,) = glob.glob(str(copy / "semalign_ms" / "synthetic_tiny" / "*" / "metadata.json"))
  original = json.loads(open(metadata_path).read())
  for num_refs, message in (({"validation": original["num_refs"]["validation"]}, r"no num_refs for split 'train'"),
                            ({**original["num_refs"], "train": []}, r"split 'train' is empty"),
                            ({**original["num_refs"], "train": original["num_refs"]["train"][:-1]},
                             r"split 'train' has 12 records but 11 num_refs entries")):
    with open(metadata_path, "w") as f:
      json.dump({**original, "num_refs": num_refs}, f)
    with pytest.raises(pipeline.DatasetError, match=message):
      pipeline.open_split(name, "train", str(copy))
