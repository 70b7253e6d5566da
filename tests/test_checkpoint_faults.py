"""Checkpoints that cannot lie, with the faults made real: a save that fails on a full filesystem (a
real tmpfs mounted under the workdir, through launch/train.py) and on a checkpoint folder turned into a
file stops the run with one CheckpointError and no export of the failed step; corrupt latest steps
(bytes flipped with the size unchanged, a truncated file, an empty _METADATA, a step without its data
item, a step without its checksums holding flipped bytes) are each reported by step on resume, set
aside, and the run falls back to the previous step, whose continuation reproduces the uninterrupted
losses; an unverified step is never given checksums."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import numpy as np
import pytest

from train_fixtures import compilation_cache, tiny_config, train_command  # noqa: F401  # pylint: disable=unused-import
from mosaic_jax.train import train_and_evaluate  # noqa: E402
from mosaic_jax.train.checkpoint import CheckpointError  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
  """4 steps, checkpoints at 2 and 4 (both kept), the source of every corrupted copy below."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  result = train_and_evaluate(tiny_config(data_dir), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert sorted(os.listdir(os.path.join(workdir, "checksums"))) == ["2.json", "4.json"]
  return workdir, result


def _wait_for(path: str, seconds: float = 60.0) -> None:
  deadline = time.time() + seconds
  while not os.path.exists(path):
    assert time.time() < deadline, f"{path} never appeared"
    time.sleep(0.05)


def _run_until_save_fails(data_dir, workdir, sabotage, after_step, committed, total_steps=8):
  """A checkpoint every 2 steps; `sabotage(workdir)` runs after step `after_step`, once the steps
  `committed` are on disk. Returns (the CheckpointError, the steps trained)."""
  trained = []

  def on_step(step, metrics):
    trained.append(step)
    if step == after_step:
      for done in committed:
        _wait_for(os.path.join(workdir, done))
      sabotage(workdir)

  with pytest.raises(CheckpointError) as caught:
    train_and_evaluate(tiny_config(data_dir, total_steps=total_steps), workdir, on_step=on_step)
  return caught.value, trained


def test_a_full_filesystem_stops_the_run_at_the_failed_save(data_dir, uninterrupted, tmp_path, compilation_cache):  # noqa: F811
  """launch/train.py with checkpoints/ on a real 9 MiB tmpfs (one tiny checkpoint is ~6 MiB): step 2 is
  committed, step 4 cannot be written. One line on stderr, status 2, naming the step, the path and the
  cause whole (the filesystem's "No space left on device" at its end); none of the tracebacks of the
  save's writes that outlive orbax's event loop. (`uninterrupted` compiled the step for the cache.)"""
  workdir = tmp_path / "run"
  mount_point = str(workdir / "checkpoints")
  os.makedirs(mount_point)
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", mount_point],
                           capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'mount failed'}): needs root")
  try:
    run = subprocess.run(train_command(data_dir, workdir, total_steps=8), capture_output=True, text=True,
                         timeout=300, env={**os.environ, "JAX_COMPILATION_CACHE_DIR": compilation_cache})
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "Event loop is closed" not in run.stderr, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, run.stderr[-3000:]
    message = errors[0]
    assert f"checkpoint of step 4 into {mount_point}/4 failed" in message, message
    assert "No space left on device" in message, message
    assert "newest committed checkpoint is step 2" in message
    trained = [int(line.split()[1].split("/")[0]) for line in run.stdout.splitlines() if line.startswith("step ")]
    assert max(trained) <= 6  # stopped within a step or two of the failed save, never trained to 8
    assert sorted(p for p in os.listdir(mount_point) if p.isdigit()) == ["2"]
    assert os.listdir(workdir / "lora") == ["2"]  # no export of the failed step
  finally:
    subprocess.run(["umount", "-l", mount_point], check=False)


def test_a_checkpoint_folder_that_cannot_be_written_stops_the_run(data_dir, tmp_path):
  """Works on any filesystem, as any user (root included): where orbax must create step 4's temporary
  folder (checkpoints/4.orbax-checkpoint-tmp), a link to a file, put there once step 2 is committed."""
  workdir = str(tmp_path / "run")

  def file_in_the_way(workdir):
    os.symlink(os.devnull, os.path.join(workdir, "checkpoints", "4.orbax-checkpoint-tmp"))

  error, trained = _run_until_save_fails(data_dir, workdir, file_in_the_way, after_step=3,
                                         committed=["checkpoints/2"])
  message = str(error)
  assert "\n" not in message and "checkpoint of step 4 into" in message, message
  assert "newest committed checkpoint is step 2" in message
  assert max(trained) <= 6  # stopped within a step or two of the failed save
  assert sorted(p for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit()) == ["2"]
  _wait_for(os.path.join(workdir, "lora", "2", "lora_ema.safetensors"))  # the committed step's export
  assert os.listdir(os.path.join(workdir, "lora")) == ["2"]


# ---- corrupt checkpoints on resume -------------------------------------------------------------------

def _flip_bytes_in_largest_file(step_dir):
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, "state"))
           for name in names]
  largest = max(files, key=os.path.getsize)
  size = os.path.getsize(largest)
  with open(largest, "r+b") as f:
    f.seek(size // 2)
    chunk = f.read(4096)
    f.seek(size // 2)
    f.write(bytes(b ^ 0xFF for b in chunk))
  assert os.path.getsize(largest) == size
  return os.path.relpath(largest, step_dir)


def _truncate_largest_file(step_dir):
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, "state"))
           for name in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)
  return os.path.relpath(largest, step_dir)


def _empty_metadata(step_dir):
  open(os.path.join(step_dir, "state", "_METADATA"), "w").close()
  return "state/_METADATA"


def _without_data_item(step_dir):
  shutil.rmtree(os.path.join(step_dir, "data"))
  return "data"


def _flipped_without_checksums(step_dir):
  """A writer killed between the commit and the checksums, and a corrupt file in the step it left:
  orbax reads the flipped bytes without complaint, so only the older, verified step may be trusted."""
  os.remove(os.path.join(os.path.dirname(os.path.dirname(step_dir)), "checksums", "4.json"))
  _flip_bytes_in_largest_file(step_dir)
  return "it has no recorded checksums"


@pytest.mark.parametrize("corrupt, expected", [
    (_flip_bytes_in_largest_file, "does not match its sha256"),
    (_flipped_without_checksums, "so its files cannot be verified, and step 2's can"),
    (_truncate_largest_file, "bytes, "),
    (_empty_metadata, "is not valid JSON"),
    (_without_data_item, "has no 'data' item"),
])
def test_a_corrupt_latest_step_is_reported_and_the_run_falls_back(uninterrupted, data_dir, tmp_path, capsys,
                                                                  corrupt, expected):
  source, reference = uninterrupted
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  broken_file = corrupt(os.path.join(workdir, "checkpoints", "4"))
  capsys.readouterr()
  resumed = train_and_evaluate(tiny_config(data_dir), workdir)
  out = capsys.readouterr().out.splitlines()
  report = [line for line in out if line.startswith("checkpoint step 4 ")]
  assert len(report) == 1, out
  assert "is unusable" in report[0] and expected in report[0] and broken_file in report[0], report[0]
  assert any(line.startswith("resuming from step 2, the newest good checkpoint") for line in out), out
  assert os.path.isdir(os.path.join(workdir, "unusable_checkpoints", "4"))
  assert sorted(resumed["losses"]) == [3, 4]
  np.testing.assert_array_equal([resumed["losses"][s] for s in (3, 4)],
                                [reference["losses"][s] for s in (3, 4)])
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]  # step 4 made again


def test_processes_hash_disjoint_shares_of_a_step_and_one_of_them_finds_the_flipped_file(uninterrupted, tmp_path):
  """Each of n processes hashes every n-th file (checkpoint.verify_step's share): the flipped file is
  found by exactly one share, and by the whole."""
  from etils import epath
  from mosaic_jax.train.checkpoint import verify_step
  workdir = tmp_path / "run"
  shutil.copytree(uninterrupted[0], workdir)
  broken_file = _flip_bytes_in_largest_file(str(workdir / "checkpoints" / "4"))
  directory, checksums = epath.Path(workdir / "checkpoints"), epath.Path(workdir / "checksums")
  whole = verify_step(directory, checksums, 4)
  assert whole[0] is not None and broken_file in whole[0], whole
  for n in (2, 3):
    found = [verify_step(directory, checksums, 4, (i, n))[0] for i in range(n)]
    assert sum(problem is not None for problem in found) == 1, found
    assert [problem for problem in found if problem] == [whole[0]]
  assert verify_step(directory, checksums, 2, (1, 2)) == (None, True)


def test_with_every_step_unusable_the_run_starts_over_with_the_uninterrupted_weights(uninterrupted, data_dir,
                                                                                     tmp_path, capsys):
  """Both steps corrupt: a resuming run builds its weights as shapes only (it expects to restore them),
  so when nothing restores it must draw them after all, exactly as a fresh run does."""
  source, reference = uninterrupted
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  for step in ("2", "4"):
    _flip_bytes_in_largest_file(os.path.join(workdir, "checkpoints", step))
  capsys.readouterr()
  resumed = train_and_evaluate(tiny_config(data_dir), workdir)
  out = capsys.readouterr().out.splitlines()
  assert any(line.startswith("no usable checkpoint in ") and "starting from step 0" in line for line in out), out
  assert sorted(resumed["losses"]) == [1, 2, 3, 4]
  np.testing.assert_array_equal([resumed["losses"][s] for s in (1, 2, 3, 4)],
                                [reference["losses"][s] for s in (1, 2, 3, 4)])


def test_a_non_finite_first_step_after_restore_blames_the_checkpoint(uninterrupted, data_dir, tmp_path):
  """Step 2's weights overwritten with NaN through orbax itself, checksums recorded for them (as if the
  arrays were bad when saved): the files verify, and the first step on them is reported as coming from a
  possibly corrupt checkpoint, not from the learning rate."""
  import jax
  import orbax.checkpoint as ocp
  source, _ = uninterrupted
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  os.remove(os.path.join(workdir, "checksums", "4.json"))
  state_dir = os.path.join(workdir, "checkpoints", "2", "state")
  checkpointer = ocp.PyTreeCheckpointer()
  state = checkpointer.restore(state_dir)
  state["trainable"] = jax.tree_util.tree_map(lambda x: np.full_like(np.asarray(x), np.nan), state["trainable"])
  shutil.rmtree(state_dir)
  checkpointer.save(state_dir, state)
  os.remove(os.path.join(workdir, "checksums", "2.json"))  # no checksums, no other step: restored unverified
  with pytest.raises(FloatingPointError, match=r"at step 3 .*first step after resuming from checkpoint step 2 "
                                               r".*possibly corrupt"):
    train_and_evaluate(tiny_config(data_dir), workdir)
  assert not os.path.exists(os.path.join(workdir, "checksums", "2.json"))  # never blessed
