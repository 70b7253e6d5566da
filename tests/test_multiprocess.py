"""The trainer as several real processes: two jax processes on this machine, two CPU devices each,
joined by `jax.distributed.initialize` on localhost (gloo collectives) through the trainer's own
cluster detection of the environment srun sets. Against one process with four devices: the same
losses, checkpoints and LoRA exports from the sharded state, preemption agreed on by both processes,
a resume, a restore onto one process with another mesh, and a failing process bringing the job down."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from train_fixtures import ROOT, tensorboard_scalars, tiny_config, train_command
from mosaic_jax.settings import settings_from_config
from mosaic_jax.train.datasets import open_raw_dataset

# fsdp over all four devices: batch 4 splits one example per device.
MESH = {"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1, "batch_size": 4}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("tfds"))
  dataset = settings_from_config(tiny_config(folder)).dataset
  for split in (dataset.train_split, dataset.eval_split):
    open_raw_dataset(dataset, split)  # built here, once
  return folder


def _env(devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_COORDINATOR"))}
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), MOSAIC_HEARTBEAT_TIMEOUT_S="10",
             PYTHONPATH=os.pathsep.join(filter(None, [os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH")])),
             PYTHONUNBUFFERED="1", **extra)
  return env


def _srun(command: list[str], tasks: int = 2, devices: int = 2, **extra) -> list[subprocess.Popen]:
  """`tasks` processes started as srun starts them: the SLURM variables jax's detection reads."""
  job = str(random.randint(10_000, 99_999))  # jax derives the coordinator port from the job id
  procs = []
  for rank in range(tasks):
    env = _env(devices, SLURM_JOB_ID=job, SLURM_NTASKS=str(tasks), SLURM_PROCID=str(rank),
               SLURM_LOCALID=str(rank), SLURM_STEP_NODELIST="localhost", SLURM_NODELIST="localhost", **extra)
    procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return procs


def _wait(procs, timeout=300) -> list[tuple[int, str]]:
  out = []
  for proc in procs:
    try:
      text, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
    out.append((proc.returncode, text))
  return out


def _losses(workdir) -> dict[int, float]:
  return dict(tensorboard_scalars(os.path.join(workdir, "tensorboard"))["loss"])


@pytest.fixture(scope="module")
def one_process_run(data_dir, tmp_path_factory):
  """The reference: one process with four devices, 11 steps."""
  workdir = tmp_path_factory.mktemp("one_process")
  run = subprocess.run(train_command(data_dir, workdir, **MESH, total_steps=11), env=_env(4),
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  return workdir, _losses(workdir)


def test_two_processes_train_preempt_resume_and_restore_on_one(one_process_run, data_dir, tmp_path):
  _, reference = one_process_run
  assert sorted(reference) == list(range(1, 12))
  workdir = tmp_path / "run"
  start = time.perf_counter()

  # Steps 1..10: SIGTERM to both processes once step 2 is logged; they agree on one step to save (a
  # few steps later: the signal, the one-step-late log line and the sync point each take a step or so).
  procs = _srun(train_command(data_dir, workdir, **MESH, total_steps=10, checkpoint_every=100))
  lines = []
  for line in procs[0].stdout:
    lines.append(line)
    if line.startswith("step 2/"):
      for proc in procs:
        proc.send_signal(signal.SIGTERM)
  results = [(procs[0].wait(timeout=120), "".join(lines))] + _wait(procs[1:])
  for status, text in results:
    assert status == 143, text[-3000:]  # preempted after saving: the scheduler restarts the job
  saved = os.listdir(workdir / "checkpoints")
  assert len(saved) == 1 and 2 <= int(saved[0]) < 10, saved
  step = int(saved[0])
  assert f"preempted (SIGTERM): step {step} committed" in results[0][1]
  # Only process 0 speaks: process 1 printed none of the console lines.
  assert "step 1/10" in results[0][1] and "step 1/" not in results[1][1], results[1][1][-2000:]
  # Both LoRA exports, written from the committed checkpoint of the sharded state.
  for name in ("lora.safetensors", "lora_ema.safetensors"):
    assert os.path.getsize(workdir / "lora" / str(step) / name) > 0

  # Resume as two processes to step 10; the losses are the one-process run's. The final evaluation and
  # sample panel run on both processes (the model is split over them); process 0 writes them.
  results = _wait(_srun(train_command(data_dir, workdir, **MESH, total_steps=10, checkpoint_every=100,
                                      eval_examples=2, sample_steps=2)))
  for status, text in results:
    assert status == 0, text[-3000:]
  assert "correspondence" not in results[1][1] and os.path.getsize(workdir / "samples" / "final.png") > 0
  assert json.loads((workdir / "eval.json").read_text())["step"] == 10
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, 11))
  np.testing.assert_allclose([losses[s] for s in range(1, 11)], [reference[s] for s in range(1, 11)], rtol=1e-5)
  assert len(os.listdir(workdir / "tensorboard")) == 2  # one event file per run: process 0's

  # The 4-device checkpoint restores onto one process with 2 devices and another mesh (data x tensor).
  run = subprocess.run(train_command(data_dir, workdir, **{**MESH, "mesh.data": 2, "mesh.fsdp": 1,
                                                            "mesh.tensor": -1}, total_steps=11),
                       env=_env(2), capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert "resumed from" in run.stdout and "at step 10" in run.stdout
  np.testing.assert_allclose(_losses(workdir)[11], reference[11], rtol=1e-5)
  print(f"two-process train, preempt, resume, restore: {time.perf_counter() - start:.0f} s")


_READ_BATCHES = r'''
import json, sys
from mosaic_jax.parallel import distributed
distributed.initialize()
import jax
from train_fixtures import tiny_config
from mosaic_jax.data import make_iterator
from mosaic_jax.settings import settings_from_config
from mosaic_jax.train.datasets import open_dataset, pipeline_config
settings = settings_from_config(tiny_config(sys.argv[1], batch_size=4))
source, num_refs = open_dataset(settings, settings.dataset.train_split)
iterator = make_iterator(source, num_refs, pipeline_config(settings), process_index=jax.process_index(),
                         process_count=jax.process_count())
batches = [[int(i) for i in next(iterator)["record_index"]] for _ in range(3)]
print("BATCHES " + json.dumps({"process": jax.process_index(), "count": jax.process_count(), "batches": batches}))
'''


def test_processes_read_disjoint_examples_that_cover_the_global_batch(data_dir):
  command = [sys.executable, "-c", _READ_BATCHES, data_dir]
  two = _wait(_srun(command, devices=1), timeout=120)
  one = _wait([subprocess.Popen(command, env=_env(1), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)], timeout=120)
  parse = lambda text: json.loads(text.rsplit("BATCHES ", 1)[1])
  for status, text in two + one:
    assert status == 0 and "BATCHES " in text, text[-3000:]
  shares = sorted((parse(text) for _, text in two), key=lambda r: r["process"])
  assert [s["count"] for s in shares] == [2, 2]
  whole = parse(one[0][1])["batches"]
  for index, batch in enumerate(whole):
    first, second = shares[0]["batches"][index], shares[1]["batches"][index]
    assert len(first) == len(second) == 2
    assert sorted(first + second) == sorted(batch)  # disjoint halves of the same global batch


_FAIL_ON_PROCESS_1 = r'''
import runpy, sys
import jax
from mosaic_jax.train import batches
real, calls = batches.host_inputs, []
def failing(host_batch, encoders, settings):
  calls.append(1)
  if jax.process_index() == 1 and len(calls) == 3:
    raise OSError("injected failure on process 1 at step 3")
  return real(host_batch, encoders, settings)
batches.host_inputs = failing
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_a_failing_process_brings_every_process_down_non_zero(data_dir, tmp_path):
  command = train_command(data_dir, tmp_path / "run", **MESH, total_steps=50, checkpoint_every=100)
  procs = _srun([sys.executable, "-c", _FAIL_ON_PROCESS_1, *command[1:]])
  failed_at, lines = None, []
  for line in procs[1].stdout:  # until process 1 reports the failure
    lines.append(line)
    if "injected failure on process 1 at step 3" in line and failed_at is None:
      failed_at = time.perf_counter()
  assert failed_at is not None, "".join(lines)[-3000:]
  assert procs[1].wait(timeout=30) == 1
  try:
    text, _ = procs[0].communicate(timeout=60)  # the survivor: down within a minute of the failure
  except subprocess.TimeoutExpired:
    procs[0].kill()
    raise AssertionError("process 0 still running a minute after process 1 failed")
  assert procs[0].returncode != 0, text[-3000:]
  print(f"process 0 exited ({procs[0].returncode}) {time.perf_counter() - failed_at:.0f} s after process 1 failed")


@pytest.fixture(scope="module")
def flux_root(tmp_path_factory):
  pytest.importorskip("torch")
  from PIL import Image
  from flux_root_fixtures import build_flux_root
  root = tmp_path_factory.mktemp("flux_root")
  build_flux_root(root, with_transformer=True)
  work = tmp_path_factory.mktemp("cases")
  for name, colour in (("cat.png", (200, 40, 40)), ("hat.png", (30, 90, 200)), ("toy.png", (40, 160, 60))):
    image = np.full((40, 48, 3), 255, np.uint8)
    image[8:32, 10:38] = colour
    Image.fromarray(image).save(work / name)
  cases = [{"index": "a", "prompt": "a cat in a hat", "image_paths": ["cat.png", "hat.png"]},
           {"index": "b", "prompt": "a toy", "image_paths": ["toy.png"]},
           {"index": "c", "prompt": "a hat on a toy", "image_paths": ["hat.png", "toy.png"]}]
  (work / "cases.json").write_text(json.dumps(cases))
  return root, work


def test_sampling_as_two_processes_writes_the_one_process_images_once_each(flux_root, tmp_path):
  """3 cases x 2 seeds in batches of 4 over fsdp=4 (the transformer split over both processes): the
  files of one process with 4 devices (attention heatmaps included), written once between the two,
  with the same pixels and attention maps."""
  from PIL import Image
  root, work = flux_root
  command = [sys.executable, os.path.join(ROOT, "launch", "sample.py"), "--cases", str(work / "cases.json"),
             "--checkpoint", str(root), "--seeds", "0", "1", "--batch_size", "4", "--mesh", "1,-1,1",
             "--size", "32", "--ref_size", "32", "--steps", "2", "--t5_max_length", "16", "--dtype", "float32",
             "--no_progress", "--save_attention"]
  start = time.perf_counter()
  two = _wait(_srun(command + ["--output", str(tmp_path / "two")]), timeout=240)
  one = _wait([subprocess.Popen(command + ["--output", str(tmp_path / "one")], env=_env(4), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)], timeout=240)
  for status, text in two + one:
    assert status == 0, text[-3000:]
  counts = [int(text.rsplit("wrote ", 1)[1].split()[0]) for _, text in two]
  (run_two,), (run_one,) = os.listdir(tmp_path / "two"), os.listdir(tmp_path / "one")
  files_two = sorted(os.listdir(tmp_path / "two" / run_two))
  files_one = sorted(os.listdir(tmp_path / "one" / run_one))
  expected = sorted([f"{c}_seed{s}{x}" for c in "abc" for s in (0, 1)
                     for x in (".png", "_panel.png", "_attention.png", "_attention.npy")] + ["run.json"])
  assert files_one == files_two == expected
  assert sum(counts) == 24 and all(counts), counts  # each file written once, by one process, both working
  for name in expected[:-1]:
    if name.endswith(".npy"):
      np.testing.assert_allclose(np.load(tmp_path / "one" / run_one / name),
                                 np.load(tmp_path / "two" / run_two / name), rtol=1e-4, atol=1e-6)
      continue
    a = np.asarray(Image.open(tmp_path / "one" / run_one / name), np.int16)
    b = np.asarray(Image.open(tmp_path / "two" / run_two / name), np.int16)
    assert np.abs(a - b).max() <= 1, name
  print(f"sampling as two processes and as one: {time.perf_counter() - start:.0f} s")
