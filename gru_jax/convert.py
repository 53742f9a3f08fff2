"""Weight converters between `GRUParams` and other libraries' GRUs.

gru_jax stores w_x [D,3H], w_h [H,3H], b_x [3H], b_h [3H] with gate blocks
(z, r, h) along 3H and z weighting the candidate: h' = (1−z)⊙h + z⊙h̃.
Peers differ from this in three ways, all handled here:

* layout: PyTorch and Equinox store [3H,D] matrices with gates (r, z, n);
  Flax Linen keeps one Dense per gate and side;
* z's side: PyTorch, Keras, Flax and Equinox let z weight the OLD state,
  h' = z⊙h + (1−z)⊙h̃.  Since 1 − σ(a) = σ(−a), their z becomes ours by
  negating that gate's weights and biases (exact in floating point);
* form: those four reset after the recurrent matmul ("reset_after"); Haiku
  and Keras' ``reset_after=False`` reset before it ("seed").

Peer libraries are imported inside the functions, so gru_jax needs none of
them installed.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gru_jax.cell import GRUParams, check_int, check_variant


def _np(a):
  """A torch tensor, Keras variable or NumPy array as a NumPy array; a JAX array (or a tracer,
  so a conversion can run under `jax.jit` and `jax.grad`) as it is."""
  if hasattr(a, "detach"):  # torch.Tensor: leave the autograd graph and the device
    a = a.detach().cpu()
    # torch refuses .numpy() for bfloat16; via float32 (which holds every bf16 value
    # exactly) to JAX's NumPy bfloat16, so the dtype is kept as float16's is.
    if str(a.dtype) == "torch.bfloat16":
      return a.float().numpy().astype(jnp.bfloat16)
    return a.numpy()
  return a if isinstance(a, jax.Array) else np.asarray(a)


def _check_shapes(arg: str, got: dict, want: dict, hint: str = "",
                  what: str = "has inconsistent GRU shapes") -> None:
  """Raises ValueError naming ``arg`` and every shape if any got[k] != want[k]."""
  got = {k: tuple(np.shape(a)) for k, a in got.items()}
  if any(got[k] != want[k] for k in want):
    raise ValueError(f"{arg} {what}: got "
                     + ", ".join(f"{k} {got[k]}" for k in want) + "; expected "
                     + ", ".join(f"{k} {want[k]}" for k in want) + hint)


def _params(w_x, w_h, b_x, b_h) -> GRUParams:
  return GRUParams(*(jnp.asarray(a) for a in (w_x, w_h, b_x, b_h)))


def _rzn_to_zrh(a):
  """Blocks (r, z, n) along axis 0, z on the old state -> ours (z, r, h), z negated."""
  r, z, n = jnp.split(a, 3, axis=0)
  return jnp.concatenate([-z, r, n], axis=0)


def _zrh_to_rzn(a: np.ndarray) -> np.ndarray:
  """Inverse of `_rzn_to_zrh`."""
  z, r, n = np.split(a, 3, axis=0)
  return np.concatenate([r, -z, n], axis=0)


def _flip_z(a):
  """Negates the z block (the first third of the last axis) of a (z, r, h) array."""
  z, r, h = jnp.split(a, 3, axis=-1)
  return jnp.concatenate([-z, r, h], axis=-1)


def _from_rzn(arg: str, names, w_ih, w_hh, b_ih, b_hh) -> GRUParams:
  """[3H,D], [3H,H], [3H], [3H] in (r, z, n) with z on the old state -> GRUParams.

  ``names`` are the peer's names for the four arrays, used in shape errors.
  """
  hsz, d = np.shape(w_hh)[-1], np.shape(w_ih)[-1]
  want = ((3 * hsz, d), (3 * hsz, hsz), (3 * hsz,), (3 * hsz,))
  rows = np.shape(w_hh)[0] if np.ndim(w_hh) == 2 else None
  hint = {4 * hsz: " (4H rows: an LSTM's weights, not a GRU's)",
          hsz: " (H rows: a plain RNN's weights, not a GRU's)"}.get(rows, "")
  _check_shapes(arg, dict(zip(names, (w_ih, w_hh, b_ih, b_hh))), dict(zip(names, want)), hint)
  w_ih, w_hh, b_ih, b_hh = (_rzn_to_zrh(_np(a)) for a in (w_ih, w_hh, b_ih, b_hh))
  return _params(w_ih.T, w_hh.T, b_ih, b_hh)


# --- PyTorch -----------------------------------------------------------------

_TORCH_KEY = re.compile(r"weight_ih_l(\d+)(_reverse)?$")


def _torch_suffix(obj, layer: int, direction: int, arg: str) -> str:
  """State-dict key suffix ("_l1_reverse", or "" for a GRUCell) after checking the indices."""
  try:
    import torch
  except ImportError:  # a plain state dict of arrays needs no torch
    torch = None
  is_module = lambda cls: torch is not None and isinstance(obj, getattr(torch.nn, cls))
  is_cell = is_module("GRUCell") or (isinstance(obj, Mapping) and "weight_ih" in obj)
  if is_cell:
    layers, directions = [0], 1
  elif is_module("GRU"):
    layers, directions = list(range(obj.num_layers)), 2 if obj.bidirectional else 1
  elif isinstance(obj, Mapping):
    found = [_TORCH_KEY.match(k) for k in obj]
    layers = sorted({int(m.group(1)) for m in found if m})
    directions = 2 if any(m and m.group(2) for m in found) else 1
    if not layers:
      raise ValueError(f"{arg} has no 'weight_ih_l<k>' or 'weight_ih' key (keys: "
                       f"{sorted(obj)[:8]}); strip any parent-module prefix from the keys")
  else:
    raise TypeError(f"{arg} must be a torch.nn.GRU, torch.nn.GRUCell or its state_dict, "
                    f"got {type(obj).__name__}")
  layer, direction = check_int("layer", layer), check_int("direction", direction)
  if layer not in layers:
    raise ValueError(f"layer={layer!r} is out of range: {arg} has layers {layers}")
  if direction not in range(directions):
    raise ValueError(f"direction={direction!r} is out of range: {arg} has {directions} "
                     f"direction(s) (1 is the reverse one of a bidirectional GRU)")
  if is_cell:
    return ""
  return f"_l{layer}" + ("_reverse" if direction else "")


def from_torch(module_or_state_dict, layer: int = 0, direction: int = 0) -> GRUParams:
  """Reads one layer and direction of a PyTorch GRU as "reset_after" `GRUParams`.

  PyTorch's layout: weight_ih_l{k}[_reverse] [3H,D], weight_hh_l{k}[_reverse]
  [3H,H], bias_ih_l{k}[_reverse] and bias_hh_l{k}[_reverse] [3H], gates
  (r, z, n), with h' = (1−z)⊙n + z⊙h.  Converted by transposing, reordering
  the gates to (z, r, h) and negating z's rows (z moves to the candidate).
  PyTorch's b_hn sits inside the reset product, as b_h's candidate block does
  here.  A GRU with ``bias=False`` gives zero biases.  The params keep the
  module's dtype (float16 and bfloat16 too; float64 needs ``jax_enable_x64``,
  else JAX makes it float32).

  Args:
    module_or_state_dict: a `torch.nn.GRU` or `torch.nn.GRUCell`, or its
      ``state_dict()`` (torch tensors or NumPy arrays, no key prefix).
    layer: which of the stacked layers (``weight_*_l{layer}``).
    direction: 0 forward, 1 the ``_reverse`` direction of a bidirectional
      GRU, which equals ``gru_jax.gru(..., reverse=True)``.
  """
  arg = "module_or_state_dict"
  obj = module_or_state_dict
  suffix = _torch_suffix(obj, layer, direction, arg)
  names = [f"{k}{suffix}" for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
  if isinstance(obj, Mapping):
    sd = obj
  else:  # attributes, not state_dict(): a parametrized weight (weight_norm) reads as its value
    sd = {k: getattr(obj, k) for k in names if obj.bias or k.startswith("weight")}
  for k in names[:2]:
    if k not in sd:
      raise ValueError(f"{arg} has no key {k!r} (keys: {sorted(sd)[:8]})")
  if (names[2] in sd) != (names[3] in sd):
    have, lack = (names[2], names[3]) if names[2] in sd else (names[3], names[2])
    raise ValueError(f"{arg} has {have!r} but no {lack!r}: a GRU has both biases or, with "
                     "bias=False, neither")
  w_ih, w_hh = sd[names[0]], sd[names[1]]
  zeros = np.zeros(3 * np.shape(w_hh)[-1], _np(w_hh).dtype)  # bias=False
  return _from_rzn(arg, names, w_ih, w_hh, sd.get(names[2], zeros), sd.get(names[3], zeros))


def _check_params(params) -> None:
  if not isinstance(params, GRUParams):
    raise TypeError(f"params must be a GRUParams, got {type(params).__name__}")
  d, hsz = params.input_size, params.hidden_size
  _check_shapes("params", params._asdict(),
                {"w_x": (d, 3 * hsz), "w_h": (hsz, 3 * hsz), "b_x": (3 * hsz,), "b_h": (3 * hsz,)})


def to_torch(params: GRUParams, module=None, layer: int = 0, direction: int = 0, *,
             variant: str = "reset_after"):
  """Writes "reset_after" `GRUParams` into PyTorch's layout; the inverse of `from_torch`.

  Transposes to [3H,D] / [3H,H], negates z's block and reorders the gates
  to PyTorch's (r, z, n).  Only "reset_after" params map onto PyTorch's
  equations; "seed" params would give a different GRU.

  Args:
    params: `GRUParams` with w_x [D,3H], w_h [H,3H], b_x [3H], b_h [3H], or an
      NNX `nnx_layers.GRU`, whose own ``variant`` is then checked.
    module: a `torch.nn.GRU` or `torch.nn.GRUCell` whose ``layer`` /
      ``direction`` weights are overwritten in place (converted to its dtype
      and device), or None.
    layer, direction: as in `from_torch`.
    variant: the variant the params were trained as.  GRUParams do not record
      it, so pass it when it may be "seed" (e.g. from `from_haiku`): "seed" is
      refused, as torch would compute another GRU with those weights.

  Returns:
    ``module`` if given, else a dict of float torch tensors under the
    state-dict keys ``weight_ih_l{layer}[_reverse]`` etc., ready for
    ``load_state_dict`` (one dict per layer and direction; merge them).  For a
    ``GRUCell``, whose keys have no ``_l0``, pass the cell as ``module``.
  """
  import torch
  if not isinstance(params, GRUParams) and hasattr(params, "variant") and hasattr(params,
                                                                                  "params"):
    variant, params = params.variant, params.params  # an NNX GRU layer
  _check_torch_variant(variant, "params")
  _check_params(params)
  arrays = (params.w_x.T, params.w_h.T, params.b_x, params.b_h)
  arrays = [_zrh_to_rzn(_torch_ready(a)) for a in arrays]
  if module is None:
    layer, direction = check_int("layer", layer), check_int("direction", direction)
    if layer < 0 or direction not in (0, 1):
      raise ValueError(f"layer must be an int >= 0 and direction 0 or 1, got layer={layer!r}, "
                       f"direction={direction!r}")
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    return {f"{k}{suffix}": _to_tensor(a, params.w_x.dtype)
            for k, a in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"), arrays)}
  if not isinstance(module, (torch.nn.GRU, torch.nn.GRUCell)):
    raise TypeError(f"module must be a torch.nn.GRU or torch.nn.GRUCell, got "
                    f"{type(module).__name__}")
  suffix = _torch_suffix(module, layer, direction, "module")
  names = [f"{k}{suffix}" for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
  if not module.bias:
    if np.any(arrays[2]) or np.any(arrays[3]):
      raise ValueError("module has bias=False but params have non-zero b_x or b_h, which "
                       "it cannot hold")
    names, arrays = names[:2], arrays[:2]
  own = dict(module.named_parameters(recurse=False))
  if any(k not in own for k in names):
    raise ValueError(f"module's {[k for k in names if k not in own]} are not plain parameters "
                     "(a parametrization such as weight_norm computes them), so writing them "
                     "would change nothing; remove the parametrization first")
  targets = [own[k] for k in names]
  _check_shapes("params", dict(zip(names, arrays)),
                {k: tuple(t.shape) for k, t in zip(names, targets)},
                f" in PyTorch's layout (params are D={params.input_size}, "
                f"H={params.hidden_size}: w_x {tuple(params.w_x.shape)}, w_h "
                f"{tuple(params.w_h.shape)}; the module's weights take D={targets[0].shape[1]}, "
                f"H={targets[1].shape[1]})",
                what=f"do not fit module at layer={layer}, direction={direction}")
  with torch.no_grad():
    for t, a in zip(targets, arrays):
      t.copy_(torch.from_numpy(np.ascontiguousarray(a)))  # copy_ casts to t's dtype
  return module


def _torch_ready(a) -> np.ndarray:
  """A NumPy array torch can read: bfloat16 (no NumPy dtype in torch's eyes) goes via float32,
  which holds every bfloat16 value exactly."""
  a = np.asarray(a)
  return a.astype(np.float32) if a.dtype == jnp.bfloat16 else np.array(a)


def _to_tensor(a: np.ndarray, dtype):
  import torch
  t = torch.from_numpy(np.ascontiguousarray(a))
  return t.to(torch.bfloat16) if dtype == jnp.bfloat16 else t


# --- PyTorch: whole stacks ----------------------------------------------------

# Bidirectional's submodules, holding torch's direction 0 and 1.
_DIRECTIONS = ("forward", "backward")


def _torch_gru_shape(module, arg: str = "module") -> tuple[int, bool]:
  """(num_layers, bidirectional) of a `torch.nn.GRU`, after refusing anything else."""
  import torch
  if not isinstance(module, torch.nn.GRU):
    hint = {"GRUCell": "; convert a GRUCell with from_torch / to_torch",
            "LSTM": "; an LSTM's gates and state are not a GRU's"}.get(type(module).__name__, "")
    raise TypeError(f"{arg} must be a torch.nn.GRU, got {type(module).__name__}{hint}")
  if getattr(module, "proj_size", 0):  # torch allows it only for LSTMs; refuse it if set anyway
    raise ValueError(f"{arg} has proj_size={module.proj_size}: gru_jax's GRU has no output "
                     "projection (proj_size=0 only)")
  return module.num_layers, bool(module.bidirectional)


def _stack_paths(num_layers: int, bidirectional: bool):
  """(layer, direction, path) of every GRU in a StackedGRU's params, path like
  ("layer_1", "backward")."""
  for i in range(num_layers):
    for d in (0, 1) if bidirectional else (0,):
      yield i, d, (f"layer_{i}",) + ((_DIRECTIONS[d],) if bidirectional else ())


def _torch_stack_params(module) -> dict:
  """A torch GRU's weights as a StackedGRU's params tree of "reset_after" GRUParams."""
  tree = {}
  for layer, direction, path in _stack_paths(*_torch_gru_shape(module)):
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = from_torch(module, layer, direction)
  return tree


def stacked_from_torch(module):
  """A whole `torch.nn.GRU` as a Flax Linen `layers.StackedGRU` and its variables.

  Returns ``(stack, variables)`` with ``stack.apply(variables, xs, mask)`` equal
  to torch's output for the same weights: xs [B,T,D] -> hs [B,T,H] ([B,T,2H]
  bidirectional, the directions concatenated as torch does).  The stack takes
  batch-major inputs only: for a module with ``batch_first=False`` (torch's
  [T,B,D]) pass ``xs.transpose(1, 0, 2)`` and transpose hs back.  A mask [B,T]
  (True on each sequence's first ``length`` steps) is torch's
  ``pack_padded_sequence(xs, lengths)``: the backward direction starts at each
  sequence's last valid step, and padded steps come out as zeros as
  ``pad_packed_sequence`` pads them.  torch's ``h0`` [L·dirs,B,H] goes in as
  it is (``stack.apply(variables, xs, mask, h0)``), and
  ``stack.clone(return_state=True)`` also returns the final states, with
  ``jnp.stack(jax.tree.leaves(states))`` torch's ``h_n``.

  ``module.dropout`` becomes ``dropout_between`` (inverted dropout on every
  layer's outputs but the last, as torch's): it runs only when applied with
  ``deterministic=False`` and a ``dropout`` RNG, and by default (no dropout)
  the stack equals torch in ``eval()`` mode.  ``bias=False`` gives zero
  biases (the same GRU).  Params keep the module's dtype, as in `from_torch`.

  Params: ``{"params": {"layer_i": GRUParams fields}}``, or with
  bidirectional ``{"layer_i": {"forward": ..., "backward": ...}}``.
  """
  from gru_jax import layers
  num_layers, bidirectional = _torch_gru_shape(module)
  tree = _torch_stack_params(module)
  dtype = jax.tree.leaves(tree)[0].dtype
  stack = layers.StackedGRU(hidden_sizes=(module.hidden_size,) * num_layers,
                            bidirectional=bidirectional, merge_mode="concat",
                            dropout_between=float(module.dropout),
                            gru_kwargs=dict(variant="reset_after", param_dtype=dtype))
  params = jax.tree.map(lambda p: dict(p._asdict()), tree,
                        is_leaf=lambda x: isinstance(x, GRUParams))
  return stack, {"params": params}


def stacked_from_torch_nnx(module, *, rngs=None):
  """A whole `torch.nn.GRU` as a Flax NNX `nnx_layers.StackedGRU` (see `stacked_from_torch`).

  xs [B,T,D] -> hs [B,T,H] / [B,T,2H]; masks, batch_first and dropout as in
  `stacked_from_torch`.  NNX layers run dropout unless in eval mode, so the
  stack starts in the module's mode: ``module.eval()`` gives an ``eval()``
  stack (equal to torch), a training module a training stack.  ``rngs``
  (an ``nnx.Rngs``, its ``dropout`` stream) is needed when dropout can run
  (``module.dropout > 0`` with 2 or more layers).
  """
  from flax import nnx
  from gru_jax import nnx_layers
  num_layers, bidirectional = _torch_gru_shape(module)
  if module.dropout > 0 and num_layers > 1 and rngs is None:
    raise ValueError(f"module has dropout={module.dropout} between its {num_layers} layers: "
                     "pass rngs=nnx.Rngs(...) for the dropout masks")
  tree = _torch_stack_params(module)
  dtype = jax.tree.leaves(tree)[0].dtype
  # The constructor's random weights are placeholders, replaced below.
  stack = nnx_layers.StackedGRU(module.input_size, (module.hidden_size,) * num_layers,
                                bidirectional=bidirectional, merge_mode="concat",
                                dropout_between=float(module.dropout),
                                rngs=nnx.Rngs(0) if rngs is None else rngs,
                                variant="reset_after", param_dtype=dtype)
  _set_nnx_params(stack, tree)
  if not module.training:
    stack.eval()
  return stack


def _set_nnx_params(node, tree) -> None:
  """Makes each `GRUParams` leaf of ``tree`` (as `_torch_stack_params` arranges them) the
  ``nnx.Param``s of the NNX submodule of ``node`` at the same path, in one walk of the tree."""
  from flax import nnx
  if isinstance(tree, GRUParams):
    for name, value in tree._asdict().items():
      setattr(node, name, nnx.Param(value))
    return
  for key, subtree in tree.items():
    _set_nnx_params(getattr(node, key), subtree)


def _keys(node) -> str:
  return str(sorted(node)) if isinstance(node, Mapping) else type(node).__name__


def stacked_to_torch(variables, module, *, variant: str = "reset_after"):
  """Writes a `StackedGRU`'s params into a `torch.nn.GRU` in place; returns ``module``.

  The inverse of `stacked_from_torch`: ``variables`` is a Linen StackedGRU's
  ``{"params": ...}`` (or its ``params`` subtree) or an NNX ``StackedGRU``,
  built with ``variant="reset_after"`` and ``merge_mode="concat"``, with as
  many layers as ``module.num_layers`` of its ``hidden_size``, bidirectional
  as the module is.  An NNX stack's layers say their variant, and "seed"
  layers are refused; Linen variables do not record it, so pass ``variant``
  when it may be "seed" ("seed" weights would give a different GRU in torch).
  Everything is checked before anything is written, so a bad layer leaves
  the module unchanged.
  """
  import copy
  import torch
  num_layers, bidirectional = _torch_gru_shape(module)
  arg = "variables"
  tree = variables
  _check_torch_variant(variant, arg)
  if not isinstance(tree, Mapping):
    from flax import nnx
    if not isinstance(tree, nnx.Module):
      raise TypeError(f"{arg} must be a Linen StackedGRU's variables dict or an NNX "
                      f"StackedGRU, got {type(tree).__name__}")
    for path, node in nnx.iter_graph(tree):
      if isinstance(getattr(node, "variant", None), str):
        _check_torch_variant(node.variant, ".".join(("variables",) + tuple(map(str, path))))
    tree = nnx.state(tree, nnx.Param).to_pure_dict()
  elif isinstance(tree.get("params"), Mapping):
    tree, arg = tree["params"], f"{arg}['params']"
  want = [f"layer_{i}" for i in range(num_layers)]
  if sorted(tree) != sorted(want):
    raise ValueError(f"{arg} has keys {sorted(tree)} but module has num_layers={num_layers}, "
                     f"so a StackedGRU with {want}")
  scratch = copy.deepcopy(module)  # all or nothing: a bad layer 2 must not leave 0-1 written
  for layer, direction, path in _stack_paths(num_layers, bidirectional):
    node, where = tree, arg
    for k in path:
      if not isinstance(node, Mapping) or k not in node:
        raise ValueError(f"{where} has {_keys(node)}, no {k!r}: module is bidirectional, so "
                         "the StackedGRU must be bidirectional=True")
      node, where = node[k], f"{where}[{k!r}]"
    if isinstance(node, Mapping) and set(_DIRECTIONS) <= set(node):
      raise ValueError(f"{where} is a Bidirectional layer {_keys(node)} but module has "
                       "bidirectional=False")
    if not isinstance(node, Mapping) or set(node) != set(GRUParams._fields):
      raise ValueError(f"{where} must hold exactly {list(GRUParams._fields)} (a plain GRU; "
                       f"torch has no layer norm), found {_keys(node)}")
    try:
      to_torch(GRUParams(**node), scratch, layer, direction)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
  with torch.no_grad():
    own = dict(module.named_parameters())
    for k, v in scratch.named_parameters():
      own[k].copy_(v)
  return module


def _check_torch_variant(variant: str, arg: str) -> None:
  check_variant(variant)
  if variant != "reset_after":
    raise ValueError(f"{arg} is a {variant!r}-variant GRU; torch.nn.GRU computes the "
                     "'reset_after' equations (r multiplies W_hn h + b_hn), so these weights "
                     "would give a different GRU there")


# Where the activations are probed: both tails and the curved middle.
_PROBE = np.linspace(-6.0, 6.0, 49, dtype=np.float32)


def _computes(fn, want) -> bool:
  try:
    with jax.ensure_compile_time_eval():  # concrete even when converting inside jax.jit
      got = np.asarray(fn(_PROBE), np.float64)
  except Exception:  # noqa: BLE001 -- a function that cannot take an array is not tanh
    return False
  return got.shape == _PROBE.shape and bool(np.allclose(got, want(_PROBE.astype(np.float64)),
                                                        rtol=1e-5, atol=1e-6))


def _check_activations(arg: str, **fns) -> None:
  """Refuses a peer GRU whose candidate activation (first of ``fns``) does not compute tanh
  or whose gate activation (second) does not compute the logistic sigmoid, by what each
  function returns on a probe of 49 points in [-6, 6] (not by its name)."""
  (cand_name, cand), (gate_name, gate) = fns.items()
  if not (_computes(cand, np.tanh) and _computes(gate, lambda a: 1.0 / (1.0 + np.exp(-a)))):
    names = {k: getattr(f, "__name__", repr(f)) for k, f in fns.items()}
    raise ValueError(f"{arg} uses " + ", ".join(f"{k}={v!r}" for k, v in names.items())
                     + "; gru_jax's GRU computes only tanh and sigmoid there")


# --- Keras 3 -----------------------------------------------------------------

def from_keras(keras_gru_layer) -> tuple[GRUParams, str]:
  """Reads a built Keras 3 ``GRU``, ``GRUCell`` or ``RNN(GRUCell)``: ``(params, variant)``.

  Keras' layout: kernel [D,3H], recurrent_kernel [H,3H], gates (z, r, h) as
  ours, with h = z⊙h + (1−z)⊙h̃.  Only z's columns and bias entries are
  negated.  ``reset_after=True`` (default): bias [2,3H] is (input, recurrent)
  -> (b_x, b_h), variant "reset_after".  ``reset_after=False``: bias [3H]
  -> b_x with b_h zero, variant "seed".  ``use_bias=False`` gives zeros.
  A layer with ``go_backwards=True`` matches ``gru(..., reverse=True)`` with
  the time axis of hs flipped (Keras returns outputs in processing order).
  With a mask, h_last and the valid steps agree; at masked steps Keras
  repeats the last valid output where `gru_jax.gru` gives zeros.
  """
  import keras
  arg = "keras_gru_layer"
  layer = keras_gru_layer
  if isinstance(layer, keras.layers.Bidirectional):
    raise TypeError(f"{arg} is a Bidirectional wrapper; convert its .forward_layer and "
                    ".backward_layer separately")
  cell = layer.cell if isinstance(layer, keras.layers.RNN) else layer  # GRU is an RNN
  if not isinstance(cell, keras.layers.GRUCell):
    of = f" of {type(cell).__name__}" if cell is not layer else ""
    raise TypeError(f"{arg} must be a keras.layers.GRU, GRUCell or RNN(GRUCell), got "
                    f"{type(layer).__name__}{of}")
  if not cell.built:
    raise ValueError(f"{arg} is not built, so it has no weights yet: call it on an input or "
                     "call .build((batch, time, features)) first")
  _check_activations(arg, activation=cell.activation,
                     recurrent_activation=cell.recurrent_activation)
  kernel, rec = _np(cell.kernel), _np(cell.recurrent_kernel)
  hsz, d = rec.shape[0], kernel.shape[0]
  bias_shape = (2, 3 * hsz) if cell.reset_after else (3 * hsz,)
  bias = _np(cell.bias) if cell.use_bias else np.zeros(bias_shape, kernel.dtype)
  _check_shapes(arg, {"kernel": kernel, "recurrent_kernel": rec, "bias": bias},
                {"kernel": (d, 3 * hsz), "recurrent_kernel": (hsz, 3 * hsz), "bias": bias_shape})
  if cell.reset_after:
    b_x, b_h, variant = bias[0], bias[1], "reset_after"
  else:
    b_x, b_h, variant = bias, np.zeros_like(bias), "seed"
  return _params(*(_flip_z(a) for a in (kernel, rec, b_x, b_h))), variant


# --- Flax Linen ----------------------------------------------------------------

_FLAX_DENSES = ("iz", "ir", "in", "hz", "hr", "hn")


def _flax_cell(module, arg: str):
  """The ``nn.GRUCell`` of ``module`` (itself or an ``nn.RNN``'s cell), activations checked."""
  import flax.linen as nn
  cell = module.cell if isinstance(module, nn.RNN) else module
  if not isinstance(cell, nn.GRUCell):
    of = f" of {type(cell).__name__}" if cell is not module else ""
    raise TypeError(f"{arg} must be a flax.linen GRUCell or RNN(GRUCell), got "
                    f"{type(module).__name__}{of}")
  _check_activations(arg, activation_fn=cell.activation_fn, gate_fn=cell.gate_fn)
  return cell


def from_flax_linen(variables_or_params, module=None) -> GRUParams:
  """Reads Flax Linen ``nn.RNN(nn.GRUCell)`` (or bare ``nn.GRUCell``) variables as "reset_after".

  Flax's layout: one Dense per gate and side, each kernel [in,H]: ir, iz, in
  (with bias) on x; hr, hz (no bias) and hn (with bias, inside the reset
  product) on h; h' = (1−z)⊙n + z⊙h.  The kernels are concatenated in our
  (z, r, h) order with z's kernels and bias negated; b_h is (0, 0, hn.bias).

  The variables do not say which ``gate_fn`` / ``activation_fn`` the cell
  used; gru_jax computes sigmoid and tanh (Flax's defaults).  Pass the module
  to have that checked: a cell with other functions is refused.

  Args:
    variables_or_params: ``module.init(...)`` output, with or without the
      top-level 'params' key and with or without nn.RNN's 'cell' level.
    module: optional, the ``nn.RNN(nn.GRUCell)`` or ``nn.GRUCell`` the
      variables belong to; its activations and feature count are checked.
  """
  arg = "variables_or_params"
  tree = variables_or_params
  cell = None if module is None else _flax_cell(module, "module")
  if not isinstance(tree, Mapping):
    raise TypeError(f"{arg} must be a dict of Flax variables, got {type(tree).__name__}")
  for level in ("params", "cell"):
    if level in tree and isinstance(tree[level], Mapping):
      tree = tree[level]
  missing = [k for k in _FLAX_DENSES if k not in tree]
  if missing:
    raise ValueError(f"{arg} is not nn.GRUCell params: missing {missing}, found keys "
                     f"{sorted(tree)}; pass the GRU's own subtree, e.g. "
                     "variables['params']['RNN_0']")
  for k in _FLAX_DENSES:
    needs = ("kernel", "bias") if k[0] == "i" or k == "hn" else ("kernel",)
    if not isinstance(tree[k], Mapping) or any(n not in tree[k] for n in needs):
      found = sorted(tree[k]) if isinstance(tree[k], Mapping) else type(tree[k]).__name__
      raise ValueError(f"{arg}[{k!r}] must hold {' and '.join(map(repr, needs))} "
                       f"(an nn.GRUCell's Dense), found {found}")
  hsz, d = np.shape(tree["hz"]["kernel"])[0], np.shape(tree["iz"]["kernel"])[0]
  biased = [k for k in _FLAX_DENSES if "bias" in tree[k]]  # hz, hr: only a custom cell's
  _check_shapes(arg, {f"{k}.kernel": tree[k]["kernel"] for k in _FLAX_DENSES}
                | {f"{k}.bias": tree[k]["bias"] for k in biased},
                {f"{k}.kernel": (d if k[0] == "i" else hsz, hsz) for k in _FLAX_DENSES}
                | {f"{k}.bias": (hsz,) for k in biased})
  if cell is not None and cell.features != hsz:
    raise ValueError(f"module has features={cell.features} but {arg} are for H={hsz} "
                     f"(hz.kernel {np.shape(tree['hz']['kernel'])})")
  k = lambda m: _np(tree[m]["kernel"])
  dtype = k("hn").dtype
  # A bias on hz or hr (not nn.GRUCell's, but a cell built like it) adds to its gate outside
  # the reset product, as b_h's first two blocks do.
  b = lambda m: _np(tree[m]["bias"]) if "bias" in tree[m] else jnp.zeros(hsz, dtype)
  # One side's (z, r, n) blocks along the last axis, then z negated as for the other peers.
  side = lambda get, s: _flip_z(jnp.concatenate([get(s + g) for g in "zrn"], axis=-1))
  return _params(side(k, "i"), side(k, "h"), side(b, "i"), side(b, "h"))


# --- Haiku ---------------------------------------------------------------------

_HAIKU_NAMES = ("w_i", "w_h", "b")


def from_haiku(params_dict, module_name: str | None = None) -> GRUParams:
  """Reads ``hk.GRU`` params as "seed" `GRUParams`.

  Haiku's layout: w_i [D,3H], w_h [H,3H], b [3H], gates (z, r, a), reset
  before the matmul and h' = (1−z)⊙h + z⊙a: the same equations, order and
  z side as our "seed" variant (its docstring's "reset and update gates"
  lists them in the opposite order to its equations, which are what it
  computes).  Nothing is flipped: w_x = w_i, w_h = w_h, b_x = b, b_h = 0.

  Args:
    params_dict: ``transformed.init(...)`` output, e.g. {'gru': {'w_i', 'w_h',
      'b'}}, or the module's own {'w_i', 'w_h', 'b'} dict.
    module_name: which module to read when several hold GRU params.
  """
  arg = "params_dict"
  if not isinstance(params_dict, Mapping):
    raise TypeError(f"{arg} must be a dict of Haiku params, got {type(params_dict).__name__}")
  is_gru = lambda m: isinstance(m, Mapping) and all(k in m for k in _HAIKU_NAMES)
  if module_name is not None:
    if module_name not in params_dict or not is_gru(params_dict[module_name]):
      raise ValueError(f"module_name={module_name!r} is not an hk.GRU module in {arg} "
                       f"(keys: {sorted(params_dict)})")
    mod = params_dict[module_name]
  elif is_gru(params_dict):
    mod = params_dict
  else:
    grus = [k for k, v in params_dict.items() if is_gru(v)]
    if not grus:
      raise ValueError(f"{arg} holds no hk.GRU params (a module dict with keys "
                       f"{list(_HAIKU_NAMES)}); its keys: {sorted(params_dict)}")
    if len(grus) > 1:
      raise ValueError(f"{arg} has {len(grus)} hk.GRU modules {grus} (keys: "
                       f"{sorted(params_dict)}); pass module_name= to pick one")
    mod = params_dict[grus[0]]
  w_i, w_h, b = (_np(mod[k]) for k in _HAIKU_NAMES)
  hsz, d = np.shape(w_h)[0], np.shape(w_i)[0]
  _check_shapes(arg, dict(zip(_HAIKU_NAMES, (w_i, w_h, b))),
                dict(zip(_HAIKU_NAMES, ((d, 3 * hsz), (hsz, 3 * hsz), (3 * hsz,)))))
  return _params(w_i, w_h, b, jnp.zeros_like(b))


# --- Equinox -------------------------------------------------------------------

def from_equinox(cell) -> GRUParams:
  """Reads an ``eqx.nn.GRUCell`` as "reset_after" `GRUParams`.

  Equinox's layout: weight_ih [3H,D], weight_hh [3H,H], gates (r, z, n),
  bias [3H] added on the input side, bias_n [H] inside the reset product,
  h' = n + z⊙(h − n), i.e. z on the old state.  Converted like PyTorch:
  transpose, reorder to (z, r, h), negate z; b_h = (0, 0, bias_n).
  ``use_bias=False`` gives zero biases.
  """
  import equinox as eqx
  if not isinstance(cell, eqx.nn.GRUCell):
    raise TypeError(f"cell must be an equinox.nn.GRUCell, got {type(cell).__name__}")
  hsz = cell.hidden_size
  dtype = _np(cell.weight_hh).dtype
  bias = _np(cell.bias) if cell.use_bias else jnp.zeros(3 * hsz, dtype)
  bias_n = _np(cell.bias_n) if cell.use_bias else jnp.zeros(hsz, dtype)
  if bias_n.shape != (hsz,):
    raise ValueError(f"cell has inconsistent GRU shapes: bias_n {bias_n.shape}, expected {(hsz,)}")
  # bias_n becomes b_h's candidate block; _rzn_to_zrh leaves that block unchanged.
  b_h = jnp.concatenate([jnp.zeros(2 * hsz, dtype), bias_n])
  return _from_rzn("cell", ("weight_ih", "weight_hh", "bias", "bias_n (padded)"),
                   cell.weight_ih, cell.weight_hh, bias, b_h)
