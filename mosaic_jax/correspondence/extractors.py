"""Our two feature extractors as Matchers (matchers.py), from weights in memory or on disk.

- `ditf`: DiTF features of our FLUX transformer (flux_features.py) fill the `dift` slot, where the released
  data has Stable Diffusion 2.1 DIFT features. Images go in at [-1, 1] (as DIFT's extractor gives them),
  through the FLUX VAE's posterior mean; the empty prompt is encoded once, when the matcher is made; the
  noise of the averaged copies comes from a fixed key, so an image's grid does not depend on its batch.
- `dinov2`: DINOv2 patch features (dinov2.py, block 11 of B/14, hub position rule) fill the `geoaware`
  slot, where the released data has GeoAware-SC's features (SD-1.5 + DINOv2 through a supervised head,
  which is not reproduced here). Images go through dinov2.preprocess on the host (1024 -> 896 LANCZOS,
  ImageNet statistics).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mosaic_jax.correspondence import dinov2, flux_features, matchers
from mosaic_jax.model.autoencoder import Autoencoder

DITF_SEED = 0


def ditf_matcher(params: Any, flux_cfg, autoencoder, text: np.ndarray, pooled: np.ndarray, cfg=None,
                 similarity: str = "", seed: int = DITF_SEED) -> matchers.Matcher:
  """The FLUX DiTF matcher of a loaded transformer, its autoencoder and the encoded empty prompt."""
  cfg = cfg if cfg is not None else flux_features.DitfConfig()
  cfg.check(flux_cfg)

  def features(parts, images):
    return flux_features.image_features_from_images(parts["autoencoder"], parts["transformer"], flux_cfg, images,
                                                    parts["text"], parts["pooled"], jax.random.key(seed), cfg)
  if autoencoder.kind == "vae":  # the matcher only encodes: the decoder's weights need no device memory
    autoencoder = Autoencoder(autoencoder.kind, autoencoder.config, {"encoder": autoencoder.params["encoder"]})
  parts = {"transformer": params, "autoencoder": autoencoder, "text": text, "pooled": pooled}
  return matchers.Matcher("ditf", "dift", parts, features, matchers.unit_range, similarity)


def ditf_matcher_from_root(root: str, cfg=None, dtype=jnp.bfloat16, similarity: str = "",
                           attention_impl: str = "") -> matchers.Matcher:
  """The DiTF matcher of a FLUX checkpoint root (transformer/, vae/, text_encoder*/, tokenizer*/);
  `attention_impl` replaces the model's (xla, splash on TPUs, cudnn on GPUs: model/config.py)."""
  from mosaic_jax import encoders, interop  # pylint: disable=import-outside-toplevel
  root = os.path.expanduser(root)
  flux_cfg, params = interop.load_flux_transformer(os.path.join(root, "transformer"), dtype=dtype)
  if attention_impl:
    flux_cfg = dataclasses.replace(flux_cfg, attention_impl=attention_impl)
  flux_encoders = encoders.load_flux_encoders(root, t5_dtype=dtype, clip_dtype=dtype)
  text, pooled = flux_encoders.encode_captions([""], batch_size=1)
  return ditf_matcher(params, flux_cfg, flux_encoders.autoencoder, text, pooled, cfg, similarity)


def dinov2_host_inputs(images: np.ndarray) -> np.ndarray:
  return np.stack([dinov2.preprocess(Image.fromarray(np.asarray(image))) for image in images])


def dinov2_matcher(model: dinov2.Dinov2Model, layer: int | None = None, positions: str = "hub",
                   similarity: str = "") -> matchers.Matcher:
  """The DINOv2 matcher of a loaded `dinov2.Dinov2Model` (its params are what the mesh places). Its attention
  stays the model's: 4097 tokens at 896 px are no multiple of 128 for splash, and cudnn wants bf16."""
  layer = dinov2.GEOAWARE_LAYER if layer is None else layer

  def features(loaded, pixels):
    return dinov2.patch_features(loaded, pixels, layer=layer, positions=positions)
  return matchers.Matcher("dinov2", "geoaware", model, features, dinov2_host_inputs, similarity)


def dinov2_matcher_from_folder(folder: str, dtype=jnp.float32, layer: int | None = None, positions: str = "hub",
                               similarity: str = "") -> matchers.Matcher:
  """The DINOv2 matcher of a transformers `Dinov2Model` folder (config.json + model.safetensors)."""
  return dinov2_matcher(dinov2.load_dinov2(os.path.expanduser(folder), dtype=dtype), layer, positions, similarity)
