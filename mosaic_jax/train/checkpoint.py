"""Checkpoints: orbax CheckpointManager (async) holding the train state and the input pipeline's state
together; a checkpoint is committed or the run stops; what is restored is verified first; preemption
agreed on by every process; diffusers-format LoRA exports written from committed checkpoints, off the
training loop.

Layout of a workdir (any etils.epath path: local, or gs://bucket/run):
  checkpoints/<step>/state      train state (step, trainable, opt_state, ema), sharded arrays
  checkpoints/<step>/data       input iterator state (JSON)
  checksums/<step>.json         {file under checkpoints/<step>: [size, sha256]}, written after the commit
  lora/<step>/lora.safetensors      the trained LoRA, diffusers format (interop.save_lora)
  lora/<step>/lora_ema.safetensors  its EMA
  unusable_checkpoints/<step>   a step that failed verification on resume, moved aside (kept for a look)

Committed or stop: orbax commits a step in the background and, when that fails, only logs it (its
manager swallows the error and still deletes the old steps it meant to replace). So the commit is
checked on disk: once a save is no longer in progress, its step folder must exist under its final
name, or the run stops with one CheckpointError naming the step, the path and orbax's cause. Old steps
are pruned by us, and only after a newer one is committed (orbax's max_to_keep is off).

After the commit, process 0 alone (a background thread: no collective, the loop never waits) records
the checksums of the step's files, reads the LoRA and its EMA back from them and writes the exports
(at scale the LoRA is split over every host, so no process could fetch it whole from the devices
without a gather on every host), then prunes. An export therefore always has a committed checkpoint
behind it.

On resume, steps are tried newest first: a step folder without its items, an empty or unreadable
metadata file, a file whose size or sha256 differs from its checksums, or a restore that raises makes
the step unusable: one line names the step and the file, the folder is moved aside, and the next
older step is tried (one line says which step the run resumes from). A step whose writer was killed
after the commit but before its checksums were written is unverified: its files cannot be checked (orbax
reads flipped bytes in an array without complaint). It is never resumed from while a verified step
restores: it is reported and moved aside like an unusable step, and the run trains the steps after the
verified one again (to the same values: the step's randomness and the data order follow the step
number). Only when no verified step is left is it restored, said so; its checksums are never recorded
afterwards, since they would bless whatever its files hold by then.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import signal
import threading
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mosaic_jax.interop import save_lora
from mosaic_jax.workdir.steps import ITEMS, read_state_subtrees

LORA_FILES = {"lora.safetensors": ("trainable", "lora"), "lora_ema.safetensors": ("ema", "lora")}


class CheckpointError(RuntimeError):
  """A checkpoint that was not committed, or none that can be restored: one line for the user."""


def _one_line(error: BaseException, limit: int | None = 300) -> str:
  """The error on one line; cut at `limit` characters (None: whole, when its end says why, as a failed
  write's "No space left on device" does)."""
  text = " ".join(str(error).split()) or type(error).__name__
  cut = limit is not None and len(text) > limit
  return f"{type(error).__name__}: {text[:limit] if cut else text}{'...' if cut else ''}"


class _OrbaxFailures(logging.Handler):
  """Collects the errors orbax's commit thread logs and swallows ("Checkpointer failed")."""

  def __init__(self):
    super().__init__(logging.ERROR)
    self.errors: list[BaseException] = []

  def emit(self, record: logging.LogRecord) -> None:
    if record.exc_info and record.exc_info[1] is not None:
      self.errors.append(record.exc_info[1])


class Checkpointer:
  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    workdir = epath.Path(workdir)
    self.workdir = workdir
    self.directory = workdir / "checkpoints"
    self.lora_directory = workdir / "lora"
    self.checksum_directory = workdir / "checksums"
    self.keep = max(int(keep), 1)
    self.manager = ocp.CheckpointManager(
        self.directory,
        # cleanup_tmp_directories: a save cut short (a kill, a preemption) leaves <step>.orbax-checkpoint-tmp,
        # which at FLUX.1-dev size is gigabytes; the next run deletes it when it opens the folder.
        options=ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=async_save,
                                             create=True, cleanup_tmp_directories=True))
    self._in_flight: list[tuple[int, Any]] = []  # (step, FluxConfig or None) saved, commit not yet seen
    self._committed: list[int] = []  # steps seen committed (or restored) by this run
    self._threads: list[threading.Thread] = []
    self._background_errors: list[BaseException] = []
    self._orbax_failures = _OrbaxFailures()
    logging.getLogger("absl").addHandler(self._orbax_failures)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def last_committed(self) -> int | None:
    """The newest step this run saw committed (or resumed from): what a "last good" claim may name."""
    return max(self._committed) if self._committed else None

  # ---- restore ----

  def restore(self, step: int, abstract_state):
    """(state with the shardings of `abstract_state`, input iterator state) at `step`."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def restore_newest_good(self, abstract_state, cfg=None, report: Callable[[str], None] = print):
    """(step, state, data state) of the newest verified step that restores, else of the newest unverified
    one that does (used only when no verified step is left), or None when the workdir holds no step.
    Unusable steps, and unverified ones newer than a verified step that restores, are reported (one line
    each) and moved aside; the step resumed from gets the exports a killed run left unwritten."""
    skipped, unverified = [], []
    for step in sorted(self.manager.all_steps(), reverse=True):
      problem, verified = self._verify(step)
      if problem is None and not verified:
        unverified.append(step)  # tried once no verified step restores
        continue
      restored = self._restore_or_set_aside(step, problem, abstract_state, report, skipped)
      if restored is not None:
        for newer in unverified:  # trained again from here, to the same values
          self._report_and_set_aside(newer, f"it has no recorded checksums (its run stopped right after the "
                                     f"commit), so its files cannot be verified, and step {step}'s can", report)
          skipped.append(newer)
        return self._resumed(step, restored, sorted(skipped, reverse=True), abstract_state, cfg, report)
    for step in unverified:
      restored = self._restore_or_set_aside(step, None, abstract_state, report, skipped)
      if restored is not None:
        report(f"checkpoint step {step} has no recorded checksums (its run stopped right after the commit) and "
               "no verified step is left: restored unverified, and left unverified (checksums recorded now would "
               "bless whatever its files hold)")
        return self._resumed(step, restored, skipped, abstract_state, cfg, report)
    if skipped:
      report(f"no usable checkpoint in {self.directory} (unusable: {skipped}): starting from step 0")
    return None

  def _verify(self, step: int) -> tuple[str | None, bool]:
    """verify_step, every process hashing its own share of the files (a FLUX.1-dev step is tens of GB),
    agreed on by every process."""
    problem, verified = verify_step(self.directory, self.checksum_directory, step,
                                    (jax.process_index(), jax.process_count()))
    if jax.process_count() > 1:
      problem = _first_problem_of_any_process(problem)
    return problem, verified

  def _restore_or_set_aside(self, step: int, problem: str | None, abstract_state, report, skipped: list):
    """The restored (state, data state) of `step`, or None with the step reported and moved aside."""
    if problem is None:
      try:
        return self.restore(step, abstract_state)
      except Exception as error:  # pylint: disable=broad-except  # any unreadable file
        problem = f"restoring it raised {_one_line(error)}"
    self._report_and_set_aside(step, problem, report)
    skipped.append(step)
    return None

  def _report_and_set_aside(self, step: int, problem: str, report) -> None:
    report(f"checkpoint step {step} in {self.directory} is unusable: {problem}; moved to "
           f"{self.workdir / 'unusable_checkpoints' / str(step)}")
    self._set_aside(step)

  def _resumed(self, step: int, restored, skipped: list[int], abstract_state, cfg, report):
    if skipped:
      report(f"resuming from step {step}, the newest good checkpoint (unusable: {skipped})")
    self._committed.append(step)
    if cfg is not None and "lora" in abstract_state["trainable"] and not (
        self.lora_directory / str(step) / "lora_ema.safetensors").exists():  # a killed run's missing exports
      self._start_after_commit(step, cfg, checksums=False)
    return step, restored[0], restored[1]

  def _set_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      aside = self.workdir / "unusable_checkpoints"
      aside.mkdir(parents=True, exist_ok=True)
      target = aside / str(step)
      if target.exists():
        target.rmtree()
      (self.directory / str(step)).rename(target)
      (self.checksum_directory / f"{step}.json").unlink(missing_ok=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
    self.manager.reload()

  # ---- save ----

  def save(self, step: int, state, data_state: dict, cfg=None, force: bool = False) -> None:
    """Starts an asynchronous save (every process); checksums and LoRA exports follow the commit."""
    # orbax starts a save once the previous one has ended, raising the previous one's failure: waited
    # for here, a failure is named by its own step, and stops the run before another is saved on top.
    try:
      self.manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except
      raise self._failure(self._in_flight[-1][0] if self._in_flight else step, error) from error
    self.poll()
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)
    except Exception as error:  # pylint: disable=broad-except  # a synchronous part of the write failed
      raise self._failure(step, error) from error
    self._in_flight.append((step, cfg if "lora" in state["trainable"] else None))

  def poll(self) -> None:
    """Cheap, every step: raises CheckpointError when a save ended without a committed step (within a
    step of its end), and starts the after-commit work (checksums, exports, pruning) of committed ones."""
    self._raise_background_errors()
    # orbax starts a save only once the previous one has ended: all but the newest are settled.
    settled = self._in_flight if not self.manager.is_saving_in_progress() else self._in_flight[:-1]
    if not settled:
      return
    try:
      self.manager.check_for_errors()
      cause = None
    except Exception as error:  # pylint: disable=broad-except
      cause = error
    for step, cfg in settled:
      if cause is not None or not _is_committed(self.directory / str(step)):
        raise self._failure(step, cause or (self._orbax_failures.errors[-1] if self._orbax_failures.errors
                                            else None))
      self._committed.append(step)
      self._start_after_commit(step, cfg)
    del self._in_flight[:len(settled)]

  def _failure(self, step: int, cause: BaseException | None) -> CheckpointError:
    because = _one_line(cause, None) if cause is not None else "the step folder was never committed"
    last = self.last_committed()
    return CheckpointError(
        f"checkpoint of step {step} into {self.directory / str(step)} failed ({because}); stopped: "
        + (f"the newest committed checkpoint is step {last}" if last is not None else
           "no checkpoint of this run was committed") + " (free space or fix the workdir, then rerun to resume).")

  # ---- after the commit: checksums, exports, pruning (process 0, background) ----

  def _start_after_commit(self, step: int, cfg, checksums: bool = True) -> None:
    """checksums: record them (a step this run saw committed), else only the exports and the pruning."""
    if jax.process_index() != 0:
      return
    thread = threading.Thread(target=self._after_commit, args=(step, cfg, checksums), name=f"after-commit-{step}",
                              daemon=True)
    thread.start()
    self._threads.append(thread)

  def _after_commit(self, step: int, cfg, checksums: bool) -> None:
    try:
      recorded = self.checksum_directory / f"{step}.json"
      if checksums and not recorded.exists():
        self.checksum_directory.mkdir(parents=True, exist_ok=True)
        temporary = self.checksum_directory / f"{step}.json.tmp"  # complete, or absent
        temporary.write_text(json.dumps(file_checksums(self.directory / str(step)), indent=1))
        temporary.rename(recorded)
      if cfg is not None:
        trees = read_lora_trees(self.directory / str(step) / "state")
        folder = self.lora_directory / str(step)
        folder.mkdir(parents=True, exist_ok=True)
        for name, path in LORA_FILES.items():
          save_lora(str(folder / name), trees[path], cfg)
      self._prune(newest=step)
    except BaseException as error:  # pylint: disable=broad-except  # raised on the loop's thread
      self._background_errors.append(error)

  def _prune(self, newest: int) -> None:
    """Keeps the `keep` newest committed steps up to `newest` (and anything newer: saves in flight)."""
    steps = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
    older = [s for s in steps if s <= newest]
    keep = set(older[-self.keep:]) | {s for s in steps if s > newest}
    for s in steps:
      if s not in keep:
        (self.directory / str(s)).rmtree(missing_ok=True)
    for folder, suffix in ((self.lora_directory, ""), (self.checksum_directory, ".json")):
      if folder.exists():
        for entry in folder.iterdir():
          name = entry.name.removesuffix(suffix)
          if name.isdigit() and int(name) not in keep:
            entry.rmtree(missing_ok=True) if entry.is_dir() else entry.unlink(missing_ok=True)

  def _raise_background_errors(self) -> None:
    if self._background_errors:
      error = self._background_errors.pop(0)
      raise CheckpointError(f"after-commit work in {self.workdir} (checksums, LoRA export) failed: "
                            f"{_one_line(error)}") from error

  def wait(self) -> None:
    """Every started save committed (or CheckpointError), its checksums and exports written."""
    try:
      self.manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except
      step = self._in_flight[-1][0] if self._in_flight else -1
      raise self._failure(step, error) from error
    self.poll()
    for thread in self._threads:
      thread.join()
    self._threads.clear()
    self._raise_background_errors()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.abandon()

  @contextlib.contextmanager
  def stopping_cleanly(self):
    """Around the loop: whatever raises, orbax's threads are stopped before the error travels on."""
    try:
      yield self
    except BaseException:
      self.abandon()
      raise

  def abandon(self) -> None:
    """On the way out after an error: orbax's threads finished and closed quietly (else they die with
    the interpreter, printing hundreds of "Event loop is closed" tracebacks)."""
    for call in (self.manager.wait_until_finished, self.manager.close):
      try:
        call()
      except Exception:  # pylint: disable=broad-except  # the error that brought us here is reported
        pass
    for thread in self._threads:
      thread.join()
    logging.getLogger("absl").removeHandler(self._orbax_failures)


def _is_committed(step_directory: epath.Path) -> bool:
  """orbax's finalized step: under its final name (local rename), with commit_success.txt on object
  stores (gs://, where orbax writes in place), and holding both items."""
  if not step_directory.is_dir() or not all((step_directory / item).is_dir() for item in ITEMS):
    return False
  local = not str(step_directory).startswith(("gs://", "s3://"))
  return local or (step_directory / "commit_success.txt").exists()


def _sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def file_checksums(step_directory: epath.Path) -> dict[str, list]:
  """{relative path: [size, sha256]} of every file of a committed step."""
  out = {}
  folders = [step_directory]
  while folders:  # a walk by listings (epath's rglob refuses "**" on object stores)
    for path in sorted(folders.pop().iterdir()):
      if path.is_dir():
        folders.append(path)
      else:
        out[str(path.relative_to(step_directory))] = [path.stat().length, _sha256(path)]
  return dict(sorted(out.items()))


def verify_step(directory: epath.Path, checksum_directory: epath.Path, step: int,
                share: tuple[int, int] = (0, 1)) -> tuple[str | None, bool]:
  """(what is wrong with checkpoint `step`, naming the file, or None; whether checksums verified it).
  share=(i, n): hash only every n-th recorded file from the i-th (process i of n; the cheap checks,
  structure, metadata and sizes, cover every file)."""
  folder = directory / str(step)
  for item in ITEMS:
    if not (folder / item).is_dir():
      return f"the step folder has no {item!r} item ({folder / item} is missing)", False
  metadata = folder / "state" / "_METADATA"
  try:
    json.loads(metadata.read_text())
  except FileNotFoundError:
    return f"{metadata} is missing", False
  except (ValueError, UnicodeDecodeError) as error:
    return f"{metadata} is not valid JSON ({metadata.stat().length} bytes: {_one_line(error, 80)})", False
  recorded_path = checksum_directory / f"{step}.json"
  if not recorded_path.exists():
    return None, False
  try:
    recorded = json.loads(recorded_path.read_text())
  except ValueError:
    return f"its checksums file {recorded_path} is not valid JSON", False
  names = sorted(recorded)
  for name in names:
    size = recorded[name][0]
    path = folder / name
    if not path.exists():
      return f"{path} is missing", False
    if path.stat().length != size:
      return f"{path} has {path.stat().length} bytes, {size} were written", False
  for name in names[share[0]::share[1]]:
    path = folder / name
    if _sha256(path) != recorded[name][1]:
      return f"{path} does not match its sha256 recorded at save time (corrupt)", False
  return None, True


def _first_problem_of_any_process(problem: str | None) -> str | None:
  """The problem the lowest-numbered process found (every process gets the same answer): each process
  hashed its own share of a step's files."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  encoded = np.zeros(_PROBLEM_BYTES, np.uint8)
  if problem is not None:
    data = problem.encode()[:_PROBLEM_BYTES]
    encoded[:len(data)] = np.frombuffer(data, np.uint8)
  for row in np.asarray(multihost_utils.process_allgather(encoded)).reshape(-1, _PROBLEM_BYTES):
    if row.any():
      return bytes(row[row != 0]).decode(errors="replace")
  return None


_PROBLEM_BYTES = 1024  # a reported problem names one path and its cause


def read_lora_trees(state_directory: epath.Path) -> dict[tuple[str, str], dict]:
  """{(group, "lora"): the LoRA pytree as numpy} for the groups of LORA_FILES, from a committed step."""
  return read_state_subtrees(state_directory, list(LORA_FILES.values()))


class PreemptionFlag:
  """Whether to save and stop now, agreed on by every process.

  One process: set by SIGTERM (what schedulers send before preemption). Several: jax's preemption
  sync point (the coordination service catches SIGTERM on any process and names one step at which
  every process sees True), so all hosts save the same step; a Python handler there would replace
  the service's own."""

  def __init__(self):
    self.event = threading.Event()
    self._previous = None
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.event.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self, step: int) -> bool:
    """Call once per step, with the same step on every process."""
    if self._multi:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        self.event.set()
    return self.event.is_set()

  def is_set(self) -> bool:
    return self.event.is_set()
