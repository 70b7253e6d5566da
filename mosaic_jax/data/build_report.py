"""Counts what a dataset build kept, skipped and patched, by reason, and prints it at the end.

Bad input never fails silently: an example that cannot be used is skipped and counted under a
reason; a released-layout example whose mask or coordinate file is missing is kept with the official
behaviour (full mask / no pairs) and counted too. A composed config (composition.py) counts source pairs:
every pair that takes part in no example, under its reason, and the placements it refused. The report is
also stored in the dataset's `metadata.json` (key `build_report`), so it survives the build.
"""

from __future__ import annotations

import collections

# Skipped examples.
CORRUPT_IMAGE = "skipped_corrupt_image"
MISSING_IMAGE = "skipped_missing_image"
MISSING_REFERENCE = "skipped_missing_reference"
BAD_COORD_SHAPE = "skipped_coord_wrong_shape"
BAD_COORD_VALUES = "skipped_coord_out_of_range"
UNREADABLE_COORD = "skipped_coord_unreadable"
BAD_MANIFEST_LINE = "skipped_manifest_line_not_json"
MANIFEST_MISSING_KEY = "skipped_manifest_line_missing_key"
MANIFEST_WRONG_TYPE = "skipped_manifest_line_wrong_type"
MANIFEST_WRONG_LENGTH = "skipped_manifest_line_wrong_length"
CORRUPT_MASK = "skipped_corrupt_mask"
# Kept, with the official fallback.
MISSING_MASK = "kept_missing_mask_full_mask_used"
MISSING_COORDS = "kept_missing_coords_no_pairs"
# Not errors: rows that the official filter drops.
FILTERED = "filtered_by_official_rule"
WRITTEN = "written"
# Composed examples (subjects200k_multi, composition.py). Source pairs that take part in no example:
PAIR_MISSING_MASK = "skipped_pair_missing_mask"  # nothing to cut out
PAIR_MISSING_COORDS = "skipped_pair_missing_coords"  # nothing to carry over
PAIR_EMPTY_MASK = "skipped_pair_empty_mask"
PAIR_TOO_FEW_TOKEN_PAIRS = "skipped_pair_too_few_token_pairs"  # fewer than min_pairs even alone, unscaled
PAIR_NO_ROOM = "skipped_pair_no_room"  # as a scene nothing fitted beside its subject; never placed in another
PAIR_POOL_EXHAUSTED = "skipped_pair_pool_exhausted"  # left without partners at the end of the stream
# Placements tried and refused (one candidate subject at one scale and offset), and what was written:
REJECTED_OVERLAP = "rejected_placement_overlap"  # occlusion="forbid" and it covered a subject
REJECTED_TOO_LITTLE_VISIBLE = "rejected_placement_too_little_visible"  # some subject kept < min_visible
REJECTED_TOO_FEW_TOKEN_PAIRS = "rejected_placement_too_few_token_pairs"  # some reference kept < min_pairs
FEWER_REFS_THAN_DRAWN = "composed_fewer_refs_than_drawn"  # written with the subjects that could be placed
PAIRS_USED = "source_pairs_used"  # distinct source pairs in at least one written example


def written_with(num_refs: int) -> str:
  """The count of examples written with `num_refs` references (composed configs)."""
  return f"written_with_{num_refs}_refs"


class SkipExample(Exception):
  """Raised by readers for an example that must be skipped; `reason` is one of the constants."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail


class BuildReport:
  """Per-split counters plus the first few details of each reason."""

  def __init__(self, split: str, max_details: int = 5, skipped_what: str = ""):
    self.split = split
    self.skipped_what = skipped_what  # what the skipped counts count, when not examples: "source pairs"
    self.counts: collections.Counter[str] = collections.Counter()
    self.details: dict[str, list[str]] = collections.defaultdict(list)
    self._max_details = max_details

  def count(self, reason: str, detail: str = "") -> None:
    self.counts[reason] += 1
    if detail and len(self.details[reason]) < self._max_details:
      self.details[reason].append(detail)

  def skipped(self) -> int:
    return sum(n for reason, n in self.counts.items() if reason.startswith("skipped_"))

  def as_dict(self) -> dict:
    return {"counts": dict(sorted(self.counts.items())),
            "examples": {k: list(v) for k, v in sorted(self.details.items())}}

  def format(self) -> str:
    skipped = f"{self.skipped()} {self.skipped_what} skipped" if self.skipped_what else f"{self.skipped()} skipped"
    lines = [f"build report for split '{self.split}': {self.counts[WRITTEN]} written, {skipped}"]
    for reason, number in sorted(self.counts.items()):
      if reason == WRITTEN:
        continue
      lines.append(f"  {reason}: {number}")
      for detail in self.details.get(reason, []):
        lines.append(f"    e.g. {detail}")
    return "\n".join(lines)
