"""tests/fork_server.py (the kill soak's way of restarting the trainer fast): a child runs a script
as `python script ARGS` would, in its own process, and dies of a real SIGKILL; the server refuses to
fork once an imported library has started a thread."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

import fork_server

SCRIPT = """
import json, os, sys, time
import preloaded
print(json.dumps(dict(name=__name__, pid=os.getpid(), argv=sys.argv, mark=os.environ.get("MARK"),
                      blas_threads=os.environ.get("OPENBLAS_NUM_THREADS"), imported_by=preloaded.IMPORTED_BY,
                      path0=sys.path[0])), flush=True)
if sys.argv[1] == "sleep":
  time.sleep(60)
sys.exit(int(sys.argv[2]))
"""


def _environment(tmp_path, **extra):
  return {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra}


def test_children_run_the_script_as_python_would_and_die_of_sigkill(tmp_path):
  (tmp_path / "preloaded.py").write_text("import os\nIMPORTED_BY = os.getpid()\n")
  script = tmp_path / "scripts" / "child.py"
  script.parent.mkdir()
  script.write_text(SCRIPT)
  server = fork_server.ForkServer(["preloaded"], _environment(tmp_path, MARK="from-caller"))
  try:
    pid = server.start(str(script), ["exit", "3"], str(tmp_path / "a.log"))
    assert server.wait(pid) == 3
    seen = json.loads((tmp_path / "a.log").read_text())
    assert seen == dict(name="__main__", pid=pid, argv=[str(script), "exit", "3"], mark="from-caller",
                        blas_threads=None,  # the caller's environment, not the server's
                        imported_by=server.process.pid, path0=str(script.parent))
    assert pid != server.process.pid

    pid = server.start(str(script), ["sleep", "0"], str(tmp_path / "b.log"))
    while "__main__" not in (tmp_path / "b.log").read_text():
      time.sleep(0.01)
    assert server.poll(pid) is None
    os.kill(pid, signal.SIGKILL)
    assert server.wait(pid) == -signal.SIGKILL
  finally:
    server.close()


def test_the_server_refuses_to_fork_once_a_thread_runs(tmp_path, capfd):
  (tmp_path / "threaded.py").write_text("import threading, time\n"
                                        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n")
  with pytest.raises(RuntimeError, match="fork server ended"):
    fork_server.ForkServer(["threaded"], _environment(tmp_path))
  assert "made forking unsafe: 2 Python threads run" in capfd.readouterr().err
