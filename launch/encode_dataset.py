"""Precomputes the encoders' features of a SemAlign-MS dataset, so that training skips the VAE, T5 and CLIP.

  python launch/encode_dataset.py --config configs/flux_ms.py --out /data/flux_ms_features \\
      --config.checkpoint=/ckpt/FLUX.1-dev --config.dataset.data_dir=/data/tfds
  python launch/train.py --config configs/flux_ms.py --workdir DIR \\
      --config.checkpoint=/ckpt/FLUX.1-dev --config.dataset.cached_features=/data/flux_ms_features

Use the same config (and overrides) as for training: the dataset, sizes and encoders come from it, and
training refuses a cache written under different settings. What is stored: mosaic_jax/data/cached_features.py.
"""

from __future__ import annotations


from absl import flags
from ml_collections import config_flags

from mosaic_jax import cli
from mosaic_jax.settings import known_fields, settings_from_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/flux_ms.py[:variant]", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "new directory for the cached features (never overwritten)")
_SPLITS = flags.DEFINE_list("splits", None, "splits to encode (default: the config's train and eval splits)")
_BATCH = flags.DEFINE_integer("batch_size", 8, "images and captions per encoder call")
_DTYPE = flags.DEFINE_enum("latent_dtype", "float32", ["float32", "bfloat16"],
                           "storage of the image latents (float32: exactly the on-the-fly values)")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
  del argv
  from mosaic_jax.train.encode_features import encode_dataset  # pylint: disable=import-outside-toplevel
  spec = encode_dataset(settings_from_config(_CONFIG.value), _OUT.value, _SPLITS.value, _BATCH.value, _DTYPE.value)
  print(f"wrote {spec['splits']} examples and {len(spec['captions'])} distinct captions to {_OUT.value}; "
        f"train with --config.dataset.cached_features={_OUT.value}")


if __name__ == "__main__":
  cli.run_absl(main, known_fields)
