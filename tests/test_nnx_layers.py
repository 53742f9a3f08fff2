"""Flax NNX layers against the float64 NumPy reference, finite differences and Flax's own layers."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gru_jax
from gru_jax import layers
from gru_jax import nnx_layers as G
from gru_jax.cell import GRUParams
from tests import reference


def _xs(key, b=3, t=6, d=4):
  return jax.random.normal(jax.random.key(key), (b, t, d))


def _mask(lengths, t):
  return jnp.arange(t)[None] < jnp.array(lengths)[:, None]


@pytest.mark.parametrize("variant", ["seed", "reset_after"])
def test_gru_matches_reference(variant):
  xs = _xs(0)
  mask = _mask([6, 3, 1], 6)
  h0 = jax.random.normal(jax.random.key(5), (3, 5))
  layer = G.GRU(4, 5, variant=variant, return_state=True,
                bias_init=nn.initializers.normal(0.5), rngs=nnx.Rngs(1))
  assert {n: getattr(layer, n)[...].shape for n in GRUParams._fields} == {
      "w_x": (4, 15), "w_h": (5, 15), "b_x": (15,), "b_h": (15,)}
  hs, h_last = layer(xs, mask, h0)
  ref_last, ref_hs = reference.run(layer.params, xs, h0=np.asarray(h0), mask=np.asarray(mask),
                                   variant=variant)
  np.testing.assert_allclose(hs, ref_hs, atol=1e-5)
  np.testing.assert_allclose(h_last, ref_last, atol=1e-5)
  last = G.GRU.from_params(layer.params, variant=variant, return_sequences=False)(xs, mask, h0)
  np.testing.assert_allclose(last, ref_last, atol=1e-5)


def test_recorded_gates_match_the_reference():
  """record_gates sows each step's z, r and candidate; they equal the float64 reference at
  every valid step, forwards and backwards, and the outputs are unchanged."""
  xs = _xs(2)
  mask = _mask([6, 4, 1], 6)
  model = G.StackedGRU(4, (5,), bidirectional=True, rngs=nnx.Rngs(3))
  plain = model(xs, mask)
  model.set_attributes(record_gates=True)
  np.testing.assert_allclose(model(xs, mask), plain, atol=1e-6)
  recorded = nnx.pop(model, nnx.Intermediate)
  bi = model.layer_0
  for name, layer, rev in (("forward", bi.forward, False), ("backward", bi.backward, True)):
    (gates,) = recorded["layer_0"][name]["gates"].value
    for b, n in enumerate((6, 4, 1)):
      h = np.zeros(5)
      for t in (reversed(range(n)) if rev else range(n)):
        h, z, r, cand = reference.step(layer.params, h, np.asarray(xs[b, t], np.float64))
        for got, want in zip(gates, (z, r, cand)):
          np.testing.assert_allclose(got[b, t], want, atol=1e-5)
  assert not nnx.state(model, nnx.Intermediate)  # popped: nothing left behind


@pytest.mark.parametrize("layer_norm", [False, True])
def test_gru_equals_linen_gru_with_the_same_variables(layer_norm):
  xs = _xs(1)
  mask = _mask([6, 4, 2], 6)
  kw = dict(variant="reset_after", layer_norm=layer_norm, reverse=True)
  lin = layers.GRU(5, bias_init=nn.initializers.normal(0.3), **kw)
  v = lin.init(jax.random.key(2), xs, mask)
  ours = G.GRU(4, 5, rngs=nnx.Rngs(0), **kw)
  for name, value in v["params"].items():  # same names: a Linen checkpoint loads by assignment
    getattr(ours, name)[...] = value
  np.testing.assert_allclose(ours(xs, mask), lin.apply(v, xs, mask), atol=1e-6)


def test_input_dropout_is_one_mask_per_example_and_switches_with_eval():
  xs = _xs(2, b=4)
  ids = jnp.array([10, 11, 12, 13])
  layer = G.GRU(4, 5, dropout=0.5, rngs=nnx.Rngs(params=0, dropout=1))
  # The key the layer draws from rngs=nnx.Rngs(dropout=7), drawn here from an identical stream.
  key = nnx.Rngs(dropout=7)["dropout"]()
  keep = layers.dropout_multiplier(key, 0.5, 4, (4,), ids)
  assert set(np.unique(np.asarray(keep))) == {0.0, 2.0}
  out = layer(xs, example_ids=ids, rngs=nnx.Rngs(dropout=7))
  # Variational: the reference run on inputs scaled by one [B,D] mask for every step.
  ref = reference.run(layer.params, np.asarray(xs) * np.asarray(keep)[:, None, :])[1]
  np.testing.assert_allclose(out, ref, atol=1e-5)
  # Each example's mask depends on its id only, not on the rest of the batch.
  half = layer(xs[2:], example_ids=ids[2:], rngs=nnx.Rngs(dropout=7))
  np.testing.assert_allclose(out[2:], half, atol=1e-6)
  # The layer's own stream advances: two training calls differ; eval turns dropout off.
  assert float(jnp.abs(layer(xs) - layer(xs)).max()) > 1e-3
  layer.eval()
  np.testing.assert_allclose(layer(xs), reference.run(layer.params, xs)[1], atol=1e-5)
  layer.train()
  assert not layer.deterministic


def test_recurrent_dropout_is_an_inverted_dropout_mask_fixed_over_time():
  xs = _xs(3, b=64, t=4, d=3)
  layer = G.GRU(3, 6, recurrent_dropout=0.3, rngs=nnx.Rngs(0))
  train, det = layer(xs), layer(xs, deterministic=True)
  assert float(jnp.abs(train - det).max()) > 1e-3
  np.testing.assert_allclose(det, reference.run(layer.params, xs)[1], atol=1e-5)
  # The mask is dropout_multiplier's (0 or 1/(1-rate), mean 1: tested in test_layers) for the
  # first key of the call's stream, passed to the scan as one [B,H] mask for every step.
  key = nnx.Rngs(dropout=4)["dropout"]()
  mask = layers.dropout_multiplier(key, 0.3, 64, (6,))
  got = layer(xs, rngs=nnx.Rngs(dropout=4))
  np.testing.assert_allclose(got, gru_jax.gru(layer.params, xs, recurrent_dropout_mask=mask)[1],
                             atol=1e-6)


def test_gradients_match_finite_differences_of_the_float64_reference():
  xs = _xs(4, b=2, t=5, d=3)
  mask = _mask([5, 3], 5)
  layer = G.GRU(3, 4, bias_init=nn.initializers.normal(0.3), rngs=nnx.Rngs(3))
  cot = np.random.RandomState(0).randn(2, 5, 4)

  def loss(model):
    return jnp.sum(model(xs, mask) * cot)

  grads = nnx.grad(loss)(layer)
  g = GRUParams(*(np.asarray(grads[n][...], np.float64) for n in GRUParams._fields))
  p64 = GRUParams(*(np.asarray(a, np.float64) for a in layer.params))
  rs = np.random.RandomState(1)
  for _ in range(3):
    direction = GRUParams(*(rs.randn(*a.shape) for a in p64))
    eps = 1e-6
    shifted = [GRUParams(*(a + s * eps * d for a, d in zip(p64, direction))) for s in (1, -1)]
    num = [np.sum(reference.run(p, xs, mask=np.asarray(mask))[1] * cot) for p in shifted]
    fd = (num[0] - num[1]) / (2 * eps)
    analytic = sum(np.sum(a * d) for a, d in zip(g, direction))
    np.testing.assert_allclose(analytic, fd, rtol=2e-4, atol=1e-4)


def test_bidirectional_lines_up_with_padding():
  xs = _xs(4)
  mask = _mask([6, 4, 2], 6)
  bi = G.Bidirectional(4, 3, rngs=nnx.Rngs(0))
  out = bi(xs, mask)
  assert out.shape == (3, 6, 6)
  for i, n in enumerate([6, 4, 2]):
    ref_f = reference.run(bi.forward.params, xs[i:i + 1, :n])[1][0]
    ref_b = reference.run(bi.backward.params, xs[i:i + 1, :n][:, ::-1])[1][0][::-1]
    np.testing.assert_allclose(out[i, :n, :3], ref_f, atol=1e-5)
    np.testing.assert_allclose(out[i, :n, 3:], ref_b, atol=1e-5)
    np.testing.assert_array_equal(out[i, n:], 0)
  summed = G.Bidirectional(4, 3, merge_mode="sum", return_sequences=False, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(
      summed(xs, mask),
      reference.run(summed.forward.params, xs, mask=np.asarray(mask))[0]
      + reference.run(summed.backward.params, xs, mask=np.asarray(mask), reverse=True)[0],
      atol=1e-5)


def test_stacked_gru_chains_layers_and_drops_between_them():
  xs = _xs(5)
  st = G.StackedGRU(4, (5, 3), dropout_between=0.5, rngs=nnx.Rngs(0))
  st.eval()
  h1 = reference.run(st.layer_0.params, xs)[1]
  np.testing.assert_allclose(st(xs), reference.run(st.layer_1.params, h1)[1], atol=1e-5)
  st.train()
  # Dropout only between the layers: layer_1 reads h1 times the call's first mask [B,T,H].
  key = nnx.Rngs(dropout=6)["dropout"]()
  m = np.asarray(layers.dropout_multiplier(key, 0.5, 3, (6, 5)))
  np.testing.assert_allclose(st(xs, rngs=nnx.Rngs(dropout=6)),
                             reference.run(st.layer_1.params, h1 * m)[1], atol=1e-5)
  # Built deterministic, no dropout anywhere, the between-layer one included.
  quiet = G.StackedGRU(4, (5, 3), dropout_between=0.5, deterministic=True, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(quiet(xs), quiet(xs))
  bi = G.StackedGRU(4, (5, 3), bidirectional=True, rngs=nnx.Rngs(0))
  assert bi(xs).shape == (3, 6, 6) and bi.layer_1.forward.w_x[...].shape == (10, 9)


def test_sequence_batchnorm_ignores_padding_and_keeps_running_averages():
  x = np.random.RandomState(0).randn(4, 5, 3).astype(np.float32) * 3 + 1
  mask = np.arange(5)[None] < np.array([5, 2, 3, 1])[:, None]
  bn = G.SequenceBatchNorm(3, momentum=0.9, epsilon=1e-3)
  y = bn(x, mask)
  valid = x[mask].astype(np.float64)
  mean, var = valid.mean(0), valid.var(0)
  np.testing.assert_allclose(np.asarray(y)[mask], (valid - mean) / np.sqrt(var + 1e-3), atol=1e-4)
  np.testing.assert_array_equal(np.asarray(y)[~mask], 0)
  np.testing.assert_allclose(bn.mean[...], 0.1 * mean, atol=1e-5)
  np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * var, atol=1e-4)
  bn.eval()
  y_eval = bn(x, mask)
  np.testing.assert_allclose(np.asarray(y_eval)[mask],
                             (valid - 0.1 * mean) / np.sqrt(0.9 + 0.1 * var + 1e-3), atol=1e-4)
  np.testing.assert_allclose(bn.mean[...], 0.1 * mean, atol=1e-5)  # eval leaves them alone


def test_sequence_batchnorm_matches_flax_nnx_batchnorm_with_a_mask():
  x = np.random.RandomState(1).randn(4, 6, 5).astype(np.float32)
  mask = np.arange(6)[None] < np.array([6, 1, 4, 3])[:, None]
  ours = G.SequenceBatchNorm(5, momentum=0.8, epsilon=1e-5)
  theirs = nnx.BatchNorm(5, momentum=0.8, epsilon=1e-5, rngs=nnx.Rngs(0))
  full = np.broadcast_to(mask[..., None], x.shape)
  np.testing.assert_allclose(np.asarray(ours(x, mask))[mask],
                             np.asarray(theirs(x, mask=full))[mask], atol=1e-5)
  np.testing.assert_allclose(ours.mean[...], theirs.mean[...], atol=1e-6)
  np.testing.assert_allclose(ours.var[...], theirs.var[...], atol=1e-6)


def test_a_jitted_nnx_training_step_updates_params_and_batch_stats():
  import optax  # pylint: disable=import-outside-toplevel

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.gru = G.GRU(3, 8, dropout=0.1, rngs=rngs)
      self.bn = G.SequenceBatchNorm(8)
      self.head = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
      return self.head(self.bn(self.gru(x))[:, -1])[:, 0]

  model = Model(nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  x = _xs(6, b=16, t=5, d=3)
  y = jnp.sum(x[:, :, 0], 1)  # a known target the GRU can learn: the sum of one input

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    opt.update(model, grads)
    return loss

  w0 = np.asarray(model.gru.w_x[...])
  losses = [float(step(model, opt)) for _ in range(60)]
  assert losses[-1] < 0.3 * losses[0]
  assert not np.allclose(w0, model.gru.w_x[...])
  assert float(jnp.abs(model.bn.mean[...]).max()) > 0


def test_bad_inputs_name_the_argument_and_shapes():
  layer = G.GRU(3, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"GRU expects inputs \[B,T,D\], got shape \(3, 4\)"):
    layer(jnp.ones((3, 4)))
  with pytest.raises(ValueError, match=r"mask must have shape \[B,T\]=\(2, 4\)"):
    layer(jnp.ones((2, 4, 3)), jnp.ones((4, 2), bool))
  with pytest.raises(ValueError, match=r"\(2, 4, 5\)"):
    layer(jnp.ones((2, 4, 5)))
  with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
    G.GRU(3, 4, dropout=1.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"params\.\w+ has shape"):
    G.GRU.from_params(GRUParams(jnp.ones((3, 12)), jnp.ones((5, 12)), jnp.ones(12),
                                jnp.ones(12)))
  with pytest.raises(ValueError, match="built for 4"):
    G.SequenceBatchNorm(4)(jnp.ones((2, 3, 5)))
  with pytest.raises(ValueError, match="merge_mode"):
    G.Bidirectional(3, 4, merge_mode="avg", rngs=nnx.Rngs(0))


def test_wrappers_refuse_gru_options_they_set_themselves():
  # return_sequences=False made StackedGRU feed final states on as sequences.  (return_state
  # is the wrappers' own argument: tests/test_stacked_state.py.)
  with pytest.raises(ValueError, match=r"remove \['reverse'\]"):
    G.Bidirectional(3, 4, rngs=nnx.Rngs(0), reverse=True)
  with pytest.raises(ValueError, match=r"remove \['return_sequences'\]"):
    G.StackedGRU(3, (4, 4), rngs=nnx.Rngs(0), return_sequences=False)
  with pytest.raises(ValueError, match=r"remove \['reverse'\]"):
    G.StackedGRU(3, (4, 4), bidirectional=True, rngs=nnx.Rngs(0), reverse=True)


def test_from_params_takes_linen_variables_and_needs_rngs_for_dropout():
  xs = _xs(8)
  for layer_norm in (False, True):
    lin = layers.GRU(5, layer_norm=layer_norm, bias_init=nn.initializers.normal(0.3))
    v = lin.init(jax.random.key(3), xs)
    ours = G.GRU.from_params(v["params"])
    assert ours.layer_norm == layer_norm
    np.testing.assert_allclose(ours(xs), lin.apply(v, xs), atol=1e-6)
  with pytest.raises(ValueError, match="needs rngs"):
    G.GRU.from_params(ours.params, dropout=0.2)
  with pytest.raises(ValueError, match=r"unknown \['kernel'\], missing \['w_x'\]"):
    G.GRU.from_params({"kernel": 1, "w_h": 1, "b_x": 1, "b_h": 1})
  # With rngs, layers built from the same params draw different masks.
  a = G.GRU.from_params(ours.params, dropout=0.5, rngs=nnx.Rngs(dropout=1))
  b = G.GRU.from_params(ours.params, dropout=0.5, rngs=nnx.Rngs(dropout=2))
  assert float(jnp.abs(a(xs) - b(xs)).max()) > 1e-3


@pytest.mark.parametrize("api", ["nnx", "linen"])
def test_stacked_bidirectional_sum_feeds_h_features_to_the_next_layer(api):
  xs = _xs(9)
  if api == "nnx":
    st = G.StackedGRU(4, (5, 3), bidirectional=True, merge_mode="sum", rngs=nnx.Rngs(0))
    out = st(xs)
    p = {f"layer_{i}": {d: getattr(getattr(st, f"layer_{i}"), d).params
                        for d in ("forward", "backward")} for i in range(2)}
  else:
    st = layers.StackedGRU((5, 3), bidirectional=True, merge_mode="sum")
    v = st.init(jax.random.key(0), xs)
    out = st.apply(v, xs)
    p = {k: {d: GRUParams(**v["params"][k][d]) for d in ("forward", "backward")}
         for k in ("layer_0", "layer_1")}
  h = np.asarray(xs, np.float64)
  for i in range(2):
    q = p[f"layer_{i}"]
    h = reference.run(q["forward"], h)[1] + reference.run(q["backward"], h, reverse=True)[1]
  assert out.shape == (3, 6, 3)
  np.testing.assert_allclose(out, h, atol=1e-5)
