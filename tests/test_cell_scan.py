"""The pure cell and scan against the float64 NumPy reference of the seed's equations."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import gru_jax
from gru_jax import cell
from tests import reference

VARIANTS = ["seed", "reset_after"]


def random_params(key, d, h, dtype=jnp.float32):
  """Initialised weights plus non-zero random biases, so bias placement is tested."""
  p = cell.init(key, d, h, dtype=dtype)
  k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
  return p._replace(b_x=0.5 * jax.random.normal(k1, p.b_x.shape, dtype),
                    b_h=0.5 * jax.random.normal(k2, p.b_h.shape, dtype))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("b,t,d,h", [(1, 1, 1, 1), (3, 7, 5, 4), (2, 13, 1, 9), (4, 5, 16, 1)])
def test_scan_matches_numpy_reference(variant, b, t, d, h):
  key = jax.random.key(b * 1000 + t * 100 + d * 10 + h)
  p = random_params(key, d, h)
  xs = jax.random.normal(jax.random.fold_in(key, 2), (b, t, d))
  h0 = 0.5 * jax.random.normal(jax.random.fold_in(key, 3), (b, h))
  h_last, hs = gru_jax.gru(p, xs, h0, variant=variant)
  ref_last, ref_hs = reference.run(p, xs, np.asarray(h0), variant=variant)
  np.testing.assert_allclose(hs, ref_hs, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(h_last, ref_last, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gates_match_reference(variant):
  key = jax.random.key(0)
  p = random_params(key, 3, 4)
  h = jax.random.normal(jax.random.fold_in(key, 1), (4,))
  x = jax.random.normal(jax.random.fold_in(key, 2), (3,))
  g = cell.gates(p, h, x, variant=variant)
  h_new, z, r, cand = reference.step(p, np.asarray(h, np.float64), np.asarray(x, np.float64),
                                     variant)
  np.testing.assert_allclose(g.z, z, atol=1e-6)
  np.testing.assert_allclose(g.r, r, atol=1e-6)
  np.testing.assert_allclose(g.candidate, cand, atol=1e-6)
  np.testing.assert_allclose(cell.step(p, h, x, variant=variant), h_new, atol=1e-6)


def test_variants_differ_when_reset_matters():
  p = random_params(jax.random.key(3), 3, 4)
  xs = jax.random.normal(jax.random.key(4), (2, 6, 3))
  h0 = jnp.ones((2, 4))
  a = gru_jax.gru(p, xs, h0, variant="seed")[1]
  b = gru_jax.gru(p, xs, h0, variant="reset_after")[1]
  assert float(jnp.abs(a - b).max()) > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_return_gates_match_reference(variant):
  p = random_params(jax.random.key(5), 2, 3)
  xs = jax.random.normal(jax.random.key(6), (2, 4, 2))
  _, hs, g = gru_jax.gru(p, xs, variant=variant, return_gates=True)
  chex.assert_shape([g.z, g.r, g.candidate], (2, 4, 3))
  h = np.zeros(3)
  for s in range(4):
    h, z, r, cand = reference.step(p, h, np.asarray(xs[0, s], np.float64), variant)
    np.testing.assert_allclose(g.z[0, s], z, atol=1e-5)
    np.testing.assert_allclose(g.r[0, s], r, atol=1e-5)
    np.testing.assert_allclose(g.candidate[0, s], cand, atol=1e-5)


def test_return_gates_follow_time_major_layout_and_reverse():
  """The docstring said gates are [B,T,H] always; time-major runs return them [T,B,H]
  like hs, each at its own step, reversed runs too (checked against the reference)."""
  p = random_params(jax.random.key(9), 2, 3)
  xs = jax.random.normal(jax.random.key(10), (2, 4, 2))
  _, _, g = gru_jax.gru(p, jnp.swapaxes(xs, 0, 1), time_major=True, reverse=True,
                        return_gates=True)
  chex.assert_shape([g.z, g.r, g.candidate], (4, 2, 3))
  h = np.zeros(3)
  for s in reversed(range(4)):
    h, z, r, cand = reference.step(p, h, np.asarray(xs[1, s], np.float64))
    np.testing.assert_allclose(g.z[s, 1], z, atol=1e-5)
    np.testing.assert_allclose(g.r[s, 1], r, atol=1e-5)
    np.testing.assert_allclose(g.candidate[s, 1], cand, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_init_in_half_precision_rounds_the_float32_draw(dtype):
  """The orthogonal initialiser's QR has no bf16/f16 kernel; the weights are drawn
  in float32 and rounded.  Known answer: equal to the float32 init cast."""
  key = jax.random.key(8)
  got, want = cell.init(key, 3, 4, dtype=dtype), cell.init(key, 3, 4)
  for g, w in zip(got, want):
    assert g.dtype == dtype
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w.astype(dtype), np.float32))


def test_init_follows_the_seed_advice():
  d, h = 40, 32
  p = cell.init(jax.random.key(0), d, h)
  chex.assert_shape([p.w_x, p.w_h, p.b_x, p.b_h], [(d, 3 * h), (h, 3 * h), (3 * h,), (3 * h,)])
  np.testing.assert_array_equal(p.b_x, 0)
  np.testing.assert_array_equal(p.b_h, 0)
  limit = np.sqrt(6.0 / (d + h))  # Glorot-uniform bound per [D,H] gate block
  assert float(jnp.abs(p.w_x).max()) <= limit + 1e-6
  assert float(jnp.abs(p.w_x).max()) > 0.9 * limit
  for g in range(3):
    blk = np.asarray(p.w_h[:, g * h:(g + 1) * h], np.float64)
    np.testing.assert_allclose(blk.T @ blk, np.eye(h), atol=1e-5)


# ---------------------------------------------------------------- masks

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("reverse", [False, True])
def test_padded_batch_equals_unpadded_sequences(variant, reverse):
  key = jax.random.key(7)
  p = random_params(key, 3, 5)
  lengths = [6, 2, 4, 1]
  t = max(lengths)
  xs = jax.random.normal(jax.random.fold_in(key, 1), (len(lengths), t, 3))
  mask = jnp.arange(t)[None, :] < jnp.asarray(lengths)[:, None]
  h_last, hs = gru_jax.gru(p, xs, mask=mask, reverse=reverse, variant=variant)
  for i, n in enumerate(lengths):
    hl_i, hs_i = gru_jax.gru(p, xs[i:i + 1, :n], reverse=reverse, variant=variant)
    np.testing.assert_allclose(hs[i, :n], hs_i[0], atol=1e-6)
    np.testing.assert_allclose(h_last[i], hl_i[0], atol=1e-6)
    np.testing.assert_array_equal(hs[i, n:], 0)


@pytest.mark.parametrize("reverse", [False, True])
def test_arbitrary_mask_pattern_matches_reference(reverse):
  key = jax.random.key(8)
  p = random_params(key, 2, 3)
  xs = jax.random.normal(jax.random.fold_in(key, 1), (3, 9, 2))
  mask = np.array(jax.random.bernoulli(jax.random.fold_in(key, 2), 0.6, (3, 9)))
  mask[2] = False  # a fully masked row keeps h0 and outputs zeros
  h0 = jax.random.normal(jax.random.fold_in(key, 3), (3, 3))
  h_last, hs = gru_jax.gru(p, xs, h0, mask=jnp.asarray(mask), reverse=reverse)
  ref_last, ref_hs = reference.run(p, xs, np.asarray(h0), mask=mask, reverse=reverse)
  np.testing.assert_allclose(hs, ref_hs, atol=1e-5)
  np.testing.assert_allclose(h_last, ref_last, atol=1e-5)
  np.testing.assert_allclose(h_last[2], h0[2], atol=0)


def test_time_major_equals_batch_major():
  p = random_params(jax.random.key(9), 4, 3)
  xs = jax.random.normal(jax.random.key(10), (2, 7, 4))
  mask = jax.random.bernoulli(jax.random.key(11), 0.7, (2, 7))
  hb = gru_jax.gru(p, xs, mask=mask)
  ht = gru_jax.gru(p, jnp.swapaxes(xs, 0, 1), mask=mask.T, time_major=True)
  np.testing.assert_allclose(hb[0], ht[0], atol=1e-6)
  np.testing.assert_allclose(hb[1], jnp.swapaxes(ht[1], 0, 1), atol=1e-6)


# ------------------------------------------------------ options that must not change results

@pytest.mark.parametrize("variant", VARIANTS)
def test_unroll_and_remat_do_not_change_values_or_grads(variant):
  p = random_params(jax.random.key(12), 3, 4)
  xs = jax.random.normal(jax.random.key(13), (2, 11, 3))
  mask = jax.random.bernoulli(jax.random.key(14), 0.8, (2, 11))

  def loss(p, **kw):
    return jnp.sum(gru_jax.gru(p, xs, mask=mask, variant=variant, **kw)[1] ** 2)

  vg = lambda **kw: jax.jit(jax.value_and_grad(functools.partial(loss, **kw)))(p)
  base_v, base_g = vg()
  for kw in [dict(unroll=4), dict(remat_chunk=4), dict(remat_chunk=11), dict(remat_chunk=3,
                                                                               reverse=False)]:
    v, g = vg(**kw)
    np.testing.assert_allclose(v, base_v, rtol=1e-6)
    chex.assert_trees_all_close(g, base_g, atol=1e-5)


def test_dropout_masks_match_reference():
  p = random_params(jax.random.key(15), 3, 4)
  xs = jax.random.normal(jax.random.key(16), (2, 5, 3))
  m_in = jax.random.bernoulli(jax.random.key(17), 0.5, (2, 3)).astype(jnp.float32) * 2
  m_rec = jax.random.bernoulli(jax.random.key(18), 0.5, (2, 4)).astype(jnp.float32) * 2
  _, hs = gru_jax.gru(p, xs, input_dropout_mask=m_in, recurrent_dropout_mask=m_rec)
  # Reference: x*m_in everywhere; h*m_rec wherever h enters a gate, undropped h in the blend.
  w = reference.concat_weights(p)
  sig = lambda a: 1 / (1 + np.exp(-a))
  for b in range(2):
    h = np.zeros(4)
    for s in range(5):
      x = np.asarray(xs[b, s], np.float64) * np.asarray(m_in[b])
      hd = h * np.asarray(m_rec[b])
      z = sig(w["z"][0] @ np.concatenate([hd, x]) + w["z"][1] + w["z"][2])
      r = sig(w["r"][0] @ np.concatenate([hd, x]) + w["r"][1] + w["r"][2])
      cand = np.tanh(w["h"][0] @ np.concatenate([r * hd, x]) + w["h"][1] + w["h"][2])
      h = (1 - z) * h + z * cand
      np.testing.assert_allclose(hs[b, s], h, atol=1e-5)


def test_bf16_compute_keeps_float32_state_and_stays_close():
  p = random_params(jax.random.key(19), 8, 16)
  xs = jax.random.normal(jax.random.key(20), (4, 20, 8))
  h32 = gru_jax.gru(p, xs)[1]
  hl, hbf = gru_jax.gru(p, xs, compute_dtype=jnp.bfloat16)
  assert hbf.dtype == jnp.float32 and hl.dtype == jnp.float32
  rel = float(jnp.linalg.norm(hbf - h32) / jnp.linalg.norm(h32))
  assert rel < 2e-2, rel


# ---------------------------------------------------------------- gradients and precision

@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_gradients_over_long_sequences_accumulate_in_float32(variant):
  """Every backend and the layer-normalised GRU in bf16 (bf16 matmuls, or bf16
  inputs and state) over T=300: each weight gradient within 3% of the float64
  gradient.  Loop invariants that entered `lax.scan` in bf16 had their per-step
  gradients summed in bf16: over T=1000 dW_h was 18% off on "scan", LN's gains 30-47%."""
  from gru_jax import layernorm
  b, t, d, h = 4, 300, 8, 16
  p = random_params(jax.random.key(40), d, h)
  xs = jax.random.normal(jax.random.key(41), (b, t, d))
  ln = layernorm.LNParams(*(1.0 + 0.1 * jax.random.normal(jax.random.key(42 + i), (3 * h,))
                            for i in range(4)))

  def grads(run, x, p, ln):
    loss = lambda p, ln: jnp.sum(run(p, ln, x)[1].astype(x.dtype if x.dtype == jnp.float64
                                                         else jnp.float32) ** 2)
    return jax.tree.leaves(jax.jit(jax.grad(loss, argnums=(0, 1)))(p, ln))

  runs = {f"gru/{be}": (lambda be: lambda p, ln, x, **kw: gru_jax.gru(
              p, x, variant=variant, backend=be, **kw))(be) for be in ("xla", "scan")}
  runs["ln_gru"] = lambda p, ln, x, **kw: layernorm.ln_gru(p, ln, x, variant=variant)
  for name, run in runs.items():
    with jax.enable_x64(True):
      up = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
      want = grads(run, np.asarray(xs, np.float64), up(p), up(ln))
    cases = {"bf16 inputs": lambda p, ln: grads(run, xs.astype(jnp.bfloat16), p, ln)}
    if name != "ln_gru":
      cases["compute_dtype=bf16"] = lambda p, ln: grads(
          lambda p, ln, x: run(p, ln, x, compute_dtype=jnp.bfloat16), xs, p, ln)
    for case, fn in cases.items():
      for i, (got, ref) in enumerate(zip(fn(p, ln), want)):
        if not ref.any():  # `gru` does not read the LN parameters
          continue
        rel = float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())
        assert rel < 3e-2, (name, case, i, rel)


@pytest.mark.parametrize("variant", VARIANTS)
def test_check_grads_float64(variant):
  with jax.enable_x64(True):
    p = random_params(jax.random.key(21), 3, 4, dtype=jnp.float64)
    xs = jax.random.normal(jax.random.key(22), (2, 5, 3), jnp.float64)
    mask = jnp.array([[1, 1, 1, 0, 1], [1, 0, 1, 1, 1]], bool)
    h0 = jax.random.normal(jax.random.key(23), (2, 4), jnp.float64)
    f = jax.jit(lambda p, xs, h0: gru_jax.gru(p, xs, h0, mask=mask, variant=variant))
    check_grads(f, (p, xs, h0), order=2, modes=("rev",), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_close_to_float64(variant):
  p32 = random_params(jax.random.key(24), 6, 8)
  xs32 = jax.random.normal(jax.random.key(25), (3, 50, 6))
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: a.astype(jnp.float64), p32)
    h64 = gru_jax.gru(p64, xs32.astype(jnp.float64), variant=variant)[1]
  h32 = gru_jax.gru(p32, xs32, variant=variant)[1]
  assert h32.dtype == jnp.float32
  np.testing.assert_allclose(h32, np.asarray(h64), atol=1e-5)


# ---------------------------------------------------------------- chex variants

class ChexVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_no_jit_match_reference(self):
    p = random_params(jax.random.key(26), 3, 4)
    xs = jax.random.normal(jax.random.key(27), (2, 6, 3))
    ref_last, ref_hs = reference.run(p, xs)
    h_last, hs = self.variant(lambda p, xs: gru_jax.gru(p, xs))(p, xs)
    chex.assert_shape(hs, (2, 6, 4))
    np.testing.assert_allclose(hs, ref_hs, atol=1e-5)
    np.testing.assert_allclose(h_last, ref_last, atol=1e-5)


def test_vmap_over_batch_of_params():
  keys = jax.random.split(jax.random.key(28), 3)
  ps = jax.vmap(lambda k: cell.init(k, 2, 3))(keys)
  xs = jax.random.normal(jax.random.key(29), (2, 4, 2))
  hs = jax.vmap(lambda p: gru_jax.gru(p, xs)[1])(ps)
  chex.assert_shape(hs, (3, 2, 4, 3))
  for i in range(3):
    p_i = jax.tree.map(lambda a: a[i], ps)
    np.testing.assert_allclose(hs[i], reference.run(p_i, xs)[1], atol=1e-5)


# ---------------------------------------------------------------- bad input

def _p():
  return cell.init(jax.random.key(0), 3, 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(xs=jnp.ones((2, 3))), r"xs must have rank 3 \[B,T,D\], got shape \(2, 3\)"),
    (dict(xs=jnp.ones((2, 5, 7))), r"feature size D=7 .*\(3, 12\)"),
    (dict(xs=jnp.ones((2, 5, 3), jnp.int32)), r"floating point, got dtype int32"),
    (dict(mask=jnp.ones((5, 2), bool)), r"mask must have shape \[B,T\]=\(2, 5\).*got \(5, 2\)"),
    (dict(h0=jnp.ones((2, 5))), r"h0 must have shape \[B,H\]=\(2, 4\), got \(2, 5\)"),
    (dict(variant="lstm"), r"variant must be one of"),
    (dict(input_dropout_mask=jnp.ones((2, 4))), r"input_dropout_mask must have shape \[B,D\]"),
    (dict(recurrent_dropout_mask=jnp.ones((1, 4))), r"recurrent_dropout_mask must have shape"),
    (dict(remat_chunk=0), r"remat_chunk must be a positive int"),
    (dict(remat_chunk=True), r"remat_chunk must be a positive int or None, got True"),
    (dict(remat_chunk=2.0), r"remat_chunk must be a positive int or None, got 2.0"),
    (dict(unroll=2.5), r"unroll must be an int >= 1, got 2.5"),
    (dict(unroll=-1, backend="xla"), r"unroll must be an int >= 1, got -1"),
    (dict(unroll=0, backend="pallas"), r"unroll must be an int >= 1, got 0"),
    (dict(unroll=True, backend="scan"), r"unroll must be an int >= 1, got True"),
    (dict(backend="cudnn"), r"backend must be one of"),
    (dict(compute_dtype=jnp.int32), r"compute_dtype must be a floating-point dtype \(e.g. jnp.bfloat16\), got int32"),
    (dict(compute_dtype="float33"), r"compute_dtype must be a floating-point dtype .*got 'float33'"),
    (dict(xs=jnp.ones((2, 5, 3), jnp.complex64)), r"got dtype complex64 .*real-valued"),
])
def test_bad_input_errors_name_argument_and_shapes(kwargs, match):
  args = dict(xs=jnp.ones((2, 5, 3)))
  args.update(kwargs)
  xs = args.pop("xs")
  with pytest.raises(ValueError, match=match):
    gru_jax.gru(_p(), xs, **args)


def test_remat_chunk_takes_numpy_and_jax_ints():
  """remat_chunk=np.int64(2) (from NumPy arithmetic) was refused as not an int, while
  unroll took it; it now runs, padding T=5 to 6, and matches the float64 reference."""
  p = random_params(jax.random.key(7), 3, 4)
  xs = jax.random.normal(jax.random.key(8), (2, 5, 3))
  want = reference.run(p, xs)[1]
  for k in (np.int64(2), jnp.int32(2)):
    np.testing.assert_allclose(gru_jax.gru(p, xs, remat_chunk=k)[1], want, atol=2e-5)


def test_bad_step_input():
  with pytest.raises(ValueError, match=r"x has feature size 2 .* input_size=3"):
    cell.step(_p(), jnp.ones((1, 4)), jnp.ones((1, 2)))
  with pytest.raises(ValueError, match=r"h has size 5"):
    cell.step(_p(), jnp.ones((1, 5)), jnp.ones((1, 3)))
  with pytest.raises(ValueError, match=r"input_size and hidden_size must be >= 1"):
    cell.init(jax.random.key(0), 0, 3)
  with pytest.raises(TypeError, match=r"params must be a GRUParams"):
    gru_jax.gru({"w": 1}, jnp.ones((1, 2, 3)))


def test_step_refuses_integer_inputs_and_runs_their_float_form():
  """An int x (one-hot tokens) or h used to be run in integers: the weights were cast
  to int32 (x) or the recurrent sums accumulated in int32 (h), and the output was
  silently wrong (all zeros for one-hot x).  Now a ValueError; the float one-hot
  matches the float64 reference."""
  p = _p()
  tokens = jnp.eye(3, dtype=jnp.int32)[jnp.array([0, 2])]  # [B=2, D=3] one-hot
  with pytest.raises(ValueError, match=r"x must be floating point, got dtype int32 \(shape \(2, 3\)\)"):
    cell.step(p, jnp.zeros((2, 4)), tokens)
  with pytest.raises(ValueError, match=r"h must be floating point, got dtype int32"):
    cell.gates(p, jnp.ones((2, 4), jnp.int32), tokens.astype(jnp.float32))
  x = tokens.astype(jnp.float32)
  for b in range(2):
    want = reference.step(p, np.ones(4), np.asarray(x[b], np.float64))[0]
    np.testing.assert_allclose(cell.step(p, jnp.ones((2, 4)), x)[b], want, atol=1e-6)


def test_cpu_projection_vjp_matches_numpy():
  """The hoisted input projection's hand-written VJP (a materialised xsᵀ on CPU)
  gives dx = g·wᵀ and dw = xsᵀ·g as float64 NumPy computes them; bf16 weights
  use the plain matmul (and JAX's own VJP)."""
  from gru_jax import scan as scan_lib
  k = jax.random.key(3)
  xs = jax.random.normal(k, (3, 4, 5))
  w = jax.random.normal(jax.random.fold_in(k, 1), (5, 6))
  g = jax.random.normal(jax.random.fold_in(k, 2), (3, 4, 6))
  out, vjp = jax.vjp(lambda a, b: scan_lib._project(a, b, jnp.float32), xs, w)
  dx, dw = vjp(g)
  x64, w64, g64 = (np.asarray(a, np.float64) for a in (xs, w, g))
  np.testing.assert_allclose(out, x64 @ w64, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, g64 @ w64.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, x64.reshape(-1, 5).T @ g64.reshape(-1, 6), rtol=1e-5, atol=1e-5)
  wb = w.astype(jnp.bfloat16)
  np.testing.assert_array_equal(scan_lib._project(xs, wb, jnp.float32),
                                cell.matmul(xs, wb, jnp.float32))


@pytest.mark.parametrize("backend", ["auto", "xla", "scan", "pallas"])
def test_zero_length_sequences_return_h0_on_every_backend(backend):
  p = _p()
  h0 = jax.random.normal(jax.random.key(1), (2, 4))
  xs = jnp.ones((2, 0, 3))
  h_last, hs = gru_jax.gru(p, xs, h0, backend=backend)
  np.testing.assert_array_equal(h_last, h0)  # no step: the known answer is h0 itself
  assert hs.shape == (2, 0, 4)
  g = jax.grad(lambda h: jnp.sum(gru_jax.gru(p, xs, h, backend=backend)[0] * 3.0))(h0)
  np.testing.assert_array_equal(g, jnp.full((2, 4), 3.0))


@pytest.mark.parametrize("backend", ["auto", "xla", "scan", "pallas"])
def test_empty_batch_gives_empty_outputs_on_every_backend(backend):
  p = _p()
  xs = jnp.ones((0, 5, 3))
  h_last, hs = gru_jax.gru(p, xs, backend=backend)
  assert h_last.shape == (0, 4) and hs.shape == (0, 5, 4)
  g = jax.grad(lambda q: jnp.sum(gru_jax.gru(q, xs, backend=backend)[1]))(p)
  for a in g:  # no example, no gradient
    np.testing.assert_array_equal(a, jnp.zeros_like(a))


def test_lists_and_numpy_arrays_are_accepted_like_jax_arrays():
  p = _p()
  rs = np.random.RandomState(0)
  xs, h0 = rs.randn(2, 5, 3).astype(np.float32), rs.randn(2, 4).astype(np.float32)
  mask = np.arange(5)[None] < np.array([5, 2])[:, None]
  h_last, hs = gru_jax.gru(p, xs.tolist(), h0.tolist(), mask=mask.tolist())
  ref_last, ref_hs = reference.run(p, xs, h0=h0, mask=mask)
  np.testing.assert_allclose(hs, ref_hs, atol=1e-5)
  np.testing.assert_allclose(h_last, ref_last, atol=1e-5)


def test_params_of_the_wrong_rank_are_named():
  p = _p()
  with pytest.raises(ValueError, match=r"params.w_x must be 2-D .* got shape \(12,\)"):
    gru_jax.gru(p._replace(w_x=jnp.ones(12)), jnp.ones((2, 5, 3)))
  with pytest.raises(ValueError, match=r"params.b_h must be 1-D .* got shape \(1, 12\)"):
    gru_jax.gru(p._replace(b_h=jnp.ones((1, 12))), jnp.ones((2, 5, 3)))


@pytest.mark.parametrize("backend", ["xla", "pallas", "scan", "layer_norm"])
def test_nan_padding_does_not_reach_outputs_or_gradients(backend):
  """NaN and inf at masked steps: outputs and gradients equal those with zero
  padding (they were all NaN: the weight gradient multiplied the padding by a
  zero cotangent), against the float64 reference's outputs."""
  from gru_jax import layernorm
  p = random_params(jax.random.key(33), 3, 4)
  ln = layernorm.init_ln(4)
  xs = jax.random.normal(jax.random.key(34), (2, 5, 3))
  mask = jnp.arange(5)[None] < jnp.array([5, 3])[:, None]
  bad = jnp.where(mask[..., None], xs, jnp.array([jnp.nan, jnp.inf, -jnp.inf]))
  good = jnp.where(mask[..., None], xs, 0.0)
  if backend == "layer_norm":
    run = lambda p, x: layernorm.ln_gru(p, ln, x, mask=mask)
  else:
    run = lambda p, x: gru_jax.gru(p, x, mask=mask, backend=backend)
  loss = lambda p, x: jnp.sum(run(p, x)[1] ** 2) + jnp.sum(run(p, x)[0])
  got, want = jax.grad(loss, argnums=(0, 1))(p, bad), jax.grad(loss, argnums=(0, 1))(p, good)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
  if backend != "layer_norm":
    np.testing.assert_allclose(run(p, bad)[1], reference.run(p, good, mask=np.asarray(mask))[1],
                               atol=2e-5)


def test_gates_at_masked_steps_come_from_the_carried_state_and_a_zero_input():
  """What the README says of return_gates with a mask: at a masked step the gates are the
  cell's on the carried state and a zero input (padding is never read), while hs is zero
  there."""
  p = random_params(jax.random.key(31), 3, 4)
  rng = np.random.default_rng(32)
  xs = rng.normal(size=(2, 6, 3)).astype(np.float32)
  mask = np.array([[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
  _, hs, g = gru_jax.gru(p, xs, mask=mask, return_gates=True)
  ref_last, ref_hs = reference.run(p, xs, mask=mask)
  for t in np.flatnonzero(~mask[0]):
    carried = ref_hs[0, np.flatnonzero(mask[0, :t])[-1]]  # state after the last valid step
    _, z, r, cand = reference.step(p, carried, np.zeros(3))
    np.testing.assert_allclose(g.z[0, t], z, atol=1e-5)
    np.testing.assert_allclose(g.r[0, t], r, atol=1e-5)
    np.testing.assert_allclose(g.candidate[0, t], cand, atol=1e-5)
    np.testing.assert_array_equal(hs[0, t], 0.0)
