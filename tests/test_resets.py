"""Segment resets (`gru_jax.gru(..., resets=)`): episode starts in RL, packed sequences.

References: the float64 NumPy segment runner (`reference.run_segments`, which
cuts each sequence into segments and runs every one on its own), Haiku's
`hk.ResetCore`, and running the packed sequences one by one.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import gru_jax
from gru_jax import layernorm, layers, nnx_layers, scan
from tests import reference
from tests.test_cell_scan import random_params
from tests.test_kernels import cuda_module

B, T, D, H = 5, 13, 3, 4
BACKENDS = ["scan", "xla", "pallas"]


def _data(seed=0, b=B, t=T, masked=True, p_reset=0.25):
  rng = np.random.default_rng(seed)
  xs = rng.normal(size=(b, t, D)).astype(np.float32)
  h0 = rng.normal(size=(b, H)).astype(np.float32)
  resets = rng.random((b, t)) < p_reset
  resets[0, 0] = True  # an RL episode that starts at the first step: h0 is dropped
  mask = rng.random((b, t)) < 0.75 if masked else None
  if masked:
    mask[1] = False  # a row with no valid step keeps h0
    mask[2, -3:] = False  # trailing padding, with a reset on it
    resets[2, -2] = True
  return xs, h0, mask, resets


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("variant", ["seed", "reset_after"])
def test_resets_match_segment_reference(variant, masked, reverse, backend):
  p = random_params(jax.random.key(1), D, H)
  xs, h0, mask, resets = _data(masked=masked)
  h_last, hs = gru_jax.gru(p, xs, h0, mask=mask, resets=resets, reverse=reverse,
                           variant=variant, backend=backend)
  ref_last, ref_hs = reference.run_segments(p, xs, h0, mask, resets, reverse, variant)
  np.testing.assert_allclose(hs, ref_hs, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(h_last, ref_last, atol=2e-5, rtol=1e-5)


def test_reference_segments_differ_from_one_sequence():
  """The test above would be empty if resets changed nothing."""
  p = random_params(jax.random.key(1), D, H)
  xs, h0, mask, resets = _data()
  _, with_resets = reference.run_segments(p, xs, h0, mask, resets)
  _, without = reference.run(p, xs, h0, mask)
  assert np.abs(with_resets - without).max() > 0.1


def test_effective_resets_known_answers():
  #          t: 0  1  2  3  4  5
  resets = [[1, 0, 1, 0, 0, 1],   # boundaries before 0, 2, 5
            [0, 1, 0, 0, 1, 0]]   # before 1 and 4; steps 1 and 4 are padding
  mask = [[1, 1, 1, 1, 1, 1],
          [1, 0, 1, 1, 0, 1]]
  r, m = jnp.asarray(resets, bool), jnp.asarray(mask, bool)
  fwd = scan.effective_resets(r, m, reverse=False, axis=1)
  bwd = scan.effective_resets(r, m, reverse=True, axis=1)
  # Forwards a step restarts after a boundary; one on padding moves to the next valid step.
  np.testing.assert_array_equal(fwd, [[1, 0, 1, 0, 0, 1], [0, 0, 1, 0, 0, 1]])
  # Backwards a step restarts when a boundary lies after it, before the next valid step.
  np.testing.assert_array_equal(bwd, [[0, 1, 0, 0, 1, 0], [1, 0, 0, 1, 0, 0]])
  np.testing.assert_array_equal(scan.effective_resets(r.T, m.T, reverse=True, axis=0), bwd.T)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("backend", ["xla", "scan"])
def test_packed_sequences_equal_separate_runs(backend, reverse):
  """Three sequences packed into one row, then padding, give each one's own outputs."""
  p = random_params(jax.random.key(2), D, H)
  rng = np.random.default_rng(3)
  lengths = [4, 6, 1]
  seqs = [rng.normal(size=(1, n, D)).astype(np.float32) for n in lengths]
  packed = np.concatenate(seqs + [np.zeros((1, 2, D), np.float32)], axis=1)  # [1,13,D]
  starts = np.cumsum([0] + lengths[:-1])
  resets = np.zeros((1, packed.shape[1]), bool)
  resets[0, starts] = True
  mask = np.arange(packed.shape[1])[None] < sum(lengths)
  _, hs = gru_jax.gru(p, packed, mask=mask, resets=resets, reverse=reverse,
                      variant="reset_after", backend=backend)
  for s, x in zip(starts, seqs):
    _, want = gru_jax.gru(p, x, reverse=reverse, variant="reset_after", backend=backend)
    np.testing.assert_allclose(hs[:, s:s + x.shape[1]], want, atol=1e-6)
  np.testing.assert_array_equal(hs[:, sum(lengths):], 0.0)


def test_matches_haiku_reset_core():
  """Haiku's own reset wrapper around its GRU (the seed's equations, zero initial state)."""
  hk = pytest.importorskip("haiku")
  xs, _, _, resets = _data(seed=4, masked=False)

  def unroll(xs, resets):
    core = hk.ResetCore(hk.GRU(H, b_init=hk.initializers.RandomUniform(-0.6, 0.6)))
    h0 = core.initial_state(xs.shape[0])
    return hk.dynamic_unroll(core, (jnp.swapaxes(xs, 0, 1), jnp.swapaxes(resets, 0, 1)), h0)

  f = hk.without_apply_rng(hk.transform(unroll))
  hk_params = f.init(jax.random.key(0), xs, resets)
  out, h_n = f.apply(hk_params, xs, resets)
  h_last, hs = gru_jax.gru(gru_jax.convert.from_haiku(hk_params), xs, resets=resets)
  np.testing.assert_allclose(hs, jnp.swapaxes(out, 0, 1), atol=1e-5)
  np.testing.assert_allclose(h_last, h_n, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("variant", ["seed", "reset_after"])
def test_gradients_float64(variant, reverse):
  """The hand-written VJP of the XLA loop against finite differences, with resets and padding."""
  with jax.enable_x64(True):
    p = random_params(jax.random.key(5), D, H, dtype=jnp.float64)
    xs, h0, mask, resets = _data(seed=6, b=3, t=7)
    xs, h0 = xs.astype(np.float64), h0.astype(np.float64)
    rm = jnp.asarray(np.random.default_rng(7).uniform(0.5, 1.5, (3, H)))
    f = lambda p, xs, h0, rm: gru_jax.gru(p, xs, h0, mask=mask, resets=resets, reverse=reverse,
                                          variant=variant, backend="xla",
                                          recurrent_dropout_mask=rm)
    check_grads(f, (p, xs, h0, rm), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("reverse,time_major", [(False, False), (True, True)])
def test_long_sequences_in_cpu_chunks_match_autodiff(reverse, time_major):
  """T = 64 runs the CPU "xla" path in chunks under AD; values and gradients as plain scan."""
  p = random_params(jax.random.key(8), D, H)
  xs, h0, mask, resets = _data(seed=9, b=3, t=64, p_reset=0.05)
  if time_major:
    xs, mask, resets = np.swapaxes(xs, 0, 1), mask.T, resets.T

  def loss(p, xs, h0, backend):
    h_last, hs = gru_jax.gru(p, xs, h0, mask=mask, resets=resets, reverse=reverse,
                             time_major=time_major, variant="reset_after", backend=backend)
    return jnp.sum(jnp.sin(hs)) + jnp.sum(h_last ** 2)

  assert scan.cpu_chunks(64) > 1
  vg = jax.jit(jax.value_and_grad(loss, (0, 1, 2)), static_argnums=3)
  got, want = vg(p, xs, h0, "xla"), vg(p, xs, h0, "scan")
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
  _, hs = gru_jax.gru(p, xs, h0, mask=mask, resets=resets, reverse=reverse,
                      time_major=time_major, variant="reset_after")
  tm = (lambda a: np.swapaxes(a, 0, 1)) if time_major else (lambda a: a)
  _, ref_hs = reference.run_segments(p, tm(xs), h0, tm(mask), tm(resets), reverse,
                                     "reset_after")
  np.testing.assert_allclose(tm(np.asarray(hs)), ref_hs, atol=3e-5)


def test_remat_chunks_with_resets_match_reference():
  p = random_params(jax.random.key(10), D, H)
  xs, h0, mask, resets = _data(seed=11)
  f = lambda p, remat: gru_jax.gru(p, xs, h0, mask=mask, resets=resets, remat_chunk=remat)
  np.testing.assert_allclose(f(p, 4)[1], reference.run_segments(p, xs, h0, mask, resets)[1],
                             atol=2e-5)
  g = lambda remat: jax.grad(lambda p: jnp.sum(f(p, remat)[1] ** 2))(p)
  for a, b in zip(jax.tree.leaves(g(4)), jax.tree.leaves(g(None))):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_all_false_resets_change_nothing():
  p = random_params(jax.random.key(12), D, H)
  xs, h0, mask, _ = _data(seed=13)
  plain = gru_jax.gru(p, xs, h0, mask=mask, backend="xla")
  none = gru_jax.gru(p, xs, h0, mask=mask, resets=np.zeros((B, T), bool), backend="xla")
  jax.tree.map(np.testing.assert_array_equal, plain, none)


def test_backend_choice_with_resets(monkeypatch):
  """Resets take the same path as plain sequences: "auto" runs the kernels on GPU (they
  were checked and timed there: 5.67 against 22.3 ms on XLA, H100 2026-11-28), "xla"
  on CPU; `AUTO_PALLAS_RESETS = False` sends them back to "xla"; an explicit "pallas"
  always runs the kernels."""
  kw = dict(hidden_size=128, batch=16, compute_dtype=jnp.float32, state_dtype=jnp.float32,
            platform="gpu", resets=True)
  assert scan.resolve_backend("pallas", **kw) == "pallas"
  assert scan.resolve_backend("auto", **kw) == "pallas"
  assert scan.resolve_backend("auto", **{**kw, "platform": "cpu"}) == "xla"
  monkeypatch.setattr(scan, "AUTO_PALLAS_RESETS", False)
  assert scan.resolve_backend("auto", **kw) == "xla"
  assert scan.resolve_backend("pallas", **kw) == "pallas"
  assert scan.resolve_backend("auto", **{**kw, "resets": False}) == "pallas"


def _spy_kernels(monkeypatch, module):
  """Records which of ``module``'s forward/backward ran, and whether resets reached them."""
  calls = []
  for name in ("forward", "backward"):
    orig = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, _o=orig, _n=name, **k: (
        calls.append((_n, k.get("rs") is not None)), _o(*a, **k))[1])
  return calls


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("time_major", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_pallas_kernels_with_resets_match_reference_and_xla_grads(time_major, split,
                                                                  monkeypatch):
  """The Pallas kernels (interpret mode) take the reset flags themselves: forward
  against the float64 segment runner, gradients against the XLA loop's VJP (itself
  checked against finite differences above) and autodiff of the plain scan, for
  both variants, reverse time, padding and recurrent dropout (against the scan:
  the reference has no dropout).  ``split``: the
  column-split kernels ("reset_after", no dropout; one column block in interpret
  mode)."""
  from gru_jax.kernels import fused_rnn, pallas_gru, pallas_split
  monkeypatch.setattr(pallas_gru, "SPLIT", 1 if split else 0)
  fused_rnn._make.cache_clear()
  calls = _spy_kernels(monkeypatch, pallas_split if split else pallas_gru)
  p = random_params(jax.random.key(14), D, H)
  xs, h0, mask, resets = _data(seed=15, b=4)
  rm = np.random.default_rng(16).uniform(0.5, 1.5, (4, H)).astype(np.float32)
  tm = (lambda a: np.swapaxes(a, 0, 1)) if time_major else (lambda a: a)
  ct = np.random.default_rng(17).normal(size=(4, T, H)).astype(np.float32)
  # Unsplit: each variant both ways, dropout on one of the two (pairwise, to keep
  # interpret mode's time down); split: "reset_after" both ways, no dropout.
  cases = ([("reset_after", rev, None) for rev in (False, True)] if split else
           [("seed", False, None), ("seed", True, rm), ("reset_after", False, rm),
            ("reset_after", True, None)])
  for variant, reverse, drop in cases:
    kw = dict(mask=tm(mask), resets=tm(resets), reverse=reverse, variant=variant,
              time_major=time_major, recurrent_dropout_mask=drop)
    h_last, hs = gru_jax.gru(p, tm(xs), h0, backend="pallas", **kw)
    if drop is None:  # the reference has no dropout; with it, the scan below is the check
      ref_last, ref_hs = reference.run_segments(p, xs, h0, mask, resets, reverse, variant)
      np.testing.assert_allclose(tm(np.asarray(hs)), ref_hs, atol=2e-5, rtol=1e-5)
      np.testing.assert_allclose(h_last, ref_last, atol=2e-5, rtol=1e-5)
    scan_last, scan_hs = gru_jax.gru(p, tm(xs), h0, backend="scan", **kw)
    np.testing.assert_allclose(hs, scan_hs, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(h_last, scan_last, atol=2e-5, rtol=1e-5)

    def loss(backend):
      def f(p, x, h0):
        h_last, hs = gru_jax.gru(p, x, h0, backend=backend, **kw)
        return jnp.sum(tm(hs) * ct) + jnp.sum(h_last ** 2)
      return f
    grad = lambda backend: jax.jit(jax.grad(loss(backend), argnums=(0, 1, 2)))(p, tm(xs), h0)
    got = grad("pallas")
    for other in ("xla", "scan"):
      want = grad(other)
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=3e-5, rtol=1e-4)
  assert ("forward", True) in calls and ("backward", True) in calls
  fused_rnn._make.cache_clear()


@pytest.mark.parametrize("split", [0, 4])
def test_pallas_kernels_with_resets_lower_to_triton_for_gpu(split, monkeypatch):
  """Without a GPU: the train step with resets lowers through the Triton rules for
  both kernels (the unsplit ones for both variants with dropout, the split ones)."""
  from gru_jax.kernels import fused_rnn, pallas_gru
  monkeypatch.setattr(pallas_gru, "SPLIT", split)
  monkeypatch.setattr(pallas_gru, "_sm_count", lambda: 132)  # an H100's; the CPU reports none
  fused_rnn._make.cache_clear()
  b, t, h = 64, 5, 128 if split else 32
  ks = jax.random.split(jax.random.key(18), 2)
  w_h = 0.1 * jax.random.normal(ks[0], (h, 3 * h))
  xp = jax.random.normal(ks[1], (t, b, 3 * h))
  mask = jnp.ones((t, b), bool)
  rs = jnp.zeros((t, b), bool).at[2, ::3].set(True)
  for variant in ["reset_after"] if split else ["seed", "reset_after"]:
    def loss(w_h, xp, h0):
      _, hs = fused_rnn.recurrence(w_h, jnp.zeros(3 * h), jnp.zeros(h), xp, h0, mask,
                                   None if split else jnp.ones((b, h)), variant=variant,
                                   time_axis=0, impl="pallas", interpret=False, resets=rs)
      return jnp.sum(hs)
    text = cuda_module(loss, w_h, xp, jnp.zeros((b, h)))
    assert "_forward_kernel" in text and "_backward_kernel" in text
    if split:
      assert text.count("grid_y = 4") == 2
  fused_rnn._make.cache_clear()


def test_bad_resets_shape_is_named():
  p = random_params(jax.random.key(0), D, H)
  xs = np.zeros((B, T, D), np.float32)
  with pytest.raises(ValueError, match=r"resets must have shape \[B,T\]=\(5, 13\) to match xs "
                                       r"\(5, 13, 3\), got \(13, 5\)"):
    gru_jax.gru(p, xs, resets=np.zeros((T, B), bool))
  with pytest.raises(ValueError, match=r"GRU: resets must have shape \[B,T\]=\(5, 13\)"):
    layers.GRU(H).init(jax.random.key(0), xs, resets=np.zeros((B, T + 1), bool))
  with pytest.raises(ValueError, match=r"resets must have shape \[B,T\]=\(5, 13\)"):
    layernorm.ln_gru(p, layernorm.init_ln(H), xs, resets=np.zeros((B,), bool))


SEGMENTS = [(0, 5), (5, 13)]  # row 0 of `_packed_row`: two segments


def _packed_row(seed):
  xs = np.random.default_rng(seed).normal(size=(1, T, D)).astype(np.float32)
  resets = np.zeros((1, T), bool)
  resets[0, [a for a, _ in SEGMENTS]] = True
  return xs, resets


def _by_segment(hs_fn, xs):
  """hs_fn run on every segment alone, outputs joined along time: [1,T,.]."""
  return np.concatenate([hs_fn(xs[:, a:b]) for a, b in SEGMENTS], axis=1)


def test_linen_bidirectional_stack_runs_each_segment_on_its_own():
  xs, resets = _packed_row(14)
  model = layers.StackedGRU((6, 5), bidirectional=True, gru_kwargs={"variant": "reset_after"})
  v = model.init(jax.random.key(0), xs)
  got = model.apply(v, xs, resets=resets)
  want = _by_segment(lambda x: model.apply(v, x), xs)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_layer_norm_gru_runs_each_segment_on_its_own():
  xs, resets = _packed_row(15)
  gru = layers.GRU(H, layer_norm=True, reverse=True)
  v = gru.init(jax.random.key(0), xs)
  v = jax.tree.map(lambda a: a + 0.1 * jnp.arange(a.size).reshape(a.shape) / a.size, v)
  got = gru.apply(v, xs, resets=resets)
  want = _by_segment(lambda x: gru.apply(v, x), xs)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_nnx_layers_pass_resets_like_linen():
  xs, _, mask, resets = _data(seed=16)
  model = nnx_layers.StackedGRU(D, (6, 5), bidirectional=True, rngs=nnx.Rngs(0),
                                deterministic=True)
  got = model(xs, mask, resets=resets)
  p = [getattr(model, f"layer_{i}") for i in range(2)]
  h = xs
  for layer in p:
    fw = reference.run_segments(layer.forward.params, h, None, mask, resets)[1]
    bw = reference.run_segments(layer.backward.params, h, None, mask, resets, reverse=True)[1]
    h = np.concatenate([fw, bw], -1).astype(np.float32)
  np.testing.assert_allclose(got, h, atol=3e-5)
