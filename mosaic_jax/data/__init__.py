"""SemAlign-MS data: TFDS builder, synthetic multi-subject generator, streaming input pipeline.

  semalign_ms.py      TFDS builder `semalign_ms` (configs subjects200k, subjects200k_multi, synthetic, folder)
  schema.py           the stored example
  released_layout.py  reader for the released Subjects200K layout
  composition.py      released pairs composed into multi-subject examples (subjects200k_multi)
  synthetic.py        procedural scenes with exact correspondences
  folder.py           reader for users' JSON-lines manifests
  build_report.py     skipped / patched examples by reason
  correspondence.py   the official token-pair rule, bit-exact, and fixed-shape packing
  image_ops.py        decoding, resizing, reference padding
  pipeline.py         deterministic, resumable, bucketed grain iterator
  cached_features.py  a split with the encoders' outputs precomputed (launch/encode_dataset.py)
  global_batch.py     host batches -> global jax arrays with a given sharding
"""

from mosaic_jax.data.global_batch import to_global_arrays
from mosaic_jax.data.pipeline import (BatchPlan, DatasetError, InputIterator, PipelineConfig, make_iterator,
                                      open_split)

__all__ = ["BatchPlan", "DatasetError", "InputIterator", "PipelineConfig", "make_iterator", "open_split",
           "to_global_arrays"]
