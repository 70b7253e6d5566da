"""DreamBench scores (CLIP-T, CLIP-I, DINO, x100; with per-case minima over subjects and breakdowns by
subject kind) for generated images, or for a model that generates them first (the work:
mosaic_jax/evaluation/).

  python launch/evaluate.py --cases dreambench_multiip.json --dreambench dreambooth/dataset \\
      --generated results/ --clip /models/clip-vit-base-patch32 --dino /models/dino-vits16 --output eval/
  python launch/evaluate.py --cases dreambench_multiip.json --dreambench dreambooth/dataset \\
      --checkpoint /ckpt/FLUX.1-dev --lora mosaic.safetensors --generated eval/images --seeds 0 1 2 3 \\
      --clip /models/clip-vit-base-patch32 --dino /models/dino-vits16 --output eval/

--clip: a transformers CLIPModel folder with its tokenizer files; --dino: a transformers ViTModel folder
(facebook/dino-vits16). Writes <output>/results.json (settings, every score, every skip), results.md and
contact_<kind>.png. Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from mosaic_jax import cli
from mosaic_jax.evaluation.dino import DEFAULT_DINO_EPS
from mosaic_jax.evaluation.dreambench import EvaluationInputError


def build_parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cases", required=True, help="UNO dreambench_*ip.json or a MOSAIC cases file")
  p.add_argument("--dreambench", required=True, help="DreamBench images: one folder of real views per subject")
  p.add_argument("--generated", required=True,
                 help="folder of <case>_<seed>.png (read; with --checkpoint, written first)")
  p.add_argument("--output", required=True, help="folder for results.json, results.md, contact sheets")
  p.add_argument("--clip", required=True, help="transformers CLIPModel folder (with tokenizer files)")
  p.add_argument("--dino", required=True, help="transformers ViTModel folder (DINO)")
  p.add_argument("--dino_eps", type=float, default=DEFAULT_DINO_EPS,
                 help="DINO LayerNorm epsilon (1e-6: original DINO, DreamBench's convention)")
  p.add_argument("--seeds", type=int, nargs="+", help="seeds to score (default: every seed found)")
  p.add_argument("--batch_size", type=int, default=32, help="extractor batch (rounded to the device count)")
  p.add_argument("--sheet_rows", type=int, default=12, help="cases per contact sheet")
  gen = p.add_argument_group("generating the images first")
  gen.add_argument("--checkpoint", help="FLUX checkpoint root; generate into --generated before scoring")
  gen.add_argument("--lora", help="MOSAIC LoRA file or training workdir")
  gen.add_argument("--size", type=int, default=512)
  gen.add_argument("--ref_size", type=int, default=512)
  gen.add_argument("--steps", type=int, default=28)
  gen.add_argument("--guidance", type=float, default=3.5)
  gen.add_argument("--sample_batch_size", type=int, default=1)
  gen.add_argument("--independent_refs", action="store_true")
  return p


def check_args(args) -> None:
  if args.batch_size < 1:
    raise EvaluationInputError(f"--batch_size {args.batch_size}: expected at least 1.")
  if not (args.dino_eps > 0):
    raise EvaluationInputError(f"--dino_eps {args.dino_eps}: expected a positive number (1e-6 or 1e-12).")
  if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
    raise EvaluationInputError(f"--seeds {args.seeds}: a seed repeats.")
  if args.lora and not args.checkpoint:
    raise EvaluationInputError("--lora needs --checkpoint (generation); to score existing images drop --lora.")
  for flag in ("clip", "dino", "dreambench"):
    if not os.path.isdir(getattr(args, flag)):
      raise EvaluationInputError(f"--{flag} {getattr(args, flag)}: no such folder.")
  if not args.checkpoint:
    from mosaic_jax.evaluation.dreambench import generated_images
    generated_images(args.generated)  # fails before any model is loaded


def run(args) -> list[str]:
  """The whole evaluation from parsed arguments; returns the files written."""
  from mosaic_jax.evaluation import protocol, report
  from mosaic_jax.evaluation.dreambench import read_cases
  check_args(args)
  cases, case_format = read_cases(args.cases)
  extractors = protocol.load_extractors(args.clip, args.dino, args.dino_eps, args.batch_size)
  generation = None
  if args.checkpoint:
    from mosaic_jax.evaluation.generate import generate_images
    generation = generate_images(cases, args.generated, args.checkpoint, args.lora, size=args.size,
                                 ref_size=args.ref_size, steps=args.steps, guidance=args.guidance,
                                 seeds=args.seeds or [0], batch_size=args.sample_batch_size,
                                 independent_refs=args.independent_refs)
  result = protocol.evaluate(cases, args.dreambench, args.generated, extractors, seeds=args.seeds,
                             log=lambda line: print(line, file=sys.stderr))
  settings = {"cases_file": os.path.abspath(args.cases), "cases_format": case_format,
              "dreambench": os.path.abspath(args.dreambench), "generated": os.path.abspath(args.generated),
              "generation": generation, **extractors.settings()}
  written = report.write_report(result, settings, args.dreambench, args.output, args.sheet_rows)
  print(report.markdown_table(result, settings))
  return written


def main(argv: list[str] | None = None) -> list[str]:
  return run(build_parser().parse_args(argv))


if __name__ == "__main__":
  cli.run(main)
