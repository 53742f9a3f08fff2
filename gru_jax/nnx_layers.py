"""Flax NNX layers around the pure GRU functions.

The same layers as `gru_jax.layers` (Linen), for NNX models: each computes
exactly what its Linen twin computes (they share `layers.apply_gru`,
`layers.masked_moments` and `layers.normalize`), with the same parameter
names, so Linen variables load with `GRU.from_params` or by assignment.

NNX conventions: modules are built eagerly from ``in_features`` and an
``nnx.Rngs``; dropout starts on (``deterministic=False``) and batch norm
starts on batch statistics, and ``model.eval()`` / ``model.train()`` switch
both, as for ``nnx.Dropout`` and ``nnx.BatchNorm``.  Dropout keys come from
the ``dropout`` stream (``default`` if there is none); with ``example_ids``
[B] each example's mask depends only on (key, example id).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gru_jax import attention as attention_lib
from gru_jax import cell as cell_lib
from gru_jax import layernorm as ln_lib
from gru_jax import layers as linen_layers

Array = jax.Array


def _dropout_stream(rngs: nnx.Rngs | None, needed: bool):
  if not needed:
    return nnx.data(None)
  if rngs is None:
    raise ValueError("dropout > 0 needs rngs=nnx.Rngs(...) (a 'dropout' or 'default' stream)")
  return rngs["dropout"].fork()


def _dropout_key(stream, rngs: nnx.Rngs | None, owner: str) -> Callable[[], Array]:
  def next_key():
    if rngs is not None:
      return rngs["dropout"]()
    if stream is None:
      raise ValueError(f"{owner}: dropout is on but the layer has no rngs; build it with "
                       "rngs=nnx.Rngs(...) or pass rngs= to the call")
    return stream()
  return next_key


class GRU(nnx.Module):
  """One GRU layer over [B,T,D] inputs, wrapping `gru_jax.gru`.

  Args:
    in_features: D.
    hidden_size: H.
    variant: "seed" (the founding document's equations) or "reset_after".
    return_sequences: return hs [B,T,H] (else the final state [B,H]).
    return_state: also return the final state: ``(outputs, h_last)``.
    reverse: run backwards in time (valid steps only, see `gru_jax.gru`).
    dropout, recurrent_dropout: rates of the input [B,D] and recurrent [B,H]
      dropout masks, fixed over time (variational dropout).
    zoneout: rate at which each unit keeps its previous value at each step
      (Krueger et al. 2016; the expectation in eval mode; see `gru_jax.gru`'s
      ``zoneout_mask``).
    layer_norm: layer-normalised GRU with extra params ``gamma_x``,
      ``beta_x``, ``gamma_h``, ``beta_h`` [3H].
    kernel_init, recurrent_init, bias_init, param_dtype: as `gru_jax.cell.init`.
    unroll, compute_dtype, remat_chunk, backend: passed to `gru_jax.gru`.
    deterministic: dropout off; flipped by ``model.eval()`` / ``model.train()``.
    record_gates: also record each call's `Gates(z, r, candidate)`, each [B,T,H], as the
      `nnx.Intermediate` ``gates`` (read them with ``nnx.pop(model, nnx.Intermediate)``;
      the plain scan backend computes them; not for layer norm).  Set it on a whole
      model with ``model.set_attributes(record_gates=True)``.
    rngs: ``params`` stream for the weights, ``dropout`` stream for the masks.

  Parameters ``w_x`` [D,3H], ``w_h`` [H,3H], ``b_x`` [3H], ``b_h`` [3H]
  (`GRUParams`; ``layer.params`` returns them as one).
  """

  def __init__(self, in_features: int, hidden_size: int, *, variant: str = "seed",
               return_sequences: bool = True, return_state: bool = False,
               reverse: bool = False, dropout: float = 0.0, recurrent_dropout: float = 0.0,
               zoneout: float = 0.0, layer_norm: bool = False,
               kernel_init: Callable = jax.nn.initializers.glorot_uniform(),
               recurrent_init: Callable = jax.nn.initializers.orthogonal(),
               bias_init: Callable = jax.nn.initializers.zeros,
               param_dtype: Any = jnp.float32, unroll: int = 1, compute_dtype: Any = None,
               remat_chunk: int | None = None, backend: str = "auto",
               deterministic: bool = False, record_gates: bool = False, rngs: nnx.Rngs):
    for name, rate in (("dropout", dropout), ("recurrent_dropout", recurrent_dropout),
                       ("zoneout", zoneout)):
      if not 0.0 <= rate < 1.0:
        raise ValueError(f"GRU: {name} must be in [0, 1), got {rate}")
    p = cell_lib.init(rngs.params(), in_features, hidden_size, variant=variant,
                      dtype=param_dtype, kernel_init=kernel_init,
                      recurrent_init=recurrent_init, bias_init=bias_init)
    for name, value in zip(cell_lib.GRUParams._fields, p):
      setattr(self, name, nnx.Param(value))
    if layer_norm:
      for name, value in zip(ln_lib.LNParams._fields, ln_lib.init_ln(hidden_size, param_dtype)):
        setattr(self, name, nnx.Param(value))
    self.in_features, self.hidden_size = in_features, hidden_size
    self.variant, self.reverse, self.unroll = variant, reverse, unroll
    self.return_sequences, self.return_state = return_sequences, return_state
    self.dropout, self.recurrent_dropout, self.zoneout = dropout, recurrent_dropout, zoneout
    self.layer_norm, self.compute_dtype = layer_norm, compute_dtype
    self.remat_chunk, self.backend = remat_chunk, backend
    self.deterministic, self.record_gates = deterministic, record_gates
    self.rngs = _dropout_stream(rngs, dropout > 0 or recurrent_dropout > 0 or zoneout > 0)

  @classmethod
  def from_params(cls, params: cell_lib.GRUParams | Mapping[str, Array], *,
                  rngs: nnx.Rngs | None = None, **kwargs) -> GRU:
    """A layer holding ``params``: a `GRUParams` (e.g. from `gru_jax.convert`) or a Linen
    GRU's ``variables["params"]`` (with ``gamma_x``... when it was layer-normalised).

    ``rngs`` is needed only for dropout (its ``dropout`` stream); ``kwargs`` are the
    other constructor arguments.
    """
    values = dict(params._asdict() if isinstance(params, cell_lib.GRUParams) else params)
    ln_names = set(ln_lib.LNParams._fields)
    unknown = set(values) - set(cell_lib.GRUParams._fields) - ln_names
    missing = set(cell_lib.GRUParams._fields) - set(values)
    if unknown or missing:
      raise ValueError(f"params must hold {cell_lib.GRUParams._fields} (and the layer-norm "
                       f"{ln_lib.LNParams._fields}); unknown {sorted(unknown)}, missing "
                       f"{sorted(missing)}")
    has_ln = bool(ln_names & set(values))
    kwargs.setdefault("layer_norm", has_ln)
    if has_ln != kwargs["layer_norm"]:
      raise ValueError(f"layer_norm={kwargs['layer_norm']} but params "
                       f"{'hold' if has_ln else 'lack'} the layer-norm parameters")
    drops = any(kwargs.get(k, 0) > 0 for k in ("dropout", "recurrent_dropout", "zoneout"))
    if drops and rngs is None:
      raise ValueError("from_params with dropout needs rngs=nnx.Rngs(...): without it every "
                       "layer would draw the same masks")
    w_x, w_h = jnp.shape(values["w_x"]), jnp.shape(values["w_h"])
    if len(w_x) != 2 or len(w_h) != 2:
      raise ValueError(f"params.w_x and params.w_h must be 2-D, got {w_x} and {w_h}")
    layer = cls(w_x[0], w_h[0], rngs=nnx.Rngs(0), **kwargs)  # placeholder weights, replaced
    if drops:
      layer.rngs = _dropout_stream(rngs, True)
    for name, value in values.items():
      old = getattr(layer, name)[...]
      if jnp.shape(value) != old.shape:
        raise ValueError(f"params.{name} has shape {jnp.shape(value)}, expected {old.shape}")
      setattr(layer, name, nnx.Param(jnp.asarray(value)))
    return layer

  @property
  def params(self) -> cell_lib.GRUParams:
    return cell_lib.GRUParams(*(getattr(self, n)[...] for n in cell_lib.GRUParams._fields))

  def __call__(self, xs: Array, mask: Array | None = None, h0: Array | None = None, *,
               deterministic: bool | None = None, example_ids: Array | None = None,
               rngs: nnx.Rngs | None = None, resets: Array | None = None,
               return_state: bool | None = None):
    """xs [B,T,D], mask [B,T] bool, h0 [B,H] -> hs [B,T,H] or h_last [B,H] (see Args).

    ``resets`` [B,T] bool: segment starts; the state starts from zero after
    each, in either direction (see `gru_jax.gru`).  ``return_state``, if
    given, overrides the attribute for this call.
    """
    xs, mask, resets = linen_layers.as_arrays(xs, mask, resets)
    linen_layers.check_sequence_input("GRU", xs, mask, resets)
    det = self.deterministic if deterministic is None else deterministic
    ln = None
    if self.layer_norm:
      ln = ln_lib.LNParams(*(getattr(self, n)[...] for n in ln_lib.LNParams._fields))
    next_key = _dropout_key(self.rngs, rngs, "GRU")
    in_mask, rec_mask = linen_layers.gru_dropout_masks(
        next_key, xs, self.hidden_size, self.dropout, self.recurrent_dropout, det, example_ids)
    zo = linen_layers.zoneout_weights(next_key, xs, self.hidden_size, self.zoneout, det,
                                      example_ids)
    gates = self.record_gates and not self.layer_norm
    out = linen_layers.apply_gru(self, self.params, ln, xs, mask, h0, in_mask, rec_mask,
                                 return_gates=gates, resets=resets, return_state=return_state,
                                 zoneout_mask=zo)
    if gates:
      out, g = out
      self.sow(nnx.Intermediate, "gates", g)
    return out


class GRUCell(nnx.RNNCellBase):
  """One GRU step as a Flax NNX RNN cell: ``(carry [...,H], inputs [...,D]) -> (h', h')``.

  For ``nnx.RNN``, ``nnx.Bidirectional`` and hand-written decoders, in place of
  ``nnx.GRUCell``.  Parameters as `GRU`'s (``w_x`` [D,3H], ``w_h`` [H,3H], ``b_x``,
  ``b_h`` [3H]; ``GRUCell.from_params`` takes a `GRUParams`, a `GRU` layer's
  ``params`` or a Linen layer's ``variables["params"]``), so ``nnx.RNN(GRUCell(D, H))``
  computes what ``GRU(D, H)`` does (which is faster: it runs the fused recurrence).
  The new state has the carry's dtype.
  """

  def __init__(self, in_features: int, hidden_size: int, *, variant: str = "seed",
               kernel_init: Callable = jax.nn.initializers.glorot_uniform(),
               recurrent_init: Callable = jax.nn.initializers.orthogonal(),
               bias_init: Callable = jax.nn.initializers.zeros,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    p = cell_lib.init(rngs.params(), in_features, hidden_size, variant=variant,
                      dtype=param_dtype, kernel_init=kernel_init,
                      recurrent_init=recurrent_init, bias_init=bias_init)
    for name, value in zip(cell_lib.GRUParams._fields, p):
      setattr(self, name, nnx.Param(value))
    self.in_features, self.hidden_size = in_features, hidden_size
    self.variant, self.param_dtype = variant, param_dtype

  @classmethod
  def from_params(cls, params: cell_lib.GRUParams | Mapping[str, Array], *,
                  variant: str = "seed") -> GRUCell:
    """A cell holding ``params`` (no layer-norm parameters: the cell has none)."""
    names = params._fields if isinstance(params, cell_lib.GRUParams) else tuple(params)
    ln = sorted(set(names) & set(ln_lib.LNParams._fields))
    if ln:
      raise ValueError(f"GRUCell has no layer norm, but params hold its parameters {ln}; "
                       "run a layer-normalised GRU with GRU(layer_norm=True)")
    layer = GRU.from_params(params, variant=variant)
    cell = cls(layer.in_features, layer.hidden_size, variant=variant, rngs=nnx.Rngs(0))
    for name in cell_lib.GRUParams._fields:
      setattr(cell, name, nnx.Param(getattr(layer, name)[...]))
    return cell

  @property
  def params(self) -> cell_lib.GRUParams:
    return cell_lib.GRUParams(*(getattr(self, n)[...] for n in cell_lib.GRUParams._fields))

  def __call__(self, carry: Array, inputs: Array, *,
               recurrent_dropout_mask: Array | None = None) -> tuple[Array, Array]:
    """carry [...,H], inputs [...,D] -> (h' [...,H], h' [...,H]); ``recurrent_dropout_mask``
    [...,H] as the Linen `GRUCell`'s."""
    return linen_layers.cell_step("GRUCell", lambda _: self.params, carry, inputs,
                                  self.hidden_size, self.variant, recurrent_dropout_mask)

  def initialize_carry(self, input_shape: tuple[int, ...], rngs: Any = None,
                       carry_init: Callable | None = None) -> Array:
    """The initial state [...,H] for inputs of shape [...,D]: zeros, or ``carry_init``'s
    draw (from ``rngs``, an ``nnx.Rngs`` or a stream of one)."""
    shape = tuple(input_shape[:-1]) + (self.hidden_size,)
    if carry_init is None:
      return jnp.zeros(shape, self.param_dtype)
    if rngs is None:
      raise ValueError("GRUCell.initialize_carry: carry_init needs rngs")
    key = rngs() if callable(rngs) else rngs
    return carry_init(key, shape, self.param_dtype)

  @property
  def num_feature_axes(self) -> int:
    return 1


class Bidirectional(nnx.Module):
  """A forward and a backward `GRU` (attributes ``forward``/``backward``).

  Outputs [B,T,2H] ("concat") or [B,T,H] ("sum"); with ``return_sequences``
  False, the two final states [B,2H] / [B,H].  The backward layer runs each
  sequence's valid steps in reverse, so with padding the outputs line up;
  with ``resets`` [B,T] (segment starts) each segment runs on its own both
  ways.  ``gru_kwargs`` go to both layers.  ``h0`` and ``return_state`` as
  in the Linen `layers.Bidirectional`: a (forward, backward) pair in, and
  ``(outputs, (h_forward, h_backward))`` out.
  """

  def __init__(self, in_features: int, hidden_size: int, *, merge_mode: str = "concat",
               return_sequences: bool = True, return_state: bool = False, rngs: nnx.Rngs,
               **gru_kwargs):
    if merge_mode not in ("concat", "sum"):
      raise ValueError(f"merge_mode must be 'concat' or 'sum', got {merge_mode!r}")
    linen_layers.check_gru_kwargs("Bidirectional", gru_kwargs, linen_layers.BIDIRECTIONAL_SETS)
    self.merge_mode, self.return_state = merge_mode, return_state
    self.forward = GRU(in_features, hidden_size, return_sequences=return_sequences,
                       rngs=rngs, **gru_kwargs)
    self.backward = GRU(in_features, hidden_size, return_sequences=return_sequences,
                        reverse=True, rngs=rngs, **gru_kwargs)

  def __call__(self, xs, mask=None, h0=None, *, deterministic=None, example_ids=None,
               rngs=None, resets=None, return_state=None):
    xs, mask, resets = linen_layers.as_arrays(xs, mask, resets)
    linen_layers.check_sequence_input("Bidirectional", xs, mask, resets)
    h0 = linen_layers.check_pair("Bidirectional", "h0", h0, xs.shape[0],
                                 self.forward.hidden_size)
    runs = [layer(xs, mask, h, deterministic=deterministic, example_ids=example_ids, rngs=rngs,
                  resets=resets, return_state=True)
            for layer, h in zip((self.forward, self.backward), h0)]
    return linen_layers.merge_directions(
        self.merge_mode, runs, self.return_state if return_state is None else return_state)


class SequenceDropout(nnx.Module):
  """Element-wise dropout on [B,...] features, per-example reproducible via ``example_ids``."""

  def __init__(self, rate: float, *, deterministic: bool = False,
               rngs: nnx.Rngs | None = None):
    if not 0.0 <= rate < 1.0:
      raise ValueError(f"SequenceDropout: rate must be in [0, 1), got {rate}")
    self.rate, self.deterministic = rate, deterministic
    self.rngs = _dropout_stream(rngs, rate > 0)

  def __call__(self, x, *, deterministic=None, example_ids=None, rngs=None):
    det = self.deterministic if deterministic is None else deterministic
    if det or self.rate == 0:
      return x
    key = _dropout_key(self.rngs, rngs, "SequenceDropout")()
    return x * linen_layers.dropout_multiplier(key, self.rate, x.shape[0], x.shape[1:],
                                               example_ids, x.dtype)


class StackedGRU(nnx.Module):
  """``len(hidden_sizes)`` GRU layers (``layer_0``, ``layer_1``, ...), each returning sequences.

  ``dropout_between`` applies (per-example) dropout to the outputs of every
  layer but the last.  Returns hs [B,T,H_last]; bidirectional, [B,T,2H_last]
  with ``merge_mode="concat"`` or [B,T,H_last] with "sum".  ``h0`` and
  ``return_state`` (the attribute, or the call's to override it) as in the
  Linen `layers.StackedGRU`: per-layer initial states (or torch's
  [L·dirs,B,H]) in, ``(hs, states)`` out.
  """

  def __init__(self, in_features: int, hidden_sizes: Sequence[int], *,
               bidirectional: bool = False, merge_mode: str = "concat",
               dropout_between: float = 0.0, return_state: bool = False, rngs: nnx.Rngs,
               **gru_kwargs):
    if not hidden_sizes:
      raise ValueError("StackedGRU needs at least one hidden size")
    linen_layers.check_rate("dropout_between", dropout_between)
    linen_layers.check_gru_kwargs("StackedGRU", gru_kwargs, linen_layers.STACKED_SETS)
    self.num_layers, self.hidden_sizes = len(hidden_sizes), tuple(hidden_sizes)
    self.bidirectional, self.return_state = bidirectional, return_state
    d = in_features
    for i, size in enumerate(hidden_sizes):
      if bidirectional:
        layer = Bidirectional(d, size, merge_mode=merge_mode, rngs=rngs, **gru_kwargs)
        d = 2 * size if merge_mode == "concat" else size
      else:
        layer = GRU(d, size, rngs=rngs, **gru_kwargs)
        d = size
      setattr(self, f"layer_{i}", layer)
    self.between = SequenceDropout(dropout_between,
                                   deterministic=gru_kwargs.get("deterministic", False),
                                   rngs=rngs)

  def __call__(self, xs, mask=None, h0=None, *, deterministic=None, example_ids=None,
               rngs=None, resets=None, return_state=None):
    xs, mask, resets = linen_layers.as_arrays(xs, mask, resets)
    linen_layers.check_sequence_input("StackedGRU", xs, mask, resets)
    h0 = linen_layers.stacked_initial_states("StackedGRU", h0, self.hidden_sizes,
                                             self.bidirectional, xs.shape[0])
    h, states = xs, []
    for i in range(self.num_layers):
      h, state = getattr(self, f"layer_{i}")(h, mask, h0[i], deterministic=deterministic,
                                             example_ids=example_ids, rngs=rngs,
                                             resets=resets, return_state=True)
      states.append(state)
      if i < self.num_layers - 1:
        h = self.between(h, deterministic=deterministic, example_ids=example_ids, rngs=rngs)
    return_state = self.return_state if return_state is None else return_state
    return (h, tuple(states)) if return_state else h


class SequenceBatchNorm(nnx.Module):
  """Batch normalisation after a GRU layer: per-feature statistics over batch and time.

  Inputs [B,T,F] with mask [B,T] (padded steps are excluded from the
  statistics and output as zeros) or [B,F].  Running averages ``mean`` and
  ``var`` (``nnx.BatchStat``) are used when ``use_running_average``;
  ``axis_name`` averages statistics across a mapped axis, weighted by each
  device's count of valid steps.  Defaults are Keras's (momentum 0.99,
  epsilon 1e-3), as in the Linen layer.
  """

  def __init__(self, num_features: int, *, momentum: float = 0.99, epsilon: float = 1e-3,
               use_running_average: bool = False, axis_name: str | None = None,
               rngs: nnx.Rngs | None = None):
    del rngs  # accepted for the NNX calling convention; nothing here is random
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.num_features, self.momentum, self.epsilon = num_features, momentum, epsilon
    self.use_running_average, self.axis_name = use_running_average, axis_name

  def __call__(self, x: Array, mask: Array | None = None, *,
               use_running_average: bool | None = None) -> Array:
    linen_layers.check_batch_norm_input(x, mask)
    if x.shape[-1] != self.num_features:
      raise ValueError(f"SequenceBatchNorm: x has {x.shape[-1]} features (shape {x.shape}), "
                       f"the layer was built for {self.num_features}")
    use_ra = self.use_running_average if use_running_average is None else use_running_average
    if use_ra:
      mean, var = self.mean[...], self.var[...]
    else:
      mean, var, count = linen_layers.masked_moments(x, mask, self.axis_name, return_count=True)
      self.mean[...], self.var[...] = linen_layers.running_averages(
          (self.mean[...], self.var[...]), (mean, var), count, self.momentum)
    return linen_layers.normalize(x, mask, mean, var, self.scale[...], self.bias[...],
                                  self.epsilon)


class AttentionDecoder(nnx.Module):
  """The GRU decoder with attention (`gru_jax.attention.decode`) for NNX models.

  Teacher-forced: ``__call__(states, embedded [B,L,E], memory [B,S,C], keys
  [B,S,A], mask [B,S])`` -> (final states, one [B,H_i] per layer; top outputs
  [B,L,H_top]; contexts [B,L,C]; α [B,L,S]).  The caller computes the keys from
  the encoder outputs once per source (additive: h_j·W_k + b, A wide;
  multiplicative: h_j·W_k, H_top wide).  Layer 0 reads [embedding, context];
  its output and every further layer's feed the next.

  Args:
    embed_features: E.  memory_features: C.
    hidden_sizes: the decoder layers' sizes H_i.
    kind: "additive" (Bahdanau et al. 2015) or "multiplicative" (Luong et al. 2015).
    attention_size: A for "additive" (None: H_top); "multiplicative" uses H_top.
    variant, kernel_init, recurrent_init, bias_init, param_dtype: the GRUs', as `GRU`.
    dropout: after every layer, a fresh draw per step; recurrent_dropout: each
      layer's recurrent mask [B,H_i], fixed over time (as the Linen `Seq2Seq`).
    zoneout: each layer's zoneout rate: Bernoulli(rate) weights of the old state
      per step and unit in training, the rate itself in evaluation.
    compute_dtype, unroll: passed to `decode`.
    deterministic: dropout off; flipped by ``model.eval()`` / ``model.train()``.
    rngs: ``params`` for the weights, ``dropout`` for the masks.

  Params: ``query.kernel`` [H_top,A] and ``energy.kernel`` [A,1] (additive
  only) and ``decoder_{i}`` with ``w_x``/``w_h``/``b_x``/``b_h``: the tree of
  the Linen `Seq2Seq`'s ``attention_decoder``, which `from_params` loads.
  """

  def __init__(self, embed_features: int, memory_features: int, hidden_sizes: Sequence[int],
               *, kind: str = "additive", attention_size: int | None = None,
               variant: str = "seed", dropout: float = 0.0, recurrent_dropout: float = 0.0,
               zoneout: float = 0.0,
               kernel_init: Callable = jax.nn.initializers.glorot_uniform(),
               recurrent_init: Callable = jax.nn.initializers.orthogonal(),
               bias_init: Callable = jax.nn.initializers.zeros, param_dtype: Any = jnp.float32,
               compute_dtype: Any = None, unroll: int = 1, deterministic: bool = False,
               rngs: nnx.Rngs):
    if kind not in ("additive", "multiplicative"):
      raise ValueError(f"AttentionDecoder: kind must be 'additive' or 'multiplicative', got "
                       f"{kind!r}")
    if not hidden_sizes:
      raise ValueError("AttentionDecoder needs at least one hidden size")
    top = hidden_sizes[-1]
    if kind == "multiplicative" and attention_size not in (None, top):
      raise ValueError(f"AttentionDecoder: multiplicative attention scores against the top "
                       f"state, so attention_size must be None or {top}, got {attention_size}")
    linen_layers.check_rate("dropout", dropout)
    linen_layers.check_rate("recurrent_dropout", recurrent_dropout)
    linen_layers.check_rate("zoneout", zoneout)
    self.kind, self.variant, self.hidden_sizes = kind, variant, tuple(hidden_sizes)
    self.attention_size = attention_size or top
    if kind == "additive":
      self.query = nnx.Linear(top, self.attention_size, use_bias=False,
                              param_dtype=param_dtype, rngs=rngs)
      self.energy = nnx.Linear(self.attention_size, 1, use_bias=False,
                               param_dtype=param_dtype, rngs=rngs)
    width = embed_features + memory_features
    for i, size in enumerate(hidden_sizes):
      setattr(self, f"decoder_{i}", GRU(width, size, variant=variant, kernel_init=kernel_init,
                                        recurrent_init=recurrent_init, bias_init=bias_init,
                                        param_dtype=param_dtype, rngs=rngs))
      width = size
    self.dropout, self.recurrent_dropout, self.zoneout = dropout, recurrent_dropout, zoneout
    self.compute_dtype, self.unroll, self.deterministic = compute_dtype, unroll, deterministic
    self.rngs = _dropout_stream(rngs, dropout > 0 or recurrent_dropout > 0 or zoneout > 0)

  @classmethod
  def from_params(cls, params: Mapping[str, Any], embed_features: int, *,
                  rngs: nnx.Rngs | None = None, **kwargs) -> AttentionDecoder:
    """A decoder holding a Linen `Seq2Seq`'s ``variables["params"]["attention_decoder"]``.

    The kind (``query`` present: additive), sizes and memory width C are read
    from the params; E must be given (layer 0's w_x has E + C rows).  ``rngs``
    is needed only for dropout; ``kwargs`` are the other constructor arguments.
    """
    sizes, i = [], 0
    while f"decoder_{i}" in params:
      sizes.append(int(jnp.shape(params[f"decoder_{i}"]["w_h"])[0]))
      i += 1
    if not sizes:
      raise ValueError(f"params hold no decoder_0: got keys {sorted(params)}")
    kind = "additive" if "query" in params else "multiplicative"
    memory = int(jnp.shape(params["decoder_0"]["w_x"])[0]) - embed_features
    if memory < 1:
      raise ValueError(f"decoder_0.w_x has {jnp.shape(params['decoder_0']['w_x'])[0]} rows, "
                       f"not more than embed_features={embed_features}")
    size = int(jnp.shape(params["query"]["kernel"])[1]) if kind == "additive" else None
    drops = any(kwargs.get(k, 0) > 0 for k in ("dropout", "recurrent_dropout", "zoneout"))
    if drops and rngs is None:
      raise ValueError("from_params with dropout needs rngs=nnx.Rngs(...)")
    layer = cls(embed_features, memory, sizes, kind=kind, attention_size=size,
                rngs=nnx.Rngs(0), **kwargs)  # placeholder weights, replaced
    if drops:
      layer.rngs = _dropout_stream(rngs, True)
    for i in range(len(sizes)):
      setattr(layer, f"decoder_{i}", GRU.from_params(
          params[f"decoder_{i}"], variant=layer.variant,
          param_dtype=jnp.asarray(params[f"decoder_{i}"]["w_x"]).dtype))
    for name in ("query", "energy") if kind == "additive" else ():
      old, new = getattr(layer, name).kernel, jnp.asarray(params[name]["kernel"])
      if new.shape != old[...].shape:
        raise ValueError(f"params {name}.kernel has shape {new.shape}, expected "
                         f"{old[...].shape}")
      old[...] = new
    return layer

  def __call__(self, states, embedded, memory, keys, mask, *, deterministic: bool | None = None,
               example_ids: Array | None = None, rngs: nnx.Rngs | None = None):
    embedded = jnp.asarray(embedded)
    det = self.deterministic if deterministic is None else deterministic
    next_key = _dropout_key(self.rngs, rngs, "AttentionDecoder")
    drops, rec = linen_layers.decoder_dropout_masks(
        next_key, self.dropout, self.recurrent_dropout, det, embedded.shape[0],
        embedded.shape[1], self.hidden_sizes, example_ids, embedded.dtype)
    zo = linen_layers.decoder_zoneout(next_key, self.zoneout, det, embedded, self.hidden_sizes,
                                      example_ids)
    w_query = v = None
    if self.kind == "additive":
      w_query, v = self.query.kernel[...], self.energy.kernel[...][:, 0]
    cells = [getattr(self, f"decoder_{i}").params for i in range(len(self.hidden_sizes))]
    return attention_lib.decode(cells, states, embedded, memory, keys, mask, kind=self.kind,
                                variant=self.variant, w_query=w_query, v=v, output_drops=drops,
                                recurrent_masks=rec, zoneout=zo, compute_dtype=self.compute_dtype,
                                unroll=self.unroll)
