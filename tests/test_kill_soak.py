"""Kill soak (short): launch/train.py on the tiny config SIGKILLed 10 times at random moments (in steps,
in saves, in exports; at least one while orbax's commit of a save was in flight, proven by the
uncommitted step folder the killed run left) and restarted each time ends with every logged loss and
the final LoRA files bit-identical to an uninterrupted run's. The long version: `python tests/kill_soak.py`."""

from __future__ import annotations

import os

import kill_soak


def test_ten_random_kills_end_with_the_uninterrupted_losses_and_lora(tmp_path):
  result = kill_soak.soak(str(tmp_path / "tfds"), str(tmp_path), kills=10, steps=10, seed=0)
  print(result)
  assert result["kills"] == 10 and result["runs"] == 11
  assert result["kills_during_saves"] >= 1, result
  assert result["final_run_steps"] < 10, result  # killed runs committed steps that later runs resumed from
  assert result["losses_compared"] == 10 and result["losses_identical"], result
  assert result["lora_identical"], result
  # The saves the kills cut short left uncommitted step folders; the runs that opened the folder after
  # them deleted them (checkpoint.py: cleanup_tmp_directories), so none is left to fill a disk.
  left = [name for name in os.listdir(os.path.join(tmp_path, "killed", "checkpoints"))
          if kill_soak.TEMPORARY_SUFFIX in name]
  assert not left, left
