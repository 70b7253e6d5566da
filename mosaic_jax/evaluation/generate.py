"""Generating the protocol's images with the sampler: the one place evaluation calls mosaic_jax.sampling.

The protocol settings (size, steps, guidance, seeds, images per prompt, reference size) are returned
for results.json. Images are written as `<out_dir>/<case>_<seed>.png`, the names evaluation reads.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from mosaic_jax import images
from mosaic_jax.evaluation.dreambench import EvalCase


def generate_images(cases: Sequence[EvalCase], out_dir: str, checkpoint: str, lora: str | None, *,
                    size: int = 512, ref_size: int = 512, steps: int = 28, guidance: float = 3.5,
                    seeds: Sequence[int] = (0,), batch_size: int = 1, independent_refs: bool = False) -> dict:
  """Samples every case and seed into out_dir. `checkpoint`: a FLUX root (with `lora`), or a training
  workdir or step folder (its own LoRA). Batched over the sampler's mesh; with several processes each
  writes its own share."""
  from mosaic_jax import sampling
  from mosaic_jax.workdir.trained import find_run
  options = sampling.SampleOptions(height=size, width=size, ref_size=ref_size, steps=steps, guidance=guidance,
                                   seeds=tuple(seeds), batch_size=batch_size,
                                   max_refs=max(sampling.DEFAULT_MAX_REFS, *(len(c.reference_paths) for c in cases)))
  if find_run(checkpoint) is not None:
    sampler = sampling.load_trained_sampler(checkpoint, options)
  else:
    sampler = sampling.load_sampler(checkpoint, lora, options, independent_refs=independent_refs)
  sample_cases = [sampling.Case(c.id, c.prompt, c.reference_paths) for c in cases]
  sampler.check(sample_cases)
  os.makedirs(out_dir, exist_ok=True)
  for (case, seed), image in sampler.sample_owned(sample_cases):
    images.write_png(os.path.join(out_dir, f"{case.index}_{seed}.png"), image)
  return {"generated_by": "mosaic_jax.sampling", "model": sampler.source, "size": size, "ref_size": ref_size,
          "steps": steps, "guidance": guidance, "seeds": list(seeds), "images_per_prompt": len(seeds),
          "independent_refs": sampler.cfg.independent_refs, "sample_options": dataclasses.asdict(options)}
