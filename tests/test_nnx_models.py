"""The NNX `Seq2Seq` (gru_jax.nnx_models) against the float64 references of the Linen
model's equations (tests/test_seq2seq.py, tests/test_attention.py), on its own params and
on a Linen model's loaded with `from_params`."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gru_jax import models, nnx_models
from tests.test_attention import _reference as attention_reference
from tests.test_seq2seq import reference_logits

V = 11
SIZES = dict(hidden_sizes=(6, 5), embed_dim=4)
CASES = [dict(attention="none", bidirectional=True, variant="reset_after"),
         dict(attention="additive", bidirectional=True, variant="seed", attention_size=3),
         dict(attention="multiplicative", bidirectional=False, variant="reset_after")]


def _data(seed=0, b=3, s=6, l=4):
  rs = np.random.RandomState(seed)
  src = jnp.asarray(rs.randint(1, V, (b, s)), jnp.int32)
  mask = jnp.arange(s)[None] < jnp.array([6, 3, 1, 4][:b])[:, None]
  return src, mask, jnp.asarray(rs.randint(1, V, (b, l)), jnp.int32)


def _params_tree(model):
  """The NNX model's params as the nested dict of names the Linen model uses."""
  tree = {}
  for path, v in nnx.iter_graph(model):
    if isinstance(v, nnx.Param):
      node = tree
      for k in path[:-1]:
        node = node.setdefault(str(k), {})
      node[str(path[-1])] = np.asarray(v[...])
  return tree


def _reference(p, src, mask, dec, case, zoneout=0.0):
  kw = dict(layers=2, bidirectional=case["bidirectional"], variant=case["variant"])
  if case["attention"] == "none":
    assert zoneout == 0.0
    return reference_logits(p, src, mask, dec, **kw)
  return attention_reference(p, src, mask, dec, zoneout=zoneout, **kw)[0]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["attention"])
def test_own_params_and_loaded_linen_params_match_the_float64_reference(case):
  src, mask, dec = _data()
  model = nnx_models.Seq2Seq(V, V, **SIZES, **case, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(model(src, mask, decoder_inputs=dec),
                             _reference(_params_tree(model), src, mask, dec, case), atol=3e-5)
  linen = models.Seq2Seq(V, V, **SIZES, **case)
  var = linen.init(jax.random.key(1), src, mask, decoder_inputs=dec)
  loaded = nnx_models.Seq2Seq.from_params(var["params"], V, V, **SIZES, **case)
  want = _reference(var["params"], src, mask, dec, case)
  np.testing.assert_allclose(loaded(src, mask, decoder_inputs=dec), want, atol=3e-5)
  # Every Linen param landed where the NNX model reads it.
  flat = lambda t: {jax.tree_util.keystr(k): np.asarray(v)
                    for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  got, linen_flat = flat(_params_tree(loaded)), flat(jax.tree.map(np.asarray, var["params"]))
  assert got.keys() == linen_flat.keys()
  for k in got:
    np.testing.assert_array_equal(got[k], linen_flat[k], err_msg=k)


def test_attention_weights_and_zoneout_expectation_match_the_float64_reference():
  case = CASES[1]
  src, mask, dec = _data(1)
  model = nnx_models.Seq2Seq(V, V, **SIZES, **case, zoneout=0.3, rngs=nnx.Rngs(2))
  model.eval()
  context, states = model.start(src, mask)
  logits, _, alpha = model.decode(context, states, dec, return_attention=True)
  want, want_alpha = attention_reference(_params_tree(model), src, mask, dec, layers=2,
                                         bidirectional=True, variant="seed", zoneout=0.3)
  np.testing.assert_allclose(logits, want, atol=3e-5)
  np.testing.assert_allclose(alpha, want_alpha, atol=1e-6)


@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: c["attention"])
def test_greedy_and_beam_search_are_the_teacher_forced_argmax(case):
  src, mask, _ = _data(2, b=4)
  model = nnx_models.Seq2Seq(V, V, **SIZES, **case, dropout=0.3, rngs=nnx.Rngs(3))
  out = np.asarray(nnx_models.greedy_decode(model, src, mask, max_len=6, bos_id=1, eos_id=-1))
  prefix = jnp.asarray(np.concatenate([np.ones((4, 1), np.int32), out[:, :-1]], 1))
  forced = model(src, mask, decoder_inputs=prefix, deterministic=True)
  np.testing.assert_array_equal(out, np.argmax(forced, -1))
  toks, scores = nnx_models.beam_search(model, src, mask, beam_size=1, max_len=6, bos_id=1,
                                        eos_id=-1)
  np.testing.assert_array_equal(toks[:, 0], out)
  # The beam's score is its sequence's teacher-forced log-probability.
  logp = jax.nn.log_softmax(forced, -1)
  np.testing.assert_allclose(scores[:, 0], np.take_along_axis(logp, out[..., None], -1).sum(
      (1, 2)), rtol=1e-5)
  wide, _ = nnx_models.beam_search(model, src, mask, beam_size=3, max_len=6, bos_id=1,
                                   eos_id=-1)
  assert wide.shape == (4, 3, 6)


def test_training_draws_per_example_and_eval_turns_it_off():
  src, mask, dec = _data(3)
  model = nnx_models.Seq2Seq(V, V, **SIZES, attention="additive", dropout=0.3,
                             recurrent_dropout=0.2, zoneout=0.2, rngs=nnx.Rngs(0, dropout=1))
  ids = jnp.array([4, 5, 6])
  run = lambda sl, key: model(src[sl], mask[sl], decoder_inputs=dec[sl], example_ids=ids[sl],
                              rngs=nnx.Rngs(dropout=key))
  full = run(slice(None), 7)
  np.testing.assert_allclose(run(slice(1, 2), 7)[0], full[1], atol=1e-5)
  assert not np.allclose(run(slice(None), 8), full)
  model.eval()
  evaluated = model(src, mask, decoder_inputs=dec)
  np.testing.assert_allclose(evaluated, model(src, mask, decoder_inputs=dec,
                                              deterministic=True), atol=0)
  assert not np.allclose(evaluated, full)


def test_a_jitted_adam_step_lowers_the_teacher_forced_loss():
  src, mask, dec = _data(4)
  labels = jnp.roll(dec, -1, axis=1)
  model = nnx_models.Seq2Seq(V, V, **SIZES, attention="multiplicative", dropout=0.1,
                             rngs=nnx.Rngs(0, dropout=1))
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  def loss_fn(m):
    logits = m(src, mask, decoder_inputs=dec, deterministic=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @nnx.jit
  def step(m, opt):
    loss, grads = nnx.value_and_grad(loss_fn)(m)
    opt.update(m, grads)
    return loss

  first = float(step(model, opt))
  for _ in range(30):
    last = float(step(model, opt))
  assert last < 0.5 * first, (first, last)


def test_bad_arguments_are_named():
  src, mask, dec = _data()
  model = nnx_models.Seq2Seq(V, V, **SIZES, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"decoder_inputs must be int tokens of rank 2, got float32 \(3, 4\)"):
    model(src, mask, decoder_inputs=dec.astype(jnp.float32))
  with pytest.raises(ValueError, match=r"mask must have shape \[B,S\]=\(3, 6\), got \(3, 5\)"):
    model(src, mask[:, :5], decoder_inputs=dec)
  with pytest.raises(ValueError, match="attention must be one of"):
    nnx_models.Seq2Seq(V, V, attention="dot", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="return_attention needs a Seq2Seq with attention"):
    model.decode(*model.start(src, mask), dec, return_attention=True)
  linen = models.Seq2Seq(V, V, **SIZES, attention="additive")
  var = linen.init(jax.random.key(0), src, mask, decoder_inputs=dec)
  with pytest.raises(ValueError, match=r"missing \['decoder_0/b_h'.*unexpected \["
                                       r"'attention_decoder/decoder_0/b_h'"):
    nnx_models.Seq2Seq.from_params(var["params"], V, V, **SIZES)
  with pytest.raises(ValueError, match=r"params head/bias has shape \(11,\), expected "
                                       r"\(12,\)"):
    nnx_models.Seq2Seq.from_params(var["params"], V, V + 1, **SIZES, attention="additive")
  with pytest.raises(ValueError, match="needs rngs"):
    nnx_models.Seq2Seq.from_params(var["params"], V, V, **SIZES, attention="additive",
                                   dropout=0.1)
