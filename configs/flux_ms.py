"""`--config configs/flux_ms.py[:variant]`: the variants of `mosaic_jax.configs.flux_ms` (see there).

ml_collections' config flags load a config by file path; the config itself lives in the installed
package, so the trainer and the tests import the same one.
"""

from mosaic_jax.configs.flux_ms import VARIANTS, get_config

__all__ = ["VARIANTS", "get_config"]
