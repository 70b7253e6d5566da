"""Prompt + reference images -> images with FLUX.1-dev and a MOSAIC LoRA (the work: mosaic_jax/sample_driver.py).

  python launch/sample.py --checkpoint /ckpt/FLUX.1-dev --lora mosaic_lora.safetensors \\
      --prompt "a cat wearing the hat" --ref cat.png --ref hat.png --output samples/
  python launch/sample.py --checkpoint /ckpt/FLUX.1-dev --lora /workdirs/run1 --cases cases.json \\
      --seeds 0 1 2 --batch_size 3 --independent_refs

Each run writes into a new folder `<output>/run-<time>/`: `<index>_seed<seed>.png`, a panel
`<index>_seed<seed>_panel.png` (references, then the result) and run.json (the settings). With
`--save_attention`, per case with references also `<index>_seed<seed>_attention.png`: each reference's
attention over the target (the statistic SCAL and MDL train, averaged over every denoising step) as a
heatmap over the result, one colour per reference (the references framed in their colours on top; then
all heatmaps together, then each alone), and the maps themselves in `<index>_seed<seed>_attention.npy`
([R, grid height, grid width], each summing to 1). Such a run samples without the reference KV cache.

`--mesh DATA,FSDP,TENSOR` places the transformer as training does: `--mesh 1,-1,1` splits FLUX.1-dev
over every chip (16 GB TPU v5e chips cannot hold its 24 GB whole); the batch (`--batch_size` pairs of
case and seed) is split over data x fsdp. Run the same command on every host of a pod or cluster (jax
detects SLURM, Open MPI, Cloud TPU and GKE jobs; `--distributed` insists): each process writes its own
share of the images, each image once, into one run folder.
"""

from __future__ import annotations

import argparse
import os

import jax

from mosaic_jax import cli, sample_driver, sampling
from mosaic_jax.parallel import distributed
from mosaic_jax.workdir import trained


def parse_size(text: str) -> tuple[int, int]:
  """"512" or "WIDTHxHEIGHT" -> (height, width)."""
  try:
    parts = [int(p) for p in text.lower().split("x")]
  except ValueError:
    parts = []
  if len(parts) == 1:
    return parts[0], parts[0]
  if len(parts) == 2:
    return parts[1], parts[0]
  raise argparse.ArgumentTypeError(f"size {text!r}: expected N or WIDTHxHEIGHT, e.g. 512 or 768x512.")


def parse_mesh(text: str) -> dict[str, int]:
  """"DATA,FSDP,TENSOR" (one may be -1) -> the mesh sizes."""
  try:
    sizes = [int(p) for p in text.split(",")]
  except ValueError:
    sizes = []
  if len(sizes) != 3:
    raise argparse.ArgumentTypeError(f"mesh {text!r}: expected DATA,FSDP,TENSOR sizes, e.g. -1,1,1 or 1,-1,1.")
  return dict(zip(("data", "fsdp", "tensor"), sizes))


def build_parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  what = p.add_mutually_exclusive_group(required=True)
  what.add_argument("--cases", help='JSON list of {"index", "prompt", "image_paths"} (the official format)')
  what.add_argument("--prompt", help="one prompt; its references come from --ref")
  p.add_argument("--ref", action="append", default=[], help="a reference image (repeat for several)")
  p.add_argument("--checkpoint", required=True,
                 help="FLUX checkpoint root in diffusers layout, or a training workdir (or one of its step "
                      "folders: checkpoints/<step>, lora/<step>), which brings its own base, LoRA and encoders")
  p.add_argument("--lora", default="",
                 help="with a FLUX root: MOSAIC LoRA .safetensors file or training workdir (none: base FLUX)")
  p.add_argument("--step", type=int, default=None, help="with a training workdir: this step (default: latest)")
  p.add_argument("--no_ema", action="store_true",
                 help="with a training workdir: the trained weights rather than their EMA")
  p.add_argument("--output", default="samples", help="folder that receives one new run folder per run")
  p.add_argument("--size", type=parse_size, default=None,
                 help="target size, N or WIDTHxHEIGHT, multiples of 16 (default 512; a workdir's resolution)")
  p.add_argument("--ref_size", type=int, default=None, help="reference size (default 512; a workdir's)")
  p.add_argument("--steps", type=int, default=None,
                 help=f"denoising steps (default {sampling.DEFAULT_STEPS}; a workdir's sample_steps)")
  p.add_argument("--guidance", type=float, default=None,
                 help=f"guidance (default {sampling.DEFAULT_GUIDANCE}; 1.0 for a workdir that trained its base)")
  p.add_argument("--seeds", type=int, nargs="+", default=[0])
  p.add_argument("--batch_size", type=int, default=1, help="seeds sampled together (sharded over devices)")
  p.add_argument("--max_refs", type=int, default=sampling.DEFAULT_MAX_REFS)
  p.add_argument("--independent_refs", action="store_true",
                 help="the LoRA was trained with independent_refs (references attend only to themselves); "
                      "LoRA files this project exported say so themselves")
  p.add_argument("--ref_cache", choices=("auto", "on", "off"), default="auto",
                 help="reference KV cache; auto: on exactly when --independent_refs (else approximate)")
  p.add_argument("--save_attention", action="store_true",
                 help="also write each reference's attention over the result as heatmaps "
                      "(<index>_seed<seed>_attention.png/.npy); samples without the reference KV cache")
  p.add_argument("--attention", choices=("xla", "cudnn", "splash"), default=None,
                 help="attention kernel: cudnn on NVIDIA GPUs (bf16), splash on TPUs (default xla; a training "
                      "workdir's own)")
  p.add_argument("--dtype", default="bfloat16", help="transformer and text-encoder dtype")
  p.add_argument("--t5_max_length", type=int, default=512)
  p.add_argument("--mesh", type=parse_mesh, default={"data": -1, "fsdp": 1, "tensor": 1},
                 help="DATA,FSDP,TENSOR device mesh for the transformer (default -1,1,1; 1,-1,1 splits it)")
  p.add_argument("--distributed", action="store_true", help="join a multi-process job even if none is detected")
  p.add_argument("--no_progress", action="store_true")
  return p


def main(argv: list[str] | None = None) -> list[str]:
  args = build_parser().parse_args(argv)
  distributed.initialize(force=args.distributed)  # before anything touches the devices
  if args.cases:
    if args.ref:
      raise sampling.SampleInputError("--ref goes with --prompt; a cases file lists its own image_paths.")
    cases = sampling.read_cases(args.cases)
  else:
    cases = [sampling.Case("0", args.prompt, tuple(args.ref))]
  run = trained.find_run(args.checkpoint)
  if run is not None and args.lora:
    raise sampling.SampleInputError(f"--lora {args.lora}: {args.checkpoint} is a training workdir, which brings "
                                    "its own LoRA (--step picks the step, --no_ema the non-EMA weights).")
  settings = None if run is None else trained.read_settings(run[0])  # in effect after the workdir's resumes
  options = sample_options(args, settings)
  # Pixels per token: FLUX's 16, or the training run's autoencoder's (the sampler checks again once loaded).
  sampling.validate_request(cases, options, 16 if settings is None else settings.token_pixels)  # before any weight
  if run is None:
    sampler = sampling.load_sampler(args.checkpoint, args.lora or None, options, dtype=args.dtype,
                                    independent_refs=args.independent_refs, t5_max_length=args.t5_max_length,
                                    text_dtype=args.dtype, attention_impl=args.attention or "xla", mesh_shape=args.mesh)
  else:
    sampler = sampling.load_trained_sampler(args.checkpoint, options, step=args.step, ema=not args.no_ema,
                                            attention_impl=args.attention, mesh_shape=args.mesh)
  with distributed.exit_on_failure():
    written = sample_driver.write_run(sampler, cases, args.output, progress=not args.no_progress)
  where = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
  print(f"{where}wrote {len(written)} files" + (f" to {os.path.dirname(written[0])}" if written else ""))
  return written


def sample_options(args, settings) -> sampling.SampleOptions:
  """The flags' options; what they leave out comes from the training run's settings (its size, sample
  steps and guidance) or, for a FLUX root, the official sampling defaults."""
  if settings is None:
    size, ref_size = (sampling.DEFAULT_SIZE,) * 2, sampling.DEFAULT_SIZE
    steps, guidance = sampling.DEFAULT_STEPS, sampling.DEFAULT_GUIDANCE
  else:
    size, ref_size = (settings.resolution,) * 2, settings.ref_resolution
    steps, guidance = settings.sample_steps, trained.sampling_guidance(settings)
  return sampling.SampleOptions(
      height=(args.size or size)[0], width=(args.size or size)[1], ref_size=args.ref_size or ref_size,
      steps=args.steps or steps, guidance=guidance if args.guidance is None else args.guidance,
      seeds=tuple(args.seeds), batch_size=args.batch_size, max_refs=args.max_refs,
      ref_cache={"auto": None, "on": True, "off": False}[args.ref_cache], save_attention=args.save_attention)

if __name__ == "__main__":
  cli.run(main)
