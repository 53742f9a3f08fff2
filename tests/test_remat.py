"""Chunked rematerialisation: same gradients as the plain scan, far less memory at long T."""
import chex
import jax
import jax.numpy as jnp
import pytest

import gru_jax


def _loss(chunk, backend="auto"):
  return lambda p, xs: jnp.mean(gru_jax.gru(p, xs, remat_chunk=chunk, backend=backend)[1] ** 2)


def test_remat_gradients_equal_plain_scan_with_padding_chunk():
  p = gru_jax.cell.init(jax.random.key(0), 3, 5)
  xs = jax.random.normal(jax.random.key(1), (2, 23, 3))   # 23 = 4 chunks of 6, padded
  g_ref = jax.grad(_loss(None, "scan"), argnums=(0, 1))(p, xs)
  g = jax.grad(_loss(6), argnums=(0, 1))(p, xs)
  chex.assert_trees_all_close(g, g_ref, atol=1e-6)


@pytest.mark.parametrize("t", [2000])
def test_remat_compiled_peak_memory_is_much_smaller(t):
  """XLA's own memory analysis of the compiled step (no timing involved)."""
  p = gru_jax.cell.init(jax.random.key(0), 16, 64)
  xs = jax.ShapeDtypeStruct((8, t, 16), jnp.float32)

  def temp_bytes(chunk):
    step = jax.jit(jax.grad(_loss(chunk), argnums=(0, 1)))
    return step.lower(p, xs).compile().memory_analysis().temp_size_in_bytes

  plain, remat = temp_bytes(None), temp_bytes(50)
  # Without remat the residuals grow with T (gates, projections: >= 4 x [T,B,H] floats).
  assert plain >= 4 * t * 8 * 64 * 4
  assert remat < plain / 3, (plain, remat)
