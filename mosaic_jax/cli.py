"""The launch scripts' front door: a user error is one line on stderr and exit status 2, without a
traceback; internal errors keep their tracebacks; third-party log lines stay off the console.

  `--verbose` (any script; or MOSAIC_VERBOSE=1): tracebacks of user errors too, and the INFO/WARNING
  lines of orbax, absl, TFDS and jax.

A user error is bad input the user can fix (a config field, a path, a file's content): the exception
types listed in USER_ERRORS, the configuration flags' parse errors (an unknown `--config.x` override
gets the settings' "unknown field" message with a did-you-mean, from the schema the script passes), and argparse's errors. After the line
is printed the process ends at once (os._exit): no shutdown barrier of a multi-process job, and no
background writer (orbax, tensorstore) dying noisily with the interpreter.

  absl scripts:     cli.run_absl(main, settings.known_fields)   (instead of app.run(main))
  argparse scripts: parser = cli.ArgumentParser(...); cli.run(main)
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import sys
import traceback
from typing import Any, Callable

USER_ERROR_EXIT_STATUS = 2

# "module:class" of every user-error type; a type counts only once its module is imported.
USER_ERRORS = (
    "mosaic_jax.settings:ConfigError", "mosaic_jax.train.checkpoint:CheckpointError",
    "mosaic_jax.sampling.requests:SampleInputError", "mosaic_jax.interop.tensor_table:CheckpointError",
    "mosaic_jax.interop.lora_file:LoraFileError", "mosaic_jax.interop.safetensors_io:SafetensorsError",
    "mosaic_jax.text:TokenizerFilesError", "mosaic_jax.data.cached_features:CacheError",
    "mosaic_jax.data.image_ops:ImageDecodeError", "mosaic_jax.evaluation.dreambench:EvaluationInputError",
    "mosaic_jax.data.pipeline:DatasetError", "mosaic_jax.workdir.trained:TrainedModelError",
    "mosaic_jax.workdir.config:WorkdirError",
    "mosaic_jax.correspondence.flux_features:FluxFeatureError", "mosaic_jax.data.composition:CompositionError",
    "mosaic_jax.correspondence.fill_manifest:MatchInputError", "mosaic_jax.correspondence.pck:PckInputError",
)


class UserError(Exception):
  """Bad input found by a launch script itself."""


def read_json(path, error: type[Exception]):
  """The JSON value in a user's file; an unreadable file or invalid JSON raises `error` (a user error
  type) with one line naming the file."""
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except OSError as e:
    raise error(f"{path}: cannot read the file ({e.strerror or e}).") from e
  except json.JSONDecodeError as e:
    raise error(f"{path}: not valid JSON ({e}).") from e


def verbose() -> bool:
  return "--verbose" in sys.argv or os.environ.get("MOSAIC_VERBOSE", "") not in ("", "0")


def _strip_verbose(argv: list[str]) -> list[str]:
  return [a for a in argv if a != "--verbose"]


def is_user_error(error: BaseException) -> bool:
  if isinstance(error, UserError):
    return True
  for spec in USER_ERRORS:
    module, name = spec.split(":")
    cls = getattr(sys.modules.get(module), name, None)
    if cls is not None and isinstance(error, cls):
      return True
  return False


def _exit_with(message: str) -> None:
  if verbose():
    traceback.print_exc()
  print(f"error: {' '.join(message.split())}", file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(USER_ERROR_EXIT_STATUS)  # pylint: disable=protected-access


def guarded(main: Callable[..., Any], *args) -> Any:
  """main(*args); a user error ends the process with one line and status 2."""
  try:
    return main(*args)
  except BaseException as error:  # pylint: disable=broad-except
    if is_user_error(error):
      _exit_with(str(error))
    raise


# ---- the console ----------------------------------------------------------------------------------

class _ThirdPartyFilter(logging.Filter):
  """Hides INFO/WARNING records, and orbax's records of errors the trainer reports itself (a failed
  save is raised as one CheckpointError, with orbax's cause in it)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "/orbax/" in record.pathname:
      return record.levelno >= logging.CRITICAL
    return record.levelno >= logging.ERROR


def quiet_third_party_logs() -> None:
  """Unless --verbose: absl's handler (where absl.logging, orbax, TFDS and jax log) shows errors only."""
  if verbose():
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from absl import logging as absl_logging
  absl_logging.get_absl_handler().addFilter(_ThirdPartyFilter())
  absl_logging.use_absl_handler()
  root = logging.getLogger()
  for handler in root.handlers:
    handler.addFilter(_ThirdPartyFilter())
  sys.unraisablehook = _without_closed_loop_callbacks(sys.unraisablehook)


def _without_closed_loop_callbacks(unraisablehook):
  """sys.unraisablehook without the errors of callbacks into an event loop that is already closed. After
  a save fails (a full disk), orbax closes its event loop while tensorstore still finishes the save's
  writes; each write's completion callback then fails on the closed loop, and tensorstore hands the
  error to sys.unraisablehook: hundreds of identical tracebacks ahead of the one line that says what
  happened (the checkpointer reports the save's own error)."""

  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
      return
    unraisablehook(unraisable)
  return hook


# ---- absl scripts (ml_collections config files) ---------------------------------------------------

def _config_overrides(argv: list[str]) -> list[str]:
  """The dotted field paths of the --config.a.b=value overrides on the command line."""
  out = []
  for arg in argv:
    if arg.startswith("--config."):
      out.append(arg[len("--config."):].split("=", 1)[0])
  return out


def _unknown_override(argv: list[str], known: set[str]) -> str | None:
  """The "unknown field" message for the first override that names no config field (`known`: every
  field, dotted), or None. A part (`dataset`) is a known prefix, not a field."""
  for path in _config_overrides(argv):
    if path not in known and not any(name.startswith(path + ".") for name in known):
      return unknown_field_message([path], known)
  return None


def unknown_field_message(unknown: list[str], known) -> str:
  """"unknown config field(s) [...]: not a field of configs/flux_ms.py (did you mean ...?)"."""
  hints = []
  for name in unknown:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    if close:
      hints.append(f"--config.{close[0]} for {name}")
  hint = f"did you mean {', '.join(hints)}?" if hints else "misspelt override?"
  return f"unknown config field(s) {sorted(unknown)}: not a field of configs/flux_ms.py ({hint})"


def _parse_absl_flags(argv: list[str], known_fields: Callable[[], set[str]] | None) -> list[str]:
  from absl import flags
  argv = _strip_verbose(argv)
  try:
    return flags.FLAGS(argv)
  except Exception as error:  # pylint: disable=broad-except  # flags.Error, or ml_collections' own
    message = _unknown_override(argv, known_fields()) if known_fields is not None else None
    if message is None:
      lines = [line.strip() for line in str(error).strip().strip("'\"").splitlines() if line.strip()]
      # A config file's own error comes as a traceback in the text: its first and last lines say it.
      message = "command line: " + (" ".join(lines[:1] + lines[1:][-1:]) if lines else type(error).__name__)
    _exit_with(message)
    raise  # unreachable


def run_absl(main: Callable[[list[str]], Any], known_fields: Callable[[], set[str]] | None = None) -> None:
  """app.run(main) with one-line user errors (flags and main's own) and quiet third-party logs.
  known_fields: every config field (settings.known_fields), for the did-you-mean of a misspelt
  --config. override; the schema, not the config file, which is not run a second time."""
  from absl import app

  def main_with_guard(argv):
    from absl import flags
    quiet_third_party_logs()
    if "config" in flags.FLAGS:  # a config file is loaded on first use: its errors are the user's
      try:
        flags.FLAGS["config"].value.keys()  # a placeholder that raises the load error
      except Exception as error:  # pylint: disable=broad-except
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        _exit_with(f"--config: the config file could not be loaded ({lines[-1] if lines else error!r})")
    return guarded(main, argv)

  app.run(main_with_guard, flags_parser=lambda argv: _parse_absl_flags(argv, known_fields))


# ---- argparse scripts -----------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors are one line (the usage is one --help away) with status 2; knows --verbose."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.add_argument("--verbose", action="store_true",
                      help="tracebacks of user errors and third-party log lines (or MOSAIC_VERBOSE=1)")

  def error(self, message):
    print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT_STATUS)


def run(main: Callable[[], Any]) -> Any:
  """main() of an argparse script, with one-line user errors and quiet third-party logs."""
  quiet_third_party_logs()
  return guarded(main)
