"""The training configs: `flux_ms.get_config(arg)` (the MOSAIC recipe and its variants).

Importable from the installed package (`from mosaic_jax.configs import flux_ms`); the command line
names them by file, `--config configs/flux_ms.py:demo`, a file that re-exports this module's.
"""
