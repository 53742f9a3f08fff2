"""Flax layers and the seed model against the pure functions and NumPy references."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gru_jax
from gru_jax import layers, models
from gru_jax.cell import GRUParams
from tests import reference


def _xs(key, b=3, t=6, d=4):
  return jax.random.normal(jax.random.key(key), (b, t, d))


@pytest.mark.parametrize("variant", ["seed", "reset_after"])
def test_gru_layer_equals_pure_function_and_reference(variant):
  xs = _xs(0)
  mask = jnp.arange(6)[None] < jnp.array([6, 3, 1])[:, None]
  layer = layers.GRU(5, variant=variant, return_state=True,
                     bias_init=nn.initializers.normal(0.5))
  v = layer.init(jax.random.key(1), xs, mask)
  assert set(v["params"]) == {"w_x", "w_h", "b_x", "b_h"}
  p = GRUParams(**v["params"])
  hs, h_last = layer.apply(v, xs, mask)
  ref_last, ref_hs = reference.run(p, xs, mask=np.asarray(mask), variant=variant)
  np.testing.assert_allclose(hs, ref_hs, atol=1e-5)
  np.testing.assert_allclose(h_last, ref_last, atol=1e-5)
  last = layers.GRU(5, variant=variant, return_sequences=False).apply(v, xs, mask)
  np.testing.assert_allclose(last, ref_last, atol=1e-5)


def test_layer_dropout_is_variational_and_per_example():
  xs = _xs(2, b=4)
  layer = layers.GRU(5, dropout=0.5, recurrent_dropout=0.5)
  v = layer.init(jax.random.key(0), xs)
  rng = {"dropout": jax.random.key(3)}
  ids = jnp.array([10, 11, 12, 13])
  full = layer.apply(v, xs, deterministic=False, rngs=rng, example_ids=ids)
  # The same example with the same id gives the same output in a different batch.
  half = layer.apply(v, xs[2:], deterministic=False, rngs=rng, example_ids=ids[2:])
  np.testing.assert_allclose(full[2:], half, atol=1e-6)
  p = GRUParams(**v["params"])
  no_drop = layer.apply(v, xs)
  assert float(jnp.abs(full - no_drop).max()) > 1e-3
  np.testing.assert_allclose(no_drop, gru_jax.gru(p, xs)[1], atol=1e-6)


def test_deterministic_attribute_survives_flax_lifted_transforms():
  """nn.vmap drops call keywords and nn.remat traces them; set on the module,
  dropout is on under both.  Known answers: the vmapped ensemble member i equals
  the plain layer applied with member i's params and dropout key; remat equals
  the plain layer with the same key; the call's keyword still overrides."""
  xs = _xs(4)
  rng = {"dropout": jax.random.key(5)}
  plain = layers.GRU(4, dropout=0.5, recurrent_dropout=0.3)
  v = plain.init(jax.random.key(0), xs)
  want = plain.apply(v, xs, deterministic=False, rngs=rng)
  assert float(jnp.abs(want - plain.apply(v, xs)).max()) > 1e-3  # dropout changes it
  on = layers.GRU(4, dropout=0.5, recurrent_dropout=0.3, deterministic=False)
  np.testing.assert_allclose(on.apply(v, xs, rngs=rng), want, atol=1e-6)
  np.testing.assert_allclose(on.apply(v, xs, deterministic=True), plain.apply(v, xs), atol=1e-6)
  np.testing.assert_allclose(nn.remat(layers.GRU)(4, dropout=0.5, recurrent_dropout=0.3,
                                                  deterministic=False).apply(v, xs, rngs=rng),
                             want, atol=1e-6)
  ens = nn.vmap(layers.GRU, variable_axes={"params": 0}, split_rngs={"params": True,
                                                                     "dropout": True},
                in_axes=None, axis_size=2)(4, dropout=0.5, deterministic=False)
  ve = ens.init(jax.random.key(1), xs)
  out = ens.apply(ve, xs, rngs=rng)
  for i in range(2):
    vi = jax.tree.map(lambda a, i=i: a[i], ve)
    alone = layers.GRU(4, dropout=0.5).apply(vi, xs)
    assert float(jnp.abs(out[i] - alone).max()) > 1e-3  # dropout ran in member i
  for mod in (layers.StackedGRU((4, 4), dropout_between=0.5, deterministic=False),
              layers.Bidirectional(4, gru_kwargs=dict(dropout=0.5), deterministic=False),
              layers.SequenceDropout(0.5, deterministic=False)):
    vm = mod.init(jax.random.key(2), xs)
    assert float(jnp.abs(mod.apply(vm, xs, rngs=rng)
                         - mod.apply(vm, xs, deterministic=True)).max()) > 1e-3


def test_bad_dropout_rates_and_list_inputs():
  xs = _xs(6)
  for mod, msg in ((layers.GRU(4, dropout=-0.1), "dropout must be in"),
                   (layers.GRU(4, recurrent_dropout=1.0), "recurrent_dropout must be in"),
                   (layers.StackedGRU((4, 4), dropout_between=-0.5), "dropout_between must be"),
                   (layers.SequenceDropout(-0.1), "SequenceDropout rate must be in")):
    with pytest.raises(ValueError, match=msg):
      mod.init(jax.random.key(0), xs)  # checked even where no dropout runs
  layer = layers.GRU(4)
  v = layer.init(jax.random.key(0), xs)
  np.testing.assert_allclose(layer.apply(v, np.asarray(xs).tolist()), layer.apply(v, xs),
                             atol=1e-6)


def test_dropout_multiplier_statistics():
  m = layers.dropout_multiplier(jax.random.key(0), 0.3, 2000, (50,))
  assert abs(float((m == 0).mean()) - 0.3) < 0.01
  np.testing.assert_allclose(float(m.mean()), 1.0, atol=0.02)
  with pytest.raises(ValueError, match="rate must be in"):
    layers.dropout_multiplier(jax.random.key(0), 1.0, 2, (3,))


def test_bidirectional_lines_up_with_padding():
  xs = _xs(4)
  mask = jnp.arange(6)[None] < jnp.array([6, 4, 2])[:, None]
  bi = layers.Bidirectional(3)
  v = bi.init(jax.random.key(0), xs, mask)
  out = bi.apply(v, xs, mask)
  assert out.shape == (3, 6, 6)
  fwd = GRUParams(**v["params"]["forward"])
  bwd = GRUParams(**v["params"]["backward"])
  for i, n in enumerate([6, 4, 2]):
    ref_f = reference.run(fwd, xs[i:i + 1, :n])[1][0]
    ref_b = reference.run(bwd, xs[i:i + 1, :n][:, ::-1])[1][0][::-1]
    np.testing.assert_allclose(out[i, :n, :3], ref_f, atol=1e-5)
    np.testing.assert_allclose(out[i, :n, 3:], ref_b, atol=1e-5)
    np.testing.assert_array_equal(out[i, n:], 0)


def test_stacked_gru_chains_layers():
  xs = _xs(5)
  st = layers.StackedGRU((4, 3))
  v = st.init(jax.random.key(0), xs)
  out = st.apply(v, xs)
  h1 = reference.run(GRUParams(**v["params"]["layer_0"]), xs)[1]
  h2 = reference.run(GRUParams(**v["params"]["layer_1"]), h1)[1]
  np.testing.assert_allclose(out, h2, atol=1e-5)


def test_sequence_batchnorm_ignores_padding():
  x = np.random.RandomState(0).randn(4, 5, 3).astype(np.float32) * 3 + 1
  mask = np.arange(5)[None] < np.array([5, 2, 3, 1])[:, None]
  bn = layers.SequenceBatchNorm(momentum=0.9, epsilon=1e-3)
  v = bn.init(jax.random.key(0), x, mask, use_running_average=False)
  y, upd = bn.apply(v, x, mask, use_running_average=False, mutable=["batch_stats"])
  valid = x[mask].astype(np.float64)  # [N_valid, F]
  mean, var = valid.mean(0), valid.var(0)
  np.testing.assert_allclose(np.asarray(y)[mask], (valid - mean) / np.sqrt(var + 1e-3), atol=1e-4)
  np.testing.assert_array_equal(np.asarray(y)[~mask], 0)
  np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * mean, atol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * var, atol=1e-4)
  # Evaluation uses the running averages.
  y_eval = bn.apply({**v, **upd}, x, mask, use_running_average=True)
  ra_m, ra_v = 0.1 * mean, 0.9 + 0.1 * var
  np.testing.assert_allclose(np.asarray(y_eval)[mask], (valid - ra_m) / np.sqrt(ra_v + 1e-3),
                             atol=1e-4)


def test_sequence_batchnorm_matches_flax_batchnorm_without_mask():
  x = np.random.RandomState(1).randn(6, 4).astype(np.float32)
  ours = layers.SequenceBatchNorm(epsilon=1e-5)
  theirs = nn.BatchNorm(epsilon=1e-5, use_running_average=False)
  v1 = ours.init(jax.random.key(0), x, use_running_average=False)
  v2 = theirs.init(jax.random.key(0), x)
  np.testing.assert_allclose(ours.apply(v1, x, use_running_average=False, mutable=["batch_stats"])[0],
                             theirs.apply(v2, x, mutable=["batch_stats"])[0], atol=1e-5)


def test_sequence_batchnorm_running_stats_keep_dtype_and_skip_empty_batches():
  """Known answers: an all-padding batch leaves the running mean and variance as
  they were (it has no statistics; averaging in 0 and 0 shrank the variance), and
  under x64 the float32 statistics stay float32 (they became float64, which broke
  a lax.scan over training steps)."""
  x = np.random.RandomState(3).randn(2, 4, 3)
  bn = layers.SequenceBatchNorm(momentum=0.9)
  v = bn.init(jax.random.key(0), x, use_running_average=False)
  _, upd = bn.apply(v, x, jnp.zeros((2, 4), bool), use_running_average=False,
                    mutable=["batch_stats"])
  chex_equal = lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  jax.tree.map(chex_equal, upd["batch_stats"], v["batch_stats"])
  with jax.enable_x64(True):
    _, upd = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    assert {a.dtype for a in jax.tree.leaves(upd["batch_stats"])} == {jnp.dtype("float32")}
    valid = x.reshape(-1, 3)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * valid.mean(0), rtol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * valid.var(0), rtol=1e-6)


def test_sequence_batchnorm_keeps_float64_precision_under_x64():
  # The statistics were taken in float32, so float64 outputs were only float32-accurate
  # (1e-7 off), which spoils float64 gradient checks through the layer.
  x = np.random.RandomState(2).randn(4, 5, 3) * 3 + 1
  mask = np.arange(5)[None] < np.array([5, 2, 3, 1])[:, None]
  with jax.enable_x64(True):
    bn = layers.SequenceBatchNorm(epsilon=1e-3)
    v = bn.init(jax.random.key(0), x, mask, use_running_average=False)
    y, _ = bn.apply(v, x, mask, use_running_average=False, mutable=["batch_stats"])
  assert y.dtype == np.float64
  valid = x[mask]
  mean, var = valid.mean(0), valid.var(0)
  np.testing.assert_allclose(np.asarray(y)[mask], (valid - mean) / np.sqrt(var + 1e-3),
                             rtol=0, atol=1e-12)


def test_seed_model_structure_and_shapes():
  m = models.SequenceModel("classification", 10)
  x = jnp.ones((4, 8, 8))
  # jit: one compiled program instead of one per eager op of the initialisers.
  v = jax.jit(m.init)(jax.random.key(0), x)
  p = v["params"]
  # (jit returns the dict sorted; gru_1's input width shows it follows gru_0)
  assert sorted(p) == ["bn_0", "bn_1", "gru_0", "gru_1", "head"]
  assert p["gru_0"]["w_x"].shape == (8, 384) and p["gru_1"]["w_x"].shape == (128, 384)
  assert p["bn_0"]["scale"].shape == (128,)
  assert jax.jit(m.apply)(v, x).shape == (4, 10)
  tag = models.SequenceModel("tagging", 7)
  assert jax.jit(tag.apply)(jax.jit(tag.init)(jax.random.key(0), x), x).shape == (4, 8, 7)
  lm = models.SequenceModel("lm", 11, vocab_size=11, batch_norm=False, hidden_sizes=(8,))
  toks = jnp.ones((2, 5), jnp.int32)
  assert jax.jit(lm.apply)(jax.jit(lm.init)(jax.random.key(0), toks), toks).shape == (2, 5, 11)


def test_model_without_bn_or_dropout_is_gru_then_dense():
  m = models.SequenceModel("classification", 3, hidden_sizes=(5,), batch_norm=False, dropout=0.0)
  xs = _xs(6)
  mask = jnp.arange(6)[None] < jnp.array([6, 2, 4])[:, None]
  v = m.init(jax.random.key(0), xs, mask)
  h_last = reference.run(GRUParams(**v["params"]["gru_0"]), xs, mask=np.asarray(mask))[0]
  head = v["params"]["head"]
  np.testing.assert_allclose(m.apply(v, xs, mask), h_last @ head["kernel"] + head["bias"],
                             atol=1e-5)


def test_sample_lm_extends_prompt_deterministically():
  lm = models.SequenceModel("lm", 6, vocab_size=6, batch_norm=False, hidden_sizes=(8,),
                            dropout=0.0)
  toks = jnp.array([[1, 2, 3]], jnp.int32)
  v = lm.init(jax.random.key(0), toks)
  out = models.sample_lm(lm, v, jnp.array([1, 2]), 4, jax.random.key(1), temperature=1e-4)
  assert out.shape == (6,) and list(out[:2]) == [1, 2]
  # Near-zero temperature = greedy: each token is the argmax given the prefix.
  for t in range(2, 6):
    logits = lm.apply(v, out[None, :t])[0, -1]
    assert int(out[t]) == int(jnp.argmax(logits))


def test_layer_bad_inputs():
  with pytest.raises(ValueError, match=r"GRU expects inputs \[B,T,D\], got shape \(3, 4\)"):
    layers.GRU(3).init(jax.random.key(0), jnp.ones((3, 4)))
  with pytest.raises(ValueError, match=r"mask must have shape \[B,T\]"):
    layers.GRU(3).init(jax.random.key(0), jnp.ones((2, 4, 3)), jnp.ones((4, 2), bool))
  with pytest.raises(ValueError, match="task must be one of"):
    models.SequenceModel("ranking", 2).init(jax.random.key(0), jnp.ones((1, 2, 3)))
  with pytest.raises(ValueError, match="expects int tokens"):
    models.SequenceModel("lm", 2, vocab_size=2).init(jax.random.key(0), jnp.ones((1, 2, 3)))
  with pytest.raises(ValueError, match="bidirectional model would read the tokens it predicts"):
    models.SequenceModel("lm", 2, vocab_size=2, bidirectional=True).init(
        jax.random.key(0), jnp.ones((1, 2), jnp.int32))
  with pytest.raises(ValueError, match="compute_dtype=.* and backend='auto' do not apply"):
    layers.GRU(3, layer_norm=True, compute_dtype=jnp.bfloat16).init(
        jax.random.key(0), jnp.ones((2, 4, 3)))


def test_empty_hidden_sizes_are_refused_not_passed_through():
  # StackedGRU(()) gave back its inputs, and SequenceModel(..., hidden_sizes=()) a
  # classifier whose "[B,K]" logits were [B,T,K] from a head on the raw inputs.
  xs = jnp.ones((2, 5, 3))
  with pytest.raises(ValueError, match="StackedGRU needs at least one hidden size"):
    layers.StackedGRU(()).init(jax.random.key(0), xs)
  for task in ("classification", "tagging"):
    with pytest.raises(ValueError, match="SequenceModel needs at least one hidden size"):
      models.SequenceModel(task, 4, hidden_sizes=()).init(jax.random.key(0), xs)


@pytest.mark.parametrize("kwargs", [dict(return_state=True), dict(return_sequences=False),
                                    dict(reverse=True)])
def test_wrappers_refuse_gru_options_they_set_themselves(kwargs):
  # return_state made Bidirectional concatenate tuples ("concatenate requires ndarray")
  # and StackedGRU feed a tuple to its next layer; reverse was "got multiple values".
  xs = jnp.ones((2, 5, 3))
  key = next(iter(kwargs))
  with pytest.raises(ValueError, match=f"remove \\['{key}'\\] from its GRU options"):
    layers.Bidirectional(4, gru_kwargs=kwargs).init(jax.random.key(0), xs)
  with pytest.raises(ValueError, match=f"remove \\['{key}'\\]"):
    layers.StackedGRU((4, 4), bidirectional=True, gru_kwargs=kwargs).init(jax.random.key(0), xs)
  if key != "reverse":  # a one-way stack may run every layer backwards
    with pytest.raises(ValueError, match=f"remove \\['{key}'\\]"):
      layers.StackedGRU((4, 4), gru_kwargs=kwargs).init(jax.random.key(0), xs)
  else:
    out = layers.StackedGRU((4, 4), gru_kwargs=kwargs).init_with_output(jax.random.key(0), xs)[0]
    assert out.shape == (2, 5, 4)


def test_sample_lm_refuses_bad_arguments():
  lm = models.SequenceModel("lm", 6, vocab_size=6, batch_norm=False, hidden_sizes=(4,))
  v = lm.init(jax.random.key(0), jnp.ones((1, 3), jnp.int32))
  prompt, key = jnp.array([1, 2]), jax.random.key(1)
  for kwargs, match in [(dict(temperature=0.0), "temperature must be > 0"),
                        (dict(temperature=-1.0), "temperature must be > 0"),
                        (dict(length=-2), "length must be an int >= 0, got -2"),
                        (dict(prompt=jnp.array([50, 2])), r"prompt must be token ids in \[0, 6\), got \[50\]"),
                        (dict(prompt=jnp.array([1.7, 2.2])), "int tokens, got dtype float32")]:
    args = {**dict(prompt=prompt, length=3, rng=key), **kwargs}
    with pytest.raises(ValueError, match=match):
      models.sample_lm(lm, v, args.pop("prompt"), args.pop("length"), args.pop("rng"), **args)


@pytest.mark.parametrize("variant", ["seed", "reset_after"])
def test_gates_are_recorded_when_intermediates_are_mutable(variant):
  """The gates a layer records equal the float64 reference's z, r and candidate at every
  valid step, forwards and backwards, and recording them leaves the outputs unchanged."""
  xs = _xs(3, b=3, t=6, d=4)
  mask = jnp.arange(6)[None] < jnp.array([6, 4, 1])[:, None]
  bi = layers.Bidirectional(5, gru_kwargs=dict(variant=variant))
  v = bi.init(jax.random.key(0), xs, mask)
  plain = bi.apply(v, xs, mask)
  out, state = bi.apply(v, xs, mask, mutable=["intermediates"])
  np.testing.assert_allclose(out, plain, atol=1e-6)
  for name, rev in (("forward", False), ("backward", True)):
    (gates,) = state["intermediates"][name]["gates"]
    p = GRUParams(**v["params"][name])
    assert all(g.shape == (3, 6, 5) for g in gates)
    for b, n in enumerate((6, 4, 1)):
      h = np.zeros(5)
      for t in (reversed(range(n)) if rev else range(n)):
        h, z, r, cand = reference.step(p, h, np.asarray(xs[b, t], np.float64), variant)
        for got, want in zip(gates, (z, r, cand)):
          np.testing.assert_allclose(got[b, t], want, atol=1e-5)
  # A whole model records every layer's gates the same way.
  model = models.SequenceModel("lm", 7, hidden_sizes=(4, 4), vocab_size=7, batch_norm=False)
  tokens = jnp.array([[1, 2, 3, 4, 5]])
  mv = model.init(jax.random.key(1), tokens)
  _, state = model.apply(mv, tokens, mutable=["intermediates"])
  assert sorted(state["intermediates"]) == ["gru_0", "gru_1"]
  assert state["intermediates"]["gru_1"]["gates"][0].z.shape == (1, 5, 4)


def test_token_models_refuse_out_of_vocabulary_inputs():
  """nn.Embed gives NaN for an id outside the table; the model says so instead."""
  model = models.SequenceModel("classification", 3, vocab_size=6, hidden_sizes=(4,))
  ok = jnp.array([[1, 5, 0]])
  v = model.init(jax.random.key(0), ok)
  assert np.isfinite(model.apply(v, ok)).all()
  for bad, got in (([[1, 6, 0]], r"\[6\]"), ([[-1, 2, 0]], r"\[-1\]")):
    with pytest.raises(ValueError, match=r"inputs must be token ids in \[0, 6\), got " + got):
      model.apply(v, jnp.array(bad))
  # Under jit the ids are traced and unreadable: the caller is trusted, as in training.
  assert jax.jit(lambda x: model.apply(v, x))(ok).shape == (1, 3)


def _ln_ref(a, gamma, beta, eps=1e-5):
  mu, var = a.mean(), a.var()
  return (a - mu) / np.sqrt(var + eps) * gamma + beta


@pytest.mark.parametrize("variant", ["seed", "reset_after"])
def test_layer_norm_gru_matches_numpy(variant):
  rs = np.random.RandomState(0)
  xs = _xs(7, b=2, t=5, d=3)
  mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
  layer = layers.GRU(4, variant=variant, layer_norm=True, bias_init=nn.initializers.normal(0.3))
  v = layer.init(jax.random.key(0), xs, mask)
  v = jax.tree.map(lambda a: a + 0.2 * rs.randn(*a.shape).astype(np.float32)
                   if a.shape == (12,) else a, v)  # non-trivial gammas/betas/biases
  hs = layer.apply(v, xs, mask)
  q = {k: np.asarray(a, np.float64) for k, a in v["params"].items()}
  want = _ln_gru_ref(q, np.asarray(xs, np.float64), variant, np.asarray(mask))
  hs, valid = np.asarray(hs), np.asarray(mask)
  np.testing.assert_array_equal(hs[~valid], 0)
  np.testing.assert_allclose(hs[valid], want[valid], atol=1e-5)


def test_layer_norm_gru_takes_h0_in_another_dtype_like_gru():
  xs = _xs(11, b=2, t=4, d=3)
  layer = layers.GRU(5, layer_norm=True, return_state=True)
  v = layer.init(jax.random.key(0), xs)
  h0 = jnp.full((2, 5), 0.5)
  hs32, last32 = layer.apply(v, xs, None, h0)
  hs16, last16 = layer.apply(v, xs, None, h0.astype(jnp.bfloat16))  # 0.5 is exact in bf16
  assert hs16.dtype == jnp.float32
  np.testing.assert_array_equal(hs16, hs32)


def _ln_gru_ref(q, xs, variant, mask=None):
  """Float64 NumPy layer-norm GRU: q param dict, xs [B,T,D] -> hs [B,T,H]; a masked
  step (mask [B,T] False) carries h and outputs zero."""
  hsz = q["w_h"].shape[0]
  sig = lambda a: 1 / (1 + np.exp(-a))
  blk = lambda a, i: a[i * hsz:(i + 1) * hsz]
  out = np.zeros(xs.shape[:2] + (hsz,))
  for b in range(xs.shape[0]):
    h = np.zeros(hsz)
    for t in range(xs.shape[1]):
      if mask is not None and not mask[b, t]:
        continue
      xw = xs[b, t] @ q["w_x"]
      ax = [_ln_ref(blk(xw, i), blk(q["gamma_x"], i), blk(q["beta_x"], i)) + blk(q["b_x"], i)
            for i in range(3)]
      hw = h @ q["w_h"]
      ah = [_ln_ref(blk(hw, i), blk(q["gamma_h"], i), blk(q["beta_h"], i)) + blk(q["b_h"], i)
            for i in range(3)]
      z, r = sig(ax[0] + ah[0]), sig(ax[1] + ah[1])
      if variant == "seed":
        hc = _ln_ref((r * h) @ q["w_h"][:, 2 * hsz:], blk(q["gamma_h"], 2), blk(q["beta_h"], 2))
        cand = np.tanh(ax[2] + hc + blk(q["b_h"], 2))
      else:
        cand = np.tanh(ax[2] + r * ah[2])
      h = (1 - z) * h + z * cand
      out[b, t] = h
  return out


@pytest.mark.parametrize("variant", ["seed", "reset_after"])
def test_layer_norm_gru_runs_bf16_inputs_in_bf16_like_gru(variant):
  # float32 weights on bf16 inputs used to promote the state and crash the scan.
  xs = _xs(12, b=2, t=5, d=3).astype(jnp.bfloat16)
  layer = layers.GRU(4, variant=variant, layer_norm=True, bias_init=nn.initializers.normal(0.3))
  v = layer.init(jax.random.key(0), xs)
  hs = layer.apply(v, xs)
  assert hs.dtype == jnp.bfloat16
  q = {k: np.asarray(a.astype(jnp.bfloat16), np.float64) for k, a in v["params"].items()}
  want = _ln_gru_ref(q, np.asarray(xs, np.float64), variant)
  np.testing.assert_allclose(np.asarray(hs, np.float64), want, atol=3e-2)


@pytest.mark.parametrize("variant", ["seed", "reset_after"])
def test_plain_gru_runs_bf16_inputs_in_bf16(variant):
  """What the layer-norm test above asks of ln_gru: bf16 in, bf16 out, near float64."""
  xs = _xs(13, b=2, t=5, d=3).astype(jnp.bfloat16)
  layer = layers.GRU(4, variant=variant, bias_init=nn.initializers.normal(0.3))
  v = layer.init(jax.random.key(0), xs)
  hs = layer.apply(v, xs)
  assert hs.dtype == jnp.bfloat16
  p = GRUParams(**{k: np.asarray(a.astype(jnp.bfloat16), np.float64)
                   for k, a in v["params"].items()})
  want = reference.run(p, np.asarray(xs, np.float64), variant=variant)[1]
  np.testing.assert_allclose(np.asarray(hs, np.float64), want, atol=3e-2)


def test_decoder_dropout_masks_shapes_values_and_key_order():
  keys = iter(jax.random.split(jax.random.key(3), 4))
  drops, rec = layers.decoder_dropout_masks(lambda: next(keys), 0.25, 0.5, False, 3, 7, (5, 2))
  assert [d.shape for d in drops] == [(3, 7, 5), (3, 7, 2)]
  assert [r.shape for r in rec] == [(3, 5), (3, 2)]
  # Output masks take the first keys, recurrent masks the next: each equals the single draw.
  expect = jax.random.split(jax.random.key(3), 4)
  np.testing.assert_array_equal(drops[1], layers.dropout_multiplier(expect[1], 0.25, 3, (7, 2)))
  np.testing.assert_array_equal(rec[0], layers.dropout_multiplier(expect[2], 0.5, 3, (5,)))
  assert set(np.unique(np.asarray(rec[1]))) <= {0.0, 2.0}
  calls = []
  off = layers.decoder_dropout_masks(lambda: calls.append(1), 0.25, 0.5, True, 3, 7, (5,))
  assert off == (None, None) and not calls
  drops, rec = layers.decoder_dropout_masks(lambda: jax.random.key(0), 0.0, 0.5, False, 3, 7, (5,))
  assert drops is None and rec[0].shape == (3, 5)
  with pytest.raises(ValueError, match="recurrent_dropout must be in"):
    layers.decoder_dropout_masks(lambda: jax.random.key(0), 0.1, 1.0, True, 3, 7, (5,))
