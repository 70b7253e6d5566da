"""The workdir's config: written once, compared on every resume before anything is written.

  config.json            the config of the run's first start (never overwritten once a checkpoint exists)
  config_history.jsonl   one line per resume that changed a field: {"time", "changed": {field: [old, new]},
                         "config": the whole config in effect from then on}

A resume may change only the fields the settings mark resume-safe (mosaic_jax/settings.py: how long to
train, how often to log, save and sample, how many checkpoints to keep, the evaluation and sampling
settings, the layout over the devices, since the state is resharded on restore, and the model overrides
of how the transformer is executed). Any other change (the model, the LoRA, the optimizer and its schedule's
shape, the losses, the data and its order, the seed) would continue a run from a state it did not make:
it is refused with the list of differing fields, and the workdir is left as it was. Note that a new
total_steps stretches the learning-rate schedule from the resumed step on.
"""

from __future__ import annotations

import json
import time

from etils import epath

from mosaic_jax.settings import ConfigError, Settings, config_fields, resume_safe


def changes(old: dict, new: dict) -> dict[str, list]:
  """{field: [old value, new value]} of every field that differs (absent: None), each model override
  a field of its own."""
  old, new = config_fields(old), config_fields(new)
  return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def in_effect(workdir: epath.Path) -> dict | None:
  """The config the workdir's checkpoints were made with (config.json, then its history), or None."""
  history = workdir / "config_history.jsonl"
  if history.exists():
    lines = [line for line in history.read_text().splitlines() if line.strip()]
    if lines:
      return json.loads(lines[-1])["config"]
  first = workdir / "config.json"
  return json.loads(first.read_text()) if first.exists() else None


def has_checkpoints(workdir: epath.Path) -> bool:
  folder = workdir / "checkpoints"
  return folder.exists() and any(p.name.isdigit() for p in folder.iterdir())


def check_and_record(settings: Settings, workdir: str, write: bool) -> dict[str, list]:
  """Refuses (ConfigError) settings that may not resume the workdir's checkpoints; records the allowed
  changes (when `write`: process 0). Returns the recorded changes."""
  workdir = epath.Path(workdir)
  current = settings.to_config()
  previous = in_effect(workdir) if has_checkpoints(workdir) else None
  if previous is None:  # nothing to resume: the config is this run's
    if write:
      workdir.mkdir(parents=True, exist_ok=True)
      (workdir / "config.json").write_text(json.dumps(current, indent=2))
    return {}
  changed = changes(previous, current)
  refused = {k: v for k, v in changed.items() if not resume_safe(k)}
  if refused:
    listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
    raise ConfigError(f"the config differs from the one {workdir} was trained with in field(s) that a resume "
                      f"cannot change ({listed}): restore those values, or use a new --workdir.")
  if changed and write:
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "changed": changed,
                       "config": current})
    history = workdir / "config_history.jsonl"
    existing = history.read_text() if history.exists() else ""
    history.write_text(existing + line + "\n")  # epath has no append mode on every backend
  return changed
