"""gru_jax: gated recurrent units for JAX.

Pure functions (`cell`, `scan`, `attention`) at the bottom, Flax Linen layers on top.
"""
from gru_jax import attention, cell, convert, layernorm, scan
from gru_jax.cell import Gates, GRUParams
from gru_jax.scan import gru

__version__ = "0.1.0"
__all__ = ["attention", "cell", "convert", "layernorm", "scan", "gru", "GRUParams", "Gates",
           "__version__"]
