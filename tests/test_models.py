"""Models, decoding and NNX/Linen parity against independent float64 NumPy compositions.

`_model_np` rebuilds `SequenceModel`'s forward pass from the float64 reference GRU
(tests/reference.py), NumPy batch norm and NumPy dense layers; nothing in it calls gru_jax.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from gru_jax import layers, models
from gru_jax import nnx_layers as G
from gru_jax.cell import GRUParams
from tests import reference


def _f64(a):
  return np.asarray(a, np.float64)


def _bn_np(x, mask, p, stats, train, eps):
  """Batch norm in float64: statistics over valid steps (train) or the running ones (eval)."""
  if train:
    w = np.ones(x.shape[:-1]) if mask is None else mask.astype(np.float64)
    flat, wf = x.reshape(-1, x.shape[-1]), w.reshape(-1)
    n = max(wf.sum(), 1.0)
    mean = (flat * wf[:, None]).sum(0) / n
    var = (((flat - mean) ** 2) * wf[:, None]).sum(0) / n
  else:
    mean, var = _f64(stats["mean"]), _f64(stats["var"])
  y = (x - mean) / np.sqrt(var + eps) * _f64(p["scale"]) + _f64(p["bias"])
  return y if mask is None else y * mask[..., None]


def _model_np(model, variables, inputs, mask, train=False, h0=None):
  """SequenceModel's forward pass (dropout off) in float64 from the reference GRU.

  With ``h0`` (one initial state per layer, a (forward, backward) pair when
  bidirectional) returns ``(outputs, final states)`` in the same form.
  """
  p, st = variables["params"], variables.get("batch_stats", {})
  m = None if mask is None else np.asarray(mask, bool)
  x = _f64(p["embed"]["embedding"])[np.asarray(inputs)] if model.vocab_size else _f64(inputs)
  n = len(model.hidden_sizes)
  starts = [(None, None) if model.bidirectional else None] * n if h0 is None else h0
  states = []
  for i in range(n):
    seq = model.task in ("tagging", "lm") or i < n - 1
    g = p[f"gru_{i}"]
    if model.bidirectional:
      fl, fh = reference.run(GRUParams(**g["forward"]), x, starts[i][0], mask=m,
                             variant=model.variant)
      bl, bh = reference.run(GRUParams(**g["backward"]), x, starts[i][1], mask=m, reverse=True,
                             variant=model.variant)
      x = np.concatenate([fh, bh] if seq else [fl, bl], -1)
      states.append((fl, bl))
    else:
      last, hs = reference.run(GRUParams(**g), x, starts[i], mask=m, variant=model.variant)
      x = hs if seq else last
      states.append(last)
    if model.batch_norm:
      x = _bn_np(x, m if seq else None, p[f"bn_{i}"], st.get(f"bn_{i}"), train,
                 model.bn_epsilon)
  out = x @ _f64(p["head"]["kernel"]) + _f64(p["head"]["bias"])
  return out if h0 is None else (out, states)


def _nontrivial(variables, key):
  """Every float leaf moved off its initial value (biases, BN scale/bias and running stats)."""
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(key), len(leaves))
  moved = [a + 0.3 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
  out = jax.tree.unflatten(tree, moved)
  if "batch_stats" in out:  # a variance must stay positive
    out["batch_stats"] = jax.tree.map(jnp.abs, out["batch_stats"])
  return out


_LENGTHS = [7, 4, 1, 0]  # a full row, two ragged ones and one with no valid step


def _inputs(tokens, hole):
  rs = np.random.RandomState(0)
  mask = np.arange(7)[None] < np.array(_LENGTHS)[:, None]
  if hole:  # masks need not be prefixes: a gap inside a row and a row starting late
    mask[0, 2] = mask[1, 0] = False
  x = rs.randint(0, 9, (4, 7)).astype(np.int32) if tokens else rs.randn(4, 7, 3).astype(
      np.float32)
  return x, mask


@pytest.mark.parametrize("task,bidirectional,variant,tokens,hole", [
    ("classification", False, "seed", False, True),
    ("classification", True, "reset_after", True, False),
    ("regression", True, "seed", False, False),
    ("tagging", False, "reset_after", True, True),
    ("tagging", True, "seed", False, True),
    ("lm", False, "seed", True, False),
])
def test_sequence_model_matches_a_float64_composition_in_eval_and_train(task, bidirectional,
                                                                        variant, tokens, hole):
  x, mask = _inputs(tokens, hole)
  model = models.SequenceModel(task, 5, hidden_sizes=(6, 4), dropout=0.0,
                               bidirectional=bidirectional, variant=variant,
                               vocab_size=9 if tokens else None, embed_dim=3)
  v = _nontrivial(model.init(jax.random.key(1), x, mask), 2)
  np.testing.assert_allclose(model.apply(v, x, mask), _model_np(model, v, x, mask), atol=2e-5)
  out, upd = model.apply(v, x, mask, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(out, _model_np(model, v, x, mask, train=True), atol=2e-5)
  # The running averages moved towards this batch's statistics over its valid steps only.
  hs = _f64(v["params"]["embed"]["embedding"])[x] if tokens else _f64(x)
  if not bidirectional:
    hs = reference.run(GRUParams(**v["params"]["gru_0"]), hs, mask=mask, variant=variant)[1]
    valid = hs[mask]
    m = 0.99
    np.testing.assert_allclose(upd["batch_stats"]["bn_0"]["mean"],
                               m * _f64(v["batch_stats"]["bn_0"]["mean"]) + (1 - m) * valid.mean(0),
                               atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["bn_0"]["var"],
                               m * _f64(v["batch_stats"]["bn_0"]["var"]) + (1 - m) * valid.var(0),
                               atol=1e-6)


@pytest.mark.parametrize("task,bidirectional,variant,tokens", [
    ("classification", True, "seed", False),
    ("tagging", False, "reset_after", True),
    ("lm", False, "seed", True),
])
def test_initial_and_final_states_match_the_float64_composition(task, bidirectional, variant,
                                                                 tokens):
  x, mask = _inputs(tokens, hole=True)
  model = models.SequenceModel(task, 5, hidden_sizes=(6, 4), dropout=0.0,
                               bidirectional=bidirectional, variant=variant,
                               vocab_size=9 if tokens else None, embed_dim=3)
  v = _nontrivial(model.init(jax.random.key(1), x, mask), 2)
  rs = np.random.RandomState(5)
  draw = lambda size: rs.randn(4, size).astype(np.float32)
  h0 = [(draw(6), draw(6)), (None, draw(4))] if bidirectional else [draw(6), None]
  ref_h0 = [tuple(np.zeros((4, 4)) if h is None else h for h in pair) for pair in h0] \
      if bidirectional else [h0[0], np.zeros((4, 4))]
  for train in (False, True):
    got = model.apply(v, x, mask, train=train, initial_states=h0, return_states=True,
                      mutable=["batch_stats"] if train else False)
    (out, states), want = (got[0] if train else got), _model_np(model, v, x, mask, train, ref_h0)
    np.testing.assert_allclose(out, want[0], atol=2e-5)
    for a, b in zip(jax.tree.leaves(states), jax.tree.leaves(want[1])):
      np.testing.assert_allclose(a, b, atol=2e-5)
  # The row with no valid step keeps its initial states.
  np.testing.assert_allclose(jax.tree.leaves(states)[0][3], jax.tree.leaves(ref_h0)[0][3])
  with pytest.raises(ValueError, match=r"SequenceModel: initial_states must have one entry per layer"):
    model.apply(v, x, mask, initial_states=h0[:1])


def test_an_lm_run_in_pieces_from_carried_states_equals_the_whole_run():
  """Eval mode: batch norm on running averages, so each step's output is its own."""
  model, v = _lm()
  toks = np.random.RandomState(1).randint(0, 4, (2, 9)).astype(np.int32)
  whole = model.apply(v, toks)
  states, pieces = None, []
  for a, b in ((0, 4), (4, 5), (5, 9)):
    out, states = model.apply(v, toks[:, a:b], initial_states=states, return_states=True)
    pieces.append(out)
  np.testing.assert_allclose(np.concatenate(pieces, 1), whole, atol=1e-5)
  np.testing.assert_allclose(whole, _model_np(model, v, toks, None), atol=2e-5)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_classifier_pools_each_rows_last_valid_step_and_the_backward_first(bidirectional):
  """Pooling, written out: the forward state at each row's last valid step and, for the
  backward direction, its state after reading back to the row's first valid step."""
  rs = np.random.RandomState(3)
  x = rs.randn(4, 7, 3).astype(np.float32)
  mask = np.zeros((4, 7), bool)
  mask[0, :] = True
  mask[1, 2:5] = True       # valid steps 2..4: last 4, first 2
  mask[2, [0, 3, 6]] = True  # holes between valid steps
  mask[3, 5] = True          # a single valid step
  model = models.SequenceModel("classification", 3, hidden_sizes=(5,), batch_norm=False,
                               dropout=0.0, bidirectional=bidirectional)
  v = _nontrivial(model.init(jax.random.key(0), x, mask), 1)
  p = v["params"]
  feats = []
  for b in range(4):
    steps = np.flatnonzero(mask[b])
    fw = GRUParams(**(p["gru_0"]["forward"] if bidirectional else p["gru_0"]))
    h = np.zeros(5)
    for t in steps:
      h = reference.step(fw, h, _f64(x[b, t]))[0]
    row = [h]
    if bidirectional:
      h = np.zeros(5)
      for t in steps[::-1]:
        h = reference.step(GRUParams(**p["gru_0"]["backward"]), h, _f64(x[b, t]))[0]
      row.append(h)
    feats.append(np.concatenate(row))
  want = np.stack(feats) @ _f64(p["head"]["kernel"]) + _f64(p["head"]["bias"])
  np.testing.assert_allclose(model.apply(v, x, mask), want, atol=1e-5)
  # Whatever sits at padded steps is never read.
  np.testing.assert_allclose(model.apply(v, np.where(mask[..., None], x, 1e3), mask),
                             want, atol=1e-5)


def _lm(v_size=4):
  model = models.SequenceModel("lm", v_size, hidden_sizes=(8, 6), dropout=0.3,
                               vocab_size=v_size, embed_dim=4)
  v = model.init(jax.random.key(0), jnp.ones((1, 3), jnp.int32))
  v = _nontrivial(v, 5)
  v["params"]["head"]["kernel"] = v["params"]["head"]["kernel"] * 4  # spread the logits
  return model, v


def _softmax(logits, temperature):
  a = _f64(logits) / temperature
  e = np.exp(a - a.max())
  return e / e.sum()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sample_lm_draws_from_softmax_of_logits_over_temperature_two_steps_deep(temperature):
  """20,000 two-token continuations: the first token's frequencies against softmax(logits/T)
  of the float64 model on the prompt, and the second's, for every first token, against the
  float64 model on prompt + that token (the sampler carries the sequence on correctly)."""
  model, v = _lm()
  prompt = np.array([1, 2, 3], np.int32)
  n = 20_000
  keys = jax.random.split(jax.random.key(11), n)
  draws = np.asarray(jax.jit(jax.vmap(
      lambda k: models.sample_lm(model, v, prompt, 2, k, temperature=temperature)))(keys))
  np.testing.assert_array_equal(draws[:, :3], np.broadcast_to(prompt, (n, 3)))

  def chi2(observed, p):
    return float((((observed - observed.sum() * p) ** 2) / (observed.sum() * p)).sum())

  # 99.9% quantile of chi-square with 3 degrees of freedom: 16.27.
  p1 = _softmax(_model_np(model, v, prompt[None], None)[0, -1], temperature)
  assert chi2(np.bincount(draws[:, 3], minlength=4), p1) < 16.27
  for first in range(4):
    rows = draws[draws[:, 3] == first]
    if len(rows) < 500:
      continue
    ctx = np.concatenate([prompt, [first]])[None]
    p2 = _softmax(_model_np(model, v, ctx, None)[0, -1], temperature)
    assert chi2(np.bincount(rows[:, 4], minlength=4), p2) < 16.27, (first, len(rows))


@pytest.mark.parametrize("temperature", [1e-3, 1e-30, 1e-45])
def test_sample_lm_at_tiny_temperatures_is_greedy_on_the_float64_model(temperature):
  # 1e-45 (a float32 denormal) overflowed logits / T to +inf for every positive logit, and
  # categorical then took the lowest-indexed of them instead of the largest.
  model, v = _lm(6)
  prompt = np.array([1, 2, 3], np.int32)
  out = np.asarray(models.sample_lm(model, v, prompt, 8, jax.random.key(4),
                                    temperature=temperature))
  want = list(prompt)
  for _ in range(8):
    want.append(int(np.argmax(_model_np(model, v, np.array(want)[None], None)[0, -1])))
  np.testing.assert_array_equal(out, want)


def test_sample_lm_argument_forms_and_refusals():
  model, v = _lm()
  key = jax.random.key(2)
  want = models.sample_lm(model, v, jnp.array([1, 2]), 3, key, temperature=0.7)
  # Lists and NumPy arrays are prompts too; a temperature may be traced under jit.
  np.testing.assert_array_equal(models.sample_lm(model, v, [1, 2], 3, key, temperature=0.7),
                                want)
  np.testing.assert_array_equal(models.sample_lm(model, v, np.array([1, 2]), 3, key,
                                                 temperature=np.float32(0.7)), want)
  jitted = jax.jit(lambda t: models.sample_lm(model, v, jnp.array([1, 2]), 3, key,
                                              temperature=t))
  np.testing.assert_array_equal(jitted(0.7), want)
  for temperature in (float("inf"), float("nan"), 0.0, -1.0, "1"):
    with pytest.raises(ValueError, match="temperature must be > 0 and finite"):
      models.sample_lm(model, v, [1, 2], 3, key, temperature=temperature)
  floats = models.SequenceModel("lm", 4, hidden_sizes=(4,))
  fv = floats.init(key, jnp.ones((1, 3, 2)))
  with pytest.raises(ValueError, match="needs a token model"):
    models.sample_lm(floats, fv, [1, 2], 3, key)
  with pytest.raises(ValueError, match=r"non-empty \[P\] or \[B,P\] token array, got shape "
                                       r"\(1, 1, 2\)"):
    models.sample_lm(model, v, [[[1, 2]]], 3, key)


def _filtered(p, top_k=None, top_p=None):
  """float64 top-k then nucleus restriction of probabilities p [V], renormalised."""
  p = p.copy()
  order = np.argsort(-p, kind="stable")
  if top_k is not None:
    p[order[top_k:]] = 0
    p /= p.sum()
  if top_p is not None:
    cum = np.cumsum(p[order])
    keep = order[:int(np.searchsorted(cum, top_p)) + 1]  # fewest reaching top_p
    q = np.zeros_like(p)
    q[keep] = p[keep]
    p = q / q.sum()
  return p


@pytest.mark.parametrize("top_k,top_p", [(2, None), (None, 0.6), (3, 0.8), (None, 0.01)])
def test_sample_lm_top_k_and_nucleus_draw_from_the_restricted_softmax(top_k, top_p):
  """20,000 draws of the first token for two prompts at once ([B,P]): tokens outside the
  float64 model's restricted set never appear, the rest follow its renormalised softmax."""
  model, v = _lm(6)
  prompts = np.array([[1, 2, 3], [4, 0, 5]], np.int32)
  n = 20_000
  keys = jax.random.split(jax.random.key(12), n)
  draws = np.asarray(jax.jit(jax.vmap(lambda k: models.sample_lm(
      model, v, prompts, 1, k, temperature=0.8, top_k=top_k, top_p=top_p)))(keys))
  assert draws.shape == (n, 2, 4)
  for row in range(2):
    np.testing.assert_array_equal(draws[:, row, :3], np.broadcast_to(prompts[row], (n, 3)))
    p = _filtered(_softmax(_model_np(model, v, prompts[row:row + 1], None)[0, -1], 0.8),
                  top_k, top_p)
    counts = np.bincount(draws[:, row, 3], minlength=6)
    assert not counts[p == 0].any(), (row, counts, p)
    support = p > 0
    if support.sum() > 1:
      stat = (((counts - n * p) ** 2)[support] / (n * p[support])).sum()
      assert stat < scipy.stats.chi2.ppf(0.999, support.sum() - 1), (row, counts, p)


def test_sample_lm_batched_prompts_continue_each_row_as_alone():
  model, v = _lm(6)
  prompts = np.array([[1, 2, 3], [4, 0, 5], [2, 2, 2]], np.int32)
  out = np.asarray(models.sample_lm(model, v, prompts, 6, jax.random.key(3),
                                    temperature=1e-3))
  assert out.shape == (3, 9)
  for row in range(3):
    want = list(prompts[row])
    for _ in range(6):
      want.append(int(np.argmax(_model_np(model, v, np.array(want)[None], None)[0, -1])))
    np.testing.assert_array_equal(out[row], want)
  # top_k=1 is greedy at any temperature; a top_p near 0 keeps only the top token too.
  for kwargs in (dict(top_k=1), dict(top_p=1e-6)):
    np.testing.assert_array_equal(
        models.sample_lm(model, v, prompts, 6, jax.random.key(5), temperature=5.0, **kwargs),
        out)
  for kwargs, match in [(dict(top_k=0), "top_k must be an int >= 1, got 0"),
                        (dict(top_k=1.5), "top_k must be an int"),
                        (dict(top_p=0.0), r"top_p must be None or a number in \(0, 1\], got 0.0"),
                        (dict(top_p=1.5), "top_p must be"), (dict(top_p="a"), "top_p must be")]:
    with pytest.raises(ValueError, match=match):
      models.sample_lm(model, v, prompts, 2, jax.random.key(0), **kwargs)


def test_models_take_lists_and_numpy_arrays_like_the_layers():
  toks = [[1, 2, 3], [0, 3, 1]]
  lm = models.SequenceModel("lm", 4, hidden_sizes=(4,), vocab_size=4)
  v = lm.init(jax.random.key(0), toks)
  np.testing.assert_array_equal(lm.apply(v, toks, [[1, 1, 0], [1, 1, 1]]),
                                lm.apply(v, jnp.asarray(toks), jnp.array([[1, 1, 0], [1, 1, 1]],
                                                                         bool)))
  s2s = models.Seq2Seq(4, 4, hidden_sizes=(4,))
  sv = s2s.init(jax.random.key(0), toks, decoder_inputs=toks)
  np.testing.assert_array_equal(s2s.apply(sv, toks, decoder_inputs=toks),
                                s2s.apply(sv, jnp.asarray(toks), decoder_inputs=jnp.asarray(toks)))


@pytest.mark.parametrize("bidirectional,b,s,l", [(False, 3, 5, 6), (True, 3, 5, 6),
                                                 (False, 1, 1, 1), (True, 1, 4, 1)])
def test_step_by_step_decoding_gives_the_teacher_forced_logits(bidirectional, b, s, l):
  rs = np.random.RandomState(b + s + l)
  model = models.Seq2Seq(9, 7, hidden_sizes=(6, 5), embed_dim=4, bidirectional=bidirectional,
                         dropout=0.2, recurrent_dropout=0.1)
  src = rs.randint(1, 9, (b, s)).astype(np.int32)
  lengths = np.maximum(1, rs.randint(0, s + 1, b))
  mask = np.arange(s)[None] < lengths[:, None]
  v = _nontrivial(model.init(jax.random.key(0), src, mask, decoder_inputs=src[:, :1] % 7), 3)
  out = models.greedy_decode(model, v, src, mask, max_len=l, bos_id=1, eos_id=-1)
  assert out.shape == (b, l)
  prev = jnp.concatenate([jnp.ones((b, 1), jnp.int32), out[:, :-1]], 1)
  forced = jax.jit(lambda d: model.apply(v, src, mask, decoder_inputs=d))(prev)
  context, states = model.apply(v, src, mask, method=models.Seq2Seq.start)
  step = jax.jit(lambda c, h, y: model.apply(v, c, h, y, method=models.Seq2Seq.step))
  for t in range(l):
    logits, states = step(context, states, prev[:, t])
    np.testing.assert_allclose(logits, forced[:, t], atol=1e-6)
    np.testing.assert_array_equal(out[:, t], jnp.argmax(logits, -1))
  # Padded source tokens are never read.
  other = np.where(mask, src, (src + 3) % 9)
  np.testing.assert_array_equal(
      models.greedy_decode(model, v, other, mask, max_len=l, bos_id=1, eos_id=-1), out)


def test_greedy_decode_keeps_eos_then_pads_for_every_choice_of_eos():
  rs = np.random.RandomState(4)
  model = models.Seq2Seq(9, 7, hidden_sizes=(6,), embed_dim=4)
  src = rs.randint(1, 9, (8, 5)).astype(np.int32)
  v = _nontrivial(model.init(jax.random.key(3), src, decoder_inputs=src[:, :1] % 7), 4)
  free = np.asarray(models.greedy_decode(model, v, src, max_len=10, bos_id=0, eos_id=-1))
  stopped = 0
  for eos in np.argsort(np.bincount(free[:, :-1].ravel(), minlength=7))[-3:]:  # 3 commonest
    out = np.asarray(models.greedy_decode(model, v, src, max_len=10, bos_id=0, eos_id=eos,
                                          pad_id=6))
    for i in range(8):
      hits = np.flatnonzero(free[i] == eos)
      k = hits[0] if len(hits) else 10
      np.testing.assert_array_equal(out[i, :k + 1], free[i, :k + 1])
      assert (out[i, k + 1:] == 6).all()
      stopped += k < 9
  assert stopped  # some row stopped early


def test_vmap_jit_grad_over_sequence_model_params():
  x, mask = _inputs(False, True)
  model = models.SequenceModel("classification", 3, hidden_sizes=(6, 4), bidirectional=True,
                               dropout=0.0)
  members = [_nontrivial(model.init(jax.random.key(k), x, mask), k) for k in range(3)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *members)
  ens = jax.jit(jax.vmap(lambda v: model.apply(v, x, mask)))(stacked)
  for k in range(3):
    np.testing.assert_allclose(ens[k], _model_np(model, members[k], x, mask), atol=2e-5)
  # The gradient along random directions against central differences of the float64 model.
  v0 = members[0]
  leaves, tree = jax.tree.flatten(v0["params"])

  def loss(params):
    return jnp.sum(model.apply({"params": params, "batch_stats": v0["batch_stats"]}, x,
                               mask) ** 2)

  grads = jax.tree.leaves(jax.jit(jax.grad(loss))(v0["params"]))
  rs = np.random.RandomState(0)
  for _ in range(2):
    d = [rs.randn(*a.shape) for a in leaves]

    def np_loss(eps, d=d):
      params = jax.tree.unflatten(tree, [_f64(a) + eps * e for a, e in zip(leaves, d)])
      return np.sum(_model_np(model, {"params": params, "batch_stats": v0["batch_stats"]}, x,
                              mask) ** 2)

    fd = (np_loss(1e-6) - np_loss(-1e-6)) / 2e-6
    analytic = sum(float(np.sum(_f64(g) * e)) for g, e in zip(grads, d))
    np.testing.assert_allclose(analytic, fd, rtol=1e-4, atol=1e-4)


# ---- NNX against Linen, with the Linen variables copied across -------------------------

def _assign(module, tree):
  for name, value in tree.items():
    if isinstance(value, dict):
      _assign(getattr(module, name), value)
    else:
      getattr(module, name)[...] = value


def _seq(seed=0):
  rs = np.random.RandomState(seed)
  xs = jnp.asarray(rs.randn(3, 6, 4), jnp.float32)
  mask = jnp.arange(6)[None] < jnp.array([6, 3, 0])[:, None]
  resets = jnp.asarray(rs.rand(3, 6) < 0.3)
  return xs, mask, resets


@pytest.mark.parametrize("kw", [dict(), dict(variant="reset_after", reverse=True),
                                dict(return_sequences=False, return_state=True),
                                dict(layer_norm=True, reverse=True)])
def test_nnx_gru_equals_linen_gru(kw):
  xs, mask, resets = _seq()
  h0 = jax.random.normal(jax.random.key(4), (3, 5))
  lin = layers.GRU(5, bias_init=jax.nn.initializers.normal(0.3), **kw)
  v = lin.init(jax.random.key(1), xs, mask)
  ours = G.GRU(4, 5, rngs=nnx.Rngs(0), **kw)
  _assign(ours, v["params"])
  for args, extra in [((xs,), {}), ((xs, mask, h0), {}), ((xs, mask), dict(resets=resets))]:
    for a, b in zip(jax.tree.leaves(ours(*args, **extra)),
                    jax.tree.leaves(lin.apply(v, *args, **extra))):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kw", [dict(), dict(merge_mode="sum", return_sequences=False)])
def test_nnx_bidirectional_equals_linen(kw):
  xs, mask, resets = _seq(1)
  lin = layers.Bidirectional(5, gru_kwargs=dict(variant="reset_after"), **kw)
  v = lin.init(jax.random.key(1), xs, mask)
  ours = G.Bidirectional(4, 5, variant="reset_after", rngs=nnx.Rngs(0), **kw)
  _assign(ours, v["params"])
  np.testing.assert_array_equal(ours(xs, mask), lin.apply(v, xs, mask))
  np.testing.assert_array_equal(ours(xs, mask, resets=resets),
                                lin.apply(v, xs, mask, resets=resets))


@pytest.mark.parametrize("kw", [dict(), dict(bidirectional=True, merge_mode="sum")])
def test_nnx_stacked_gru_equals_linen_and_takes_lists(kw):
  xs, mask, _ = _seq(2)
  lin = layers.StackedGRU((5, 3), dropout_between=0.4, **kw)
  v = lin.init(jax.random.key(1), xs, mask)
  ours = G.StackedGRU(4, (5, 3), dropout_between=0.4, rngs=nnx.Rngs(0), **kw)
  _assign(ours, v["params"])
  want = lin.apply(v, xs, mask)
  np.testing.assert_array_equal(ours(xs, mask, deterministic=True), want)
  # Lists, as the Linen StackedGRU takes them (the NNX one read .ndim of a list).
  np.testing.assert_allclose(ours(xs.tolist(), np.asarray(mask).tolist(), deterministic=True),
                             want, atol=1e-6)
  with pytest.raises(ValueError, match=r"dropout_between must be in \[0, 1\), got 1.0"):
    G.StackedGRU(4, (5, 3), dropout_between=1.0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("shape,masked", [((3, 6, 4), True), ((3, 6, 4), False),
                                          ((5, 4), False)])
def test_nnx_batch_norm_equals_linen_in_train_and_eval(shape, masked):
  x = jax.random.normal(jax.random.key(0), shape) * 2 + 1
  mask = (jnp.arange(6)[None] < jnp.array([6, 3, 0])[:, None]) if masked else None
  lin = layers.SequenceBatchNorm(momentum=0.8)
  v = lin.init(jax.random.key(0), x, mask, use_running_average=False)
  v = {"params": jax.tree.map(lambda a: a + 0.5, v["params"]),
       "batch_stats": jax.tree.map(lambda a: a + 0.3, v["batch_stats"])}
  ours = G.SequenceBatchNorm(4, momentum=0.8)
  _assign(ours, v["params"])
  _assign(ours, v["batch_stats"])
  y, upd = lin.apply(v, x, mask, use_running_average=False, mutable=["batch_stats"])
  np.testing.assert_array_equal(ours(x, mask), y)
  np.testing.assert_array_equal(ours.mean[...], upd["batch_stats"]["mean"])
  np.testing.assert_array_equal(ours.var[...], upd["batch_stats"]["var"])
  ours.eval()
  np.testing.assert_array_equal(
      ours(x, mask), lin.apply({"params": v["params"], **upd}, x, mask, use_running_average=True))


class _Net(nnx.Module):

  def __init__(self, rngs):
    self.rnn = G.StackedGRU(4, (5, 5), dropout_between=0.3, recurrent_dropout=0.2, dropout=0.1,
                            bidirectional=True, rngs=rngs)
    self.bn = G.SequenceBatchNorm(10)
    self.drop = G.SequenceDropout(0.2, rngs=rngs)

  def __call__(self, xs, mask=None):
    return self.drop(self.bn(self.rnn(xs, mask), mask))


def test_nnx_split_merge_state_and_jit_round_trips():
  xs, mask, _ = _seq(3)
  net = _Net(nnx.Rngs(params=0, dropout=1))
  # nnx.merge reuses the Variables it is given, so each copy gets its own (nnx.clone).
  graphdef, state = nnx.split(nnx.clone(net))
  merged = nnx.merge(graphdef, state)
  other = _Net(nnx.Rngs(params=7, dropout=8))
  nnx.update(other, nnx.state(nnx.clone(net)))
  jitted = nnx.clone(net)
  want = net(xs, mask)  # training mode: dropout masks and batch statistics
  np.testing.assert_array_equal(merged(xs, mask), want)
  np.testing.assert_array_equal(other(xs, mask), want)
  np.testing.assert_allclose(nnx.jit(lambda m, x, k: m(x, k))(jitted, xs, mask), want,
                             atol=1e-6)
  for m in (merged, other, jitted):  # the running statistics moved alike
    np.testing.assert_allclose(m.bn.var[...], net.bn.var[...], atol=1e-6)
  want = net(xs, mask)  # and so did the streams: the next masks agree too
  for m in (merged, other, jitted):
    np.testing.assert_allclose(m(xs, mask), want, atol=1e-6)
  net.eval()
  h1 = reference.run(net.rnn.layer_0.forward.params, xs, mask=np.asarray(mask))[1]
  h1 = np.concatenate([h1, reference.run(net.rnn.layer_0.backward.params, xs,
                                         mask=np.asarray(mask), reverse=True)[1]], -1)
  np.testing.assert_allclose(nnx.jit(lambda m, x, k: m.rnn(x, k))(net, xs, mask), np.concatenate(
      [reference.run(net.rnn.layer_1.forward.params, h1, mask=np.asarray(mask))[1],
       reference.run(net.rnn.layer_1.backward.params, h1, mask=np.asarray(mask),
                     reverse=True)[1]], -1), atol=1e-5)


def test_nnx_vmapped_ensemble_members_are_the_reference_with_their_own_weights():
  xs, mask, _ = _seq(4)

  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return G.StackedGRU(4, (5, 3), dropout_between=0.3, recurrent_dropout=0.2, rngs=rngs)

  ens = create(nnx.Rngs(params=0, dropout=1))
  run = nnx.vmap(lambda m, x, k, det: m(x, k, deterministic=det), in_axes=(0, None, None, None))
  out = run(ens, xs, mask, True)
  for k in range(3):
    p0, p1 = (jax.tree.map(lambda a, k=k: a[k], getattr(ens, f"layer_{i}").params)
              for i in range(2))
    h = reference.run(p0, xs, mask=np.asarray(mask))[1]
    np.testing.assert_allclose(out[k], reference.run(p1, h, mask=np.asarray(mask))[1],
                               atol=1e-5)
  drawn = run(ens, xs, mask, False)  # each member draws its own masks
  assert float(jnp.abs(drawn[0] - drawn[1]).max()) > 1e-3
