"""GRUCell (Linen and NNX) against the float64 reference, Flax's own nn.RNN / nn.GRUCell,
and gru_jax's GRU layers."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gru_jax import convert, layers, nnx_layers
from gru_jax.cell import GRUParams
from tests import reference

B, T, D, H = 3, 7, 4, 5
LENGTHS = np.array([7, 4, 1])


def _xs(key=0, shape=(B, T, D)):
  return jax.random.normal(jax.random.key(key), shape)


def _ref_steps(params, h, x, variant):
  """reference.step over every leading index of h [...,H], x [...,D]."""
  flat_h = np.asarray(h, np.float64).reshape(-1, h.shape[-1])
  flat_x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  out = [reference.step(params, hi, xi, variant)[0] for hi, xi in zip(flat_h, flat_x)]
  return np.stack(out).reshape(h.shape)


@pytest.mark.parametrize("variant", ["seed", "reset_after"])
def test_linen_cell_step_matches_reference_over_any_batch_dims(variant):
  cell = layers.GRUCell(H, variant=variant, bias_init=nn.initializers.normal(0.5))
  x = _xs(1, (2, 3, D))
  h = cell.initialize_carry(jax.random.key(0), x.shape)
  assert h.shape == (2, 3, H) and not h.any()
  h = _xs(2, (2, 3, H))
  v = cell.init(jax.random.key(3), h, x)
  assert set(v["params"]) == {"w_x", "w_h", "b_x", "b_h"}
  new, out = cell.apply(v, h, x)
  np.testing.assert_array_equal(new, out)
  np.testing.assert_allclose(new, _ref_steps(GRUParams(**v["params"]), h, x, variant),
                             atol=1e-5)


@pytest.mark.parametrize("variant", ["seed", "reset_after"])
def test_linen_rnn_of_cell_equals_gru_layer_with_its_variables(variant):
  xs = _xs()
  mask = jnp.arange(T)[None] < LENGTHS[:, None]
  layer = layers.GRU(H, variant=variant, return_state=True,
                     bias_init=nn.initializers.normal(0.5))
  v = layer.init(jax.random.key(1), xs, mask)
  rnn = nn.RNN(layers.GRUCell(H, variant=variant), return_carry=True)
  rv = {"params": {"cell": v["params"]}}
  assert (jax.tree.structure(rnn.init(jax.random.key(2), xs, seq_lengths=LENGTHS))
          == jax.tree.structure(rv))
  h_last, hs = rnn.apply(rv, xs, seq_lengths=LENGTHS)
  ref_hs, ref_last = layer.apply(v, xs, mask)
  np.testing.assert_allclose(h_last, ref_last, atol=1e-5)
  np.testing.assert_allclose(np.where(mask[..., None], hs, 0), ref_hs, atol=1e-5)

  def loss(p, fn):
    return jnp.sum(jnp.where(mask[..., None], fn(p), 0) ** 2)
  g_cell = jax.grad(loss)(rv["params"]["cell"], lambda p: rnn.apply(
      {"params": {"cell": p}}, xs, seq_lengths=LENGTHS)[1])
  g_layer = jax.grad(loss)(v["params"], lambda p: layer.apply({"params": p}, xs, mask)[0])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               g_cell, g_layer)


def test_linen_bidirectional_of_cells_equals_bidirectional_layer():
  xs = _xs(3)
  mask = jnp.arange(T)[None] < LENGTHS[:, None]
  bi = layers.Bidirectional(H)
  v = bi.init(jax.random.key(4), xs, mask)
  flax_bi = nn.Bidirectional(nn.RNN(layers.GRUCell(H)), nn.RNN(layers.GRUCell(H)))
  fv = {"params": {"forward_rnn": {"cell": v["params"]["forward"]},
                   "backward_rnn": {"cell": v["params"]["backward"]}}}
  # The layer's variables have exactly the shapes nn.Bidirectional's own init makes.
  assert (jax.tree.map(jnp.shape, flax_bi.init(jax.random.key(5), xs, seq_lengths=LENGTHS))
          == jax.tree.map(jnp.shape, fv))
  out = flax_bi.apply(fv, xs, seq_lengths=LENGTHS)
  np.testing.assert_allclose(np.where(mask[..., None], out, 0), bi.apply(v, xs, mask),
                             atol=1e-5)


def test_reset_after_cell_equals_flax_gru_cell_with_converted_weights():
  x, h = _xs(6, (B, D)), _xs(7, (B, H))
  flax_cell = nn.GRUCell(H, bias_init=nn.initializers.normal(0.5))
  fv = flax_cell.init(jax.random.key(8), h, x)
  params = convert.from_flax_linen(fv, flax_cell)
  ours, _ = layers.GRUCell(H, variant="reset_after").apply({"params": params._asdict()}, h, x)
  np.testing.assert_allclose(ours, flax_cell.apply(fv, h, x)[0], atol=1e-5)


def test_cell_keeps_a_bf16_carry_under_nn_rnn():
  xs = _xs().astype(jnp.bfloat16)
  rnn = nn.RNN(layers.GRUCell(H))
  carry = jnp.zeros((B, H), jnp.bfloat16)
  v = rnn.init(jax.random.key(0), xs, initial_carry=carry)
  hs = rnn.apply(v, xs, initial_carry=carry)
  assert hs.dtype == jnp.bfloat16
  ref = reference.run(GRUParams(**v["params"]["cell"]), np.asarray(xs, np.float64))[1]
  np.testing.assert_allclose(np.asarray(hs, np.float64), ref, atol=0.05)


def test_cells_refuse_a_carry_that_does_not_match_the_inputs():
  x = _xs(0, (B, D))
  cell = layers.GRUCell(H)
  with pytest.raises(ValueError, match=r"GRUCell: carry must have shape \[...,H\]=\(3, 5\) "
                                       r"to match inputs \(3, 4\), got \(3, 6\)"):
    cell.init(jax.random.key(0), jnp.zeros((B, H + 1)), x)
  ncell = nnx_layers.GRUCell(D, H, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"carry must have shape \[...,H\]=\(2, 5\)"):
    ncell(jnp.zeros((B, H)), x[:2])
  with pytest.raises(ValueError, match="input_size=4"):
    ncell(jnp.zeros((B, H)), _xs(0, (B, D + 1)))


@pytest.mark.parametrize("variant", ["seed", "reset_after"])
def test_nnx_rnn_of_cell_equals_nnx_gru_layer(variant):
  xs = _xs(9)
  mask = jnp.arange(T)[None] < LENGTHS[:, None]
  layer = nnx_layers.GRU(D, H, variant=variant, return_state=True,
                         bias_init=nnx.initializers.normal(0.5), rngs=nnx.Rngs(1))
  cell = nnx_layers.GRUCell.from_params(layer.params, variant=variant)
  assert cell.in_features == D and cell.hidden_size == H
  x0 = xs[:, 0]
  h1, out = cell(cell.initialize_carry(x0.shape), x0)
  np.testing.assert_allclose(h1, _ref_steps(layer.params, np.zeros((B, H)), x0, variant),
                             atol=1e-5)
  rnn = nnx.RNN(cell, return_carry=True)
  h_last, hs = rnn(xs, seq_lengths=jnp.asarray(LENGTHS))
  ref_hs, ref_last = layer(xs, mask)
  np.testing.assert_allclose(h_last, ref_last, atol=1e-5)
  np.testing.assert_allclose(np.where(mask[..., None], hs, 0), ref_hs, atol=1e-5)


def test_nnx_cell_from_linen_variables_and_its_initialisers():
  xs = _xs(10)
  v = layers.GRU(H).init(jax.random.key(2), xs)
  cell = nnx_layers.GRUCell.from_params(v["params"])
  hs = nnx.RNN(cell)(xs)
  np.testing.assert_allclose(hs, reference.run(GRUParams(**v["params"]), xs)[1], atol=1e-5)
  fresh = nnx_layers.GRUCell(D, H, rngs=nnx.Rngs(3))
  assert fresh.params.w_h.shape == (H, 3 * H) and fresh.params.w_x.shape == (D, 3 * H)
  # The orthogonal recurrent initialiser, per gate block, as the GRU layer draws it.
  for k in range(3):
    blk = np.asarray(fresh.params.w_h[:, k * H:(k + 1) * H])
    np.testing.assert_allclose(blk.T @ blk, np.eye(H), atol=1e-5)
  c = fresh.initialize_carry((2, D), nnx.Rngs(4), carry_init=nnx.initializers.ones)
  np.testing.assert_array_equal(c, np.ones((2, H)))
  with pytest.raises(ValueError, match="missing"):
    nnx_layers.GRUCell.from_params({"w_x": v["params"]["w_x"]})
  ln = layers.GRU(H, layer_norm=True).init(jax.random.key(2), xs)["params"]
  with pytest.raises(ValueError, match=r"GRUCell has no layer norm, but params hold its "
                                       r"parameters \['beta_h', 'beta_x', 'gamma_h', 'gamma_x'\]"):
    nnx_layers.GRUCell.from_params(ln)
