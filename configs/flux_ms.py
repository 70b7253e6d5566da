"""MOSAIC on FLUX: `get_config(arg)` variants, selected as `--config configs/flux_ms.py:ARG`.

Variants:
  default  FLUX.1-dev dimensions, 512 px target and references, bf16.
  demo     a tiny random FLUX that runs on a laptop CPU in seconds (needs no downloaded files).

Any field can be overridden on the command line, e.g. `--config.checkpoint=/ckpt/FLUX.1-dev`.
"""

import ml_collections


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # The transformer: a preset from mosaic_jax.model.config (random weights) unless `checkpoint` names
  # a diffusers transformer folder, a FLUX checkpoint root, or a BFL single .safetensors file.
  config.model = "flux1_dev"
  config.checkpoint = ""
  config.lora = ""  # a diffusers-format MOSAIC LoRA file
  config.dtype = "bfloat16"
  config.seed = 0

  # The packed sequence (DESIGN section 3): sizes in pixels; 16 px per latent token after 2x2 packing.
  config.batch_size = 1
  config.resolution = 512
  config.ref_resolution = 512
  config.num_refs = 2
  config.text_len = 512
  config.guidance = 3.5

  if arg == "demo":
    config.model = "tiny"
    config.dtype = "float32"
    config.resolution = 128
    config.ref_resolution = 64
    config.text_len = 16
  elif arg != "default":
    raise ValueError(f"configs/flux_ms.py: unknown variant {arg!r}; use 'default' or 'demo'.")
  return config
