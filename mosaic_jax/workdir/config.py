"""The workdir's config: written once, compared on every resume before anything is written.

  config.json            the config of the run's first start (never overwritten once a checkpoint exists)
  config_history.jsonl   one line per resume that changed a field: {"time", "changed": {field: [old, new]},
                         "config": the whole config in effect from then on}; and one per choice the
                         program made for a field set to "auto" (remat_policy: train/remat_choice.py),
                         with "choice": what it was made for and from what

A resume may change only the fields the settings mark resume-safe (mosaic_jax/settings/fields.py: how long to
train, how often to log, save and sample, how many checkpoints to keep, the evaluation and sampling
settings, the layout over the devices, since the state is resharded on restore, and the model overrides
of how the transformer is executed). Any other change (the model, the LoRA, the optimizer and its schedule's
shape, the losses, the data and its order, the seed) would continue a run from a state it did not make:
it is refused with the list of differing fields, and the workdir is left as it was. Note that a new
total_steps stretches the learning-rate schedule from the resumed step on. Model overrides are compared
one by one at the values in effect: an override that is not set stands for the preset's (or the
checkpoint's) value, so giving that value is no change.
"""

from __future__ import annotations

import dataclasses
import json
import time

from etils import epath

from mosaic_jax.model import config as model_config
from mosaic_jax.settings import ConfigError, Settings, checkpoint_transformer_config, config_fields, resume_safe


class WorkdirError(ValueError):
  """A --workdir that cannot hold a run (a file, or a path under one); the message names it."""


def check_path(workdir: str) -> None:
  """The workdir is a folder, or a path where one can be made: nothing in the way is a file."""
  path = epath.Path(workdir)
  existing = path
  while not existing.exists() and existing.parent != existing:
    existing = existing.parent
  if existing.exists() and not existing.is_dir():
    where = "is a file" if existing == path else f"lies under the file {existing}"
    raise WorkdirError(f"--workdir {workdir} {where}: expected a folder for the run's checkpoints and logs "
                       "(an existing one resumes; a new one is made).")


def changes(old: dict, new: dict) -> dict[str, list]:
  """{field: [old value, new value]} of every field that differs (absent: None), each model override
  a field of its own, compared at the value in effect."""
  old, new = _in_effect_fields(old), _in_effect_fields(new)
  return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def _in_effect_fields(config: dict) -> dict:
  """config_fields(config), each model override that is not set at the value of the transformer it
  overrides (the checkpoint's config when it names a diffusers folder, else the preset)."""
  fields = config_fields(config)
  try:
    loaded = checkpoint_transformer_config(config["checkpoint"]) if config.get("checkpoint") else None
    base = json.loads(json.dumps(dataclasses.asdict(model_config.resolve(config["model"], {}, loaded))))
  except (ConfigError, ValueError, KeyError):  # compared as written; the settings report the config's errors
    return fields
  for key, value in fields.items():
    name = key.removeprefix("model_overrides.")
    if key != name and value is None and name in base:
      fields[key] = base[name]
  return fields


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


def resume_changes(settings: Settings, workdir: str) -> dict[str, list] | None:
  """What the settings change in the workdir's config in effect ({field: [old, new]}), or None when the
  workdir holds no checkpoint to resume (the settings are then the run's first). Refuses a workdir that
  cannot be one (WorkdirError) and a change a resume may not make (ConfigError); reads only."""
  check_path(workdir)
  workdir = epath.Path(workdir)
  previous = in_effect(workdir) if has_checkpoints(workdir) else None
  if previous is None:
    return None
  changed = changes(previous, settings.to_config())
  refused = {k: v for k, v in changed.items() if not resume_safe(k)}
  if refused:
    listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
    raise ConfigError(f"the config differs from the one {workdir} was trained with in field(s) that a resume "
                      f"cannot change ({listed}): restore those values, or use a new --workdir.")
  return changed


def record(settings: Settings, workdir: str, changed: dict[str, list] | None) -> None:
  """Writes what resume_changes found: the first start's config.json, or a resume's changes with the whole
  config in effect from now on (a line of config_history.jsonl). One process writes (process 0)."""
  workdir = epath.Path(workdir)
  current = settings.to_config()
  if changed is None:  # nothing to resume: the config is this run's
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(current, indent=2))
  elif changed:
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "changed": changed,
                       "config": current})
    history = workdir / "config_history.jsonl"
    existing = history.read_text() if history.exists() else ""
    history.write_text(existing + line + "\n")  # epath has no append mode on every backend


def record_choice(workdir: str, field: str, asked: str, chose: Settings, details: dict) -> None:
  """A line of config_history.jsonl for a choice the program made for `field` (set to `asked`, e.g.
  "auto"): the change to the chosen value, the config in effect from now on (`chose`), and `details`
  (what the choice was made for and from what). One process writes (process 0)."""
  current = chose.to_config()
  line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "changed": {field: [asked, current[field]]}, "config": current, "choice": details})
  history = epath.Path(workdir) / "config_history.jsonl"
  existing = history.read_text() if history.exists() else ""
  history.write_text(existing + line + "\n")


def recorded_choice(workdir: str, field: str) -> dict | None:
  """The details of the latest choice recorded for `field` while the config in effect still holds its
  value (a later explicit change replaces it), or None."""
  history = epath.Path(workdir) / "config_history.jsonl"
  if not history.exists():
    return None
  lines = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
  for line in reversed(lines):
    if field in line["changed"]:
      chosen = line.get("choice")
      if chosen is None or lines[-1]["config"].get(field) != line["config"][field]:
        return None
      return chosen
  return None
