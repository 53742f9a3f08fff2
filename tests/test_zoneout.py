"""Zoneout (Krueger et al. 2016) against a float64 NumPy loop over the seed's equations,
central differences, and known answers (k = 0 is the plain GRU, k = 1 freezes the state)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gru_jax
from gru_jax import layers, models, nnx_layers
from gru_jax.cell import GRUParams
from tests import reference

B, T, D, H = 3, 6, 4, 5


def _setup(seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  p = gru_jax.cell.init(ks[0], D, H, bias_init=jax.nn.initializers.normal(0.5))
  xs = jax.random.normal(ks[1], (B, T, D))
  k = jax.random.bernoulli(ks[2], 0.4, (B, T, H)).astype(jnp.float32)
  h0 = jax.random.normal(ks[3], (B, H)) * 0.5
  return p, xs, k, h0


def _ref(p, xs, k, h0=None, mask=None, reverse=False, resets=None, variant="seed"):
  """float64: h_t = k⊙h_{t−1} + (1−k)⊙GRU(h_{t−1}, x_t) over each sequence's valid steps."""
  xs = np.asarray(xs, np.float64)
  hsz = np.asarray(p.w_h).shape[0]
  k = np.broadcast_to(np.asarray(k, np.float64), xs.shape[:2] + (hsz,))
  hs = np.zeros(xs.shape[:2] + (hsz,))
  last = np.zeros((xs.shape[0], hsz))
  for b in range(xs.shape[0]):
    h = np.zeros(hsz) if h0 is None else np.asarray(h0[b], np.float64)
    steps = [t for t in range(xs.shape[1]) if mask is None or mask[b, t]]
    for t in (steps[::-1] if reverse else steps):
      if resets is not None and resets[b, t]:
        h = np.zeros(hsz)
      h = k[b, t] * h + (1 - k[b, t]) * reference.step(p, h, xs[b, t], variant)[0]
      hs[b, t] = h
    last[b] = h
  return last, hs


@pytest.mark.parametrize("variant", ["seed", "reset_after"])
@pytest.mark.parametrize("reverse", [False, True])
def test_zoneout_matches_the_float64_loop(variant, reverse):
  p, xs, k, h0 = _setup()
  mask = np.arange(T)[None] < np.array([6, 4, 1])[:, None]
  want = _ref(p, xs, k, h0, mask, reverse, variant=variant)
  for kw in (dict(), dict(remat_chunk=4), dict(backend="xla"), dict(backend="pallas")):
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


def test_zoneout_gradients_match_central_differences_of_the_float64_loop():
  p, xs, k, h0 = _setup(2)
  mask = np.arange(T)[None] < np.array([6, 5, 3])[:, None]
  c = np.asarray(jax.random.normal(jax.random.key(9), (B, T, H)), np.float64)

  def loss_ref(p64, xs64):
    return float((_ref(p64, xs64, k, h0, mask)[1] * c).sum())

  g_p, g_x = jax.grad(lambda p, x: jnp.sum(gru_jax.gru(p, x, h0, mask=mask, zoneout_mask=k)[1]
                                           * c), argnums=(0, 1))(p, xs)
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
  assert gru_jax.scan.resolve_backend("pallas", hidden_size=H, batch=B, compute_dtype=None,
                                      state_dtype=jnp.float32, zoneout=True) == "scan"
  with pytest.raises(ValueError, match=r"zoneout must be in \[0, 1\), got 1.0"):
    layers.GRU(H, zoneout=1.0).init(jax.random.key(0), xs)
  with pytest.raises(ValueError, match="zoneout must be in"):
    nnx_layers.GRU(D, H, zoneout=-0.1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="neither dropout, recurrent_dropout, zoneout"):
    layers.GRU(H, zoneout=0.1, layer_norm=True).init(jax.random.key(0), xs)
