"""Fills in the missing correspondences of `folder` manifests, in JAX: MOSAIC's matching rule with our matchers.

  python launch/match.py --manual_dir /data/mine --out /data/mine_matched \\
      --flux /ckpt/FLUX.1-dev --dinov2 /ckpt/dinov2-base
  python launch/build_dataset.py --config folder --manual_dir /data/mine_matched --data_dir DIR

Every `{split}.jsonl` of --manual_dir is read (data/folder.py format); for each reference without `coords`
the two grids are made (FLUX DiTF features -> coord/dift, DINOv2 -> coord/geoaware) and written as .npy in
the released layout under --out, with `{split}.jsonl` manifests there that name them. Nothing is
overwritten; run it again to resume. What is written, skipped and why: mosaic_jax/correspondence/
fill_manifest.py and docs/matching.md.
"""

from __future__ import annotations

import argparse

from mosaic_jax import cli


def channel_list(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(c) for c in text.split(",") if c.strip())
  except ValueError as error:
    raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated channel numbers, e.g. 154,1446") from error


def main(argv=None):
  parser = cli.ArgumentParser(description="Fill in the missing correspondences of folder manifests.")
  parser.add_argument("--manual_dir", required=True, help="directory of {split}.jsonl manifests (folder format)")
  parser.add_argument("--out", required=True, help="directory for the grids and the filled manifests")
  parser.add_argument("--flux", help="FLUX checkpoint root (transformer/, vae/, text_encoder*/, tokenizer*/): "
                      "the DiTF matcher, coord/dift")
  parser.add_argument("--dinov2", help="transformers Dinov2Model folder (facebook/dinov2-base): coord/geoaware")
  parser.add_argument("--batch_size", type=int, default=0,
                      help="pairs per step (default: one per device; a multiple of the device count)")
  parser.add_argument("--dift_similarity", choices=("cosine", "dot"), default="cosine",
                      help="cosine (default) or the official DIFT script's raw dot product")
  parser.add_argument("--geoaware_similarity", choices=("cosine", "dot"), default="cosine")
  parser.add_argument("--ditf_block", type=int, help="DiTF: the block whose input is read (default 28)")
  parser.add_argument("--ditf_timestep", type=float, help="DiTF: sigma of the noisy copies (default 0.26)")
  parser.add_argument("--ditf_copies", type=int, help="DiTF: noisy copies averaged (default 8)")
  parser.add_argument("--ditf_massive_channels", type=channel_list, help="DiTF: comma-separated channels zeroed before the AdaLN "
                      "(default FLUX.1-dev's 154,1446; empty: none)")
  parser.add_argument("--dinov2_layer", type=int, help="DINOv2: the block whose output is read (default 11)")
  parser.add_argument("--attention", choices=("xla", "splash", "cudnn"), default="",
                      help="the FLUX matcher's attention kernel (default xla; splash on TPUs, cudnn on NVIDIA GPUs "
                      "in bfloat16; DINOv2 keeps xla)")
  parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                      help="the FLUX transformer's and text encoders' weights (DINOv2 stays float32)")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  parser.add_argument("--distributed", action="store_true", help="join a multi-process job (see train.py)")
  args = parser.parse_args(argv)
  if not (args.flux or args.dinov2):
    parser.error("give --flux, --dinov2 or both (both grids are needed for a reference to get pairs)")
  import os
  for flag, path in (("--flux", args.flux), ("--dinov2", args.dinov2)):
    if path and not os.path.isdir(os.path.expanduser(path)):
      parser.error(f"{flag} {path}: no such directory")

  from mosaic_jax.parallel import distributed
  distributed.initialize(args.distributed)
  with distributed.exit_on_failure():
    _run(args)


def _run(args) -> None:
  import dataclasses

  import jax.numpy as jnp

  from mosaic_jax.correspondence import extractors, fill_manifest, flux_features, matchers
  from mosaic_jax.parallel import distributed

  def ditf():
    overrides = {name: value for name, value in (("block", args.ditf_block), ("timestep", args.ditf_timestep),
                                                 ("copies", args.ditf_copies)) if value is not None}
    if args.ditf_massive_channels is not None:
      channels = args.ditf_massive_channels
      overrides.update(massive_channels=channels, discard_massive=bool(channels))
    cfg = dataclasses.replace(flux_features.DitfConfig(), **overrides)
    matcher = extractors.ditf_matcher_from_root(args.flux, cfg, getattr(jnp, args.dtype), args.dift_similarity,
                                                args.attention)
    return matchers.MeshMatcher(matcher, batch_size=args.batch_size or None)

  def dinov2():
    matcher = extractors.dinov2_matcher_from_folder(args.dinov2, layer=args.dinov2_layer,
                                                    similarity=args.geoaware_similarity)
    return matchers.MeshMatcher(matcher, batch_size=args.batch_size or None)

  runners = {}
  if args.flux:
    runners["dift"] = ditf
  if args.dinov2:
    runners["geoaware"] = dinov2
  summary = fill_manifest.fill(args.manual_dir, args.out, runners, progress=not args.no_progress)
  distributed.say(summary.format())
  differing = [path for path, state in summary.manifests.items() if state not in ("written", "unchanged")]
  if differing:
    raise fill_manifest.MatchInputError(
        f"{differing[0]} exists and differs from this run's manifest: it was left as it is; remove it (the grids "
        "are kept) and run again to write the new one")


if __name__ == "__main__":
  cli.run(main)
