"""Fused Pallas GRU kernels (work in progress: not yet implemented, never selected)."""


def supported(*, hidden_size, batch, compute_dtype, state_dtype, platform):
  """(applies, reason): the kernel is not implemented yet, so never."""
  del hidden_size, batch, compute_dtype, state_dtype, platform
  return False, "the Pallas kernel is not implemented yet"
