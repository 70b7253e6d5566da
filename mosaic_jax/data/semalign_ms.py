"""TFDS builder `semalign_ms`: SemAlign-MS examples in array_record files, built without TensorFlow.

Configs (see `schema.py` for the stored example):
  subjects200k  the released SemAlign-MS-Subjects200K layout, from a manual directory
                (`released_layout.py`); split `train`; one reference per example.
  subjects200k_multi  the same manual directory, 2 to 6 released pairs composed into each example
                (`composition.py`, settings `SemalignMsConfig.composition`), with per-reference
                provenance; splits `train` and `validation` (disjoint source pairs).
  synthetic     procedural multi-subject scenes with exact correspondences (`synthetic.py`), 1 to
                `max_refs` references; splits `train` and `validation`.
  folder        the user's JSON-lines manifests (`folder.py`), one split per `{split}.jsonl`.

Build without TensorFlow:
  builder = SemalignMs(config="synthetic", data_dir=DIR)        # array_record by default
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=MANUAL))
or `python launch/build_dataset.py --config synthetic --data_dir DIR` (`build_command` gives the
command for any config). With TensorFlow installed the
CLI works too: `tfds build mosaic_jax/data/semalign_ms.py --config synthetic
--file_format array_record --manual_dir MANUAL`.
Read: `tfds.data_source("semalign_ms/synthetic", data_dir=DIR)` (import this module first so the
builder is registered), or `pipeline.make_iterator`.

Records are written in generation order (`disable_shuffling`; the input pipeline shuffles), so the
per-record reference counts stored in `metadata.json` (`num_refs[split]`) line up with record
indices and bucketing needs no pass over the data. The build report (`build_report.py`) is printed
at the end of each split and stored in `metadata.json` under `build_report[split]`.

A custom config (other sizes, counts, seed, composition settings) is a `SemalignMsConfig` with its own
name, e.g. `SemalignMsConfig(name="synthetic_128", source="synthetic", image_size=128, num_train=64)`.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Iterator

import tensorflow_datasets as tfds
import tqdm

from mosaic_jax.data import build_report, composition, folder, released_layout, schema, synthetic
from mosaic_jax.data.image_ops import encode_png

COMPOSED = "subjects200k_multi"
SOURCES = ("subjects200k", COMPOSED, "synthetic", "folder")
MANUAL_DIRS = {"subjects200k": "RELEASED_DIR", COMPOSED: "RELEASED_DIR", "folder": "MANIFEST_DIR"}


@dataclasses.dataclass(eq=False)
class SemalignMsConfig(tfds.core.BuilderConfig):
  source: str = "synthetic"
  # synthetic only
  image_size: int = 512
  min_refs: int = 1
  max_refs: int = 6
  num_train: int = 2000
  num_validation: int = 64
  # synthetic and subjects200k_multi
  seed: int = 0
  # subjects200k_multi only
  composition: composition.CompositionSettings = dataclasses.field(
      default_factory=composition.CompositionSettings)

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ValueError(f"SemalignMsConfig {self.name!r}: source={self.source!r}, expected one of {SOURCES}")
    if not 1 <= self.min_refs <= self.max_refs:
      raise ValueError(f"SemalignMsConfig {self.name!r}: need 1 <= min_refs ({self.min_refs}) <= "
                       f"max_refs ({self.max_refs})")
    if self.max_refs > len(synthetic.SHAPES):
      raise ValueError(f"SemalignMsConfig {self.name!r}: max_refs={self.max_refs} exceeds the "
                       f"{len(synthetic.SHAPES)} distinct synthetic shapes")


class SemalignMs(tfds.core.GeneratorBasedBuilder):
  """SemAlign-MS multi-subject personalization data (see module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      SemalignMsConfig(name="subjects200k", source="subjects200k",
                       description="Released SemAlign-MS-Subjects200K (manual directory)."),
      SemalignMsConfig(name=COMPOSED, source=COMPOSED,
                       description="2 to 6 released Subjects200K pairs composed per example (manual directory)."),
      SemalignMsConfig(name="synthetic", source="synthetic",
                       description="Procedural multi-subject scenes, exact correspondences."),
      SemalignMsConfig(name="folder", source="folder",
                       description="Your own data: JSON-lines manifests in the manual directory."),
  ]
  DEFAULT_CONFIG_NAME = "synthetic"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  subjects200k, subjects200k_multi: the Subjects200K parquet shards (any depth) plus SemAlign-MS `mask/`
  and `coord/` (unzipped) in one directory. folder: `{split}.jsonl` manifests (see
  mosaic_jax/data/folder.py).
  """

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or "array_record", **kwargs)

  # TFDS prints "Downloading and preparing dataset Unknown size ..." before a build and "... downloaded and
  # prepared ..." after it, on stdout whatever the logging level: nothing is downloaded here, and the
  # callers (launch/build_dataset.py, the trainer's first use) say themselves what they build and where.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=schema.features(provenance=self.builder_config.source == COMPOSED),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
        homepage="https://arxiv.org/abs/2509.01977",
    )

  def _split_generators(self, dl_manager):
    config = self.builder_config
    if config.source == "synthetic":
      return {split: self._generate_examples(split, self._synthetic(split, count))
              for split, count in (("train", config.num_train), ("validation", config.num_validation))}
    manual_dir = str(dl_manager.manual_dir)
    if config.source == COMPOSED:
      settings = config.composition
      self.info.metadata["composition"] = {**dataclasses.asdict(settings), "seed": config.seed}
      return {split: self._generate_examples(split, lambda report, split=split: composition.compose_released(
          manual_dir, split, settings, config.seed, report)) for split in settings.splits()}
    if config.source == "subjects200k":
      return {"train": self._generate_examples("train", lambda report: released_layout.read_examples(
          manual_dir, report))}
    return {split: self._generate_examples(split, lambda report, path=path, split=split: folder.read_examples(
        path, split, report)) for split, path in folder.manifest_splits(manual_dir).items()}

  def _synthetic(self, split: str, count: int):
    config = self.builder_config

    def read(report: build_report.BuildReport) -> Iterator[dict]:
      del report  # generated data has nothing to skip
      for index in range(count):
        scene = synthetic.scene_for_index(config.seed, split, index, config.min_refs,
                                          config.max_refs, config.image_size)
        refs = [schema.reference(encode_png(image), encode_png(mask), (grid, grid))
                for image, mask, grid in zip(scene.refs, scene.masks, scene.coords)]
        yield schema.example(f"synthetic-{split}-{index:08d}", scene.caption,
                             encode_png(scene.target), refs)
    return read

  def _generate_examples(self, split: str, read) -> Iterator[tuple[int, dict]]:
    composed = self.builder_config.source == COMPOSED
    report = build_report.BuildReport(split, skipped_what="source pairs" if composed else "")
    # Recorded before each yield, not after the loop: `tfds build --max_examples_per_split` stops
    # consuming this generator early, and the metadata must still match the records written.
    num_refs = self.info.metadata.setdefault("num_refs", {}).setdefault(split, [])
    num_refs.clear()
    for example in read(report):
      key = len(num_refs)  # integer keys in order: record index == key (disable_shuffling)
      num_refs.append(int(example["num_refs"]))
      report.count(build_report.WRITTEN)
      self.info.metadata.setdefault("build_report", {})[split] = report.as_dict()
      yield key, example
    # On lines of its own: tqdm clears the build's progress bars, prints, then redraws them.
    tqdm.tqdm.write(report.format(), file=sys.stdout)
    self.info.metadata.setdefault("build_report", {})[split] = report.as_dict()


def build_command(config: SemalignMsConfig, data_dir: str) -> str:
  """The launch/build_dataset.py command that builds `config` into data_dir (for "not built" messages)."""
  registered = any(config is known for known in SemalignMs.BUILDER_CONFIGS)
  name = "" if registered else f" --name {config.name}"
  manual = f" --manual_dir {MANUAL_DIRS[config.source]}" if config.source in MANUAL_DIRS else ""
  return f"python launch/build_dataset.py --config {config.source}{name}{manual} --data_dir {data_dir}"
