"""Whole `torch.nn.GRU` stacks <-> gru_jax's StackedGRU, against the real torch module.

Every torch GRU gets random weights and non-zero biases; padded batches go
through torch as packed sequences (pack_padded_sequence) and through the
stack as a mask [B,T]; outputs and input gradients must agree in float32.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gru_jax import convert
from gru_jax import layers

torch = pytest.importorskip("torch")
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

B, T, D, H = 3, 6, 5, 4
LENGTHS = [4, T, 1]  # unsorted, one full-length row and one of a single step
TOL = dict(atol=1e-5, rtol=1e-5)


def _close(actual, expected):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), **TOL)


def _torch_gru(seed=1, **kw):
  kw = dict(batch_first=True) | kw
  m = torch.nn.GRU(D, H, **kw)
  rng = np.random.default_rng(seed)
  with torch.no_grad():
    for p in m.parameters():  # non-zero biases: a misplaced bias block must show
      p.copy_(torch.from_numpy(rng.uniform(-0.6, 0.6, size=p.shape).astype(np.float32)))
  return m.eval()


def _data(seed=0):
  """xs [B,T,D] and an output cotangent [B,T,2H] (sliced to H for one direction)."""
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(B, T, D)).astype(np.float32),
          rng.normal(size=(B, T, 2 * H)).astype(np.float32))


def _mask(lengths=LENGTHS):
  return np.arange(T)[None, :] < np.asarray(lengths)[:, None]


def _torch_run(m, xs, lengths=None, ct=None):
  """torch's output [B,T,dirs*H] for batch-major xs [B,T,D] (packed when ``lengths`` are
  given, padded back with zeros), and with ``ct`` also d sum(out * ct) / d xs [B,T,D]."""
  tm = lambda a: a if m.batch_first else a.transpose(0, 1)  # batch- <-> time-major
  x = tm(torch.tensor(xs)).requires_grad_(ct is not None)
  if lengths is None:
    out, _ = m(x)
  else:
    packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=m.batch_first,
                                  enforce_sorted=False)
    out, _ = pad_packed_sequence(m(packed)[0], batch_first=m.batch_first, total_length=T)
  out = tm(out)
  if ct is None:
    return out.detach().numpy()
  (out * torch.from_numpy(ct[..., :out.shape[-1]])).sum().backward()
  return out.detach().numpy(), tm(x.grad).numpy()


def _stack_config(num_layers, bidirectional):
  return dict(hidden_sizes=(H,) * num_layers, bidirectional=bidirectional, merge_mode="concat",
              dropout_between=0.0, gru_kwargs=dict(variant="reset_after",
                                                   param_dtype=jnp.float32))


@functools.cache
def _apply_and_vjp(num_layers, bidirectional):
  """(variables, xs, mask, ct) -> (hs, d sum(hs * ct) / d xs), compiled once per stack shape
  (bias and batch_first change neither, so the grid compiles 6 programs, not 24)."""
  stack = layers.StackedGRU(**_stack_config(num_layers, bidirectional))

  def f(variables, xs, mask, ct):
    hs, vjp = jax.vjp(lambda x: stack.apply(variables, x, mask), xs)
    return hs, vjp(ct[..., :hs.shape[-1]])[0]
  return jax.jit(f)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_stack_equals_torch_with_packed_sequences_and_input_grads(num_layers, bidirectional,
                                                                   batch_first, bias):
  m = _torch_gru(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first,
                 bias=bias)
  xs, ct = _data()
  want, want_grad = _torch_run(m, xs, LENGTHS, ct)
  stack, variables = convert.stacked_from_torch(m)
  assert isinstance(stack, layers.StackedGRU)
  assert stack.hidden_sizes == (H,) * num_layers and stack.bidirectional == bidirectional
  assert stack == layers.StackedGRU(**_stack_config(num_layers, bidirectional))
  # The stack takes [B,T,D] whatever batch_first says; _torch_run transposes torch's side.
  got, got_grad = _apply_and_vjp(num_layers, bidirectional)(variables, xs, _mask(), ct)
  assert got.shape == want.shape == (B, T, (2 if bidirectional else 1) * H)
  _close(got, want)  # padded steps included: zeros on both sides
  _close(got_grad, want_grad)


def test_without_mask_equals_torch_and_params_keep_the_modules_dtype():
  m = _torch_gru(num_layers=2, bidirectional=True)
  xs, _ = _data(1)
  stack, variables = convert.stacked_from_torch(m)
  _close(stack.apply(variables, xs), _torch_run(m, xs))
  leaves = jax.tree.leaves(variables)
  assert len(leaves) == 2 * 2 * 4 and all(a.dtype == jnp.float32 for a in leaves)
  # The tree is the stack's own: init gives the same structure and shapes.
  init = stack.init(jax.random.key(0), xs)
  assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, variables)
  half_stack, half = convert.stacked_from_torch(_torch_gru(num_layers=2).half())
  assert all(a.dtype == jnp.float16 for a in jax.tree.leaves(half))
  assert half_stack.gru_kwargs["param_dtype"] == jnp.float16


def test_no_bias_reads_as_zero_biases():
  _, variables = convert.stacked_from_torch(_torch_gru(num_layers=2, bias=False))
  for layer in variables["params"].values():
    assert not np.any(layer["b_x"]) and not np.any(layer["b_h"])


def test_dropout_is_transferred_and_deterministic_equals_torch_eval():
  m = _torch_gru(num_layers=3, dropout=0.3).train()
  xs, _ = _data(2)
  stack, variables = convert.stacked_from_torch(m)
  assert stack.dropout_between == m.dropout == 0.3
  want = _torch_run(m.eval(), xs)
  _close(stack.apply(variables, xs), want)  # no dropout unless asked for, as eval()
  _close(stack.apply(variables, xs, deterministic=True), want)
  dropped = stack.apply(variables, xs, deterministic=False,
                        rngs={"dropout": jax.random.key(3)})
  assert not np.allclose(dropped, want, **TOL)  # and it does run when asked for


def test_round_trip_is_exact():
  for kw in (dict(num_layers=3, bidirectional=True), dict(num_layers=2, bias=False)):
    m = _torch_gru(**kw)
    into = _torch_gru(seed=7, **kw)
    _, variables = convert.stacked_from_torch(m)
    assert convert.stacked_to_torch(variables, into) is into
    # Negation, transposes and reordering are exact: bit for bit, both ways.
    for k, v in m.state_dict().items():
      assert torch.equal(into.state_dict()[k], v), k
    again = convert.stacked_from_torch(into)[1]
    jax.tree.map(np.testing.assert_array_equal, again, variables)
    xs, _ = _data(3)
    np.testing.assert_array_equal(_torch_run(into, xs), _torch_run(m, xs))


def test_stack_params_written_to_torch_compute_the_stack():
  """Params the stack made itself (its own init, as after training) run the same in torch."""
  xs, _ = _data(4)
  stack = layers.StackedGRU((H, H), bidirectional=True,
                            gru_kwargs=dict(variant="reset_after",
                                            bias_init=jax.nn.initializers.normal(0.5)))
  variables = stack.init(jax.random.key(1), xs)
  m = convert.stacked_to_torch(variables["params"], _torch_gru(num_layers=2, bidirectional=True))
  _close(_torch_run(m, xs, LENGTHS), stack.apply(variables, xs, _mask()))


def test_nnx_stack_equals_torch_and_writes_back():
  nnx = pytest.importorskip("flax.nnx")
  from gru_jax import nnx_layers
  m = _torch_gru(num_layers=2, bidirectional=True, batch_first=False, dropout=0.25)
  xs, _ = _data(5)
  want = _torch_run(m, xs, LENGTHS)
  stack = convert.stacked_from_torch_nnx(m, rngs=nnx.Rngs(0))  # m is in eval mode
  assert isinstance(stack, nnx_layers.StackedGRU) and stack.between.rate == 0.25
  _close(stack(xs, _mask()), want)
  linen = convert.stacked_from_torch(m)[1]["params"]
  jax.tree.map(np.testing.assert_array_equal, nnx.state(stack, nnx.Param).to_pure_dict(), linen)
  into = convert.stacked_to_torch(stack, _torch_gru(seed=9, num_layers=2, bidirectional=True))
  for k, v in m.state_dict().items():
    assert torch.equal(into.state_dict()[k], v), k
  # A module in training mode gives a stack in training mode: dropout runs until eval().
  train = convert.stacked_from_torch_nnx(m.train(), rngs=nnx.Rngs(0))
  assert not np.allclose(train(xs, _mask()), want, **TOL)
  train.eval()
  _close(train(xs, _mask()), want)
  with pytest.raises(ValueError, match=r"dropout=0.25 between its 2 layers: pass rngs="):
    convert.stacked_from_torch_nnx(m)


def test_nnx_stack_of_one_direction_equals_torch():
  # Each layer's params sit right under layer_i (no forward/backward level), in a stack
  # deeper than two layers, bias-free, and built without rngs (no dropout to run).
  nnx = pytest.importorskip("flax.nnx")
  m = _torch_gru(num_layers=3, bias=False)
  xs, _ = _data(3)
  stack = convert.stacked_from_torch_nnx(m)
  _close(stack(xs, _mask()), _torch_run(m, xs, LENGTHS))
  params = nnx.state(stack, nnx.Param).to_pure_dict()
  assert sorted(params) == ["layer_0", "layer_1", "layer_2"]
  for i in range(3):
    np.testing.assert_array_equal(params[f"layer_{i}"]["b_x"], np.zeros(3 * H, np.float32))
    # torch's (r, z, n) rows, transposed, with z first and negated: the NNX stack's w_h.
    w_hh = getattr(m, f"weight_hh_l{i}").detach().numpy()
    r, z, n = np.split(w_hh, 3)
    np.testing.assert_array_equal(params[f"layer_{i}"]["w_h"], np.concatenate([-z, r, n]).T)


def test_refuses_what_is_not_a_gru():
  for bad, what in ((torch.nn.LSTM(D, H), "LSTM; an LSTM's gates"),
                    (torch.nn.LSTM(D, H, proj_size=2), "LSTM; an LSTM's gates"),
                    (torch.nn.GRUCell(D, H), "GRUCell; convert a GRUCell with from_torch")):
    with pytest.raises(TypeError, match=f"module must be a torch.nn.GRU, got {what}"):
      convert.stacked_from_torch(bad)
    with pytest.raises(TypeError, match=f"module must be a torch.nn.GRU, got {what}"):
      convert.stacked_to_torch({}, bad)
  with pytest.raises(ValueError, match="only supported for LSTM"):  # torch's own refusal
    torch.nn.GRU(D, H, proj_size=2)
  m = _torch_gru()
  m.proj_size = 2  # set after construction, which torch does not check
  with pytest.raises(ValueError, match="module has proj_size=2: gru_jax's GRU has no output"):
    convert.stacked_from_torch(m)


def test_stacked_to_torch_errors_name_the_layer_and_shapes():
  _, variables = convert.stacked_from_torch(_torch_gru(num_layers=2, bidirectional=True))
  with pytest.raises(ValueError, match=r"variables\['params'\]\['layer_0'\]\['forward'\]: params "
                     r"do not fit module at layer=0, direction=0: got weight_ih_l0 \(12, 5\).*"
                     r"expected weight_ih_l0 \(15, 5\).*take D=5, H=5"):
    convert.stacked_to_torch(variables, torch.nn.GRU(D, H + 1, num_layers=2, bidirectional=True))
  with pytest.raises(ValueError, match=r"variables\['params'\] has keys \['layer_0', 'layer_1'\] "
                     r"but module has num_layers=3"):
    convert.stacked_to_torch(variables, torch.nn.GRU(D, H, num_layers=3, bidirectional=True))
  with pytest.raises(ValueError, match=r"\['layer_0'\] is a Bidirectional layer.*module has "
                     r"bidirectional=False"):
    convert.stacked_to_torch(variables, torch.nn.GRU(D, H, num_layers=2))
  _, one_way = convert.stacked_from_torch(_torch_gru(num_layers=2))
  with pytest.raises(ValueError, match=r"\['layer_0'\] has \['b_h', 'b_x', 'w_h', 'w_x'\], no "
                     r"'forward': module is bidirectional"):
    convert.stacked_to_torch(one_way, torch.nn.GRU(D, H, num_layers=2, bidirectional=True))
  with pytest.raises(ValueError, match=r"\['layer_0'\]: module has bias=False but params have "
                     "non-zero"):
    convert.stacked_to_torch(one_way, torch.nn.GRU(D, H, num_layers=2, bias=False))
  ln = layers.StackedGRU((H,), gru_kwargs=dict(variant="reset_after", layer_norm=True))
  with pytest.raises(ValueError, match=r"\['layer_0'\] must hold exactly \['w_x', 'w_h', 'b_x', "
                     r"'b_h'\].*found \['b_h', 'b_x', 'beta_h'"):
    convert.stacked_to_torch(ln.init(jax.random.key(0), _data()[0]), torch.nn.GRU(D, H))
  with pytest.raises(TypeError, match="variables must be a Linen StackedGRU's variables dict or "
                     "an NNX StackedGRU, got list"):
    convert.stacked_to_torch([variables], torch.nn.GRU(D, H, num_layers=2))


def test_stacked_to_torch_checks_every_layer_before_writing_any():
  _, variables = convert.stacked_from_torch(_torch_gru(num_layers=2))
  bad = jax.tree.map(lambda a: a, variables)
  bad["params"]["layer_1"]["b_h"] = bad["params"]["layer_1"]["b_h"][:-1]
  into = _torch_gru(seed=7, num_layers=2)
  before = {k: v.clone() for k, v in into.state_dict().items()}
  with pytest.raises(ValueError, match=r"variables\['params'\]\['layer_1'\]: params has "
                     r"inconsistent GRU shapes: got .*b_h \(11,\)"):
    convert.stacked_to_torch(bad, into)
  for k, v in before.items():  # layer 0 was fine, yet nothing was written
    assert torch.equal(into.state_dict()[k], v), k


def test_seed_variant_weights_are_refused_where_the_variant_is_known():
  """torch computes the reset_after equations; seed weights there are another GRU."""
  from flax import nnx
  from gru_jax import nnx_layers
  m = _torch_gru(num_layers=2, bidirectional=True)
  before = {k: v.clone() for k, v in m.state_dict().items()}
  seed_stack = nnx_layers.StackedGRU(D, (H, H), bidirectional=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError,
                     match=r"variables\.layer_0\.(forward|backward) is a 'seed'-variant GRU"):
    convert.stacked_to_torch(seed_stack, m)
  _, variables = convert.stacked_from_torch(m)
  with pytest.raises(ValueError, match=r"'seed'-variant GRU; torch.nn.GRU computes"):
    convert.stacked_to_torch(variables, m, variant="seed")
  layer = nnx_layers.GRU(D, H, rngs=nnx.Rngs(0))  # seed, the default
  with pytest.raises(ValueError, match=r"params is a 'seed'-variant GRU"):
    convert.to_torch(layer, m, layer=0)
  with pytest.raises(ValueError, match=r"variant must be one of"):
    convert.to_torch(convert.from_torch(m), m, variant="Seed")
  assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
  # A reset_after NNX layer is written, and torch then computes that layer.
  ra = nnx_layers.GRU(D, H, variant="reset_after", rngs=nnx.Rngs(1))
  one = torch.nn.GRU(D, H, batch_first=True)
  convert.to_torch(ra, one)
  xs, _ = _data(2)
  _close(ra(xs), one(torch.tensor(xs))[0].detach().numpy())
