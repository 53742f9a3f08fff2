"""Fused GRU recurrences with hand-written VJPs.

`recurrence` runs the time loop over hoisted input projections with either an
XLA loop (any device) or a Pallas kernel (`pallas_gru`: GPU, or interpret
mode on CPU).  `gru_jax.gru(..., backend=...)` chooses between them.
"""
from gru_jax.kernels.fused_rnn import recurrence

__all__ = ["recurrence"]
