"""`Seq2Seq(attention="additive")` (Bahdanau et al. 2015) against a float64 NumPy
composition of the reference GRU and the attention equations, written out here."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gru_jax
from gru_jax import cell, data, layers, models, nnx_layers
from gru_jax.cell import GRUParams
from tests import reference


def _dense(p, x):
  out = x @ np.asarray(p["kernel"], np.float64)
  return out + np.asarray(p["bias"], np.float64) if "bias" in p else out


def _reference(p, src, mask, dec, *, layers, bidirectional, variant, zoneout=0.0):
  """Logits [B,L,V] and attention weights [B,L,S], one example and one step at a time;
  ``zoneout``: evaluation's h = k·h_{t−1} + (1−k)·GRU(h_{t−1}, x) in every GRU."""
  from tests.test_zoneout import _ref as zoneout_run
  m = np.asarray(mask, bool)
  x = np.asarray(p["src_embed"]["embedding"], np.float64)[np.asarray(src)]
  for i in range(layers):
    dirs = [GRUParams(**p[f"encoder_{i}_{k}"]) for k in range(2 if bidirectional else 1)]
    runs = [zoneout_run(q, x, zoneout, mask=m, reverse=k == 1, variant=variant)
            for k, q in enumerate(dirs)]
    x = np.concatenate([r[1] for r in runs], -1)
    summary = np.concatenate([r[0] for r in runs], -1)
  memory, keys = x, _dense(p["attention_keys"], x)
  a = p["attention_decoder"]
  additive = "query" in a
  if additive:
    w_q = np.asarray(a["query"]["kernel"], np.float64)
    v = np.asarray(a["energy"]["kernel"], np.float64)[:, 0]
  emb = np.asarray(p["tgt_embed"]["embedding"], np.float64)[np.asarray(dec)]
  b, length = dec.shape
  logits, alphas = [], np.zeros((b, length, src.shape[1]))
  for row in range(b):
    hs = [np.tanh(_dense(p[f"bridge_{i}"], summary[row])) for i in range(layers)]
    out = []
    for t in range(length):
      if additive:
        energy = np.tanh(keys[row] + hs[-1] @ w_q) @ v  # [S]
      else:  # multiplicative: e_j = s·(h_j W_k)
        energy = keys[row] @ hs[-1]
      valid = m[row]
      alpha = np.zeros_like(energy)
      if valid.any():
        ex = np.exp(energy[valid] - energy[valid].max())
        alpha[valid] = ex / ex.sum()
      alphas[row, t] = alpha
      context = alpha @ memory[row]
      h_in = np.concatenate([emb[row, t], context])
      for i in range(layers):
        h_cell = reference.step(GRUParams(**a[f"decoder_{i}"]), hs[i], h_in, variant)[0]
        hs[i] = zoneout * hs[i] + (1 - zoneout) * h_cell
        h_in = hs[i]
      out.append(_dense(p["head"], np.concatenate([hs[-1], emb[row, t], context])))
    logits.append(out)
  return np.asarray(logits), alphas


def _setup(seed=0, b=3, s=6, l=4, v=11, lengths=(6, 3, 1), attention="additive", **kw):
  rs = np.random.RandomState(seed)
  src = jnp.asarray(rs.randint(1, v, (b, s)), jnp.int32)
  mask = jnp.arange(s)[None] < jnp.array(lengths)[:, None]
  dec = jnp.asarray(rs.randint(1, v, (b, l)), jnp.int32)
  model = models.Seq2Seq(v, v, embed_dim=4, attention=attention, **kw)
  var = model.init(jax.random.key(seed), src, mask, decoder_inputs=dec)
  return model, var, src, mask, dec


@pytest.mark.parametrize("attention,variant,bidirectional,sizes,attention_size,zoneout", [
    ("additive", "seed", False, (7,), None, 0.0),
    ("additive", "reset_after", True, (6, 5), 3, 0.0),
    ("additive", "seed", True, (5, 4), None, 0.0),
    ("multiplicative", "seed", False, (7,), None, 0.0),
    ("multiplicative", "reset_after", True, (6, 5), 5, 0.0),
    ("additive", "reset_after", True, (6, 5), None, 0.3)])
def test_logits_and_weights_match_a_float64_reference(attention, variant, bidirectional, sizes,
                                                      attention_size, zoneout):
  model, var, src, mask, dec = _setup(hidden_sizes=sizes, bidirectional=bidirectional,
                                      variant=variant, attention_size=attention_size,
                                      attention=attention, zoneout=zoneout)
  logits, state = model.apply(var, src, mask, decoder_inputs=dec, mutable=["intermediates"])
  want, want_alpha = _reference(var["params"], src, mask, dec, layers=len(sizes),
                                bidirectional=bidirectional, variant=variant, zoneout=zoneout)
  np.testing.assert_allclose(logits, want, atol=3e-5)
  alpha = models.attention_weights(model, var, src, mask, decoder_inputs=dec)
  np.testing.assert_allclose(alpha, want_alpha, atol=1e-6)
  np.testing.assert_array_equal(alpha, state["intermediates"]["attention"][0])
  assert alpha.shape == (3, 4, 6)
  assert var["params"]["attention_keys"]["kernel"].shape[-1] == (attention_size or sizes[-1])
  assert ("bias" in var["params"]["attention_keys"]) == (attention == "additive")
  # Padding is never read: 0 weight, rows sum to 1, other pad tokens change nothing.
  assert (np.asarray(alpha)[~np.broadcast_to(np.asarray(mask)[:, None], alpha.shape)] == 0).all()
  np.testing.assert_allclose(np.asarray(alpha).sum(-1), 1.0, atol=1e-6)
  other = jnp.where(mask, src, (src + 3) % 11)
  np.testing.assert_array_equal(model.apply(var, other, mask, decoder_inputs=dec), logits)


def test_a_source_with_no_valid_step_reads_a_zero_context():
  model, var, src, mask, dec = _setup(hidden_sizes=(5,), lengths=(6, 0, 2))
  logits = model.apply(var, src, mask, decoder_inputs=dec)
  want, want_alpha = _reference(var["params"], src, mask, dec, layers=1, bidirectional=False,
                                variant="seed")
  assert np.isfinite(np.asarray(logits)).all()
  np.testing.assert_allclose(logits, want, atol=3e-5)
  alpha = models.attention_weights(model, var, src, mask, decoder_inputs=dec)
  assert (np.asarray(alpha[1]) == 0).all() and (want_alpha[1] == 0).all()


@pytest.mark.parametrize("attention", ["additive", "multiplicative"])
def test_gradients_match_central_differences_in_float64(attention):
  with jax.enable_x64(True):
    model, var, src, mask, dec = _setup(hidden_sizes=(4, 3), bidirectional=True, l=3,
                                        attention=attention)
    var = jax.tree.map(lambda a: a.astype(jnp.float64), var)
    w = jax.random.normal(jax.random.key(3), (3, 3, 11), jnp.float64)
    loss = jax.jit(
        lambda p: jnp.sum(w * model.apply({"params": p}, src, mask, decoder_inputs=dec)))
    grads = jax.jit(jax.grad(loss))(var["params"])
    rs = np.random.RandomState(0)
    paths = [("attention_keys", "kernel"), ("attention_decoder", "decoder_0", "w_x"),
             ("encoder_0_1", "w_h")]
    if attention == "additive":
      paths += [("attention_decoder", "query", "kernel"),
                ("attention_decoder", "energy", "kernel"), ("attention_keys", "bias")]
    for path in paths:
      leaf = var["params"]
      for k in path:
        leaf = leaf[k]
      g = grads
      for k in path:
        g = g[k]
      for _ in range(3):
        idx = tuple(rs.randint(n) for n in leaf.shape)
        def shifted(eps):
          p = jax.tree.map(lambda a: a, var["params"])
          node = p
          for k in path[:-1]:
            node = node[k]
          node[path[-1]] = leaf.at[idx].add(eps)
          return float(loss(p))
        fd = (shifted(1e-6) - shifted(-1e-6)) / 2e-6
        np.testing.assert_allclose(g[idx], fd, rtol=1e-6, atol=1e-8, err_msg=str((path, idx)))


def test_dropout_in_training_is_per_example_and_off_in_evaluation():
  model, var, src, mask, dec = _setup(hidden_sizes=(6, 5), dropout=0.3, recurrent_dropout=0.4)
  ids = jnp.array([7, 8, 9])
  run = lambda s, m, d, i, key=1: model.apply(var, s, m, decoder_inputs=d, train=True,
                                              example_ids=i,
                                              rngs={"dropout": jax.random.key(key)})
  batch = run(src, mask, dec, ids)
  # Row i's draws depend only on (key, example id): alone it gives the same logits.
  np.testing.assert_allclose(run(src[1:2], mask[1:2], dec[1:2], ids[1:2])[0], batch[1],
                             atol=1e-6)
  assert not np.allclose(run(src, mask, dec, ids, key=2), batch)
  evaluated = model.apply(var, src, mask, decoder_inputs=dec)
  assert not np.allclose(batch, evaluated)
  # At rate 0 training computes the evaluation's function.
  plain = models.Seq2Seq(11, 11, embed_dim=4, attention="additive", hidden_sizes=(6, 5))
  np.testing.assert_allclose(
      plain.apply(var, src, mask, decoder_inputs=dec, train=True, example_ids=ids,
                  rngs={"dropout": jax.random.key(1)}), evaluated, atol=1e-6)
  # The recurrent dropout alone acts too (the masks' effect on one step is checked in
  # test_cell_step_recurrent_dropout_mask_feeds_only_the_matmuls).
  rec_only = models.Seq2Seq(11, 11, embed_dim=4, attention="additive", hidden_sizes=(6, 5),
                            recurrent_dropout=0.4)
  assert not np.allclose(rec_only.apply(var, src, mask, decoder_inputs=dec, train=True,
                                        rngs={"dropout": jax.random.key(1)}), evaluated)


@pytest.mark.parametrize("attention", models.ATTENTIONS)
def test_seq2seq_zoneout_draws_per_example_in_training_and_averages_in_evaluation(attention):
  """Seq2Seq(zoneout=r), with and without attention: in training each row's draws
  depend only on (key, example id) and change the logits; in evaluation every GRU
  (encoder and decoder) takes the scalar r, as the float64 reference does for attention
  (test_logits_and_weights_match_a_float64_reference) and `gru_jax.gru` for the rest."""
  model, var, src, mask, dec = _setup(hidden_sizes=(6, 5), zoneout=0.4, attention=attention)
  ids = jnp.array([4, 5, 6])
  run = lambda s, m, d, i, key=1: model.apply(var, s, m, decoder_inputs=d, train=True,
                                              example_ids=i,
                                              rngs={"dropout": jax.random.key(key)})
  batch = run(src, mask, dec, ids)
  np.testing.assert_allclose(run(src[2:], mask[2:], dec[2:], ids[2:])[0], batch[2], atol=1e-6)
  assert not np.allclose(run(src, mask, dec, ids, key=2), batch)
  evaluated = model.apply(var, src, mask, decoder_inputs=dec)
  plain = models.Seq2Seq(11, 11, embed_dim=4, attention=attention, hidden_sizes=(6, 5))
  assert not np.allclose(evaluated, plain.apply(var, src, mask, decoder_inputs=dec), atol=1e-3)
  # Greedy decoding steps in evaluation mode: its first step's logits are the teacher-forced
  # model's at position 0 with zoneout's expectation.
  context, states = model.apply(var, src, mask, method=models.Seq2Seq.start)
  first, _ = model.apply(var, context, states, dec[:, 0], method=models.Seq2Seq.step)
  np.testing.assert_allclose(first, evaluated[:, 0], atol=1e-5)


def test_cell_step_recurrent_dropout_mask_feeds_only_the_matmuls():
  params = cell.init(jax.random.key(0), 3, 4)
  h = jax.random.normal(jax.random.key(1), (2, 4))
  x = jax.random.normal(jax.random.key(2), (2, 3))
  m = jnp.array([[2.0, 0.0, 2.0, 0.0], [0.0, 2.0, 2.0, 2.0]])
  for variant in cell.VARIANTS:
    got = cell.step(params, h, x, variant=variant, recurrent_dropout_mask=m)
    want = [reference.step(params, hb, xb, variant, rec_mask=mb)[0]
            for hb, xb, mb in zip(*(np.asarray(a, np.float64) for a in (h, x, m)))]
    np.testing.assert_allclose(got, want, atol=1e-5)
    # The whole-sequence function's recurrent dropout, one step long.
    one = gru_jax.gru(params, x[:, None], h, variant=variant, recurrent_dropout_mask=m,
                      backend="scan")[0]
    np.testing.assert_allclose(got, one, atol=1e-5)
    np.testing.assert_array_equal(
        cell.step(params, h, x, variant=variant, recurrent_dropout_mask=jnp.ones(4)),
        cell.step(params, h, x, variant=variant))
    # The Linen and NNX cells pass it through.
    linen = layers.GRUCell(4, variant).apply({"params": params._asdict()}, h, x,
                                             recurrent_dropout_mask=m)[0]
    nnx_cell = nnx_layers.GRUCell.from_params(params, variant=variant)
    np.testing.assert_allclose(linen, got, atol=1e-6)
    np.testing.assert_allclose(nnx_cell(h, x, recurrent_dropout_mask=m)[0], got, atol=1e-6)
  with pytest.raises(ValueError, match=r"recurrent_dropout_mask \(3,\) must broadcast to h "
                                       r"\(2, 4\)"):
    cell.step(params, h, x, recurrent_dropout_mask=jnp.ones(3))


def _eqns(jaxpr):
  """Every equation of ``jaxpr``, those of nested jaxprs (remat, pjit) included."""
  for e in jaxpr.eqns:
    yield e
    for sub in jax.core.jaxprs_in_params(e.params):
      yield from _eqns(sub)


def _decode_problem(kind, seed=0, b=3, s=5, length=4, e=3, c=6, sizes=(5, 4), a=3):
  ks = iter(jax.random.split(jax.random.key(seed), 16))
  normal = lambda shape, scale=1.0: scale * jax.random.normal(next(ks), shape)
  cells, width = [], e + c
  for size in sizes:
    cells.append(cell.init(next(ks), width, size, bias_init=jax.nn.initializers.normal(0.5)))
    width = size
  a = sizes[-1] if kind == "multiplicative" else a
  kw = dict(w_query=normal((sizes[-1], a)), v=normal((a,))) if kind == "additive" else {}
  mask = jnp.arange(s)[None] < jnp.array([5, 2, 0])[:, None]
  drops = tuple(2.0 * jax.random.bernoulli(next(ks), 0.5, (b, length, h)) for h in sizes)
  rec = tuple(2.0 * jax.random.bernoulli(next(ks), 0.5, (b, h)) for h in sizes)
  states = tuple(normal((b, h), 0.5) for h in sizes)
  return (cells, states, normal((b, length, e)), normal((b, s, c)), normal((b, s, a)), mask,
          dict(kw, output_drops=drops, recurrent_masks=rec))


def _decode_reference(kind, variant, cells, states, emb, memory, keys, mask, w_query=None,
                      v=None, output_drops=None, recurrent_masks=None, zoneout=None):
  """float64, one example and one step at a time: (states, outputs, contexts, α);
  ``zoneout`` per layer: k [B,L,H_i] or a scalar, h = k·h_{t−1} + (1−k)·GRU(h_{t−1}, x)."""
  f64 = lambda a: np.asarray(a, np.float64)
  emb, memory, keys, mask = f64(emb), f64(memory), f64(keys), np.asarray(mask)
  b, length = emb.shape[:2]
  outs = np.zeros((b, length, cells[-1].hidden_size))
  ctxs = np.zeros((b, length, memory.shape[-1]))
  alphas = np.zeros((b, length, memory.shape[1]))
  final = []
  for row in range(b):
    hs = [f64(h[row]) for h in states]
    for t in range(length):
      if kind == "additive":
        energy = np.tanh(keys[row] + hs[-1] @ f64(w_query)) @ f64(v)
      else:
        energy = keys[row] @ hs[-1]
      alpha = np.zeros_like(energy)
      if mask[row].any():
        ex = np.exp(energy[mask[row]] - energy[mask[row]].max())
        alpha[mask[row]] = ex / ex.sum()
      context = alpha @ memory[row]
      x = np.concatenate([emb[row, t], context])
      for i, p in enumerate(cells):
        h_cell = reference.step(p, hs[i], x, variant, f64(recurrent_masks[i][row]))[0]
        k = 0.0 if zoneout is None else f64(zoneout[i])
        k = k[row, t] if np.ndim(k) else k
        hs[i] = k * hs[i] + (1 - k) * h_cell
        x = hs[i] * f64(output_drops[i][row, t])
      outs[row, t], ctxs[row, t], alphas[row, t] = x, context, alpha
    final.append(hs)
  return [np.stack([f[i] for f in final]) for i in range(len(cells))], outs, ctxs, alphas


@pytest.mark.parametrize("kind,variant", [("additive", "seed"), ("multiplicative", "reset_after")])
def test_pure_decode_matches_float64_in_float32_and_bfloat16(kind, variant):
  """`gru_jax.attention.decode` (two layers, output and recurrent dropout, a row with no
  valid source step) against the float64 loop; with compute_dtype=bfloat16 its matmuls
  take bf16 operands (the jaxpr's dots inside the scan), within bf16's rounding."""
  cells, states, emb, memory, keys, mask, kw = _decode_problem(kind)
  want = _decode_reference(kind, variant, cells, states, emb, memory, keys, mask, **kw)
  run = lambda dtype, remat=True: gru_jax.attention.decode(
      cells, states, emb, memory, keys, mask, kind=kind, variant=variant, compute_dtype=dtype,
      remat=remat, **kw)
  got = run(None)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=2e-5)
  assert (np.asarray(got[3][2]) == 0).all()  # no valid step: no weight, zero context
  low = run(jnp.bfloat16)
  for g, w in zip(jax.tree.leaves(low), jax.tree.leaves(want)):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, w, atol=0.1)
  assert not np.allclose(low[1], got[1], atol=1e-6)
  # Every matmul inside the scan takes bf16 operands but the context's α·memory: the
  # scores (2 additive, 1 multiplicative), two input projections, the recurrent ones.
  loop = next(e for e in jax.make_jaxpr(lambda: run(jnp.bfloat16))().eqns
              if e.primitive.name == "scan")
  dots = [[str(v.aval.dtype) for v in e.invars] for e in _eqns(loop.params["jaxpr"].jaxpr)
          if e.primitive.name == "dot_general"]
  per_step = {"additive": 2, "multiplicative": 1}[kind] + 2 + 2 * (2 if variant == "seed" else 1)
  assert sorted(map(tuple, dots)) == sorted([("bfloat16",) * 2] * per_step
                                            + [("float32",) * 2]), dots
  # Without the per-step remat: the same values and gradients.
  loss = lambda remat: lambda cs: jnp.sum(jnp.sin(gru_jax.attention.decode(
      cs, states, emb, memory, keys, mask, kind=kind, variant=variant, remat=remat, **kw)[1]))
  np.testing.assert_array_equal(run(None, remat=False)[1], got[1])
  import chex
  chex.assert_trees_all_close(jax.grad(loss(True))(cells), jax.grad(loss(False))(cells),
                              atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,variant", [("additive", "reset_after"), ("multiplicative", "seed")])
def test_pure_decode_zoneout_matches_float64_and_known_answers(kind, variant):
  """`decode` with zoneout (layer 0 per-step Bernoulli weights, layer 1 one scalar) beside
  both dropouts against the float64 loop, its gradients in k against central differences
  of it; k = 1 everywhere keeps every state at its start, k = 0 is the plain decoder."""
  cells, states, emb, memory, keys, mask, kw = _decode_problem(kind, seed=3)
  k0 = jax.random.bernoulli(jax.random.key(9), 0.4, (3, 4, 5)).astype(jnp.float32)
  zo = (k0, jnp.float32(0.3))
  run = lambda z: gru_jax.attention.decode(cells, states, emb, memory, keys, mask, kind=kind,
                                           variant=variant, zoneout=z, **kw)
  want = _decode_reference(kind, variant, cells, states, emb, memory, keys, mask, **kw,
                           zoneout=zo)
  for g, w in zip(jax.tree.leaves(run(zo)), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=2e-5)
  frozen = run((1.0, 1.0))[0]
  for h, h0 in zip(frozen, states):
    np.testing.assert_allclose(h, h0, atol=1e-6)
  for a, b in zip(jax.tree.leaves(run((0.0, None))), jax.tree.leaves(run(None))):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # d/dk of a scalar loss, per step (layer 0) and the scalar (layer 1)
  loss = lambda z0, z1: jnp.sum(jnp.sin(run((z0, z1))[1]))
  g0, g1 = jax.grad(loss, argnums=(0, 1))(k0, jnp.float32(0.3))
  ref_loss = lambda z0, z1: np.sum(np.sin(_decode_reference(
      kind, variant, cells, states, emb, memory, keys, mask, **kw, zoneout=(z0, z1))[1]))
  eps = 1e-6
  k64 = np.asarray(k0, np.float64)
  for idx in [(0, 1, 2), (1, 3, 0), (2, 0, 4)]:
    plus, minus = k64.copy(), k64.copy()
    plus[idx] += eps
    minus[idx] -= eps
    np.testing.assert_allclose(g0[idx], (ref_loss(plus, 0.3) - ref_loss(minus, 0.3)) / (2 * eps),
                               rtol=1e-3, atol=1e-5, err_msg=str(idx))
  np.testing.assert_allclose(
      g1, (ref_loss(k64, 0.3 + eps) - ref_loss(k64, 0.3 - eps)) / (2 * eps), rtol=1e-3)


def test_pure_decode_names_the_bad_argument_and_its_shape():
  cells, states, emb, memory, keys, mask, kw = _decode_problem("additive")
  run = lambda **over: gru_jax.attention.decode(
      **{**dict(cells=cells, states=states, embedded=emb, memory=memory, keys=keys, mask=mask,
                kind="additive", **kw), **over})
  with pytest.raises(ValueError, match=r"cells\[0\].w_x must have E\+C=3\+6 rows, got shape "
                                       r"\(8, 15\)"):
    run(cells=[cells[0]._replace(w_x=cells[0].w_x[:8])] + cells[1:])
  with pytest.raises(ValueError, match=r"keys must be \[B,S,A\]=\(3, 5, A\) to match memory "
                                       r"\(3, 5, 6\), got \(3, 4, 3\)"):
    run(keys=keys[:, :4])
  with pytest.raises(ValueError, match=r"mask must be \[B,S\]=\(3, 5\), got \(3, 4\)"):
    run(mask=mask[:, :4])
  with pytest.raises(ValueError, match=r"states\[1\] must be \[B,H\]=\(3, 4\), got \(3, 5\)"):
    run(states=(states[0], states[0]))
  with pytest.raises(ValueError, match=r"additive attention needs w_query \[H,A\]=\(4, 3\)"):
    run(w_query=None)
  with pytest.raises(ValueError, match=r"output_drops\[0\] must have shape \(3, 4, 5\)"):
    run(output_drops=(kw["output_drops"][0][:, :2], None))
  with pytest.raises(ValueError, match="kind must be one of"):
    run(kind="dot")
  with pytest.raises(ValueError, match=r"zoneout\[1\] must be a scalar or have shape "
                                       r"\[B,L,H_1\]=\(3, 4, 4\), got \(3, 4\)"):
    run(zoneout=(None, jnp.zeros((3, 4))))
  with pytest.raises(ValueError, match=r"zoneout must be one per layer \(2\), got 1"):
    run(zoneout=(0.1,))
  full = jnp.ones_like(mask)  # mask=None: every source step is valid
  for a, b in zip(jax.tree.leaves(run(mask=None)), jax.tree.leaves(run(mask=full))):
    np.testing.assert_array_equal(a, b)


def test_decoder_params_keep_their_names_shapes_and_init():
  """The decoder's params are the tree the first (nn.scan) version made, so its
  workdirs restore: names and shapes written out."""
  model, var, *_ = _setup(hidden_sizes=(6, 5), bidirectional=True, attention_size=3)
  got = jax.tree.map(lambda a: a.shape, var["params"]["attention_decoder"])
  cells = lambda d, h: {"w_x": (d, 3 * h), "w_h": (h, 3 * h), "b_x": (3 * h,), "b_h": (3 * h,)}
  assert got == {"query": {"kernel": (5, 3)}, "energy": {"kernel": (3, 1)},
                 "decoder_0": cells(4 + 10, 6), "decoder_1": cells(6, 5)}


@pytest.mark.parametrize("attention", ["additive", "multiplicative"])
def test_seq2seq_compute_dtype_reaches_the_attention_decoder(attention, monkeypatch):
  """Seq2Seq(compute_dtype=bfloat16): the decoder is asked for bf16 compute and the
  logits stay within bf16 rounding of the float64 reference."""
  seen = []
  real = gru_jax.attention.decode
  monkeypatch.setattr(gru_jax.attention, "decode",
                      lambda *a, **k: seen.append(k["compute_dtype"]) or real(*a, **k))
  model, var, src, mask, dec = _setup(hidden_sizes=(6,), attention=attention,
                                      compute_dtype=jnp.bfloat16)
  logits = model.apply(var, src, mask, decoder_inputs=dec)
  want, _ = _reference(var["params"], src, mask, dec, layers=1, bidirectional=False,
                       variant="seed")
  assert logits.dtype == jnp.float32 and seen[-1] == jnp.bfloat16
  np.testing.assert_allclose(logits, want, atol=0.05)


@pytest.mark.parametrize("kind,variant", [("additive", "reset_after"), ("multiplicative", "seed")])
def test_nnx_attention_decoder_matches_float64_and_loads_linen_params(kind, variant):
  """nnx_layers.AttentionDecoder against the float64 loop (its own random params), its
  dropout (per example with example_ids, off in eval), and `from_params` of a Linen
  Seq2Seq's attention_decoder: every param equal to Linen's."""
  from flax import nnx
  _, states, emb, memory, keys, mask, _ = _decode_problem(kind)
  dec = nnx_layers.AttentionDecoder(3, 6, (5, 4), kind=kind, variant=variant,
                                    attention_size=3 if kind == "additive" else None,
                                    rngs=nnx.Rngs(0))
  got = dec(states, emb, memory, keys, mask)
  cells = [getattr(dec, f"decoder_{i}").params for i in range(2)]
  extra = dict(w_query=dec.query.kernel[...], v=dec.energy.kernel[...][:, 0]) \
      if kind == "additive" else {}
  ones = tuple(jnp.ones((3, 4, h)) for h in (5, 4)), tuple(jnp.ones((3, h)) for h in (5, 4))
  want = _decode_reference(kind, variant, cells, states, emb, memory, keys, mask, **extra,
                           output_drops=ones[0], recurrent_masks=ones[1])
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=2e-5)

  drop = nnx_layers.AttentionDecoder(3, 6, (5, 4), kind=kind, variant=variant, dropout=0.5,
                                     recurrent_dropout=0.3,
                                     attention_size=3 if kind == "additive" else None,
                                     rngs=nnx.Rngs(0, dropout=1))
  ids = jnp.array([7, 8, 9])
  trained = drop(states, emb, memory, keys, mask, example_ids=ids)[1]
  assert not np.allclose(trained, got[1])
  again = drop(states, emb, memory, keys, mask, example_ids=ids, rngs=nnx.Rngs(dropout=5))[1]
  part = drop(jax.tree.map(lambda h: h[1:], states), emb[1:], memory[1:], keys[1:], mask[1:],
              example_ids=ids[1:], rngs=nnx.Rngs(dropout=5))[1]
  np.testing.assert_allclose(part, again[1:], atol=1e-6)
  drop.eval()
  np.testing.assert_allclose(drop(states, emb, memory, keys, mask)[1], got[1], atol=1e-6)

  # Zoneout: the rate itself in eval (against the float64 loop), per-example draws in training.
  zo = nnx_layers.AttentionDecoder(3, 6, (5, 4), kind=kind, variant=variant, zoneout=0.3,
                                   attention_size=3 if kind == "additive" else None,
                                   rngs=nnx.Rngs(0, dropout=2))
  want = _decode_reference(kind, variant, cells, states, emb, memory, keys, mask, **extra,
                           output_drops=ones[0], recurrent_masks=ones[1], zoneout=(0.3, 0.3))
  zo.eval()
  for g, w in zip(jax.tree.leaves(zo(states, emb, memory, keys, mask)), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=2e-5)
  zo.train()
  full = zo(states, emb, memory, keys, mask, example_ids=ids, rngs=nnx.Rngs(dropout=4))[1]
  part = zo(jax.tree.map(lambda h: h[:1], states), emb[:1], memory[:1], keys[:1], mask[:1],
            example_ids=ids[:1], rngs=nnx.Rngs(dropout=4))[1]
  np.testing.assert_allclose(part, full[:1], atol=1e-6)
  assert not np.allclose(full, want[1], atol=1e-3)

  model, var, *_ = _setup(hidden_sizes=(6, 5), bidirectional=True, attention=kind,
                          variant=variant, attention_size=3 if kind == "additive" else None)
  linen = var["params"]["attention_decoder"]
  loaded = nnx_layers.AttentionDecoder.from_params(linen, 4, variant=variant)
  assert loaded.hidden_sizes == (6, 5) and loaded.kind == kind
  for i in range(2):
    for name, value in getattr(loaded, f"decoder_{i}").params._asdict().items():
      np.testing.assert_array_equal(value, linen[f"decoder_{i}"][name])
  if kind == "additive":
    np.testing.assert_array_equal(loaded.query.kernel[...], linen["query"]["kernel"])
    np.testing.assert_array_equal(loaded.energy.kernel[...], linen["energy"]["kernel"])


def test_nnx_attention_decoder_refusals():
  from flax import nnx
  with pytest.raises(ValueError, match="kind must be 'additive' or 'multiplicative'"):
    nnx_layers.AttentionDecoder(3, 6, (5,), kind="dot", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="attention_size must be None or 5, got 3"):
    nnx_layers.AttentionDecoder(3, 6, (5,), kind="multiplicative", attention_size=3,
                                rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="dropout must be in"):
    nnx_layers.AttentionDecoder(3, 6, (5,), dropout=1.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no decoder_0"):
    nnx_layers.AttentionDecoder.from_params({"query": {}}, 3)
  cells = nnx_layers.AttentionDecoder(3, 6, (5,), rngs=nnx.Rngs(0)).decoder_0.params
  tree = {"decoder_0": cells._asdict(),
          "query": {"kernel": jnp.zeros((5, 4))}, "energy": {"kernel": jnp.zeros((5, 1))}}
  with pytest.raises(ValueError, match=r"energy.kernel has shape \(5, 1\), expected \(4, 1\)"):
    nnx_layers.AttentionDecoder.from_params(tree, 3)


def test_bad_attention_settings_are_refused():
  src = jnp.ones((2, 3), jnp.int32)
  with pytest.raises(ValueError, match=r"attention must be one of \('none', 'additive', "
                                       r"'multiplicative'\), got 'dot'"):
    models.Seq2Seq(5, 5, hidden_sizes=(4,), attention="dot").init(
        jax.random.key(0), src, decoder_inputs=src)
  with pytest.raises(ValueError, match=r"attention_size must be an int >= 1, got 0"):
    models.Seq2Seq(5, 5, hidden_sizes=(4,), attention="additive", attention_size=0).init(
        jax.random.key(0), src, decoder_inputs=src)
  with pytest.raises(ValueError, match=r"multiplicative attention scores against the top "
                                       r"decoder state, so attention_size must be None or 4, "
                                       r"got 3"):
    models.Seq2Seq(5, 5, hidden_sizes=(4,), attention="multiplicative", attention_size=3).init(
        jax.random.key(0), src, decoder_inputs=src)
  plain = models.Seq2Seq(5, 5, hidden_sizes=(4,))
  v = plain.init(jax.random.key(0), src, decoder_inputs=src)
  with pytest.raises(ValueError, match="attention_weights needs a Seq2Seq with attention"):
    models.attention_weights(plain, v, src, decoder_inputs=src)


def _words(steps, attention="additive", **data):
  from tests.test_configs import load_config
  c = load_config("number_words")
  c.num_train_steps = c.eval_every_steps = c.checkpoint_every_steps = steps
  c.log_every_steps = 50
  c.model.hidden_sizes = (16,)
  c.model.attention = attention
  c.dataset.update(data or dict(num_train=256, num_validation=32, num_test=32))
  return c


def test_training_resumes_translates_and_shows_the_alignment(tmp_path):
  import json
  import os
  from experiments import sample
  from gru_jax import train
  wd = str(tmp_path / "wd")
  c = _words(2)
  c.model.attention_size = 5
  train.train_and_evaluate(c, wd)
  _, model, variables, info = train.restore_for_inference(wd)
  assert (model.attention, model.attention_size) == ("additive", 5)
  out = sample.translate(model, variables, info, "30015", show_attention=True).split("\n")
  words = out[0].split()
  # A header of source digits, then one row per output word and <eos> (if it came):
  # percentages of the row's weights, which sum to 100 up to rounding.
  assert out[1].split() == list("30015")
  rows = [l.split() for l in out[2:]]
  assert [r[0] for r in rows[:len(words)]] == words and len(rows) in (len(words),
                                                                       len(words) + 1)
  for r in rows:
    assert len(r) == 6 and abs(sum(int(p) for p in r[1:]) - 100) <= 3, out
  assert sample.translate(model, variables, info, "30015") == out[0]
  # Per-example exact matches: their mean is decode_accuracy, lengths are the sources'.
  exact, lengths = train.decode_exact(wd, [1], split="validation")
  a, _ = data.load("number_words", "validation", **dict(num_train=256, num_validation=32,
                                                        num_test=32))
  np.testing.assert_array_equal(lengths, a["mask"].sum(1))
  assert exact[1].shape == (32,)
  assert train.decode_accuracy(wd, [1], split="validation")[1] == exact[1].mean()
  # A workdir written before the attention keys existed resumes as attention "none".
  old = str(tmp_path / "old")
  train.train_and_evaluate(_words(2, attention="none"), old)
  for name in ("config.json", "config_history.jsonl"):
    path = os.path.join(old, name)
    with open(path) as f:
      recs = [json.loads(l) for l in f] if name.endswith("l") else [json.load(f)]
    for r in recs:
      model_cfg = (r.get("config") or r)["model"]
      del model_cfg["attention"], model_cfg["attention_size"]
    with open(path, "w") as f:
      f.write("\n".join(json.dumps(r) for r in recs) + "\n")
  train.train_and_evaluate(_words(4, attention="none"), old)
  assert train.restore_for_inference(old)[1].attention == "none"
  with pytest.raises(train.TrainingError, match="config.model.attention was 'none', now "
                                                "'additive'"):
    train.train_and_evaluate(_words(6), old)
  with pytest.raises(ValueError, match="needs a model trained with attention"):
    _, plain, pv, _ = train.restore_for_inference(old)
    sample.translate(plain, pv, info, "12", show_attention=True)


def test_accuracy_by_length_known_answers():
  from gru_jax import train
  exact = np.array([1, 0, 1, 1, 0, 0, 1], bool)
  lengths = np.array([3, 3, 5, 9, 9, 9, 12])
  assert train.accuracy_by_length(exact, lengths, [3, 6, 10, 20]) == {
      (3, 6): 2 / 3, (6, 10): 1 / 3, (10, 20): 1.0}
  assert train.accuracy_by_length(exact, lengths, ["0", "3"]) == {}  # empty bins left out
  for bad in ([5], [5, 3], ["a", "b"], [3, 3]):
    with pytest.raises(ValueError, match="length bin edges must be at least two increasing"):
      train.accuracy_by_length(exact, lengths, bad)


def test_attention_on_a_dataset_that_is_not_seq2seq_is_refused(tmp_path):
  from gru_jax import train
  from tests.test_configs import load_config
  c = load_config("digits")
  c.model.attention = "additive"
  with pytest.raises(ValueError, match=r"config.model.attention='additive' is for "
                                       r"sequence-to-sequence data .* set "
                                       r"config.model.attention='none'"):
    train.train_and_evaluate(c, str(tmp_path / "wd"))


@pytest.mark.slow
def test_training_with_attention_learns_and_its_metric_is_greedy_exact_match(tmp_path):
  from gru_jax import train
  c = _words(300, num_train=20_000, num_validation=500, num_test=500)
  c.model.hidden_sizes = (128,)
  wd = str(tmp_path / "wd")
  results = train.train_and_evaluate(c, wd)
  # A decoder blind to its source spells at most 0.102 of the test numbers.
  assert results["validation"]["sequence_accuracy"] > 0.4, results
  acc = train.decode_accuracy(wd, [1, 2], split="validation")
  assert acc[1] == pytest.approx(results["validation"]["sequence_accuracy"], abs=1e-9)
  assert acc[2] > 0.4, acc


def test_attention_speed_script_times_every_attention(capsys):
  from experiments import attention_speed
  dtype = "bfloat16"
  attention_speed.main(2, 3, 4, 5, dtype)
  lines = capsys.readouterr().out.splitlines()
  assert [line.split(":")[0].strip() for line in lines] == list(models.ATTENTIONS)
  assert all(f"(B=2 S=3 L=4 H=5, {dtype})" in line for line in lines)
