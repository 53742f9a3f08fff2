"""The fused recurrences (backend "xla" and "pallas") against the plain scan and the float64 reference.

The "scan" backend is `jax.lax.scan` differentiated by JAX; "xla" and
"pallas" use the hand-written VJP in `gru_jax.kernels.fused_rnn`.  Pallas runs
in interpret mode on CPU, so sizes stay tiny.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import gru_jax
from gru_jax import scan
from gru_jax.kernels import pallas_gru
from tests import reference
from tests.test_cell_scan import VARIANTS, random_params

FUSED = ["xla", "pallas"]


def problem(seed, b=3, t=6, d=4, h=8, dtype=jnp.float32):
  """Params, xs [B,T,D], h0, a mask with a fully masked row, dropout masks."""
  key = jax.random.key(seed)
  p = random_params(key, d, h, dtype)
  xs = jax.random.normal(jax.random.fold_in(key, 2), (b, t, d), dtype)
  h0 = 0.5 * jax.random.normal(jax.random.fold_in(key, 3), (b, h), dtype)
  mask = np.array(jax.random.bernoulli(jax.random.fold_in(key, 4), 0.7, (b, t)))
  mask[-1] = False
  m_in = 2.0 * jax.random.bernoulli(jax.random.fold_in(key, 5), 0.5, (b, d)).astype(dtype)
  m_rec = 2.0 * jax.random.bernoulli(jax.random.fold_in(key, 6), 0.5, (b, h)).astype(dtype)
  return p, xs, h0, jnp.asarray(mask), m_in, m_rec


def loss_fn(backend, variant, **kw):
  """sum(hs·ct) + sum(h_last·ct_last): exercises both cotangents."""
  def loss(p, xs, h0, ct, ct_last):
    h_last, hs = gru_jax.gru(p, xs, h0, variant=variant, backend=backend, **kw)
    return jnp.sum(hs * ct) + jnp.sum(h_last * ct_last)
  return loss


def cotangents(xs, h, seed=0):
  b, t = xs.shape[:2]
  k = jax.random.key(100 + seed)
  return (jax.random.normal(k, (b, t, h), xs.dtype),
          jax.random.normal(jax.random.fold_in(k, 1), (b, h), xs.dtype))


def grads(backend, variant, p, xs, h0, ct, ct_last, **kw):
  grad = jax.jit(jax.grad(loss_fn(backend, variant, **kw), argnums=(0, 1, 2)))
  return grad(p, xs, h0, ct, ct_last)


def cuda_module(loss, *args) -> str:
  """The MLIR of jit(grad(loss)) lowered for CUDA without a GPU: runs the Pallas
  Triton lowering rules on every kernel in it (Triton's own compile is not run)."""
  exported = jax.export.export(
      jax.jit(jax.grad(loss, argnums=tuple(range(len(args))))), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
  )(*args)
  return exported.mlir_module()


# ---------------------------------------------------------------- forward values

@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("reverse", [False, True])
def test_forward_matches_float64_reference(backend, variant, reverse):
  p, xs, h0, mask, _, _ = problem(1)
  h_last, hs = gru_jax.gru(p, xs, h0, mask=mask, reverse=reverse, variant=variant,
                           backend=backend)
  ref_last, ref_hs = reference.run(p, xs, np.asarray(h0), mask=np.asarray(mask),
                                   reverse=reverse, variant=variant)
  np.testing.assert_allclose(hs, ref_hs, atol=2e-5)
  np.testing.assert_allclose(h_last, ref_last, atol=2e-5)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("time_major", [False, True])
def test_time_major_and_no_mask(backend, time_major):
  p, xs, h0, _, _, _ = problem(2)
  ref_last, ref_hs = reference.run(p, xs, np.asarray(h0))
  xs_in = jnp.swapaxes(xs, 0, 1) if time_major else xs
  h_last, hs = gru_jax.gru(p, xs_in, h0, time_major=time_major, backend=backend)
  if time_major:
    hs = jnp.swapaxes(hs, 0, 1)
  np.testing.assert_allclose(hs, ref_hs, atol=2e-5)
  np.testing.assert_allclose(h_last, ref_last, atol=2e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the layout split is CPU-only")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("reverse", [False, True])
def test_cpu_batch_major_primal_and_time_major_vjp_agree_with_reference(variant, reverse):
  """On CPU, [B,T,D] inputs run batch-major undifferentiated and time-major under AD.

  Both paths' outputs against the float64 reference (mask, h0); the VJP
  path's gradients, also with recurrent dropout, against autodiff of the scan.
  """
  p, xs, h0, mask, _, m_rec = problem(7)
  kw = dict(mask=mask, reverse=reverse, variant=variant)
  run = lambda backend, **more: lambda xs, h0: gru_jax.gru(p, xs, h0, backend=backend, **kw,
                                                            **more)
  ref_last, ref_hs = reference.run(p, xs, np.asarray(h0), mask=np.asarray(mask),
                                   reverse=reverse, variant=variant)
  for h_last, hs in (jax.jit(run("xla"))(xs, h0), jax.vjp(run("xla"), xs, h0)[0]):
    np.testing.assert_allclose(hs, ref_hs, atol=2e-5)
    np.testing.assert_allclose(h_last, ref_last, atol=2e-5)
  ct, ct_last = cotangents(xs, p.hidden_size)
  got, want = (jax.vjp(run(b, recurrent_dropout_mask=m_rec), xs, h0)[1]((ct_last, ct))
               for b in ("xla", "scan"))
  chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the chunking is CPU-only")
@pytest.mark.parametrize("variant,reverse,time_major,chunks", [
    pytest.param("seed", False, False, 3, marks=pytest.mark.slow), ("seed", True, True, 3),
    ("reset_after", False, True, 3), ("reset_after", True, False, 3),
    pytest.param("reset_after", True, True, 7, marks=pytest.mark.slow)])
def test_cpu_chunked_vjp_matches_reference_and_scan(monkeypatch, variant, reverse, time_major,
                                                    chunks):
  """On CPU the steps run in chunks (T=7: 3 uneven ones, or 7 of one step).

  Outputs, undifferentiated (the caller's layout) and under AD (time-major),
  against the float64 reference; gradients (with both dropout masks) against
  autodiff of the scan.
  """
  monkeypatch.setattr(scan, "CPU_CHUNKS", chunks)
  p, xs, h0, mask, m_in, m_rec = problem(9, t=7)
  tm = (lambda a: jnp.swapaxes(a, 0, 1)) if time_major else (lambda a: a)
  kw = dict(mask=tm(mask), reverse=reverse, variant=variant, time_major=time_major)
  run = lambda xs, h0: gru_jax.gru(p, xs, h0, backend="xla", **kw)
  ref_last, ref_hs = reference.run(p, xs, np.asarray(h0), mask=np.asarray(mask),
                                   reverse=reverse, variant=variant)
  for h_last, hs in (jax.jit(run)(tm(xs), h0), jax.vjp(run, tm(xs), h0)[0]):
    np.testing.assert_allclose(tm(hs), ref_hs, atol=2e-5)
    np.testing.assert_allclose(h_last, ref_last, atol=2e-5)
  ct, ct_last = cotangents(xs, p.hidden_size)
  kw.update(input_dropout_mask=m_in)

  def loss(backend):
    def f(p, xs, h0, m):
      h_last, hs = gru_jax.gru(p, xs, h0, backend=backend, recurrent_dropout_mask=m, **kw)
      return jnp.sum(tm(hs) * ct) + jnp.sum(h_last * ct_last)
    return f

  got, want = (jax.grad(loss(b), argnums=(0, 1, 2, 3))(p, tm(xs), h0, m_rec)
               for b in ("xla", "scan"))
  chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the chunking is CPU-only")
def test_cpu_chunks_keep_a_nan_row_to_itself(monkeypatch):
  """A NaN in one sequence stays in that sequence across chunk boundaries.

  The chunks are ordered by a data dependency on the carried state; the
  other rows' outputs and input gradients still match the float64 reference
  and the scan backend.
  """
  monkeypatch.setattr(scan, "CPU_CHUNKS", 3)
  p, xs, h0, _, _, _ = problem(10, t=7)
  xs = xs.at[0, 1, 0].set(jnp.nan)
  run = lambda backend: lambda xs: gru_jax.gru(p, xs, h0, backend=backend)[1]
  hs, vjp = jax.vjp(run("xla"), xs)
  _, ref_hs = reference.run(p, np.asarray(xs), np.asarray(h0))
  assert np.isnan(np.asarray(hs[0, 1:])).all()
  np.testing.assert_allclose(hs[1:], ref_hs[1:], atol=2e-5)
  ct, _ = cotangents(xs, p.hidden_size)
  got, = vjp(ct)
  want, = jax.vjp(run("scan"), xs)[1](ct)
  assert np.isfinite(np.asarray(got[1:])).all()
  np.testing.assert_allclose(got[1:], want[1:], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("chunks", [None, 3])
def test_cpu_layout_vjp_under_vmap_and_checkpoint(monkeypatch, chunks):
  """vmap of grad and grad of jax.checkpoint go through the CPU layout VJP unchanged.

  ``chunks``: the library's default for T=6 (one chunk), or 3 time chunks.
  """
  monkeypatch.setattr(scan, "CPU_CHUNKS", chunks)
  p, xs, _, mask, _, _ = problem(8)
  xs4 = jnp.stack([xs, -xs, 0.5 * xs])
  loss = lambda backend: lambda x: jnp.sum(
      gru_jax.gru(p, x, mask=mask, variant="reset_after", backend=backend)[1] ** 2)
  chex.assert_trees_all_close(jax.vmap(jax.grad(loss("xla")))(xs4),
                              jax.vmap(jax.grad(loss("scan")))(xs4), atol=2e-5, rtol=2e-5)
  chex.assert_trees_all_close(jax.jit(jax.grad(jax.checkpoint(loss("xla"))))(xs),
                              jax.grad(loss("scan"))(xs), atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("reverse", [False, True])
def test_grads_match_autodiff_of_scan(backend, variant, reverse):
  """Masks, h0, both dropout masks, both cotangents: vs jax.grad of lax.scan."""
  p, xs, h0, mask, m_in, m_rec = problem(3)
  ct, ct_last = cotangents(xs, p.hidden_size)
  kw = dict(mask=mask, reverse=reverse, input_dropout_mask=m_in, recurrent_dropout_mask=m_rec)
  want = grads("scan", variant, p, xs, h0, ct, ct_last, **kw)
  got = grads(backend, variant, p, xs, h0, ct, ct_last, **kw)
  chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_dropout_mask_gradients(variant):
  """The fused VJP also differentiates w.r.t. the recurrent dropout multiplier."""
  p, xs, h0, mask, m_in, m_rec = problem(4)
  ct, _ = cotangents(xs, p.hidden_size)

  def f(backend, m_rec):
    return jnp.sum(gru_jax.gru(p, xs, h0, mask=mask, variant=variant, backend=backend,
                               recurrent_dropout_mask=m_rec)[1] * ct)

  np.testing.assert_allclose(jax.grad(lambda m: f("xla", m))(m_rec),
                             jax.grad(lambda m: f("scan", m))(m_rec), atol=2e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_xla_check_grads_float64(variant):
  """Finite differences, first and second order (reverse over reverse).

  Reversed, with a mask and recurrent dropout; tests/test_cell_scan.py runs
  the forward direction through the default backend.
  """
  reverse = True
  with jax.enable_x64(True):
    p, xs, h0, mask, _, m_rec = problem(5, b=2, t=5, d=3, h=4, dtype=jnp.float64)
    f = jax.jit(lambda p, xs, h0, m_rec: gru_jax.gru(p, xs, h0, mask=mask, reverse=reverse,
                                                     variant=variant, backend="xla",
                                                     recurrent_dropout_mask=m_rec))
    check_grads(f, (p, xs, h0, m_rec), order=2, modes=("rev",), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_xla_grads_match_float64_scan(variant):
  """float32 fused gradients against float64 autodiff of the scan."""
  p, xs, h0, mask, _, _ = problem(6, t=30)
  ct, ct_last = cotangents(xs, p.hidden_size)
  got = grads("xla", variant, p, xs, h0, ct, ct_last, mask=mask)
  with jax.enable_x64(True):
    to64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
    want = grads("scan", variant, *to64((p, xs, h0, ct, ct_last)), mask=mask)
  chex.assert_trees_all_close(got, jax.tree.map(np.asarray, want), atol=5e-5, rtol=5e-5)


# ---------------------------------------------------------------- bf16 weights, f32 state

@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_compute_float32_state(backend, variant):
  p, xs, h0, mask, _, _ = problem(8, t=12, h=16)
  ct, ct_last = cotangents(xs, p.hidden_size)
  kw = dict(mask=mask, compute_dtype=jnp.bfloat16)
  h_last, hs = gru_jax.gru(p, xs, h0, variant=variant, backend=backend, **kw)
  assert hs.dtype == jnp.float32 and h_last.dtype == jnp.float32
  _, ref_hs = reference.run(p, xs, np.asarray(h0), mask=np.asarray(mask), variant=variant)
  np.testing.assert_allclose(hs, ref_hs, atol=3e-2)
  got = grads(backend, variant, p, xs, h0, ct, ct_last, **kw)
  want = grads("scan", variant, p, xs, h0, ct, ct_last, mask=mask)  # float32 autodiff
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype
    rel = float(jnp.linalg.norm(g - w) / (jnp.linalg.norm(w) + 1e-12))
    assert rel < 3e-2, rel


# ---------------------------------------------------------------- dispatch

def test_auto_picks_xla_on_cpu_and_fused_paths_fall_back():
  kw = dict(hidden_size=128, batch=64, compute_dtype=jnp.float32, state_dtype=jnp.float32)
  assert scan.resolve_backend("auto", **kw) == "xla"
  assert scan.resolve_backend("auto", platform="tpu", **kw) == "xla"
  assert scan.resolve_backend("xla", **kw) == "xla"
  assert scan.resolve_backend("pallas", **kw) == "pallas"  # interpret mode on CPU
  assert scan.resolve_backend("pallas", return_gates=True, **kw) == "scan"
  assert scan.resolve_backend("auto", remat_chunk=8, **kw) == "scan"
  with pytest.raises(ValueError, match="backend must be one of"):
    scan.resolve_backend("cudnn", **kw)


def test_auto_on_gpu_uses_pallas_only_when_weights_fit_on_chip():
  kw = dict(batch=64, state_dtype=jnp.float32, platform="gpu")
  assert scan.resolve_backend("auto", hidden_size=128, compute_dtype=jnp.float32, **kw) == "pallas"
  # f32 H=256 needs 768 KB of recurrent weights: more than an H100's 227 KB.
  assert scan.resolve_backend("auto", hidden_size=256, compute_dtype=jnp.float32, **kw) == "xla"
  assert scan.resolve_backend("pallas", hidden_size=1024, compute_dtype=jnp.float32,
                              **kw) == "xla"
  ok, why = pallas_gru.supported(hidden_size=256, batch=64, compute_dtype=jnp.float32,
                                 state_dtype=jnp.float32, platform="gpu")
  assert not ok and "shared memory" in why


def test_explicit_split_fits_where_only_a_programs_share_of_the_weights_does(monkeypatch):
  """With SPLIT=S the on-chip budget is judged per program, 3·H·H/S: H=256 f32 at
  S=16 keeps 48 KB a program (the unsplit kernel would need 768 KB); where the split
  does not apply (the seed variant, recurrent dropout, too many programs) the
  unsplit kernel's whole weights are what must fit, so "auto" stays on "xla"."""
  kw = dict(hidden_size=256, batch=16, state_dtype=jnp.float32, platform="gpu")
  monkeypatch.setattr(pallas_gru, "_sm_count", lambda: 132)  # an H100's
  f32, bf16 = jnp.float32, jnp.bfloat16
  assert scan.resolve_backend("auto", compute_dtype=f32, **kw) == "xla"  # default: unsplit only
  monkeypatch.setattr(pallas_gru, "SPLIT", 16)
  ok, why = pallas_gru.supported(compute_dtype=f32, **kw)
  assert ok, why
  assert scan.resolve_backend("auto", compute_dtype=f32, **kw) == "pallas"
  assert scan.resolve_backend("pallas", compute_dtype=bf16, **kw) == "pallas"
  for change in [dict(variant="seed"), dict(recurrent_dropout=True), dict(batch=16 * 16)]:
    assert scan.resolve_backend("auto", compute_dtype=f32, **{**kw, **change}) == "xla", change
  ok, why = pallas_gru.supported(compute_dtype=f32, **{**kw, "variant": "seed"})
  assert not ok and "768 KB" in why, why
  monkeypatch.setattr(pallas_gru, "SPLIT", 2)  # 384 KB a program: over the budget
  ok, why = pallas_gru.supported(compute_dtype=f32, **kw)
  assert not ok and "384 KB" in why and "split of 2" in why, why
  monkeypatch.setattr(pallas_gru, "SPLIT", None)
  assert pallas_gru.plan_split(split=None, variant="reset_after", hidden_size=128, batch=64,
                               compute_dtype=f32, has_rm=False, interpret=False,
                               sm_count=132) == 4  # the measured default is unchanged


def test_pallas_request_that_does_not_apply_falls_back_without_error():
  p, xs, h0, _, _, _ = problem(9, h=6)  # H=6: not a power of two, the kernel does not apply
  np.testing.assert_allclose(gru_jax.gru(p, xs, h0, backend="pallas")[1],
                             gru_jax.gru(p, xs, h0, backend="scan")[1], atol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "xla", "pallas"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("reverse", [False, True])
def test_forward_mode_ad_on_every_backend(backend, variant, reverse):
  """jax.jvp through the fused backends (custom VJPs, no forward mode of their
  own) runs the plain scan: tangents against central differences of the float64
  reference (masks and segment resets), and the adjoint identity <u, J·v> =
  <Jᵀ·u, v> against the fused path's own VJP."""
  p, xs, h0, mask, _, _ = problem(10)
  resets = jnp.zeros(mask.shape, bool).at[0, 3].set(True).at[1, 0].set(True)
  f = lambda p, xs, h0: gru_jax.gru(p, xs, h0, mask=mask, resets=resets, reverse=reverse,
                                    variant=variant, backend=backend)
  k = jax.random.key(7)
  dirs = jax.tree.map(lambda a: jax.random.normal(jax.random.fold_in(k, a.size), a.shape),
                      (p, xs, h0))
  out, tan = jax.jit(lambda *a: jax.jvp(f, a, dirs))(p, xs, h0)

  def ref(eps):
    pp, xx, hh = jax.tree.map(lambda a, d: np.asarray(a, np.float64) + eps * np.asarray(d),
                              (p, xs, h0), dirs)
    return reference.run_segments(pp, xx, hh, mask=np.asarray(mask), resets=np.asarray(resets),
                                  reverse=reverse, variant=variant)
  eps = 1e-5
  fd = [(a - b) / (2 * eps) for a, b in zip(ref(eps), ref(-eps))]
  for got, want, primal, want_primal in zip(tan, fd, out, ref(0.0)):
    np.testing.assert_allclose(primal, want_primal, atol=2e-5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4)

  u = cotangents(xs, p.hidden_size, seed=3)
  u = (u[1], u[0])  # (h_last, hs), the order gru returns
  _, vjp = jax.vjp(f, p, xs, h0)
  lhs = sum(jnp.vdot(a, b) for a, b in zip(u, tan))
  rhs = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(vjp(u)), jax.tree.leaves(dirs)))
  np.testing.assert_allclose(lhs, rhs, rtol=1e-4)


def test_forward_mode_falls_back_only_under_forward_mode(monkeypatch):
  """Reverse mode (and forward-over-reverse, the Hessian-vector product) keeps
  the fused path's VJP; jacfwd gets the scan.  Known answers:
  jacfwd equals jacrev, and the HVP equals the Hessian's product with v."""
  p, xs, h0, _, _, _ = problem(12, b=2, t=4, d=3, h=4)
  calls = []
  scan_loop = scan._recurrence_scan
  monkeypatch.setattr(scan, "_recurrence_scan", lambda *a, **k: calls.append(1) or scan_loop(*a, **k))
  f = lambda xs: gru_jax.gru(p, xs, h0, variant="reset_after", backend="xla")[0]
  loss = lambda xs: jnp.sum(f(xs) ** 2)
  jac_rev = jax.jacrev(f)(xs)
  v = jnp.ones_like(xs)
  hvp = jax.jvp(jax.grad(loss), (xs,), (v,))[1]
  assert calls == []  # reverse mode and forward-over-reverse stay on the custom VJP
  np.testing.assert_allclose(jax.jacfwd(f)(xs), jac_rev, rtol=1e-5, atol=1e-6)
  hess = jax.hessian(loss)(xs).reshape(xs.size, xs.size)
  np.testing.assert_allclose(hvp.ravel(), hess @ v.ravel(), rtol=1e-4, atol=1e-5)
  assert calls  # jacfwd ran the scan
  # Nested: vmap inside jvp, and jit outside jacfwd, trace gru under the JVP too.
  one = lambda x, h: gru_jax.gru(p, x[None], h[None], variant="reset_after", backend="xla")[0][0]
  v1 = jax.jvp(lambda xs: jax.vmap(one)(xs, h0), (xs,), (v,))[1]
  np.testing.assert_allclose(v1, jnp.einsum("bhxtd,xtd->bh", jac_rev, v), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.jacfwd(f))(xs), jac_rev, rtol=1e-5, atol=1e-6)
  # A jitted function is staged on its own and its program reused under other
  # transformations, so it keeps the fused path and JAX refuses the jvp, whichever
  # transformation traced it first.
  jf = jax.jit(f)
  jf(xs)
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.block_until_ready(jax.jvp(jf, (xs,), (v,)))
  jf2 = jax.jit(f)
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.block_until_ready(jax.jvp(jf2, (xs,), (v,)))
  calls.clear()
  np.testing.assert_allclose(jax.jacrev(jf2)(xs), jac_rev, rtol=1e-6, atol=1e-7)
  assert calls == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_second_order_derivatives_through_pallas_use_the_xla_loops(variant):
  """The Pallas kernels have no derivatives of their own, so a call differentiated
  twice runs the "xla" loops; once, it keeps the kernels.  Against the plain
  scan's autodiff: grad of grad, the Hessian-vector product (jvp of grad) and
  the Hessian, under jit, with a mask and segment resets."""
  p, xs, h0, mask, _, _ = problem(13, b=2, t=4, d=3, h=4)
  resets = jnp.zeros(mask.shape, bool).at[0, 2].set(True)

  def loss(backend):
    return lambda xs: jnp.sum(gru_jax.gru(p, xs, h0, mask=mask, resets=resets, variant=variant,
                                          backend=backend)[1] ** 2)

  def second_orders(backend):
    f = loss(backend)
    return (jax.grad(lambda x: jnp.sum(jax.grad(f)(x) ** 2))(xs),
            jax.jvp(jax.grad(f), (xs,), (jnp.cos(xs),))[1],
            jax.jit(jax.hessian(f))(xs))
  for got, want in zip(second_orders("pallas"), second_orders("scan")):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  count = lambda fn: str(jax.make_jaxpr(fn)(xs)).count("pallas_call")
  assert count(jax.grad(loss("pallas"))) == 2  # the forward and the backward kernel
  assert count(jax.hessian(loss("pallas"))) == 0


@pytest.mark.parametrize("backend", ["auto", "xla", "pallas", "scan"])
def test_inside_shard_map_with_vma_checks(backend):
  """Under `jax.shard_map` (check_vma on, the default) the loops' carries and the
  custom VJPs' cotangents must vary over the mesh axes like the inputs; zero h0
  and the loops' buffers did not ("carry input and carry output must have equal
  types").  Against the float64 reference, and gradients of replicated params
  against the same call without shard_map; both variants, mask, resets, reverse."""
  from jax.sharding import PartitionSpec as P
  mesh = jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  p, xs, h0, mask, _, _ = problem(14, b=2, t=5, d=3, h=4)
  resets = jnp.zeros(mask.shape, bool).at[0, 2].set(True)
  for variant, reverse, with_h0 in (("seed", False, False), ("reset_after", True, True)):
    def run(p, xs, mask, resets, h0):
      return gru_jax.gru(p, xs, h0 if with_h0 else None, mask=mask, resets=resets,
                         reverse=reverse, variant=variant, backend=backend)
    sharded = jax.shard_map(run, mesh=mesh, in_specs=(P(), P("d"), P("d"), P("d"), P("d")),
                            out_specs=P("d"))
    h_last, hs = jax.jit(sharded)(p, xs, mask, resets, h0)
    ref_last, ref_hs = reference.run_segments(
        p, xs, np.asarray(h0) if with_h0 else None, mask=np.asarray(mask),
        resets=np.asarray(resets), reverse=reverse, variant=variant)
    np.testing.assert_allclose(hs, ref_hs, atol=2e-5)
    np.testing.assert_allclose(h_last, ref_last, atol=2e-5)
    loss = lambda f: lambda p, h0: jnp.sum(f(p, xs, mask, resets, h0)[1] ** 2)
    got = jax.jit(jax.grad(loss(sharded), argnums=(0, 1)))(p, h0)
    want = jax.grad(loss(run), argnums=(0, 1))(p, h0)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "scan"])
def test_jax_export_with_symbolic_batch_and_time(backend):
  """`jax.export` with symbolic B and T, serialised with its VJP and called at two
  concrete shapes: outputs against the float64 reference, gradients against the
  plain scan's.  GRUParams could not be serialised, and the CPU chunk counts
  compared the symbolic T with numbers."""
  from jax import export
  p, _, _, _, _, _ = problem(15, d=3, h=4)
  spec = jax.ShapeDtypeStruct(export.symbolic_shape("b, t") + (3,), jnp.float32)
  fn = lambda p, xs: gru_jax.gru(p, xs, variant="reset_after", backend=backend)
  exported = export.deserialize(export.export(jax.jit(fn))(p, spec).serialize(vjp_order=1))
  for b, t in ((2, 5), (3, 50)):
    xs = jax.random.normal(jax.random.key(b * t), (b, t, 3))
    h_last, hs = exported.call(p, xs)
    ref_last, ref_hs = reference.run(p, xs, variant="reset_after")
    np.testing.assert_allclose(hs, ref_hs, atol=2e-5)
    np.testing.assert_allclose(h_last, ref_last, atol=2e-5)
    loss = lambda f: lambda p: jnp.sum(f(p, xs)[1] ** 2)
    got = jax.grad(loss(exported.call))(p)
    want = jax.grad(loss(lambda p, xs: gru_jax.gru(p, xs, variant="reset_after",
                                                   backend="scan")))(p)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("time_axis", [0, 1])
def test_kernels_lower_to_triton_for_gpu(time_axis):
  """Without a GPU: lowering for CUDA runs the Pallas Triton lowering rules
  (power-of-two blocks, supported ops) on both kernels, train step included."""
  from gru_jax.kernels import fused_rnn
  b, t, h = 32, 5, 32
  ks = jax.random.split(jax.random.key(11), 3)
  w_h = 0.1 * jax.random.normal(ks[0], (h, 3 * h))
  xp = jax.random.normal(ks[1], (t, b, 3 * h) if time_axis == 0 else (b, t, 3 * h))
  h0, rm = jnp.zeros((b, h)), jnp.ones((b, h))
  mask = jnp.ones(xp.shape[:2], bool)
  for variant in VARIANTS:
    for dtype in (jnp.float32, jnp.bfloat16):
      def loss(w_h, xp, h0):
        _, hs = fused_rnn.recurrence(w_h.astype(dtype), jnp.zeros(3 * h), jnp.zeros(h), xp, h0,
                                     mask, rm, variant=variant, time_axis=time_axis,
                                     impl="pallas", interpret=False)
        return jnp.sum(hs)
      text = cuda_module(loss, w_h, xp, h0)
      assert "_forward_kernel" in text and "_backward_kernel" in text


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_pallas_prefetch_on_and_off_match_reference_and_scan_grads(prefetch, variant, monkeypatch):
  """The software-pipelined loop (inputs of step t+1 loaded during step t) and the
  plain loop compute the same forward values and gradients, masks and reverse time included."""
  monkeypatch.setattr(pallas_gru, "PREFETCH", prefetch)
  p, xs, h0, mask, _, _ = problem(21)
  for reverse in (False, True):
    h_last, hs = gru_jax.gru(p, xs, h0, mask=mask, reverse=reverse, variant=variant,
                             backend="pallas")
    ref_last, ref_hs = reference.run(p, xs, np.asarray(h0), mask=np.asarray(mask),
                                     reverse=reverse, variant=variant)
    np.testing.assert_allclose(hs, ref_hs, atol=2e-5)
    np.testing.assert_allclose(h_last, ref_last, atol=2e-5)
    ct, ct_last = cotangents(xs, h0.shape[-1], seed=3)
    got = grads("pallas", variant, p, xs, h0, ct, ct_last, mask=mask, reverse=reverse)
    want = grads("scan", variant, p, xs, h0, ct, ct_last, mask=mask, reverse=reverse)
    chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("time_major", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_packed_stores_match_unpacked_scan_and_reference(variant, time_major, monkeypatch):
  """The "xla" loops with packed stores (`fused_rnn.PACKED`, one row of
  residuals and one dxp row per step) give the float64 reference's outputs and
  the gradients of the unpacked loops and of autodiff of the scan, with masks,
  resets, recurrent dropout and h0, in both directions and both layouts."""
  from gru_jax.kernels import fused_rnn
  p, xs, h0, mask, m_in, m_rec = problem(41, t=7)
  ct, ct_last = cotangents(xs, p.hidden_size)
  resets = jax.random.bernoulli(jax.random.key(8), 0.25, mask.shape)
  tm = (lambda a: jnp.swapaxes(a, 0, 1)) if time_major else (lambda a: a)
  seen = []
  real = fused_rnn._make
  monkeypatch.setattr(fused_rnn, "_make", lambda cfg: seen.append(cfg.packed) or real(cfg))
  for reverse in (False, True):
    kw = dict(mask=tm(mask), reverse=reverse, input_dropout_mask=m_in,
              recurrent_dropout_mask=m_rec, resets=tm(resets), time_major=time_major)
    args = (p, tm(xs), h0, tm(ct), ct_last)
    want = grads("scan", variant, *args, **kw)
    monkeypatch.setattr(fused_rnn, "PACKED", False)
    unpacked = grads("xla", variant, *args, **kw)
    monkeypatch.setattr(fused_rnn, "PACKED", True)
    packed = grads("xla", variant, *args, **kw)
    chex.assert_trees_all_close(packed, want, atol=2e-5, rtol=2e-5)
    chex.assert_trees_all_close(packed, unpacked, atol=2e-6, rtol=2e-6)
    # Outputs of the differentiated call (the packed forward runs only under AD).
    (h_last, hs), _ = jax.vjp(lambda x: gru_jax.gru(p, x, h0, mask=mask, reverse=reverse,
                                                    variant=variant, backend="xla"), xs)
    ref_last, ref_hs = reference.run(p, xs, np.asarray(h0), mask=np.asarray(mask),
                                     reverse=reverse, variant=variant)
    np.testing.assert_allclose(hs, ref_hs, atol=2e-5)
    np.testing.assert_allclose(h_last, ref_last, atol=2e-5)
  assert set(seen) == {False, True}, seen  # both layouts really ran


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("time_axis", [0, 1])
def test_xla_scan_primal_matches_loop_primal_and_reference(variant, time_axis):
  """The undifferentiated "xla" forward run as a time-major lax.scan (the GPU
  default) equals the fori_loop forward (masks, reverse time, recurrent
  dropout) and, without dropout, the float64 reference."""
  from gru_jax import cell as cell_lib
  from gru_jax.kernels import fused_rnn
  p, xs, h0, mask, _, m_rec = problem(31)
  xp = cell_lib.matmul(xs, p.w_x, xs.dtype)
  args = (p.w_h, cell_lib.folded_bias(p, variant), p.b_h[2 * p.hidden_size:])
  xp_in, mask_in = (jnp.swapaxes(xp, 0, 1), mask.T) if time_axis == 0 else (xp, mask)
  for reverse in (False, True):
    for rm in (None, m_rec):
      outs = {primal: fused_rnn.recurrence(*args, xp_in, h0, mask_in, rm, variant=variant,
                                           reverse=reverse, time_axis=time_axis, primal=primal)
              for primal in ("loop", "scan")}
      chex.assert_trees_all_close(outs["scan"], outs["loop"], atol=1e-6, rtol=1e-6)
    ref_last, ref_hs = reference.run(p, xs, np.asarray(h0), mask=np.asarray(mask),
                                     reverse=reverse, variant=variant)
    h_last, hs = fused_rnn.recurrence(*args, xp_in, h0, mask_in, variant=variant,
                                      reverse=reverse, time_axis=time_axis, primal="scan")
    np.testing.assert_allclose(hs if time_axis == 1 else jnp.swapaxes(hs, 0, 1), ref_hs,
                               atol=2e-5)
    np.testing.assert_allclose(h_last, ref_last, atol=2e-5)
  with pytest.raises(ValueError, match="primal must be"):
    fused_rnn.recurrence(*args, xp, h0, primal="while")


# ---------------------------------------------------------------- column-split kernels

@pytest.mark.parametrize("time_major", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_split_kernels_match_reference_and_scan_grads(time_major, monkeypatch):
  """The column-split kernels (one program per tile and column block, state
  exchanged through a sentinel-filled buffer) in interpret mode, where only one
  column block can run: forward against float64 NumPy, gradients against
  autodiff of the plain scan, with masks and reverse time.  Several column
  blocks need concurrent programs: experiments/gpu_check.py checks them on GPU."""
  from gru_jax.kernels import pallas_split
  calls = []
  monkeypatch.setattr(pallas_gru, "SPLIT", 1)
  for name in ("forward", "backward"):
    orig = getattr(pallas_split, name)
    monkeypatch.setattr(pallas_split, name,
                        lambda *a, _o=orig, _n=name, **k: calls.append(_n) or _o(*a, **k))
  p, xs, h0, mask, _, _ = problem(41)
  tm = (lambda a: jnp.swapaxes(a, 0, 1)) if time_major else (lambda a: a)
  for reverse in (False, True):
    for m in (None, mask):
      kw = dict(mask=None if m is None else tm(m), reverse=reverse, variant="reset_after",
                time_major=time_major)
      h_last, hs = gru_jax.gru(p, tm(xs), h0, backend="pallas", **kw)
      ref_last, ref_hs = reference.run(p, xs, np.asarray(h0),
                                       mask=None if m is None else np.asarray(m),
                                       reverse=reverse, variant="reset_after")
      np.testing.assert_allclose(tm(hs), ref_hs, atol=2e-5)
      np.testing.assert_allclose(h_last, ref_last, atol=2e-5)
      ct, ct_last = cotangents(xs, h0.shape[-1], seed=5)

      def loss(backend):
        def f(p, x, h0):
          h_last, hs = gru_jax.gru(p, x, h0, backend=backend, **kw)
          return jnp.sum(tm(hs) * ct) + jnp.sum(h_last * ct_last)
        return f
      got = jax.grad(loss("pallas"), argnums=(0, 1, 2))(p, tm(xs), h0)
      want = jax.grad(loss("scan"), argnums=(0, 1, 2))(p, tm(xs), h0)
      chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)
  assert "forward" in calls and "backward" in calls


def test_split_applies_only_where_it_can_run():
  from gru_jax.kernels import pallas_split
  base = dict(variant="reset_after", hidden_size=128, batch=64, tile=16, split=4, has_rm=False,
              interpret=False, sm_count=132)
  assert pallas_split.applies(**base) == (True, "fits")
  for change, why in [(dict(split=0), "off"), (dict(variant="seed"), "reset_after"),
                      (dict(has_rm=True), "dropout"), (dict(split=3), "power of two"),
                      (dict(split=16), "< 16"), (dict(batch=1024), "resident on 132 SMs"),
                      (dict(sm_count=None), "SM count is unknown"),
                      (dict(interpret=True), "split must be 1")]:
    ok, reason = pallas_split.applies(**{**base, **change})
    assert not ok and why in reason, (change, reason)
  assert pallas_split.applies(**{**base, "interpret": True, "split": 1})[0]


@pytest.mark.parametrize("joint_wait", [False, True])
def test_split_kernels_lower_to_triton_for_gpu(joint_wait, monkeypatch):
  """Without a GPU: with SPLIT=4 the train step lowers through the split kernels
  (a 2-D grid, the spin-wait's while loop and volatile loads included), with the
  backward's three gate rows waited for one after another or together."""
  from gru_jax.kernels import fused_rnn, pallas_split
  monkeypatch.setattr(pallas_gru, "SPLIT", 4)
  monkeypatch.setattr(pallas_gru, "_sm_count", lambda: 132)  # an H100's; the CPU reports none
  monkeypatch.setattr(pallas_split, "JOINT_WAIT", joint_wait)
  fused_rnn._make.cache_clear()
  b, t, h = 64, 5, 128
  ks = jax.random.split(jax.random.key(12), 2)
  w_h = 0.1 * jax.random.normal(ks[0], (h, 3 * h))
  xp = jax.random.normal(ks[1], (t, b, 3 * h))
  mask = jnp.ones((t, b), bool)

  def loss(w_h, xp, h0):
    _, hs = fused_rnn.recurrence(w_h, jnp.zeros(3 * h), jnp.zeros(h), xp, h0, mask,
                                 variant="reset_after", time_axis=0, impl="pallas",
                                 interpret=False)
    return jnp.sum(hs)
  text = cuda_module(loss, w_h, xp, jnp.zeros((b, h)))
  assert text.count("grid_y = 4") == 2  # the forward and the backward kernel
  fused_rnn._make.cache_clear()


def test_explicit_split_at_h256_lowers_to_triton_for_gpu(monkeypatch):
  """Without a GPU: H=256 with SPLIT=16 runs through `gru_jax.gru` as 16 programs per
  batch tile, each with [256, 3·16] of the weights, forward and backward."""
  from gru_jax.kernels import fused_rnn
  monkeypatch.setattr(pallas_gru, "SPLIT", 16)
  monkeypatch.setattr(pallas_gru, "_sm_count", lambda: 132)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  fused_rnn._make.cache_clear()
  p = gru_jax.cell.init(jax.random.key(3), 8, 256)
  xs = jnp.ones((16, 4, 8))

  def loss(p, xs):
    return jnp.sum(gru_jax.gru(p, xs, variant="reset_after", compute_dtype=jnp.bfloat16)[1])
  text = cuda_module(loss, p, xs)
  assert text.count("grid_y = 16") == 2
  assert "tensor<3x256x256xbf16>" in text  # the weights, each program's BlockSpec [3,256,16]
  fused_rnn._make.cache_clear()


def test_default_split_and_primal_follow_the_measured_rules(monkeypatch):
  """S = H/32 column blocks for the Pallas kernels on GPU (none in interpret mode,
  below H=128, or where the split does not apply); the undifferentiated "xla"
  forward is a scan on GPU and the loop elsewhere, and the "xla" loops store
  unpacked rows, unless overridden."""
  from gru_jax.kernels import fused_rnn
  cfg = lambda **k: fused_rnn.Config(**{**dict(variant="reset_after", reverse=False, time_axis=0,
                                               impl="pallas", interpret=False), **k})
  f32 = jnp.float32
  assert pallas_gru.SPLIT is None
  monkeypatch.setattr(pallas_gru, "_sm_count", lambda: 132)  # an H100's; the CPU reports none
  assert pallas_gru._split(cfg(), 64, 128, None, f32) == 4
  assert pallas_gru._split(cfg(), 1024, 128, None, f32) == 0  # 256 programs > 132 SMs
  assert pallas_gru._split(cfg(), 64, 64, None, f32) == 0  # not measured below H=128
  assert pallas_gru._split(cfg(), 64, 32, None, f32) == 0
  # Not by default where only a split program's share of the weights fits (untimed).
  assert pallas_gru._split(cfg(), 16, 256, None, f32) == 0
  assert pallas_gru._split(cfg(), 16, 256, None, jnp.bfloat16) == 0
  assert pallas_gru._split(cfg(interpret=True), 64, 128, None, f32) == 0
  assert pallas_gru._split(cfg(variant="seed"), 64, 128, None, f32) == 0
  assert pallas_gru._split(cfg(), 64, 128, jnp.ones((64, 128)), f32) == 0  # recurrent dropout
  assert pallas_gru._split(cfg(), 64, 128, None, f32, jnp.float32(0.1)) == 0  # zoneout
  assert pallas_gru._split(cfg(split=8), 64, 128, None, f32) == 8  # the setting when traced
  monkeypatch.setattr(pallas_gru, "_sm_count", lambda: None)
  assert pallas_gru._split(cfg(split=8), 64, 128, None, f32) == 0
  assert fused_rnn.default_primal("cpu") == "loop"
  assert fused_rnn.default_primal("gpu") == "scan"
  monkeypatch.setattr(fused_rnn, "PRIMAL", "scan")
  assert fused_rnn.default_primal("cpu") == "scan"
  # Packed stores: untimed on a GPU, so off everywhere unless asked for; never
  # for the Pallas kernels, which store their own residuals.
  assert fused_rnn.default_packed("gpu") is False and fused_rnn.default_packed("cpu") is False
  monkeypatch.setattr(fused_rnn, "PACKED", True)
  assert fused_rnn.default_packed("gpu") is True
  seen = []
  real = fused_rnn._make
  monkeypatch.setattr(fused_rnn, "_make", lambda c: seen.append((c.impl, c.packed)) or real(c))
  for impl in ("xla", "pallas"):
    fused_rnn.recurrence(jnp.zeros((16, 48)), jnp.zeros(48), jnp.zeros(16),
                         jnp.zeros((2, 16, 48)), jnp.zeros((16, 16)), variant="reset_after",
                         impl=impl, interpret=True)
  assert seen == [("xla", True), ("pallas", False)], seen


def test_cpu_chunk_counts_follow_their_rules(monkeypatch):
  """Known answers for the chunk counts, and the override bounded by T."""
  assert [scan.cpu_chunks(t) for t in (1, 39, 40, 100, 500, 1000, 5000)] == [1, 1, 4, 5, 5, 10, 10]
  mib = 2**20
  assert scan.cpu_forward_chunks(100, 24 * mib) == 1
  assert scan.cpu_forward_chunks(100, 37 * mib) == 5  # ceil(37 / 8)
  assert scan.cpu_forward_chunks(1000, 47 * mib) == 6
  assert scan.cpu_forward_chunks(30, 400 * mib) == 3  # at most one chunk per 10 steps
  monkeypatch.setattr(scan, "CPU_CHUNKS", 50)
  assert scan.cpu_chunks(7) == 7 and scan.cpu_forward_chunks(7, 0) == 7


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the chunking is CPU-only")
def test_cpu_default_forward_chunks_a_large_projection():
  """x·w_x of 37.5 MiB (B=64, T=100, H=512): the undifferentiated call runs in 5 chunks.

  Outputs, with a mask and reverse, against the float64 reference.
  """
  b, t, h = 64, 100, 512
  assert scan.cpu_forward_chunks(t, b * t * 3 * h * 4) == 5
  p, xs, h0, mask, _, _ = problem(11, b=b, t=t, d=3, h=h)
  h_last, hs = jax.jit(lambda xs: gru_jax.gru(p, xs, h0, mask=mask, reverse=True,
                                              backend="xla"))(xs)
  ref_last, ref_hs = reference.run(p, xs, np.asarray(h0), mask=np.asarray(mask), reverse=True)
  np.testing.assert_allclose(hs, ref_hs, atol=5e-5)
  np.testing.assert_allclose(h_last, ref_last, atol=5e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the chunking is CPU-only")
def test_cpu_chunks_one_runs_whole_and_saves_the_joined_outputs(monkeypatch):
  """CPU_CHUNKS=1 (the README's memory switch) traces one loop pair, and a smaller step.

  Known answers from the compiled programs: the default traces 5 forward and 5
  backward loops at T=100 and needs more temporary memory than the whole run.
  """
  p = gru_jax.cell.init(jax.random.key(0), 8, 16)
  xs = jnp.ones((4, 100, 8))
  step = lambda: jax.jit(jax.grad(lambda p: jnp.sum(gru_jax.gru(p, xs)[1] ** 2))).lower(p)

  def loops_and_temp():
    lowered = step()
    return (lowered.as_text().count("stablehlo.while"),
            lowered.compile().memory_analysis().temp_size_in_bytes)

  chunked_loops, chunked_temp = loops_and_temp()
  monkeypatch.setattr(scan, "CPU_CHUNKS", 1)
  whole_loops, whole_temp = loops_and_temp()
  assert (chunked_loops, whole_loops) == (10, 2)
  assert whole_temp < chunked_temp
