"""More of the converters against the real peer libraries: the layouts and options a user
meets (time-major torch, every layer and direction, go_backwards, Bidirectional halves, several
Haiku GRUs), gradients against torch autograd, and the inputs that must be refused.

Like tests/test_convert.py: random weights and non-zero biases, outputs compared in float32.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gru_jax
from gru_jax import convert
from tests.test_convert import B, D, H, T, _close, _data, _random_like


def _randomize(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, _random_like([l.shape for l in leaves], seed))


# --- PyTorch -----------------------------------------------------------------

def _torch_gru(seed=1, **kw):
  torch = pytest.importorskip("torch")
  m = torch.nn.GRU(D, H, **kw)
  with torch.no_grad():
    for p, v in zip(m.parameters(), _random_like([p.shape for p in m.parameters()], seed)):
      p.copy_(torch.from_numpy(v))
  return m


def _stacked(m, xs, h0s, time_major):
  """A torch GRU's (out, h_n) computed layer by layer and direction by direction with gru_jax."""
  dirs = 2 if m.bidirectional else 1
  inp, h_n = jnp.asarray(xs), []
  for layer in range(m.num_layers):
    outs = []
    for d in range(dirs):
      h, hs = gru_jax.gru(convert.from_torch(m, layer, d), inp, h0s[dirs * layer + d],
                          variant="reset_after", reverse=bool(d), time_major=time_major)
      h_n.append(h)
      outs.append(hs)
    inp = jnp.concatenate(outs, axis=-1)
  return inp, jnp.stack(h_n)


@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_three_layers_bidirectional_every_layer_and_direction(batch_first):
  torch = pytest.importorskip("torch")
  m = _torch_gru(num_layers=3, bidirectional=True, batch_first=batch_first)
  xs, _ = _data()
  if not batch_first:
    xs = np.ascontiguousarray(xs.transpose(1, 0, 2))  # [T,B,D]
  h0s = np.random.default_rng(5).normal(size=(6, B, H)).astype(np.float32) * 0.5
  with torch.no_grad():
    out, h_n = m(torch.from_numpy(xs), torch.from_numpy(h0s))
  got_out, got_h_n = _stacked(m, xs, h0s, time_major=not batch_first)
  _close(got_out, out.numpy())
  _close(got_h_n, h_n.numpy())


def test_torch_gradients_match_autograd():
  """d(loss)/d(inputs, h0) through a 2-layer bidirectional GRU: jax.grad of the converted
  model against torch's autograd of the module, on the same cotangents."""
  torch = pytest.importorskip("torch")
  m = _torch_gru(num_layers=2, bidirectional=True, batch_first=True)
  xs, _ = _data()
  rng = np.random.default_rng(6)
  h0s = rng.normal(size=(4, B, H)).astype(np.float32) * 0.5
  g_out = rng.normal(size=(B, T, 2 * H)).astype(np.float32)
  g_hn = rng.normal(size=(4, B, H)).astype(np.float32)
  xt, ht = (torch.from_numpy(a).requires_grad_(True) for a in (xs, h0s))
  out, h_n = m(xt, ht)
  ((out * torch.from_numpy(g_out)).sum() + (h_n * torch.from_numpy(g_hn)).sum()).backward()

  def loss(x, h0):
    o, hn = _stacked(m, x, h0, time_major=False)
    return jnp.sum(o * g_out) + jnp.sum(hn * g_hn)

  gx, gh = jax.grad(loss, (0, 1))(jnp.asarray(xs), jnp.asarray(h0s))
  np.testing.assert_allclose(gx, xt.grad.numpy(), atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(gh, ht.grad.numpy(), atol=2e-5, rtol=1e-5)


def test_torch_weight_gradients_map_through_to_torch():
  """The conversion is linear (sign flips, reordering, transposes), so to_torch of jax.grad's
  GRUParams is torch's .grad of each parameter."""
  torch = pytest.importorskip("torch")
  m = _torch_gru(batch_first=True)
  xs, h0 = _data()
  g = np.random.default_rng(8).normal(size=(B, T, H)).astype(np.float32)
  out, _ = m(torch.from_numpy(xs), torch.from_numpy(h0)[None])
  (out * torch.from_numpy(g)).sum().backward()
  grads = jax.grad(lambda p: jnp.sum(gru_jax.gru(p, jnp.asarray(xs), h0,
                                                 variant="reset_after")[1] * g))(
      convert.from_torch(m))
  for k, v in convert.to_torch(grads).items():
    np.testing.assert_allclose(v.numpy(), getattr(m, k).grad.numpy(), atol=2e-5, rtol=1e-5)


def test_torch_packed_sequences_are_mask():
  """pack_padded_sequence in both directions is gru's mask: zero outputs past each length,
  h_n the state after the last valid step, the reverse direction starting at that step."""
  torch = pytest.importorskip("torch")
  from torch.nn.utils import rnn
  m = _torch_gru(bidirectional=True, batch_first=True)
  xs, _ = _data()
  lengths = np.array([T, 2, 3])
  mask = np.arange(T)[None] < lengths[:, None]
  with torch.no_grad():
    packed = rnn.pack_padded_sequence(torch.from_numpy(xs), torch.from_numpy(lengths),
                                      batch_first=True, enforce_sorted=False)
    out, h_n = m(packed)
    out, _ = rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
  fwd, bwd = (gru_jax.gru(convert.from_torch(m, direction=d), jnp.asarray(xs), mask=mask,
                          variant="reset_after", reverse=bool(d)) for d in (0, 1))
  _close(jnp.concatenate([fwd[1], bwd[1]], -1), out.numpy())
  _close(jnp.stack([fwd[0], bwd[0]]), h_n.numpy())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_torch_half_precision_modules_keep_dtype_and_run(dtype):
  """The params keep the module's dtype and, run in it, agree with torch to its precision."""
  torch = pytest.importorskip("torch")
  m = _torch_gru(batch_first=True).to(getattr(torch, dtype))
  xs, _ = _data()
  x = torch.from_numpy(xs).to(getattr(torch, dtype))
  with torch.no_grad():
    out, h_n = m(x)
  params = convert.from_torch(m)
  assert params.w_x.dtype == jnp.dtype(dtype)
  h_last, hs = gru_jax.gru(params, jnp.asarray(x.float().numpy()).astype(dtype),
                           variant="reset_after")
  tol = dict(atol=2e-2 if dtype == "bfloat16" else 4e-3)  # a few units of the last place
  np.testing.assert_allclose(np.asarray(hs, np.float32), out.float().numpy(), **tol)
  np.testing.assert_allclose(np.asarray(h_last, np.float32), h_n[0].float().numpy(), **tol)


def test_torch_state_dict_missing_one_bias_is_refused():
  """A missing bias_hh used to read as zeros, silently giving a different GRU."""
  sd = dict(_torch_gru(num_layers=2).state_dict())
  for k in ("bias_hh_l1", "bias_ih_l1"):
    part = {n: v for n, v in sd.items() if n != k}
    with pytest.raises(ValueError, match=f"module_or_state_dict has .* but no '{k}'"):
      convert.from_torch(part, layer=1)
    convert.from_torch(part, layer=0)  # layer 0 is whole
  # Neither bias: a bias=False GRU's state dict, zeros.
  nb = {n: v for n, v in sd.items() if not n.startswith("bias")}
  p = convert.from_torch(nb, layer=1)
  assert not np.any(p.b_x) and not np.any(p.b_h)


def test_torch_other_rnns_are_named():
  torch = pytest.importorskip("torch")
  with pytest.raises(ValueError, match=r"weight_hh_l0 \(24, 6\).*an LSTM's weights"):
    convert.from_torch(torch.nn.LSTM(D, H).state_dict())
  with pytest.raises(ValueError, match=r"weight_hh \(24, 6\).*an LSTM's weights"):
    convert.from_torch(torch.nn.LSTMCell(D, H).state_dict())
  with pytest.raises(ValueError, match=r"weight_hh_l0 \(6, 6\).*a plain RNN's weights"):
    convert.from_torch(torch.nn.RNN(D, H).state_dict())
  with pytest.raises(TypeError, match="got RNN"):
    convert.from_torch(torch.nn.RNN(D, H))
  with pytest.raises(TypeError, match="module must be a torch.nn.GRU.*got LSTM"):
    convert.to_torch(convert.from_torch(_torch_gru()), torch.nn.LSTM(D, H))


def test_torch_weight_norm_module():
  """from_torch reads a parametrized weight's value (the state dict has no weight_hh_l0);
  to_torch refuses to write one: copying into the computed tensor changed nothing."""
  torch = pytest.importorskip("torch")
  from torch.nn.utils import parametrizations
  m = parametrizations.weight_norm(_torch_gru(batch_first=True), "weight_hh_l0")
  xs, _ = _data()
  with torch.no_grad():
    out, h_n = m(torch.from_numpy(xs))
  h_last, hs = gru_jax.gru(convert.from_torch(m), jnp.asarray(xs), variant="reset_after")
  _close(hs, out.numpy())
  _close(h_last, h_n[0].numpy())
  with pytest.raises(ValueError, match=r"module's \['weight_hh_l0'\] are not plain parameters"):
    convert.to_torch(convert.from_torch(_torch_gru(seed=3)), m)


# --- Keras 3 -----------------------------------------------------------------

@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("return_sequences,return_state", [(True, False), (False, True),
                                                           (False, False)])
def test_keras_directions_and_returns(reset_after, go_backwards, return_sequences, return_state):
  """go_backwards is gru(reverse=True) with hs in processing order (flipped in time)."""
  keras = pytest.importorskip("keras")
  layer = keras.layers.GRU(H, reset_after=reset_after, go_backwards=go_backwards,
                           return_sequences=return_sequences, return_state=return_state)
  xs, h0 = _data()
  layer(xs)
  layer.set_weights(_random_like([w.shape for w in layer.get_weights()], seed=2))
  got = layer(xs, initial_state=[h0])
  got = [keras.ops.convert_to_numpy(a) for a in (got if return_state else [got])]
  params, variant = convert.from_keras(layer)
  h_last, hs = gru_jax.gru(params, jnp.asarray(xs), h0, variant=variant, reverse=go_backwards)
  _close(hs[:, ::-1] if go_backwards else hs, got[0]) if return_sequences else \
      _close(h_last, got[0])
  if return_state:
    _close(h_last, got[1])


def test_keras_rnn_of_gru_cell_and_bidirectional_halves():
  keras = pytest.importorskip("keras")
  xs, _ = _data()
  rnn = keras.layers.RNN(keras.layers.GRUCell(H), return_sequences=True)
  rnn(xs)
  rnn.set_weights(_random_like([w.shape for w in rnn.get_weights()], seed=3))
  params, variant = convert.from_keras(rnn)  # used to be refused ("got RNN")
  _close(gru_jax.gru(params, jnp.asarray(xs), variant=variant)[1],
         keras.ops.convert_to_numpy(rnn(xs)))
  bi = keras.layers.Bidirectional(keras.layers.GRU(H, return_sequences=True))
  bi(xs)
  bi.set_weights(_random_like([w.shape for w in bi.get_weights()], seed=4))
  (fwd, variant), (bwd, _) = convert.from_keras(bi.forward_layer), \
      convert.from_keras(bi.backward_layer)
  hs = jnp.concatenate([gru_jax.gru(fwd, jnp.asarray(xs), variant=variant)[1],
                        gru_jax.gru(bwd, jnp.asarray(xs), variant=variant, reverse=True)[1]], -1)
  _close(hs, keras.ops.convert_to_numpy(bi(xs)))


def test_keras_mask_differs_only_at_masked_steps():
  """With a mask, h_last and the valid steps' outputs agree; at masked steps Keras repeats the
  last valid output where gru gives zeros (the docstring says so)."""
  keras = pytest.importorskip("keras")
  layer = keras.layers.GRU(H, return_sequences=True, return_state=True)
  xs, h0 = _data()
  layer(xs)
  layer.set_weights(_random_like([w.shape for w in layer.get_weights()], seed=5))
  mask = np.arange(T)[None] < np.array([T, 2, 3])[:, None]
  out, h_n = (keras.ops.convert_to_numpy(a) for a in layer(xs, initial_state=[h0], mask=mask))
  params, variant = convert.from_keras(layer)
  h_last, hs = gru_jax.gru(params, jnp.asarray(xs), h0, mask=mask, variant=variant)
  _close(h_last, h_n)
  _close(np.where(mask[..., None], hs, 0), np.where(mask[..., None], out, 0))
  assert not np.any(np.asarray(hs)[~mask])
  _close(out[1, 2:], np.broadcast_to(out[1, 1], (T - 2, H)))  # Keras: step 1's output again


def test_keras_refusals():
  keras = pytest.importorskip("keras")
  for kw, msg in [(dict(activation="relu"), "activation='relu'"),
                  (dict(activation=None), "activation='linear'"),
                  (dict(recurrent_activation="silu"), "recurrent_activation='silu'"),
                  (dict(activation=lambda a: a), "activation='<lambda>'")]:
    layer = keras.layers.GRU(H, **kw)
    layer.build((None, T, D))
    with pytest.raises(ValueError, match=f"keras_gru_layer uses .*{msg}.*only tanh and sigmoid"):
      convert.from_keras(layer)
  lstm = keras.layers.RNN(keras.layers.LSTMCell(H))
  with pytest.raises(TypeError, match="got RNN of LSTMCell"):
    convert.from_keras(lstm)
  # tanh and sigmoid given as functions (not names) are the same GRU, whatever their names;
  # the check runs each function on probe points, so a name alone does not pass.
  for act, rec in ((jnp.tanh, jax.nn.sigmoid), (lambda a: 2 * jax.nn.sigmoid(2 * a) - 1,
                                                 lambda a: 0.5 * (1 + jnp.tanh(a / 2)))):
    layer = keras.layers.GRU(H, activation=act, recurrent_activation=rec)
    layer.build((None, T, D))
    assert convert.from_keras(layer)[1] == "reset_after"

  def tanh(a):  # named tanh, computes hard tanh
    return jnp.clip(a, -1, 1)
  layer = keras.layers.GRU(H, activation=tanh)
  layer.build((None, T, D))
  with pytest.raises(ValueError, match="activation='tanh'.*only tanh and sigmoid"):
    convert.from_keras(layer)


# --- Flax Linen ----------------------------------------------------------------

def test_flax_linen_module_checks_activations():
  """Variables alone cannot show a non-default gate_fn / activation_fn (the converted GRU
  silently differed: hard_sigmoid by 0.13, relu by 0.72); with module= they are refused."""
  nn = pytest.importorskip("flax.linen")
  xs, h0 = _data()
  good = nn.RNN(nn.GRUCell(features=H), return_carry=True)
  variables = _randomize(good.init(jax.random.key(0), xs), seed=3)
  carry, out = good.apply(variables, xs, initial_carry=jnp.asarray(h0))
  for module in (good, good.cell):
    params = convert.from_flax_linen(variables, module=module)
    # The activation check probes the functions, also when converting under jit.
    jitted = jax.jit(lambda v, module=module: convert.from_flax_linen(v, module=module))
    _close(jitted(variables).w_h, params.w_h)
    h_last, hs = gru_jax.gru(params, jnp.asarray(xs), h0, variant="reset_after")
    _close(hs, out)
    _close(h_last, carry)
  for kw, msg in [(dict(gate_fn=nn.hard_sigmoid), "gate_fn='hard_sigmoid'"),
                  (dict(activation_fn=nn.relu), "activation_fn='relu'")]:
    with pytest.raises(ValueError, match=f"module uses .*{msg}.*only tanh and sigmoid"):
      convert.from_flax_linen(variables, module=nn.RNN(nn.GRUCell(features=H, **kw)))
  with pytest.raises(ValueError, match=r"module has features=7 but variables_or_params are "
                     r"for H=6 \(hz.kernel \(6, 6\)\)"):
    convert.from_flax_linen(variables, module=nn.GRUCell(features=H + 1))
  with pytest.raises(TypeError, match="module must be a flax.linen GRUCell.*OptimizedLSTMCell"):
    convert.from_flax_linen(variables, module=nn.RNN(nn.OptimizedLSTMCell(H)))


@pytest.mark.parametrize("keep_order", [True, False])
def test_flax_linen_reverse_and_bidirectional(keep_order):
  nn = pytest.importorskip("flax.linen")
  xs, h0 = _data()
  model = nn.RNN(nn.GRUCell(H), return_carry=True, reverse=True, keep_order=keep_order)
  variables = _randomize(model.init(jax.random.key(0), xs), seed=4)
  carry, out = model.apply(variables, xs, initial_carry=jnp.asarray(h0))
  h_last, hs = gru_jax.gru(convert.from_flax_linen(variables), jnp.asarray(xs), h0,
                           variant="reset_after", reverse=True)
  _close(hs if keep_order else hs[:, ::-1], out)
  _close(h_last, carry)
  bi = nn.Bidirectional(nn.RNN(nn.GRUCell(H)), nn.RNN(nn.GRUCell(H)))
  variables = _randomize(bi.init(jax.random.key(1), xs), seed=5)
  with pytest.raises(ValueError, match=r"found keys \['backward_rnn', 'forward_rnn'\]"):
    convert.from_flax_linen(variables)
  fwd, bwd = (convert.from_flax_linen(variables["params"][k])
              for k in ("forward_rnn", "backward_rnn"))
  hs = jnp.concatenate([gru_jax.gru(fwd, jnp.asarray(xs), variant="reset_after")[1],
                        gru_jax.gru(bwd, jnp.asarray(xs), variant="reset_after", reverse=True)[1]],
                       -1)
  _close(hs, bi.apply(variables, xs))


def test_flax_linen_malformed_denses():
  nn = pytest.importorskip("flax.linen")
  xs, h0 = _data()
  variables = _randomize(nn.RNN(nn.GRUCell(H)).init(jax.random.key(0), xs), seed=6)
  cell = dict(variables["params"]["cell"])
  for k in ("iz", "hn"):  # used to be a bare KeyError: 'bias'
    bad = {**cell, k: {"kernel": cell[k]["kernel"]}}
    with pytest.raises(ValueError, match=rf"variables_or_params\['{k}'\] must hold 'kernel' and "
                       r"'bias'.*found \['kernel'\]"):
      convert.from_flax_linen(bad)
  with pytest.raises(ValueError, match=r"variables_or_params\['hr'\] must hold 'kernel'"):
    convert.from_flax_linen({**cell, "hr": jnp.ones((H, H))})
  # A bias on hz or hr (a custom cell's; nn.GRUCell has none) used to be dropped silently.
  # It adds to its gate's pre-activation like the input-side bias, so moving it onto iz / ir
  # gives the same GRU, which the real nn.GRUCell computes.
  rng = np.random.default_rng(7)
  b_hz, b_hr = (rng.uniform(-0.6, 0.6, H).astype(np.float32) for _ in range(2))
  extra = {**cell, "hz": {**cell["hz"], "bias": b_hz}, "hr": {**cell["hr"], "bias": b_hr}}
  folded = {**cell, "iz": {**cell["iz"], "bias": cell["iz"]["bias"] + b_hz},
            "ir": {**cell["ir"], "bias": cell["ir"]["bias"] + b_hr}}
  model = nn.RNN(nn.GRUCell(H), return_carry=True)
  carry, out = model.apply({"params": {"cell": folded}}, xs, initial_carry=jnp.asarray(h0))
  h_last, hs = gru_jax.gru(convert.from_flax_linen(extra), jnp.asarray(xs), h0,
                           variant="reset_after")
  _close(hs, out)
  _close(h_last, carry)


# --- Haiku ---------------------------------------------------------------------

def test_haiku_stacked_grus_by_module_name():
  hk = pytest.importorskip("haiku")

  def f(x, h):  # two GRUs and a Linear in one params dict
    init = hk.initializers.RandomUniform(-0.6, 0.6)
    o1, s1 = hk.dynamic_unroll(hk.GRU(H, b_init=init), jnp.swapaxes(x, 0, 1), h)
    o2, s2 = hk.dynamic_unroll(hk.GRU(H, b_init=init), o1, h)
    return jnp.swapaxes(o1, 0, 1), s1, jnp.swapaxes(o2, 0, 1), s2, hk.Linear(2)(x)

  fn = hk.without_apply_rng(hk.transform(f))
  xs, h0 = _data()
  hp = fn.init(jax.random.key(0), xs, h0)
  assert sorted(hp) == ["gru", "gru_1", "linear"]
  o1, s1, o2, s2, _ = fn.apply(hp, xs, h0)
  with pytest.raises(ValueError, match=r"has 2 hk.GRU modules \['gru', 'gru_1'\]"):
    convert.from_haiku(hp)
  h1, hs1 = gru_jax.gru(convert.from_haiku(hp, module_name="gru"), jnp.asarray(xs), h0)
  h2, hs2 = gru_jax.gru(convert.from_haiku(hp, module_name="gru_1"), hs1, h0)
  for got, want in ((hs1, o1), (h1, s1), (hs2, o2), (h2, s2)):
    _close(got, want)
  with pytest.raises(ValueError, match="module_name='linear' is not an hk.GRU module"):
    convert.from_haiku(hp, module_name="linear")
  with pytest.raises(ValueError, match=r"params_dict holds no hk.GRU params.*keys: \['linear'\]"):
    convert.from_haiku({"linear": hp["linear"]})


# --- Equinox -------------------------------------------------------------------

def test_equinox_float16_keeps_dtype():
  eqx = pytest.importorskip("equinox")
  cell = eqx.nn.GRUCell(D, H, key=jax.random.key(4))
  cell = jax.tree.map(lambda a: a.astype(jnp.float16) if eqx.is_array(a) else a, cell)
  xs, h0 = (jnp.asarray(a, jnp.float16) for a in _data())
  want_last, want_hs = jax.vmap(
      lambda x, h: jax.lax.scan(lambda h, x_t: (cell(x_t, h),) * 2, h, x))(xs, h0)
  params = convert.from_equinox(cell)
  assert params.w_x.dtype == jnp.float16
  h_last, hs = gru_jax.gru(params, xs, h0, variant="reset_after")
  np.testing.assert_allclose(np.asarray(hs, np.float32), np.asarray(want_hs, np.float32),
                             atol=4e-3)
  np.testing.assert_allclose(np.asarray(h_last, np.float32), np.asarray(want_last, np.float32),
                             atol=4e-3)


# --- Under jax.jit and jax.grad --------------------------------------------------

def test_jax_native_peers_convert_under_jit_and_grad():
  """from_flax_linen / from_haiku / from_equinox are linear maps of JAX arrays, so they run
  inside jax.jit and jax.grad (they raised TracerArrayConversionError): the gradient with
  respect to the peer's own params through gru_jax equals the peer's own gradient."""
  nn = pytest.importorskip("flax.linen")
  hk = pytest.importorskip("haiku")
  eqx = pytest.importorskip("equinox")
  xs, h0 = (jnp.asarray(a) for a in _data())
  g = jnp.asarray(np.random.default_rng(9).normal(size=(B, T, H)).astype(np.float32))

  def check(peer_loss, ours_loss, tree):
    want = jax.grad(peer_loss)(tree)
    got = jax.jit(jax.grad(ours_loss))(tree)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5), got, want)

  model = nn.RNN(nn.GRUCell(H))
  check(lambda v: jnp.sum(model.apply(v, xs, initial_carry=h0) * g),
        lambda v: jnp.sum(gru_jax.gru(convert.from_flax_linen(v, module=model), xs, h0,
                                      variant="reset_after")[1] * g),
        _randomize(model.init(jax.random.key(0), xs), seed=10))

  fn = hk.without_apply_rng(hk.transform(
      lambda x: hk.dynamic_unroll(hk.GRU(H), jnp.swapaxes(x, 0, 1), h0)[0]))
  check(lambda p: jnp.sum(jnp.swapaxes(fn.apply(p, xs), 0, 1) * g),
        lambda p: jnp.sum(gru_jax.gru(convert.from_haiku(p), xs, h0)[1] * g),
        _randomize(fn.init(jax.random.key(0), xs), seed=11))

  def eqx_run(cell):
    hs = jax.vmap(lambda x, h: jax.lax.scan(lambda h, x_t: (cell(x_t, h),) * 2, h, x)[1])
    return hs(xs, h0)

  cell = eqx.nn.GRUCell(D, H, key=jax.random.key(4))
  params, static = eqx.partition(cell, eqx.is_array)
  params = _randomize(params, seed=12)
  check(lambda p: jnp.sum(eqx_run(eqx.combine(p, static)) * g),
        lambda p: jnp.sum(gru_jax.gru(convert.from_equinox(eqx.combine(p, static)), xs, h0,
                                      variant="reset_after")[1] * g),
        params)
