"""Generating the protocol's images with the sampler: the one place evaluation calls mosaic_jax.sample.

The protocol settings (size, steps, guidance, seeds, images per prompt, reference size) are returned
for results.json. Images are written as `<out_dir>/<case>_<seed>.png`, the names evaluation reads.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from PIL import Image

from mosaic_jax.evaluation.dreambench import EvalCase


def generate_images(cases: Sequence[EvalCase], out_dir: str, checkpoint: str, lora: str | None, *,
                    size: int = 512, ref_size: int = 512, steps: int = 28, guidance: float = 3.5,
                    seeds: Sequence[int] = (0,), batch_size: int = 1, independent_refs: bool = False) -> dict:
  from mosaic_jax import sample
  options = sample.SampleOptions(height=size, width=size, ref_size=ref_size, steps=steps, guidance=guidance,
                                 seeds=tuple(seeds), batch_size=batch_size,
                                 max_refs=max(sample.DEFAULT_MAX_REFS, *(len(c.reference_paths) for c in cases)))
  sampler = sample.load_sampler(checkpoint, lora, options, independent_refs=independent_refs)
  sample_cases = [sample.Case(c.id, c.prompt, c.reference_paths) for c in cases]
  sampler.check(sample_cases)
  os.makedirs(out_dir, exist_ok=True)
  for case in sample_cases:
    for seed, image in zip(seeds, sampler.generate(case, seeds)):
      Image.fromarray(image).save(os.path.join(out_dir, f"{case.index}_{seed}.png"))
  return {"generated_by": "mosaic_jax.sample", "checkpoint": os.path.abspath(checkpoint),
          "lora": lora and os.path.abspath(lora), "size": size, "ref_size": ref_size, "steps": steps,
          "guidance": guidance, "seeds": list(seeds), "images_per_prompt": len(seeds),
          "independent_refs": independent_refs, "sample_options": dataclasses.asdict(options)}
