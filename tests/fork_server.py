"""A fork server: one process imports a script's libraries once (jax, orbax, tensorflow-datasets, the
trainer), then forks a fresh child for every run of the script, so that a run skips the interpreter's
start and those imports (about 3 s of a trainer restart on two cores). The kill soak restarts the
trainer a dozen times; each child is still its own process, running the script as `python script
ARGS...` would (`__main__`, its own argv, flags, jax backend, threads and exit status), and is killed
with a real SIGKILL.

Forking is safe only while the server is a single thread (a child has only the thread that forked: a
lock held by another would never be released there): the server refuses to fork when a second thread
runs (Python's or the OS's) or a jax backend exists (XLA's thread pools). Importing jax, orbax,
tensorstore and tensorflow-datasets starts no thread; numpy's OpenBLAS starts a pool at import, so the
server imports with OPENBLAS_NUM_THREADS=1 (numpy's BLAS is not on the trainer's path: jax computes;
the child gets the caller's environment back).

Protocol (one JSON object a line): the client writes {"script", "argv", "log"}; the server answers
{"pid"} once the child runs, then {"pid", "status"} when it has ended (os.waitstatus_to_exitcode: -9 for
SIGKILL). The child's stdout and stderr go to the file "log", its stdin is /dev/null.

  server = ForkServer(["jax", "mosaic_jax.train"], env)   # client side
  child = server.start("launch/train.py", ["--config", ...], "/tmp/run.log")
  os.kill(child, signal.SIGKILL); server.wait(child)      # -> -9 (server.poll(child): None while it runs)
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import runpy
import signal
import subprocess
import sys
import threading


class ForkServer:
  """Client: starts the server process (with `env`, read by jax at import) preloading `modules`."""

  def __init__(self, modules: list[str], env: dict):
    self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), *modules], env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    self._answers: queue.Queue = queue.Queue()
    threading.Thread(target=self._read_answers, daemon=True).start()
    self._ended: dict[int, int] = {}
    self._running = None
    ready = self._next()
    if ready.get("ready") is not True:
      raise RuntimeError(f"the fork server did not start: {ready}")

  def _read_answers(self) -> None:
    for line in self.process.stdout:
      self._answers.put(json.loads(line))
    self._answers.put(None)

  def _next(self, timeout: float | None = None) -> dict:
    answer = self._answers.get(timeout=timeout)
    if answer is None:
      self._answers.put(None)
      raise RuntimeError(f"the fork server ended (status {self.process.wait()}); its errors are above")
    return answer

  def start(self, script: str, argv: list[str], log: str) -> int:
    """The pid of a new child running `script` with `argv`, writing its output to `log` (one child at a
    time: start the next after wait or poll returned this one's status)."""
    self.process.stdin.write(json.dumps({"script": script, "argv": argv, "log": log}) + "\n")
    self.process.stdin.flush()
    self._running = self._next()["pid"]
    return self._running

  def poll(self, pid: int) -> int | None:
    """The child's exit status once it has ended (negative: the signal that ended it), else None."""
    if pid not in self._ended:
      try:
        answer = self._next(timeout=0)
      except queue.Empty:
        return None
      self._ended[answer["pid"]] = answer["status"]
    return self._ended[pid]

  def wait(self, pid: int) -> int:
    while pid not in self._ended:
      answer = self._next()
      self._ended[answer["pid"]] = answer["status"]
    return self._ended[pid]

  def close(self) -> None:
    """Ends the server; a child still running (the caller stopped on an error) is killed first."""
    if self._running is not None and self.poll(self._running) is None:
      os.kill(self._running, signal.SIGKILL)
      self.wait(self._running)
    self.process.stdin.close()
    self.process.wait()


def _os_threads() -> int | None:
  return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None


def _fork_is_safe() -> str | None:
  """Why forking now would give a broken child, or None."""
  if threading.active_count() > 1:
    return f"{threading.active_count()} Python threads run: {[t.name for t in threading.enumerate()]}"
  if (_os_threads() or 1) > 1:
    return f"{_os_threads()} threads run (a library started a pool)"
  if "jax" in sys.modules:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    if xla_bridge.backends_are_initialized():
      return "a jax backend is initialized (its thread pools would be missing in the child)"
  return None


def _run_child(request: dict, log: int, environment: dict) -> None:
  """In the child: `python script argv...` in this process with `environment`, writing to the file
  descriptor log; never returns (SystemExit ends it)."""
  os.environ.clear()
  os.environ.update(environment)
  null = os.open(os.devnull, os.O_RDONLY)
  os.dup2(null, 0)
  os.dup2(log, 1)
  os.dup2(log, 2)
  os.close(null)
  os.close(log)
  sys.stdin = open(0, closefd=False)  # the server's buffered reader of its request pipe is not the child's
  script = os.path.abspath(request["script"])
  sys.argv = [script, *request["argv"]]
  sys.path[0] = os.path.dirname(script)  # as `python script` sets it
  runpy.run_path(script, run_name="__main__")
  sys.exit(0)


def serve(modules: list[str]) -> None:
  environment = dict(os.environ)
  os.environ["OPENBLAS_NUM_THREADS"] = "1"  # read when numpy loads OpenBLAS: no pool thread
  for name in modules:
    importlib.import_module(name)
  problem = _fork_is_safe()
  if problem:
    raise SystemExit(f"fork_server: importing {modules} made forking unsafe: {problem}")
  reply = lambda answer: (sys.stdout.write(json.dumps(answer) + "\n"), sys.stdout.flush())
  reply({"ready": True})
  for line in sys.stdin:
    request = json.loads(line)
    problem = _fork_is_safe()
    if problem:
      raise SystemExit(f"fork_server: refusing to fork: {problem}")
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)  # there once the pid is
    pid = os.fork()
    if pid == 0:
      _run_child(request, log, environment)
    os.close(log)
    reply({"pid": pid})
    _, status = os.waitpid(pid, 0)
    reply({"pid": pid, "status": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
  serve(sys.argv[1:])
