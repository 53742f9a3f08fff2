"""Zoneout (Krueger et al. 2016) against a float64 NumPy loop over the seed's equations,
central differences, and known answers (k = 0 is the plain GRU, k = 1 freezes the state)."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gru_jax
from gru_jax import layers, models, nnx_layers
from gru_jax.cell import GRUParams
from gru_jax.kernels import fused_rnn
from tests import reference

B, T, D, H = 3, 6, 4, 5


def _setup(seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  p = gru_jax.cell.init(ks[0], D, H, bias_init=jax.nn.initializers.normal(0.5))
  xs = jax.random.normal(ks[1], (B, T, D))
  k = jax.random.bernoulli(ks[2], 0.4, (B, T, H)).astype(jnp.float32)
  h0 = jax.random.normal(ks[3], (B, H)) * 0.5
  return p, xs, k, h0


def _ref(p, xs, k, h0=None, mask=None, reverse=False, resets=None, variant="seed",
         rec_mask=None):
  """float64: h_t = k⊙h_{t−1} + (1−k)⊙GRU(h_{t−1}, x_t) over each sequence's valid steps."""
  xs = np.asarray(xs, np.float64)
  hsz = np.asarray(p.w_h).shape[0]
  k = np.broadcast_to(np.asarray(k, np.float64), xs.shape[:2] + (hsz,))
  hs = np.zeros(xs.shape[:2] + (hsz,))
  last = np.zeros((xs.shape[0], hsz))
  for b in range(xs.shape[0]):
    h = np.zeros(hsz) if h0 is None else np.asarray(h0[b], np.float64)
    steps = [t for t in range(xs.shape[1]) if mask is None or mask[b, t]]
    # Segment numbers: a step starts from zero when its segment differs from the
    # one run before it (h0's: the first forwards, the last in reverse).
    seg = np.cumsum(np.zeros(xs.shape[1], int) if resets is None else resets[b])
    before = seg[-1] if reverse else 0
    for t in (steps[::-1] if reverse else steps):
      if seg[t] != before:
        h = np.zeros(hsz)
      before = seg[t]
      h = k[b, t] * h + (1 - k[b, t]) * reference.step(
          p, h, xs[b, t], variant, None if rec_mask is None else rec_mask[b])[0]
      hs[b, t] = h
    last[b] = h
  return last, hs


@pytest.mark.parametrize("variant", ["seed", "reset_after"])
@pytest.mark.parametrize("reverse", [False, True])
def test_zoneout_matches_the_float64_loop(variant, reverse):
  p, xs, k, h0 = _setup()
  mask = np.arange(T)[None] < np.array([6, 4, 1])[:, None]
  want = _ref(p, xs, k, h0, mask, reverse, variant=variant)
  for kw in (dict(), dict(backend="scan"), dict(remat_chunk=4), dict(backend="xla"),
             dict(backend="pallas")):
    got = gru_jax.gru(p, xs, h0, mask=mask, reverse=reverse, variant=variant,
                      zoneout_mask=k, **kw)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5, err_msg=str(kw))
    np.testing.assert_allclose(got[1], want[1], atol=1e-5, err_msg=str(kw))
  # time-major layout, and a scalar weight (evaluation's expectation)
  tm = gru_jax.gru(p, jnp.swapaxes(xs, 0, 1), h0, mask=mask.T, reverse=reverse,
                   variant=variant, time_major=True, zoneout_mask=jnp.swapaxes(k, 0, 1))
  np.testing.assert_allclose(jnp.swapaxes(tm[1], 0, 1), want[1], atol=1e-5)
  scalar = gru_jax.gru(p, xs, h0, mask=mask, reverse=reverse, variant=variant,
                       zoneout_mask=0.3)
  np.testing.assert_allclose(scalar[1], _ref(p, xs, 0.3, h0, mask, reverse,
                                             variant=variant)[1], atol=1e-5)


def test_zoneout_known_answers_and_resets():
  p, xs, k, h0 = _setup(1)
  plain = gru_jax.gru(p, xs, h0)
  zero = gru_jax.gru(p, xs, h0, zoneout_mask=jnp.zeros((B, T, H)))
  np.testing.assert_allclose(zero[1], plain[1], atol=1e-6)
  frozen = gru_jax.gru(p, xs, h0, zoneout_mask=1.0)
  np.testing.assert_allclose(frozen[0], h0, atol=1e-6)
  np.testing.assert_allclose(frozen[1], np.broadcast_to(h0[:, None], (B, T, H)), atol=1e-6)
  resets = np.zeros((B, T), bool)
  resets[0, 2] = resets[1, 0] = resets[2, 5] = True
  got = gru_jax.gru(p, xs, h0, resets=resets, zoneout_mask=k)
  np.testing.assert_allclose(got[1], _ref(p, xs, k, h0, resets=resets)[1], atol=1e-5)


@pytest.mark.parametrize("backend", ["xla", "scan"])
def test_zoneout_gradients_match_central_differences_of_the_float64_loop(backend):
  p, xs, k, h0 = _setup(2)
  k = k * 0.8 + 0.1  # away from 0 and 1, so dk is tested at weights of both kinds
  mask = np.arange(T)[None] < np.array([6, 5, 3])[:, None]
  c = np.asarray(jax.random.normal(jax.random.key(9), (B, T, H)), np.float64)

  def loss_ref(p64, xs64, k64=np.asarray(k, np.float64)):
    return float((_ref(p64, xs64, k64, h0, mask)[1] * c).sum())

  def loss(p, x, k):
    return jnp.sum(gru_jax.gru(p, x, h0, mask=mask, zoneout_mask=k, backend=backend)[1] * c)

  g_p, g_x, g_k = jax.grad(loss, argnums=(0, 1, 2))(p, xs, k)
  p64 = GRUParams(*(np.asarray(a, np.float64) for a in p))
  eps = 1e-6
  for field, idx in (("w_h", (1, 7)), ("w_x", (2, 11)), ("b_x", (3,)), ("b_h", (12,))):
    plus, minus = (p64._replace(**{field: getattr(p64, field).copy()}) for _ in range(2))
    getattr(plus, field)[idx] += eps
    getattr(minus, field)[idx] -= eps
    num = (loss_ref(plus, xs) - loss_ref(minus, xs)) / (2 * eps)
    np.testing.assert_allclose(getattr(g_p, field)[idx], num, rtol=2e-3, atol=1e-5,
                               err_msg=field)
  xs64 = np.asarray(xs, np.float64)
  plus, minus = xs64.copy(), xs64.copy()
  plus[1, 2, 3] += eps
  minus[1, 2, 3] -= eps
  np.testing.assert_allclose(g_x[1, 2, 3], (loss_ref(p64, plus) - loss_ref(p64, minus))
                             / (2 * eps), rtol=2e-3, atol=1e-5)
  k64 = np.asarray(k, np.float64)
  for idx in ((0, 0, 1), (1, 3, 4), (2, 1, 0), (1, 5, 2)):  # (1, 5, .): a masked step, dk = 0
    plus, minus = k64.copy(), k64.copy()
    plus[idx] += eps
    minus[idx] -= eps
    num = (loss_ref(p64, xs, plus) - loss_ref(p64, xs, minus)) / (2 * eps)
    np.testing.assert_allclose(g_k[idx], num, rtol=2e-3, atol=1e-5, err_msg=str(idx))
  assert g_k[1, 5, 2] == 0


def _check_fused_zoneout(backend, variant, reverse, time_major, *, seed, b, t, h, lengths,
                         resets_at):
  """``backend``'s loops with zoneout, a mask, resets and recurrent dropout: outputs
  (undifferentiated and under AD) against the float64 loop, gradients of every input, the
  zoneout weights too, against JAX's autodiff of "scan"; per-step k and one scalar."""
  ks = jax.random.split(jax.random.key(seed), 6)
  p = gru_jax.cell.init(ks[0], D, h, bias_init=jax.nn.initializers.normal(0.5))
  xs = jax.random.normal(ks[1], (b, t, D))
  k = jax.random.bernoulli(ks[2], 0.4, (b, t, h)).astype(jnp.float32)
  h0 = jax.random.normal(ks[3], (b, h)) * 0.5
  m_rec = 2.0 * jax.random.bernoulli(ks[4], 0.5, (b, h)).astype(jnp.float32)
  mask = np.arange(t)[None] < np.array(lengths)[:, None]
  resets = np.zeros((b, t), bool)
  for row, step in resets_at:
    resets[row, step] = True
  tm = (lambda a: jnp.swapaxes(a, 0, 1)) if time_major else (lambda a: a)

  def run(name):
    def f(p, xs, h0, k, m_rec):
      return gru_jax.gru(p, tm(xs), h0, mask=tm(mask), resets=tm(resets), reverse=reverse,
                         variant=variant, time_major=time_major, zoneout_mask=
                         k if jnp.ndim(k) == 0 else tm(k), recurrent_dropout_mask=m_rec,
                         backend=name)
    return f

  def loss(name):
    def f(*a):
      h_last, hs = run(name)(*a)
      return jnp.sum(tm(hs) * ct) + jnp.sum(h_last * ct_last)
    return f

  ct = jax.random.normal(ks[5], (b, t, h))
  ct_last = jax.random.normal(jax.random.fold_in(ks[5], 1), (b, h))
  for zk in (k, jnp.float32(0.3)):
    args = (p, xs, h0, zk, m_rec)
    if backend == "pallas":
      assert "pallas_call" in str(jax.make_jaxpr(run(backend))(*args))
    want_last, want_hs = _ref(p, xs, np.asarray(zk), h0, mask, reverse, resets, variant, m_rec)
    for h_last, hs in (jax.jit(run(backend))(*args), jax.vjp(run(backend), *args)[0]):
      np.testing.assert_allclose(tm(hs), want_hs, atol=2e-5)
      np.testing.assert_allclose(h_last, want_last, atol=2e-5)
    got, want = (jax.jit(jax.grad(loss(name), argnums=range(5)))(*args)
                 for name in (backend, "scan"))
    chex.assert_trees_all_close(got, want, atol=3e-5, rtol=3e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the chunks and layouts are CPU's")
@pytest.mark.parametrize("variant,reverse,time_major,chunks,packed,primal", [
    ("seed", False, False, None, False, None),
    ("reset_after", True, True, 3, False, None),
    ("seed", True, False, 3, True, "scan"),
    ("reset_after", False, False, None, True, "scan")])
def test_fused_zoneout_matches_float64_and_scan_autodiff(monkeypatch, variant, reverse,
                                                         time_major, chunks, packed, primal):
  """The "xla" loops with zoneout, in each of their forms (CPU time chunks, the
  packed residual stores, the scan primal), with a mask, resets and recurrent
  dropout: outputs (undifferentiated and under AD) against the float64 loop;
  gradients of every input, the zoneout weights too, per step and scalar,
  against JAX's autodiff of the "scan" backend."""
  monkeypatch.setattr(gru_jax.scan, "CPU_CHUNKS", chunks)
  monkeypatch.setattr(fused_rnn, "PACKED", packed)
  monkeypatch.setattr(fused_rnn, "PRIMAL", primal)
  _check_fused_zoneout("xla", variant, reverse, time_major, seed=11, b=B, t=8, h=H,
                       lengths=[8, 5, 2], resets_at=[(0, 3), (1, 1)])


def test_fused_zoneout_second_order_matches_scan():
  """grad of grad (the Hessian-vector product) through the "xla" loops' VJP with zoneout."""
  p, xs, k, h0 = _setup(5)
  v = jax.random.normal(jax.random.key(12), xs.shape)

  def hvp(backend):
    loss = lambda x: jnp.sum(jnp.tanh(gru_jax.gru(p, x, h0, zoneout_mask=k,
                                                  backend=backend)[1]))
    return jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), v))(xs)
  np.testing.assert_allclose(hvp("xla"), hvp("scan"), atol=2e-5, rtol=2e-5)


def test_layer_zoneout_keeps_each_unit_at_the_rate_in_training_and_averages_in_eval():
  xs = jax.random.normal(jax.random.key(3), (64, 20, D))
  layer = layers.GRU(H, zoneout=0.3, bias_init=nn.initializers.normal(0.5))
  v = layer.init(jax.random.key(0), xs)
  p = GRUParams(**v["params"])
  hs = np.asarray(layer.apply(v, xs, deterministic=False, rngs={"dropout": jax.random.key(1)}),
                  np.float64)
  # Every unit at every step either kept its old value or took the GRU's new one.
  prev = np.concatenate([np.zeros((64, 1, H)), hs[:, :-1]], axis=1)
  new = np.stack([np.stack([reference.step(p, prev[b, t], np.asarray(xs[b, t], np.float64))[0]
                            for t in range(20)]) for b in range(64)])
  kept = np.abs(hs - prev) < 1e-5
  took = np.abs(hs - new) < 1e-5
  assert (kept | took).all()
  decided = kept ^ took  # where old and new differ enough to tell which happened
  frac = kept[decided].mean()
  n = decided.sum()
  assert n > 5000 and abs(frac - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n), (frac, n)
  # Evaluation: the expectation, 0.3⊙h_{t−1} + 0.7⊙h_t.
  np.testing.assert_allclose(layer.apply(v, xs), _ref(p, xs, 0.3)[1], atol=1e-5)
  # Per-example masks: a row's draw depends only on (key, example id).
  ids = jnp.arange(64) + 100
  rng = {"dropout": jax.random.key(5)}
  whole = layer.apply(v, xs, deterministic=False, example_ids=ids, rngs=rng)
  part = layer.apply(v, xs[10:20], deterministic=False, example_ids=ids[10:20], rngs=rng)
  np.testing.assert_allclose(whole[10:20], part, atol=1e-6)


def test_nnx_zoneout_layer_equals_linen_in_eval_and_draws_in_training():
  xs = jax.random.normal(jax.random.key(4), (B, T, D))
  lin = layers.GRU(H, zoneout=0.25)
  v = lin.init(jax.random.key(0), xs)
  layer = nnx_layers.GRU.from_params(v["params"], zoneout=0.25, rngs=nnx.Rngs(dropout=1))
  layer.eval()
  np.testing.assert_allclose(layer(xs), lin.apply(v, xs), atol=1e-6)
  layer.train()
  a, b = layer(xs), layer(xs)
  assert not np.allclose(a, b)  # a fresh draw per call
  stack = nnx_layers.StackedGRU(D, (H, H), zoneout=0.25, rngs=nnx.Rngs(0))
  assert all(getattr(stack, f"layer_{i}").zoneout == 0.25 for i in range(2))


def test_sequence_model_zoneout_and_its_eval_mode_for_batch_norm_statistics():
  xs = jax.random.normal(jax.random.key(6), (B, T, D))
  kw = dict(hidden_sizes=(H,), batch_norm=False, dropout=0.0, zoneout=0.5)
  model = models.SequenceModel("tagging", 3, **kw)
  v = model.init(jax.random.key(0), xs)
  rngs = {"dropout": jax.random.key(1)}
  evaluated = model.apply(v, xs)
  trained = model.apply(v, xs, train=True, rngs=rngs)
  assert not np.allclose(trained, evaluated)
  as_eval = models.SequenceModel("tagging", 3, gru_eval_mode=True, **kw).apply(
      v, xs, train=True, rngs=rngs)
  np.testing.assert_allclose(as_eval, evaluated, atol=1e-6)
  want = _ref(GRUParams(**v["params"]["gru_0"]), xs, 0.5)[1]
  head = v["params"]["head"]
  np.testing.assert_allclose(evaluated, want @ np.asarray(head["kernel"], np.float64)
                             + np.asarray(head["bias"], np.float64), atol=1e-5)


def test_zoneout_refusals():
  p, xs, k, _ = _setup()
  with pytest.raises(ValueError, match=r"zoneout_mask must be a scalar or have shape "
                                       r"\[B,T,H\]=\(3, 6, 5\), got \(3, 6\)"):
    gru_jax.gru(p, xs, zoneout_mask=k[..., 0])
  with pytest.raises(ValueError, match=r"\[T,B,H\]=\(6, 3, 5\), got \(3, 6, 5\)"):
    gru_jax.gru(p, jnp.swapaxes(xs, 0, 1), time_major=True, zoneout_mask=k)
  with pytest.raises(ValueError, match="zoneout_mask must be floating point"):
    gru_jax.gru(p, xs, zoneout_mask=k.astype(bool))
  # "auto" keeps zoneout off the kernels (untimed with it on a GPU); "pallas" runs them.
  kw = dict(hidden_size=64, batch=32, compute_dtype=jnp.float32, state_dtype=jnp.float32,
            zoneout=True)
  assert gru_jax.scan.resolve_backend("auto", platform="gpu", **kw) == "xla"
  assert gru_jax.scan.resolve_backend("pallas", platform="gpu", **kw) == "pallas"
  assert gru_jax.scan.resolve_backend("pallas", platform="cpu", **kw) == "pallas"
  with pytest.raises(ValueError, match=r"zoneout must be in \[0, 1\), got 1.0"):
    layers.GRU(H, zoneout=1.0).init(jax.random.key(0), xs)
  with pytest.raises(ValueError, match="zoneout must be in"):
    nnx_layers.GRU(D, H, zoneout=-0.1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="neither dropout, recurrent_dropout, zoneout"):
    layers.GRU(H, zoneout=0.1, layer_norm=True).init(jax.random.key(0), xs)


def test_fused_zoneout_under_vmap_and_forward_mode():
  """vmap of grad through the "xla" loops with per-step and (batched) scalar weights,
  T = 50 so the CPU path runs in time chunks, against the scan's; jacfwd (which runs
  "scan") of the final state in the scalar weight against central differences."""
  p = gru_jax.cell.init(jax.random.key(0), D, H, bias_init=jax.nn.initializers.normal(0.5))
  xs = jax.random.normal(jax.random.key(1), (4, B, 50, D))
  k = jax.random.bernoulli(jax.random.key(2), 0.3, (4, B, 50, H)).astype(jnp.float32)

  def grads(backend, k):
    loss = lambda x, k: jnp.sum(jnp.sin(gru_jax.gru(p, x, zoneout_mask=k, backend=backend)[1]))
    return jax.vmap(jax.grad(loss, argnums=(0, 1)))(xs, k)
  for weights in (k, jnp.linspace(0.1, 0.5, 4)):
    chex.assert_trees_all_close(grads("xla", weights), grads("scan", weights), atol=1e-4,
                                rtol=1e-4)
  last = lambda w: gru_jax.gru(p, xs[0], zoneout_mask=w)[0]
  eps = 1e-3
  numeric = (last(0.3 + eps) - last(0.3 - eps)) / (2 * eps)
  np.testing.assert_allclose(jax.jacfwd(last)(0.3), numeric, atol=2e-3)


@pytest.mark.parametrize("variant,reverse,time_major", [
    ("seed", False, False), ("reset_after", True, True),
    pytest.param("seed", True, True, marks=pytest.mark.slow),
    pytest.param("reset_after", False, False, marks=pytest.mark.slow)])
def test_pallas_zoneout_matches_float64_and_scan_autodiff(variant, reverse, time_major):
  """The Pallas kernels (interpret mode) with zoneout, a mask, resets and recurrent
  dropout: outputs against the float64 loop; gradients of every input, the zoneout
  weights too (per step and one scalar), against JAX's autodiff of "scan"."""
  # H a power of two, so the kernels apply
  _check_fused_zoneout("pallas", variant, reverse, time_major, seed=21, b=4, t=6, h=8,
                       lengths=[6, 4, 1, 5], resets_at=[(0, 3), (3, 1)])


def test_pallas_zoneout_lowers_to_triton_without_a_gpu():
  """Lowering the train step for CUDA runs Pallas' Triton lowering rules on both
  kernels with per-step and scalar zoneout weights (the [H] row of the scalar too)."""
  from tests.test_kernels import cuda_module
  b, t, h = 32, 5, 32
  ks = jax.random.split(jax.random.key(13), 3)
  w_h = 0.1 * jax.random.normal(ks[0], (h, 3 * h))
  xp = jax.random.normal(ks[1], (b, t, 3 * h))
  k = jax.random.bernoulli(ks[2], 0.3, (b, t, h)).astype(jnp.float32)
  for zk in (k, jnp.float32(0.2)):
    def loss(w_h, xp, zk):
      _, hs = fused_rnn.recurrence(w_h, jnp.zeros(3 * h), jnp.zeros(h), xp, jnp.zeros((b, h)),
                                   variant="reset_after", time_axis=1, impl="pallas",
                                   interpret=False, zoneout=zk)
      return jnp.sum(hs)
    text = cuda_module(loss, w_h, xp, zk)
    assert "_forward_kernel" in text and "_backward_kernel" in text


def test_pallas_zoneout_under_vmap_of_grad():
  """vmap of grad through the kernels (interpret mode) with per-step and batched scalar
  weights (the scalar's [H] row is then batched too), against the scan's."""
  p = gru_jax.cell.init(jax.random.key(0), D, 8, bias_init=jax.nn.initializers.normal(0.5))
  xs = jax.random.normal(jax.random.key(1), (2, 4, 5, D))
  k = jax.random.bernoulli(jax.random.key(2), 0.3, (2, 4, 5, 8)).astype(jnp.float32)

  def grads(backend, k):
    loss = lambda x, k: jnp.sum(jnp.sin(gru_jax.gru(p, x, zoneout_mask=k, backend=backend)[1]))
    return jax.vmap(jax.grad(loss, argnums=(0, 1)))(xs, k)
  for weights in (k, jnp.array([0.1, 0.4])):
    assert "pallas_call" in str(jax.make_jaxpr(lambda w: grads("pallas", w))(weights))
    chex.assert_trees_all_close(grads("pallas", weights), grads("scan", weights), atol=1e-4,
                                rtol=1e-4)
