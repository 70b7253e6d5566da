"""Builds a `semalign_ms` config into array_record files, without TensorFlow.

  python launch/build_dataset.py --config synthetic --data_dir ~/tensorflow_datasets
  python launch/build_dataset.py --config subjects200k --manual_dir /data/semalign --data_dir DIR
  python launch/build_dataset.py --config subjects200k_multi --manual_dir /data/semalign --data_dir DIR
  python launch/build_dataset.py --config folder --manual_dir /data/mine --data_dir DIR
  python launch/build_dataset.py --config synthetic --name synthetic_256 --image_size 256 \
      --num_train 500 --max_refs 4 --data_dir DIR      # a custom synthetic config
  python launch/build_dataset.py --config subjects200k_multi --name multi_reuse3 \
      --compose max_uses=3 --compose refs=2,3,4 --manual_dir /data/semalign --data_dir DIR

`--compose FIELD=VALUE` sets a composition setting of subjects200k_multi (mosaic_jax/data/composition.py,
CompositionSettings; docs/data.md); like the synthetic options it needs `--name`, since the registered
config means its defaults. The build report (skipped / patched examples by reason) is printed at the end
of each split.
"""

from __future__ import annotations


import tensorflow_datasets as tfds

from mosaic_jax import cli
from mosaic_jax.data import folder, released_layout
from mosaic_jax.data.composition import CompositionSettings
from mosaic_jax.data.semalign_ms import COMPOSED, SOURCES, SemalignMs, SemalignMsConfig


def main(argv=None):
  parser = cli.ArgumentParser(description="Build semalign_ms (array_record, no TensorFlow).")
  parser.add_argument("--config", choices=SOURCES, required=True)
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--manual_dir", help="input directory for subjects200k, subjects200k_multi and folder")
  parser.add_argument("--name", help="custom config name (the synthetic and --compose options below need one)")
  parser.add_argument("--image_size", type=int, default=512)
  parser.add_argument("--min_refs", type=int, default=1)
  parser.add_argument("--max_refs", type=int, default=6)
  parser.add_argument("--num_train", type=int, default=2000)
  parser.add_argument("--num_validation", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0, help="synthetic scenes and subjects200k_multi's composition")
  parser.add_argument("--compose", action="append", default=[], metavar="FIELD=VALUE",
                      help="a subjects200k_multi composition setting, e.g. max_uses=3 or refs=2,6 (repeatable)")
  args = parser.parse_args(argv)
  if args.config != "synthetic" and not args.manual_dir:
    parser.error(f"--config {args.config} needs --manual_dir")
  if args.compose and args.config != COMPOSED:
    parser.error(f"--compose sets subjects200k_multi's composition, not {args.config}'s")
  if args.compose and not args.name:
    parser.error("--compose needs --name (a custom config name): subjects200k_multi means the defaults")
  if not args.name:  # a registered config means its own settings: options that would change it need a name
    for option in ("image_size", "min_refs", "max_refs", "num_train", "num_validation", "seed"):
      if getattr(args, option) != parser.get_default(option):
        parser.error(f"--{option} needs --name (a custom config name): --config {args.config} means its "
                     "registered settings")
  try:
    composition = CompositionSettings().replace(args.compose)
  except ValueError as error:
    parser.error(str(error))
  try:  # the input is there before anything is written (each reader names what it expects)
    if args.config in ("subjects200k", COMPOSED):
      released_layout.parquet_files(args.manual_dir)
    elif args.config == "folder":
      folder.manifest_splits(args.manual_dir)
  except FileNotFoundError as error:
    raise cli.UserError(f"--manual_dir {args.manual_dir}: {error}") from error
  config = args.config
  if args.name:
    config = SemalignMsConfig(name=args.name, source=args.config, image_size=args.image_size,
                              min_refs=args.min_refs, max_refs=args.max_refs,
                              num_train=args.num_train, num_validation=args.num_validation,
                              seed=args.seed, composition=composition)
  builder = SemalignMs(config=config, data_dir=args.data_dir)
  download_config = (tfds.download.DownloadConfig(manual_dir=args.manual_dir)
                     if args.manual_dir else None)
  print(f"building {builder.info.full_name} into {builder.data_dir}", flush=True)
  builder.download_and_prepare(download_config=download_config)
  print(f"built {builder.info.full_name} in {builder.data_dir}")


if __name__ == "__main__":
  cli.run(main)
