"""Initial and final states of `Bidirectional` and `StackedGRU` (Linen and NNX).

References: the real `torch.nn.GRU` (h0 in, h_n out, packed sequences, autograd
through h0) and the float64 NumPy GRU of tests/reference.py composed layer by
layer, for stacks torch cannot express (different hidden sizes, the seed variant).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gru_jax import cell
from gru_jax import convert
from gru_jax import layers
from gru_jax import nnx_layers
from tests import reference

torch = pytest.importorskip("torch")
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402

B, T, D, H = 3, 6, 5, 4
LENGTHS = [4, T, 1]
TOL = dict(atol=2e-5, rtol=2e-5)


def _close(actual, expected, **tol):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), **(tol or TOL))


def _torch_gru(num_layers, bidirectional):
  m = torch.nn.GRU(D, H, num_layers=num_layers, bidirectional=bidirectional, batch_first=True)
  rng = np.random.default_rng(num_layers + 10 * bidirectional)
  with torch.no_grad():
    for p in m.parameters():
      p.copy_(torch.from_numpy(rng.uniform(-0.6, 0.6, size=p.shape).astype(np.float32)))
  return m.eval()


def _inputs(num_layers, bidirectional, seed=0):
  rng = np.random.default_rng(seed)
  xs = rng.normal(size=(B, T, D)).astype(np.float32)
  h0 = rng.normal(size=(num_layers * (1 + bidirectional), B, H)).astype(np.float32)
  return xs, h0


def _mask(lengths=LENGTHS):
  return np.arange(T)[None, :] < np.asarray(lengths)[:, None]


def _torch_with_state(m, xs, h0, packed):
  """torch's (h_n [L*dirs,B,H], output [B,T,dirs*H] on the valid steps, zeros elsewhere)."""
  x = torch.tensor(xs)
  if packed:
    x = pack_padded_sequence(x, torch.tensor(LENGTHS), batch_first=True, enforce_sorted=False)
  out, h_n = m(x, torch.tensor(h0))
  if packed:
    out = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)[0]
  return h_n.detach().numpy(), out.detach().numpy()


def _per_layer(h0, bidirectional):
  """torch's [L*dirs,B,H] as StackedGRU's per-layer form."""
  if bidirectional:
    return [(h0[i], h0[i + 1]) for i in range(0, len(h0), 2)]
  return list(h0)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_linen_stack_takes_h0_and_returns_h_n_as_torch(num_layers, bidirectional, packed):
  m = _torch_gru(num_layers, bidirectional)
  xs, h0 = _inputs(num_layers, bidirectional)
  want_hn, want_out = _torch_with_state(m, xs, h0, packed)
  stack, variables = convert.stacked_from_torch(m)
  stack = stack.clone(return_state=True)
  mask = _mask() if packed else None
  run = jax.jit(lambda v, x, h: stack.apply(v, x, mask, h))
  # torch's layout and the per-layer form are the same initial states.
  for h in (jnp.asarray(h0), _per_layer(h0, bidirectional)):
    out, states = run(variables, xs, h)
    assert len(states) == num_layers
    _close(out, want_out)
    _close(jnp.stack(jax.tree.leaves(states)), want_hn)
  # Without return_state the outputs alone, and still from h0.
  _close(stack.clone(return_state=False).apply(variables, xs, mask, h0), want_out)


def test_gradients_through_h0_equal_torch_autograd():
  m = _torch_gru(2, True)
  xs, h0 = _inputs(2, True, seed=3)
  rng = np.random.default_rng(4)
  ct_out = rng.normal(size=(B, T, 2 * H)).astype(np.float32)
  ct_hn = rng.normal(size=h0.shape).astype(np.float32)
  x = torch.tensor(xs, requires_grad=True)
  h = torch.tensor(h0, requires_grad=True)
  packed = pack_padded_sequence(x, torch.tensor(LENGTHS), batch_first=True,
                                enforce_sorted=False)
  out, h_n = m(packed, h)
  out = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)[0]
  ((out * torch.tensor(ct_out)).sum() + (h_n * torch.tensor(ct_hn)).sum()).backward()

  stack, variables = convert.stacked_from_torch(m)
  stack = stack.clone(return_state=True)

  def loss(xs, h0):
    out, states = stack.apply(variables, xs, _mask(), h0)
    return jnp.sum(out * ct_out) + jnp.sum(jnp.stack(jax.tree.leaves(states)) * ct_hn)
  gx, gh = jax.jit(jax.grad(loss, argnums=(0, 1)))(xs, h0)
  _close(gx, x.grad.numpy())
  _close(gh, h.grad.numpy())
  assert np.abs(h.grad.numpy()).min() > 0  # every initial state reaches the loss


@pytest.mark.parametrize("bidirectional", [False, True])
def test_nnx_stack_takes_h0_and_returns_h_n_as_torch(bidirectional):
  m = _torch_gru(2, bidirectional)
  xs, h0 = _inputs(2, bidirectional, seed=5)
  want_hn, want_out = _torch_with_state(m, xs, h0, packed=True)
  stack = convert.stacked_from_torch_nnx(m)
  assert stack(xs, _mask(), h0).shape == want_out.shape  # the attribute: outputs only
  out, states = stack(xs, _mask(), h0, return_state=True)
  _close(out, want_out)
  _close(jnp.stack(jax.tree.leaves(states)), want_hn)
  stack.return_state = True
  out, states = stack(xs, _mask(), _per_layer(h0, bidirectional))
  _close(jnp.stack(jax.tree.leaves(states)), want_hn)


def _reference_stack(layer_params, xs, mask, h0, bidirectional, variant):
  """Float64 composition of reference.run: (outputs, per-layer final states)."""
  h, states = np.asarray(xs, np.float64), []
  for params, start in zip(layer_params, h0):
    if bidirectional:
      (hf, of), (hb, ob) = (reference.run(p, h, s, mask, reverse=rev, variant=variant)
                            for p, s, rev in zip(params, start, (False, True)))
      h, state = np.concatenate([of, ob], -1), (hf, hb)
    else:
      state, h = reference.run(params, h, start, mask, variant=variant)
    states.append(state)
  return h, states


def _gru_params(tree):
  return cell.GRUParams(*(tree[n] for n in cell.GRUParams._fields))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_different_hidden_sizes_against_the_float64_reference(bidirectional):
  """Layers of 5 then 3 units in the seed variant, h0 partly None (zeros), Linen and NNX."""
  sizes = (5, 3)
  rng = np.random.default_rng(6)
  xs = rng.normal(size=(B, T, D)).astype(np.float32)
  given = [rng.normal(size=(B, s)).astype(np.float32) for s in sizes]
  zeros = [np.zeros((B, s), np.float32) for s in sizes]
  if bidirectional:
    h0, ref_h0 = [(given[0], None), (None, given[1])], [(given[0], zeros[0]), (zeros[1], given[1])]
  else:
    h0, ref_h0 = [None, given[1]], [zeros[0], given[1]]
  stack = layers.StackedGRU(sizes, bidirectional=bidirectional, return_state=True)
  variables = stack.init(jax.random.key(0), xs, _mask(), h0)
  out, states = stack.apply(variables, xs, _mask(), h0)
  p = variables["params"]
  if bidirectional:
    per_layer = [(_gru_params(p[f"layer_{i}"]["forward"]), _gru_params(p[f"layer_{i}"]["backward"]))
                 for i in range(2)]
  else:
    per_layer = [_gru_params(p[f"layer_{i}"]) for i in range(2)]
  want_out, want_states = _reference_stack(per_layer, xs, _mask(), ref_h0, bidirectional, "seed")
  _close(out, want_out)
  for got, want in zip(jax.tree.leaves(states), jax.tree.leaves(want_states)):
    _close(got, want)

  nstack = nnx_layers.StackedGRU(D, sizes, bidirectional=bidirectional, rngs=nnx.Rngs(1))
  nnx.update(nstack, nnx.State(_as_nnx_state(p)))
  nout, nstates = nstack(xs, _mask(), h0, return_state=True)
  _close(nout, want_out)
  for got, want in zip(jax.tree.leaves(nstates), jax.tree.leaves(want_states)):
    _close(got, want)


def _as_nnx_state(tree):
  return {k: _as_nnx_state(v) if isinstance(v, dict) else nnx.Param(jnp.asarray(v))
          for k, v in tree.items()}


def test_bidirectional_layer_state_in_and_out_against_the_reference():
  rng = np.random.default_rng(7)
  xs = rng.normal(size=(B, T, D)).astype(np.float32)
  h0 = rng.normal(size=(2, B, H)).astype(np.float32)
  bi = layers.Bidirectional(H, return_state=True, return_sequences=False,
                            gru_kwargs=dict(variant="reset_after"))
  variables = bi.init(jax.random.key(1), xs, _mask(), h0)
  p = variables["params"]
  (hf, of), (hb, ob) = (reference.run(_gru_params(p[d]), xs, h, _mask(), reverse=rev,
                                      variant="reset_after")
                        for d, h, rev in (("forward", h0[0], False), ("backward", h0[1], True)))
  for h in (h0, (h0[0], h0[1]), [jnp.asarray(h0[0]), jnp.asarray(h0[1])]):
    last, (got_f, got_b) = bi.apply(variables, xs, _mask(), h)
    _close(got_f, hf)
    _close(got_b, hb)
    _close(last, np.concatenate([hf, hb], -1))  # return_sequences=False: the final states
  out, _ = bi.clone(return_sequences=True).apply(variables, xs, _mask(), h0)
  _close(out, np.concatenate([of, ob], -1))


def test_bad_initial_states_name_the_argument_and_shapes():
  xs = np.zeros((B, T, D), np.float32)
  uni = layers.StackedGRU((4, 3))
  v = uni.init(jax.random.key(0), xs)
  with pytest.raises(ValueError, match=r"one entry per layer \(2\), got 1"):
    uni.apply(v, xs, None, [np.zeros((B, 4))])
  with pytest.raises(ValueError, match=r"h0\[1\] must have shape \[B,H\]=\(3, 3\), got \(3, 4\)"):
    uni.apply(v, xs, None, [None, np.zeros((B, 4))])
  with pytest.raises(ValueError, match=r"torch's layout \[L\*dirs,B,H\].*hidden sizes \(4, 3\)"):
    uni.apply(v, xs, None, np.zeros((2, B, 4)))
  bi = layers.StackedGRU((4, 4), bidirectional=True)
  vb = bi.init(jax.random.key(0), xs)
  with pytest.raises(ValueError, match=r"torch's layout \[L\*dirs,B,H\]=\(4, 3, 4\).*\(2, 3, 4\)"):
    bi.apply(vb, xs, None, np.zeros((2, B, 4)))
  with pytest.raises(ValueError, match=r"h0\[0\] must be a pair \(forward, backward\)"):
    bi.apply(vb, xs, None, [np.zeros((B, 4)), None])
  with pytest.raises(ValueError, match=r"h0\[1\]\[1\] \(backward\) must have shape"):
    bi.apply(vb, xs, None, [None, (None, np.zeros((B, 5)))])
  nbi = nnx_layers.Bidirectional(D, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"Bidirectional: h0 must be a pair"):
    nbi(xs, None, np.zeros((B, 4)))
