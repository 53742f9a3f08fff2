"""Converters against the real peer layers: same weights, same inputs, same outputs.

Every peer gets random weights and random non-zero biases (their default
zero biases would hide a misplaced bias block), runs on random inputs, and
`gru_jax.gru` must reproduce its outputs and final state in float32.
"""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gru_jax
from gru_jax import convert
from gru_jax.cell import GRUParams

B, T, D, H = 3, 5, 4, 6
# float32 against float32; both sides sum the same few terms in different orders.
TOL = dict(atol=1e-5, rtol=1e-5)


def _close(actual, expected):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), **TOL)


def _data(seed=0, d=D):
  """xs [B,T,d] and h0 [B,H] in float32."""
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(B, T, d)).astype(np.float32),
          rng.normal(size=(B, H)).astype(np.float32) * 0.5)


def _random_like(shapes, seed):
  """Random float32 arrays of the given shapes, scaled so the gates are not saturated."""
  rng = np.random.default_rng(seed)
  return [rng.uniform(-0.6, 0.6, size=s).astype(np.float32) for s in shapes]


# --- PyTorch -----------------------------------------------------------------

def _torch_gru(seed=1, **kw):
  torch = pytest.importorskip("torch")
  m = torch.nn.GRU(D, H, batch_first=True, **kw)
  with torch.no_grad():
    for p, v in zip(m.parameters(), _random_like([p.shape for p in m.parameters()], seed)):
      p.copy_(torch.from_numpy(v))
  return m


def _torch_run(m, xs, h0=None):
  """-> (out [B,T,dirs*H], h_n [layers*dirs,B,H]) as NumPy."""
  import torch
  with torch.no_grad():
    out, h_n = m(torch.from_numpy(xs), None if h0 is None else torch.from_numpy(h0))
  return out.numpy(), h_n.numpy()


@pytest.mark.parametrize("with_h0", [False, True])
def test_torch_one_layer(with_h0):
  m = _torch_gru()
  xs, h0 = _data()
  h0 = h0 if with_h0 else None
  out, h_n = _torch_run(m, xs, None if h0 is None else h0[None])
  params = convert.from_torch(m)
  h_last, hs = gru_jax.gru(params, jnp.asarray(xs), h0, variant="reset_after")
  _close(hs, out)
  _close(h_last, h_n[0])


def test_torch_state_dict_equals_module():
  m = _torch_gru(bidirectional=True, num_layers=2)
  sd = {k: v.numpy() for k, v in m.state_dict().items()}  # NumPy values work too
  for layer in (0, 1):
    for direction in (0, 1):
      a = convert.from_torch(m, layer, direction)
      b = convert.from_torch(sd, layer=layer, direction=direction)
      jax.tree.map(np.testing.assert_array_equal, a, b)


def test_torch_two_layers_chain():
  m = _torch_gru(num_layers=2)
  xs, h0 = _data()
  h0s = np.stack([h0, -h0])
  out, h_n = _torch_run(m, xs, h0s)
  h1, hs1 = gru_jax.gru(convert.from_torch(m, layer=0), jnp.asarray(xs), h0s[0],
                        variant="reset_after")
  h2, hs2 = gru_jax.gru(convert.from_torch(m, layer=1), hs1, h0s[1], variant="reset_after")
  _close(hs2, out)
  _close(h1, h_n[0])
  _close(h2, h_n[1])


def test_torch_bidirectional_two_layers():
  m = _torch_gru(num_layers=2, bidirectional=True)
  xs, _ = _data()
  out, h_n = _torch_run(m, xs)
  inp = jnp.asarray(xs)
  for layer in (0, 1):
    fwd = gru_jax.gru(convert.from_torch(m, layer, 0), inp, variant="reset_after")
    bwd = gru_jax.gru(convert.from_torch(m, layer, 1), inp, variant="reset_after", reverse=True)
    _close(fwd[0], h_n[2 * layer])  # h_n is ordered (layer, direction)
    _close(bwd[0], h_n[2 * layer + 1])
    inp = jnp.concatenate([fwd[1], bwd[1]], axis=-1)
  _close(inp, out)


def test_torch_no_bias():
  m = _torch_gru(bias=False)
  xs, h0 = _data()
  out, h_n = _torch_run(m, xs, h0[None])
  params = convert.from_torch(m)
  assert not np.any(params.b_x) and not np.any(params.b_h)
  h_last, hs = gru_jax.gru(params, jnp.asarray(xs), h0, variant="reset_after")
  _close(hs, out)
  _close(h_last, h_n[0])


def test_torch_gru_cell():
  torch = pytest.importorskip("torch")
  cell = torch.nn.GRUCell(D, H)
  xs, h0 = _data()
  with torch.no_grad():
    want = cell(torch.from_numpy(xs[:, 0]), torch.from_numpy(h0)).numpy()
  params = convert.from_torch(cell)
  _close(gru_jax.cell.step(params, jnp.asarray(h0), jnp.asarray(xs[:, 0]), variant="reset_after"),
         want)


def test_torch_round_trip_into_module_and_state_dict():
  m = _torch_gru(num_layers=2, bidirectional=True)
  xs, _ = _data()
  want = _torch_run(m, xs)
  into = _torch_gru(seed=7, num_layers=2, bidirectional=True)
  sd = {}
  for layer in (0, 1):
    for direction in (0, 1):
      p = convert.from_torch(m, layer, direction)
      assert convert.to_torch(p, into, layer, direction) is into
      sd.update(convert.to_torch(p, layer=layer, direction=direction))
  # Negation, transposes and reordering are exact, so the weights come back bit for bit.
  for k, v in m.state_dict().items():
    np.testing.assert_array_equal(into.state_dict()[k].numpy(), v.numpy())
  fresh = _torch_gru(seed=8, num_layers=2, bidirectional=True)
  fresh.load_state_dict(sd)
  for got in (_torch_run(into, xs), _torch_run(fresh, xs)):
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g, w)


def test_torch_export_of_bfloat16_params():
  import torch
  m = _torch_gru()
  p = jax.tree.map(lambda a: a.astype(jnp.bfloat16), convert.from_torch(m))
  as_f32 = jax.tree.map(lambda a: a.astype(jnp.float32), p)  # exact: f32 holds every bf16
  sd = convert.to_torch(p)
  want = convert.to_torch(as_f32)
  for k, v in sd.items():
    assert v.dtype == torch.bfloat16
    np.testing.assert_array_equal(v.float().numpy(), want[k].numpy())
  into = convert.to_torch(p, _torch_gru(seed=5).to(torch.bfloat16))
  for k, v in into.state_dict().items():
    np.testing.assert_array_equal(v.float().numpy(), want[k].numpy())


def test_torch_import_of_bfloat16_modules():
  """torch refuses .numpy() for bfloat16; the params still come back bfloat16, as float16's
  come back float16 (they came back float32), holding the same values."""
  torch = pytest.importorskip("torch")
  m = _torch_gru().to(torch.bfloat16)
  want = convert.from_torch(_torch_gru().to(torch.bfloat16).float())
  for got in (convert.from_torch(m), convert.from_torch(m.state_dict())):
    for a, b in zip(got, want):
      assert a.dtype == jnp.bfloat16
      np.testing.assert_array_equal(np.asarray(a, np.float32), b)
  # And back: to_torch gives bfloat16 tensors equal to the module's, bit for bit.
  for k, v in convert.to_torch(convert.from_torch(m)).items():
    assert v.dtype == torch.bfloat16 and torch.equal(v, m.state_dict()[k])
  half = _torch_gru().half()
  # Negating and reordering the gate blocks is exact, so the float32 path cast back agrees.
  want = convert.from_torch(_torch_gru().half().float())
  for a, b in zip(convert.from_torch(half), want):
    assert a.dtype == jnp.float16
    np.testing.assert_array_equal(a, np.asarray(b).astype(np.float16))


def test_torch_layer_and_direction_take_numpy_ints():
  m = _torch_gru(num_layers=2)
  for a, b in zip(convert.from_torch(m, layer=np.int64(1)), convert.from_torch(m, layer=1)):
    np.testing.assert_array_equal(a, b)
  p = convert.from_torch(m, layer=1)
  sd = convert.to_torch(p, layer=np.int32(1), direction=np.int64(0))
  assert sorted(sd) == ["bias_hh_l1", "bias_ih_l1", "weight_hh_l1", "weight_ih_l1"]
  with pytest.raises(ValueError, match="layer must be an int, got True"):
    convert.from_torch(m, layer=True)
  with pytest.raises(ValueError, match="direction must be an int, got 0.0"):
    convert.to_torch(p, direction=0.0)


def test_torch_errors():
  torch = pytest.importorskip("torch")
  m = _torch_gru()
  with pytest.raises(ValueError, match="layer=1"):
    convert.from_torch(m, layer=1)
  with pytest.raises(ValueError, match="direction=1"):
    convert.from_torch(m, direction=1)
  with pytest.raises(ValueError, match="layer must be an int, got 0.5"):
    convert.from_torch(m, layer=0.5)
  with pytest.raises(TypeError, match="module_or_state_dict.*LSTM"):
    convert.from_torch(torch.nn.LSTM(D, H))
  sd = dict(m.state_dict())
  sd["weight_hh_l0"] = sd["weight_hh_l0"][:, :-1]
  with pytest.raises(ValueError, match=r"module_or_state_dict.*weight_hh_l0 \(18, 5\)"):
    convert.from_torch(sd)
  with pytest.raises(ValueError, match="no 'weight_ih_l<k>'"):
    convert.from_torch({f"gru.{k}": v for k, v in m.state_dict().items()})
  p = convert.from_torch(m)
  with pytest.raises(ValueError, match="module has bias=False"):
    convert.to_torch(p, _torch_gru(bias=False))
  with pytest.raises(ValueError, match=r"params do not fit module at layer=0, direction=0: got "
                     r"weight_ih_l0 \(18, 4\).*expected weight_ih_l0 \(21, 4\).*params are D=4, "
                     r"H=6.*the module's weights take D=4, H=7"):
    convert.to_torch(p, torch.nn.GRU(D, H + 1))
  with pytest.raises(ValueError, match=r"layer=1.*expected weight_ih_l1 \(18, 6\).*take D=6"):
    convert.to_torch(p, torch.nn.GRU(D, H, num_layers=2), layer=1)
  with pytest.raises(ValueError, match="direction=1"):
    convert.to_torch(p, m, direction=1)
  with pytest.raises(TypeError, match="params must be a GRUParams"):
    convert.to_torch(tuple(p), m)
  with pytest.raises(ValueError, match="params has inconsistent"):
    convert.to_torch(p._replace(b_h=p.b_h[:-1]), m)


# --- Keras 3 -----------------------------------------------------------------

@pytest.mark.parametrize("reset_after,use_bias", [(True, True), (False, True), (True, False)])
def test_keras(reset_after, use_bias):
  keras = pytest.importorskip("keras")
  layer = keras.layers.GRU(H, return_sequences=True, return_state=True,
                           reset_after=reset_after, use_bias=use_bias)
  xs, h0 = _data()
  layer(xs)  # builds it
  layer.set_weights(_random_like([w.shape for w in layer.get_weights()], seed=2))
  out, h_n = layer(xs, initial_state=[h0])
  params, variant = convert.from_keras(layer)
  assert variant == ("reset_after" if reset_after else "seed")
  h_last, hs = gru_jax.gru(params, jnp.asarray(xs), h0, variant=variant)
  _close(hs, keras.ops.convert_to_numpy(out))
  _close(h_last, keras.ops.convert_to_numpy(h_n))
  # The bare cell converts the same way.
  jax.tree.map(np.testing.assert_array_equal, convert.from_keras(layer.cell)[0], params)


def test_keras_errors():
  keras = pytest.importorskip("keras")
  with pytest.raises(ValueError, match="keras_gru_layer is not built"):
    convert.from_keras(keras.layers.GRU(H))
  with pytest.raises(TypeError, match="keras_gru_layer.*LSTM"):
    convert.from_keras(keras.layers.LSTM(H))
  bi = keras.layers.Bidirectional(keras.layers.GRU(H))
  with pytest.raises(TypeError, match="forward_layer"):
    convert.from_keras(bi)
  hard = keras.layers.GRU(H, recurrent_activation="hard_sigmoid")
  hard.build((None, T, D))
  with pytest.raises(ValueError, match="recurrent_activation='hard_sigmoid'"):
    convert.from_keras(hard)


# --- Flax Linen ----------------------------------------------------------------

def test_flax_linen():
  nn = pytest.importorskip("flax.linen")
  model = nn.RNN(nn.GRUCell(features=H), return_carry=True)
  xs, h0 = _data()
  variables = model.init(jax.random.key(0), xs)
  leaves, treedef = jax.tree.flatten(variables)
  variables = jax.tree.unflatten(treedef, _random_like([l.shape for l in leaves], seed=3))
  carry, out = model.apply(variables, xs, initial_carry=jnp.asarray(h0))
  params = convert.from_flax_linen(variables)
  h_last, hs = gru_jax.gru(params, jnp.asarray(xs), h0, variant="reset_after")
  _close(hs, out)
  _close(h_last, carry)
  for sub in (variables["params"], variables["params"]["cell"]):
    jax.tree.map(np.testing.assert_array_equal, convert.from_flax_linen(sub), params)


def test_flax_linen_errors():
  nn = pytest.importorskip("flax.linen")
  variables = nn.RNN(nn.GRUCell(features=H)).init(jax.random.key(0), jnp.ones((B, T, D)))
  with pytest.raises(ValueError, match=r"variables_or_params.*missing.*found keys \['RNN_0'\]"):
    convert.from_flax_linen({"params": {"RNN_0": variables["params"]}})
  cell = dict(variables["params"]["cell"])
  cell["hz"] = {"kernel": jnp.ones((H, H + 1))}
  with pytest.raises(ValueError, match=r"variables_or_params has inconsistent.*hz.kernel \(6, 7\)"):
    convert.from_flax_linen(cell)
  with pytest.raises(TypeError, match="variables_or_params"):
    convert.from_flax_linen([1, 2])


# --- Haiku ---------------------------------------------------------------------

def _haiku_unroll(xs, h0):
  hk = pytest.importorskip("haiku")
  core = hk.GRU(H, b_init=hk.initializers.RandomUniform(-0.6, 0.6))
  return hk.dynamic_unroll(core, jnp.swapaxes(xs, 0, 1), h0)  # time-major


def test_haiku():
  hk = pytest.importorskip("haiku")
  f = hk.without_apply_rng(hk.transform(_haiku_unroll))
  xs, h0 = _data()
  hk_params = f.init(jax.random.key(0), xs, h0)
  out, h_n = f.apply(hk_params, xs, h0)
  assert np.any(hk_params["gru"]["b"])
  params = convert.from_haiku(hk_params)
  h_last, hs = gru_jax.gru(params, jnp.asarray(xs), h0, variant="seed")
  _close(hs, jnp.swapaxes(out, 0, 1))
  _close(h_last, h_n)
  jax.tree.map(np.testing.assert_array_equal, convert.from_haiku(hk_params["gru"]), params)


def test_haiku_errors():
  gru_params = {"w_i": np.zeros((D, 3 * H)), "w_h": np.zeros((H, 3 * H)), "b": np.zeros(3 * H)}
  two = {"enc": gru_params, "dec": gru_params}
  with pytest.raises(ValueError, match="params_dict has 2 hk.GRU modules"):
    convert.from_haiku(two)
  assert convert.from_haiku(two, module_name="dec").hidden_size == H
  with pytest.raises(ValueError, match="module_name='mlp'"):
    convert.from_haiku(two, module_name="mlp")
  with pytest.raises(ValueError, match=r"params_dict has inconsistent.*w_h \(6, 17\)"):
    convert.from_haiku({**gru_params, "w_h": np.zeros((H, 3 * H - 1))})
  with pytest.raises(TypeError, match="params_dict"):
    convert.from_haiku(None)


# --- Equinox -------------------------------------------------------------------

@pytest.mark.parametrize("use_bias", [True, False])
def test_equinox(use_bias):
  eqx = pytest.importorskip("equinox")
  cell = eqx.nn.GRUCell(D, H, use_bias=use_bias, key=jax.random.key(4))
  xs, h0 = _data()

  def run(x, h):  # x [T,D], h [H]
    h_last, hs = jax.lax.scan(lambda h, x_t: (cell(x_t, h),) * 2, h, x)
    return h_last, hs

  want_last, want_hs = jax.vmap(run)(jnp.asarray(xs), jnp.asarray(h0))
  params = convert.from_equinox(cell)
  assert np.any(params.b_h) == use_bias
  h_last, hs = gru_jax.gru(params, jnp.asarray(xs), h0, variant="reset_after")
  _close(hs, want_hs)
  _close(h_last, want_last)


def test_equinox_errors():
  pytest.importorskip("equinox")
  with pytest.raises(TypeError, match="cell must be an equinox.nn.GRUCell"):
    convert.from_equinox(GRUParams(*[np.zeros(1)] * 4))


# --- Packaging -----------------------------------------------------------------

def test_import_needs_no_peer_library():
  code = ("import sys, gru_jax.convert; "
          "print([m for m in ('torch', 'keras', 'haiku', 'equinox') if m in sys.modules])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"
