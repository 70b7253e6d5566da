"""A missing PyTorch reference stops the test run with one line (it does not turn into skipped tests),
unless MOSAIC_SKIP_REFERENCES=1 asks for the tests that do not need it. The reference is hidden from a
child pytest by a sitecustomize that marks it unimportable (sys.modules[name] = None). CI runs the test
command README gives, linter first."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _collect(tmp_path, hidden: str | None, **env):
  if hidden:
    (tmp_path / "sitecustomize.py").write_text(f"import sys\nsys.modules[{hidden!r}] = None\n")
  child_env = {k: v for k, v in os.environ.items() if k != "MOSAIC_SKIP_REFERENCES"}
  child_env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])), **env)
  return subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                         "tests/test_image_ops.py"], cwd=ROOT, env=child_env, capture_output=True, text=True,
                        timeout=300)


def test_a_missing_reference_stops_the_run_with_one_line(tmp_path):
  run = _collect(tmp_path, "diffusers")
  assert run.returncode == 4, run.stdout + run.stderr  # pytest's usage error: nothing ran
  errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("ERROR")]
  assert errors == ["ERROR: the PyTorch references diffusers are not installed: pip install -r "
                    "requirements-test.txt (or MOSAIC_SKIP_REFERENCES=1 runs only the tests that do not need "
                    "them)"], run.stdout + run.stderr
  assert "collected" not in run.stdout


def test_the_opt_out_runs_the_tests_without_references(tmp_path):
  run = _collect(tmp_path, "torch", MOSAIC_SKIP_REFERENCES="1")
  assert run.returncode == 0, run.stdout + run.stderr
  assert "tests collected" in run.stdout, run.stdout + run.stderr
  assert "error" not in (run.stdout + run.stderr).lower(), run.stdout + run.stderr


def test_ci_runs_the_test_command_readme_gives_linting_first():
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = [line for line in f.read().splitlines() if line.startswith("pip install -r requirements-test.txt")]
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    ci = f.read().strip().splitlines()[-1]
  assert readme == [ci]
  assert ci.index("ruff check &&") < ci.index("pytest")
