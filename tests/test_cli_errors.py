"""Every launch script's user errors, through the real command line: one line on stderr naming the
field, file or value, exit status 2, no traceback (which --verbose brings back)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "flux_ms.py") + ":demo"


def _run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args], capture_output=True,
                        text=True, timeout=300, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def _one_line_error(result: subprocess.CompletedProcess) -> str:
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "\\n" not in errors[0], result.stderr[-3000:]
  return errors[0]


def test_train_unknown_override_gets_the_trainers_message_with_a_did_you_mean(tmp_path):
  line = _one_line_error(_run("train.py", "--config", DEMO, "--workdir", str(tmp_path), "--config.total_step=3"))
  assert "unknown config field(s) ['total_step']" in line and "did you mean --config.total_steps" in line, line
  line = _one_line_error(_run("train.py", "--config", DEMO, "--workdir", str(tmp_path), "--config.nonexistent=1"))
  assert "unknown config field(s) ['nonexistent']" in line, line
  assert not os.listdir(tmp_path)  # nothing written


def test_the_did_you_mean_comes_from_the_schema_without_running_the_config_file_again(tmp_path):
  """A config file that counts its own runs: the hint for a misspelt model override (a FluxConfig field)
  costs no second run of it."""
  counter = tmp_path / "runs.txt"
  config_file = tmp_path / "counting_config.py"
  config_file.write_text(
      "import sys\n"
      f"sys.path.insert(0, {os.path.join(ROOT, 'configs')!r})\n"
      "from flux_ms import get_config as _get_config\n"
      "def get_config(arg='default'):\n"
      f"  open({str(counter)!r}, 'a').write('run\\n')\n"
      "  return _get_config(arg)\n")
  line = _one_line_error(_run("train.py", "--config", f"{config_file}:demo", "--workdir", str(tmp_path / "run"),
                              "--config.model_overrides.attention_imp=cudnn"))
  assert "unknown config field(s) ['model_overrides.attention_imp']" in line, line
  assert "did you mean --config.model_overrides.attention_impl" in line, line
  assert counter.read_text() == "run\n"
  assert not (tmp_path / "run").exists()


def test_train_config_error_is_one_line_and_verbose_shows_the_traceback(tmp_path):
  args = ("--config", DEMO, "--workdir", str(tmp_path / "run"), "--config.resolution=30")
  line = _one_line_error(_run("train.py", *args))
  assert "config.resolution=30: expected a positive multiple of" in line, line
  verbose = _run("train.py", *args, "--verbose")
  assert verbose.returncode == 2 and "Traceback" in verbose.stderr and "ConfigError" in verbose.stderr


def test_train_missing_config_file_is_one_line(tmp_path):
  line = _one_line_error(_run("train.py", "--config", str(tmp_path / "no_such.py"), "--workdir", str(tmp_path)))
  assert "no_such.py" in line, line


def test_forward_bad_config_value_is_one_line():
  line = _one_line_error(_run("forward.py", "--config", DEMO, "--config.num_refs=x"))
  assert "num_refs" in line, line


def test_encode_dataset_unknown_override_is_one_line(tmp_path):
  line = _one_line_error(_run("encode_dataset.py", "--config", DEMO, "--out", str(tmp_path / "out"),
                              "--config.dataset.nmae=x"))
  assert "unknown config field(s) ['dataset.nmae']" in line and "--config.dataset.name" in line, line


def test_sample_input_error_is_one_line(tmp_path):
  cases = tmp_path / "cases.json"
  cases.write_text(json.dumps([{"index": "0", "prompt": "a cat", "image_paths": []}]))
  line = _one_line_error(_run("sample.py", "--cases", str(cases), "--ref", "cat.png", "--checkpoint", str(tmp_path)))
  assert "--ref goes with --prompt" in line, line
  line = _one_line_error(_run("sample.py", "--prompt", "a cat", "--checkpoint", str(tmp_path), "--size", "5x"))
  assert "size '5x'" in line, line


@pytest.mark.parametrize("args, expected", [
    (("--config", "folder", "--data_dir", "DATA"), "--config folder needs --manual_dir"),
    (("--config", "nonsense", "--data_dir", "DATA"), "invalid choice: 'nonsense'"),
    (("--config", "synthetic", "--num_train", "8", "--data_dir", "DATA"), "--num_train needs --name"),
])
def test_build_dataset_errors_are_one_line(tmp_path, args, expected):
  line = _one_line_error(_run("build_dataset.py", *[a.replace("DATA", str(tmp_path)) for a in args]))
  assert expected in line, line


def _run_side_by_side(runs: dict[str, tuple[str, list[str]]]) -> dict[str, subprocess.CompletedProcess]:
  """{name: (script, args)} run as concurrent processes (each mostly starts Python and jax) -> results."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = {name: subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", script), *args], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for name, (script, args) in runs.items()}
  results = {}
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=300)
    results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
  return results


def test_a_new_users_faults_are_one_line_with_status_2_and_write_nothing(tmp_path):
  """Each fault made for real through the command line: one line naming what is wrong, status 2, and
  nothing written (no workdir, no dataset folders, no run folder)."""
  from train_fixtures import train_command
  a_file = tmp_path / "a_file"
  a_file.write_text("not a folder")
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # a PNG signature, then nothing a PNG holds
  workdir, missing = tmp_path / "run", tmp_path / "no" / "such" / "tfds"
  train = lambda *flags, where=workdir: ("train.py", ["--config", DEMO, "--workdir", str(where), *flags])
  # A dataset built on first use into a fresh folder, too small for one batch: TFDS stays quiet.
  tiny = train_command(str(tmp_path / "tfds"), workdir, **{"dataset.name": "semalign_ms/synthetic_three",
                                                            "dataset.build.num_train": 3, "batch_size": 4})
  faults = {  # name: ((script, args), what the line says, what it must not say)
      "lora_rank=-1": (train("--config.lora_rank=-1"), "config.lora_rank=-1: expected a positive integer", "Type"),
      "lora_rank=0": (train("--config.lora_rank=0"), "config.lora_rank=0: expected a positive integer", "Zero"),
      "batch_size=0": (train("--config.batch_size=0"), "config.batch_size=0: expected a positive integer",
                       "total_steps"),
      "workdir is a file": (train(where=a_file), f"--workdir {a_file} is a file: expected a folder", "Exists"),
      "workdir under a file": (train(where=a_file / "run"), f"--workdir {a_file / 'run'} lies under the file "
                               f"{a_file}", "NotADirectory"),
      "data_dir missing": (train(f"--config.dataset.data_dir={missing}"),
                           f"config.dataset.data_dir='{missing}' does not exist, nor does {missing.parent}", "building"),
      "corrupt PNG": (("sample.py", ["--prompt", "x", "--ref", str(broken), "--checkpoint", str(tmp_path),
                                     "--output", str(tmp_path / "out")]),
                      f"reference image {broken}: not a readable image", "BytesIO"),
      "too small to train": (("train.py", tiny[2:]), "gives no training batch", "Downloading"),
  }
  results = _run_side_by_side({name: command for name, (command, _, _) in faults.items()})
  for name, (_, expected, unexpected) in faults.items():
    line = _one_line_error(results[name])
    assert expected in line and unexpected not in line, (name, line)
  assert not os.path.exists(workdir) and not os.path.exists(tmp_path / "no") and not os.path.exists(tmp_path / "out")
  assert a_file.read_text() == "not a folder"
  quiet = results["too small to train"]
  assert "building semalign_ms/synthetic_three into" in quiet.stdout, quiet.stdout
  for noise in ("Downloading and preparing", "downloaded and prepared", "%|", "it/s]"):
    assert noise not in quiet.stdout + quiet.stderr, (noise, quiet.stdout[-2000:], quiet.stderr[-2000:])
  assert "semalign_ms" in os.listdir(tmp_path / "tfds")  # it was built
