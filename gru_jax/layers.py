"""Flax Linen layers around the pure GRU functions.

Parameter names are stable: a `GRU` layer owns ``w_x`` [D,3H], ``w_h`` [H,3H],
``b_x`` [3H] and ``b_h`` [3H] (exactly the fields of `GRUParams`); a
`SequenceBatchNorm` owns ``scale``/``bias`` params and ``mean``/``var`` in the
``batch_stats`` collection; `Bidirectional` nests ``forward`` and ``backward``.

Dropout masks are drawn from the ``dropout`` RNG.  When ``example_ids`` [B]
are given, each example's mask comes from ``fold_in(rng, example_id)``, so a
result does not depend on how the batch is split across devices.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gru_jax import cell as cell_lib
from gru_jax import layernorm as ln_lib
from gru_jax import scan as scan_lib

Array = jax.Array


def keep_bits(rng: Array, keep: float, batch: int, shape: tuple[int, ...],
              example_ids: Array | None = None) -> Array:
  """Bernoulli(keep) bits [B, *shape]; with ``example_ids`` [B], row i depends only on
  (rng, example_ids[i])."""
  if example_ids is None:
    return jax.random.bernoulli(rng, keep, (batch,) + shape)
  if example_ids.shape != (batch,):
    raise ValueError(f"example_ids must have shape [B]=({batch},), got {example_ids.shape}")
  return jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(rng, i), keep, shape))(
      example_ids)


def dropout_multiplier(rng: Array, rate: float, batch: int, shape: tuple[int, ...],
                       example_ids: Array | None = None, dtype=jnp.float32) -> Array:
  """Inverted-dropout multiplier [B, *shape]: 0 or 1/(1-rate).

  With ``example_ids`` [B], row i depends only on (rng, example_ids[i]).
  """
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
  keep = 1.0 - rate
  return keep_bits(rng, keep, batch, shape, example_ids).astype(dtype) / keep


def check_rate(name: str, rate: float) -> None:
  """A dropout rate must be in [0, 1): checked whether or not dropout runs this call."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"{name} must be in [0, 1), got {rate}")


def resolve_deterministic(attribute: bool | None, argument: bool | None) -> bool:
  """The call's ``deterministic`` if given, else the module attribute's, else True.

  The attribute is for Flax's lifted transforms (`nn.vmap`, `nn.remat`,
  `nn.scan`), which drop or trace call keywords.
  """
  if argument is not None:
    return bool(argument)
  return True if attribute is None else bool(attribute)


def check_sequence_input(name: str, xs: Array, mask: Array | None,
                         resets: Array | None = None) -> None:
  if xs.ndim != 3:
    raise ValueError(f"{name} expects inputs [B,T,D], got shape {xs.shape}")
  for arg, m in (("mask", mask), ("resets", resets)):
    if m is not None and jnp.shape(m) != xs.shape[:2]:
      raise ValueError(f"{name}: {arg} must have shape [B,T]={xs.shape[:2]}, got {jnp.shape(m)}")


def as_arrays(*args):
  """Nested lists and NumPy arrays as JAX arrays (None stays None)."""
  return tuple(None if a is None else jnp.asarray(a) for a in args)


def check_gru_kwargs(owner: str, kwargs: dict, reserved: tuple[str, ...]) -> None:
  """Refuses GRU options a wrapper sets itself (e.g. return_state would hand it tuples)."""
  bad = sorted(set(kwargs) & set(reserved))
  if bad:
    raise ValueError(f"{owner} sets {', '.join(reserved)} of its GRU layers itself; "
                     f"remove {bad} from its GRU options")


class GRU(nn.Module):
  """One GRU layer over [B,T,D] inputs, wrapping `gru_jax.gru`.

  Attributes:
    hidden_size: H.
    variant: "seed" (the founding document's equations) or "reset_after".
    return_sequences: return hs [B,T,H] (else the final state [B,H]).
    return_state: also return the final state: ``(outputs, h_last)``.
    reverse: run backwards in time (valid steps only, see `gru_jax.gru`).
    Call arguments: xs [B,T,D], mask [B,T], h0 [B,H], and ``resets`` [B,T]
    bool, segment starts (episode starts, packed sequences): the state starts
    from zero after each, in either direction (see `gru_jax.gru`).
    dropout: rate of the input dropout mask [B,D], fixed over time.
    recurrent_dropout: rate of the recurrent dropout mask [B,H], fixed over time.
    zoneout: rate at which each unit keeps its previous value at each step
      (Krueger et al. 2016): in training a Bernoulli(rate) draw per step and
      unit, in evaluation the expectation rate⊙h_{t−1} + (1−rate)⊙h_t.  Runs
      on every backend ("auto": the "xla" loops; see `gru_jax.gru`'s ``zoneout_mask``).
    layer_norm: layer-normalised GRU (`gru_jax.layernorm.ln_gru`), with extra
      params ``gamma_x``, ``beta_x``, ``gamma_h``, ``beta_h`` [3H].
    unroll, compute_dtype, remat_chunk, backend: passed to `gru_jax.gru`.
    deterministic: no dropout; the call's ``deterministic`` overrides it, and
      with neither given there is none.  Set it here under `nn.vmap`,
      `nn.remat` or `nn.scan`, which drop or trace call keywords.

  Gates: ``apply(..., mutable=["intermediates"])`` also returns, under
  ``intermediates/<layer path>/gates``, a 1-tuple of `Gates(z, r, candidate)`,
  each [B,T,H] (the plain scan backend computes them; layer-norm layers record none).
  """
  hidden_size: int
  variant: str = "seed"
  return_sequences: bool = True
  return_state: bool = False
  reverse: bool = False
  dropout: float = 0.0
  recurrent_dropout: float = 0.0
  zoneout: float = 0.0
  kernel_init: Callable = jax.nn.initializers.glorot_uniform()
  recurrent_init: Callable = jax.nn.initializers.orthogonal()
  bias_init: Callable = jax.nn.initializers.zeros
  param_dtype: Any = jnp.float32
  unroll: int = 1
  compute_dtype: Any = None
  remat_chunk: int | None = None
  backend: str = "auto"
  layer_norm: bool = False
  deterministic: bool | None = None

  @nn.compact
  def __call__(self, xs: Array, mask: Array | None = None, h0: Array | None = None, *,
               deterministic: bool | None = None, example_ids: Array | None = None,
               resets: Array | None = None):
    """xs [B,T,D], mask [B,T] bool, h0 [B,H] -> hs [B,T,H] or h_last [B,H] (see attributes)."""
    xs, mask, resets = as_arrays(xs, mask, resets)
    check_sequence_input("GRU", xs, mask, resets)
    deterministic = resolve_deterministic(self.deterministic, deterministic)
    params = gru_params(self, xs.shape[-1])
    ln = None
    if self.layer_norm:
      init = ln_lib.init_ln(self.hidden_size, self.param_dtype)
      ln = ln_lib.LNParams(*(self.param(n, lambda _, v=v: v)
                             for n, v in zip(ln_lib.LNParams._fields, init)))
    in_mask, rec_mask = gru_dropout_masks(
        lambda: self.make_rng("dropout"), xs, self.hidden_size, self.dropout,
        self.recurrent_dropout, deterministic, example_ids)
    zo = zoneout_weights(lambda: self.make_rng("dropout"), xs, self.hidden_size, self.zoneout,
                         deterministic, example_ids)
    # apply(..., mutable=["intermediates"]) also records the gates (the seed's
    # interpretability need); they need the plain scan backend, so only when asked.
    gates = not self.layer_norm and self.is_mutable_collection("intermediates")
    out = apply_gru(self, params, ln, xs, mask, h0, in_mask, rec_mask, return_gates=gates,
                    resets=resets, zoneout_mask=zo)
    if gates:
      out, g = out
      self.sow("intermediates", "gates", g)
    return out


def gru_params(module: nn.Module, input_size: int) -> cell_lib.GRUParams:
  """The ``w_x``, ``w_h``, ``b_x``, ``b_h`` params of a Linen `GRU` or `GRUCell`."""
  def field(name):
    return lambda key: getattr(
        cell_lib.init(key, input_size, module.hidden_size, variant=module.variant,
                      dtype=module.param_dtype, kernel_init=module.kernel_init,
                      recurrent_init=module.recurrent_init, bias_init=module.bias_init), name)
  return cell_lib.GRUParams(*(module.param(n, field(n)) for n in cell_lib.GRUParams._fields))


def check_cell_input(owner: str, carry: Array, inputs: Array, hidden_size: int) -> None:
  """A cell's carry must be [...,H] with the batch dims of inputs [...,D]."""
  if inputs.ndim < 1:
    raise ValueError(f"{owner}: inputs must be [...,D], got a scalar")
  want = inputs.shape[:-1] + (hidden_size,)
  if jnp.shape(carry) != want:
    raise ValueError(f"{owner}: carry must have shape [...,H]={want} to match inputs "
                     f"{inputs.shape}, got {jnp.shape(carry)}")


def cell_step(owner: str, get_params: Callable[[int], cell_lib.GRUParams], carry, inputs,
              hidden_size: int, variant: str, recurrent_dropout_mask=None
              ) -> tuple[Array, Array]:
  """One checked step of a cell module: (carry [...,H], inputs [...,D]) -> (h', h').

  ``get_params(D)`` gives the cell's `GRUParams` once the shapes have passed;
  ``recurrent_dropout_mask`` [...,H] as `gru_jax.cell.step`'s.
  """
  carry, inputs = as_arrays(carry, inputs)
  check_cell_input(owner, carry, inputs, hidden_size)
  params = get_params(inputs.shape[-1])
  # The carry keeps its dtype, as a scan over steps needs (float32 weights would
  # otherwise promote a bf16 carry).
  h = cell_lib.step(params, carry, inputs, variant=variant,
                    recurrent_dropout_mask=recurrent_dropout_mask).astype(carry.dtype)
  return h, h


class GRUCell(nn.RNNCellBase):
  """One GRU step as a Flax RNN cell: ``(carry [...,H], inputs [...,D]) -> (h', h')``.

  For ``nn.RNN``, ``nn.Bidirectional``, ``nn.scan`` and hand-written decoders, in
  place of ``nn.GRUCell``.  Its params are a `GRU` layer's (``w_x`` [D,3H], ``w_h``
  [H,3H], ``b_x``, ``b_h`` [3H]), so a trained layer's variables run step by step
  unchanged, and ``nn.RNN(GRUCell(H))`` computes what ``GRU(H)`` does (which is
  faster: it runs the fused recurrence, not one cell call per step).  ``variant``
  "seed" is the founding document's GRU, "reset_after" nn.GRUCell's.  The new
  state has the carry's dtype.
  """
  hidden_size: int
  variant: str = "seed"
  kernel_init: Callable = jax.nn.initializers.glorot_uniform()
  recurrent_init: Callable = jax.nn.initializers.orthogonal()
  bias_init: Callable = jax.nn.initializers.zeros
  param_dtype: Any = jnp.float32
  carry_init: Callable = jax.nn.initializers.zeros

  @nn.compact
  def __call__(self, carry: Array, inputs: Array, *,
               recurrent_dropout_mask: Array | None = None) -> tuple[Array, Array]:
    """carry [...,H], inputs [...,D] -> (h' [...,H], h' [...,H]).

    ``recurrent_dropout_mask`` [...,H]: multiplies the carry where it enters the
    matmuls (variational dropout: pass the same mask at every step)."""
    return cell_step("GRUCell", lambda d: gru_params(self, d), carry, inputs,
                     self.hidden_size, self.variant, recurrent_dropout_mask)

  @nn.nowrap
  def initialize_carry(self, rng: Array, input_shape: tuple[int, ...]) -> Array:
    """The initial state [...,H] for inputs of shape [...,D] (zeros by default)."""
    return self.carry_init(rng, tuple(input_shape[:-1]) + (self.hidden_size,), self.param_dtype)

  @property
  def num_feature_axes(self) -> int:
    return 1


def gru_dropout_masks(next_key: Callable[[], Array], xs: Array, hidden_size: int,
                      rate: float, recurrent_rate: float, deterministic: bool,
                      example_ids: Array | None = None) -> tuple[Array | None, Array | None]:
  """The input [B,D] and recurrent [B,H] dropout multipliers of one GRU call (None if off).

  ``next_key()`` is called once per mask that is drawn.
  """
  check_rate("dropout", rate)
  check_rate("recurrent_dropout", recurrent_rate)
  b, d = xs.shape[0], xs.shape[-1]
  in_mask = rec_mask = None
  if not deterministic and rate > 0:
    in_mask = dropout_multiplier(next_key(), rate, b, (d,), example_ids, xs.dtype)
  if not deterministic and recurrent_rate > 0:
    rec_mask = dropout_multiplier(next_key(), recurrent_rate, b, (hidden_size,), example_ids,
                                  xs.dtype)
  return in_mask, rec_mask


def decoder_dropout_masks(next_key: Callable[[], Array], rate: float, recurrent_rate: float,
                          deterministic: bool, batch: int, length: int, sizes: Sequence[int],
                          example_ids: Array | None = None, dtype=jnp.float32
                          ) -> tuple[tuple[Array, ...] | None, tuple[Array, ...] | None]:
  """A stacked decoder's dropout, drawn before its loop: the multipliers after each layer
  [B,L,H_i] (a fresh draw per step) and each layer's recurrent mask [B,H_i] (fixed over
  time), or None for each group that is off.  ``next_key()`` is called once per mask drawn,
  all output masks first."""
  check_rate("dropout", rate)
  check_rate("recurrent_dropout", recurrent_rate)
  def draw(r, shape):
    if deterministic or r == 0:
      return None
    return tuple(dropout_multiplier(next_key(), r, batch, shape(h), example_ids, dtype)
                 for h in sizes)
  return draw(rate, lambda h: (length, h)), draw(recurrent_rate, lambda h: (h,))


def zoneout_weights(next_key: Callable[[], Array], xs: Array, hidden_size: int, rate: float,
                    deterministic: bool, example_ids: Array | None = None) -> Array | None:
  """The old state's weight k for `gru_jax.gru`'s ``zoneout_mask``: Bernoulli(rate)
  [B,T,H] in training (row i from (key, example_ids[i]) if given), the scalar rate in
  evaluation, None at rate 0.  ``next_key()`` is called only when a mask is drawn."""
  check_rate("zoneout", rate)
  if rate == 0:
    return None
  if deterministic:
    return jnp.asarray(rate, xs.dtype)
  b, t = xs.shape[:2]
  # A unit zones out where dropout at this rate would drop it.
  kept = keep_bits(next_key(), 1.0 - rate, b, (t, hidden_size), example_ids)
  return (~kept).astype(xs.dtype)


def decoder_zoneout(next_key: Callable[[], Array], rate: float, deterministic: bool,
                    embedded: Array, sizes: Sequence[int], example_ids: Array | None = None
                    ) -> tuple[Array, ...] | None:
  """A stacked decoder's zoneout weights, one `zoneout_weights` per layer over the
  embedded inputs [B,L,E]: [B,L,H_i] draws in training, the rate in evaluation, None
  at rate 0."""
  check_rate("zoneout", rate)
  if rate == 0:
    return None
  return tuple(zoneout_weights(next_key, embedded, h, rate, deterministic, example_ids)
               for h in sizes)


def apply_gru(cfg: Any, params: cell_lib.GRUParams, ln: ln_lib.LNParams | None, xs: Array,
              mask: Array | None, h0: Array | None, in_mask: Array | None,
              rec_mask: Array | None, return_gates: bool = False,
              resets: Array | None = None, return_state: bool | None = None,
              zoneout_mask: Array | None = None):
  """Runs one configured GRU layer; ``cfg`` carries the layer's attributes.

  Shared by the Linen and NNX layers so that both compute the same function.
  Returns hs [B,T,H] or h_last [B,H], and ``(outputs, h_last)`` with ``return_state``
  (the argument if given, else ``cfg.return_state``); with ``return_gates`` (not for
  layer norm), ``(that, Gates)``, each gate [B,T,H].
  """
  return_state = cfg.return_state if return_state is None else return_state
  if ln is not None:
    if in_mask is not None or rec_mask is not None or cfg.remat_chunk or cfg.zoneout:
      raise ValueError("GRU(layer_norm=True) supports neither dropout, recurrent_dropout, "
                       "zoneout nor remat_chunk; put a SequenceDropout before the layer "
                       "instead")
    if cfg.compute_dtype is not None or cfg.backend != "auto":
      raise ValueError("GRU(layer_norm=True) runs its own lax.scan in the inputs' dtype: "
                       f"compute_dtype={cfg.compute_dtype} and backend={cfg.backend!r} do not "
                       "apply (leave them at None and 'auto')")
    h_last, hs = ln_lib.ln_gru(params, ln, xs, h0, mask=mask, reverse=cfg.reverse,
                               variant=cfg.variant, unroll=cfg.unroll, resets=resets)
  else:
    h_last, hs, *gates = scan_lib.gru(
        params, xs, h0, mask=mask, reverse=cfg.reverse, variant=cfg.variant, unroll=cfg.unroll,
        input_dropout_mask=in_mask, recurrent_dropout_mask=rec_mask,
        compute_dtype=cfg.compute_dtype, remat_chunk=cfg.remat_chunk, backend=cfg.backend,
        return_gates=return_gates, resets=resets, zoneout_mask=zoneout_mask)
  out = hs if cfg.return_sequences else h_last
  out = (out, h_last) if return_state else out
  return (out, gates[0]) if return_gates else out


# GRU options the wrappers set on their layers: each layer feeds sequences on.
STACKED_SETS = ("return_sequences", "return_state")
BIDIRECTIONAL_SETS = ("reverse",) + STACKED_SETS


def check_pair(owner: str, arg: str, pair, batch: int, size: int) -> tuple:
  """A bidirectional layer's (forward, backward) states, each [B,H] or None;
  ``pair`` may also be one array [2,B,H] (torch's layout)."""
  if pair is None:
    return (None, None)
  if isinstance(pair, (jax.Array, np.ndarray)) and jnp.shape(pair) == (2, batch, size):
    pair = tuple(pair)
  if isinstance(pair, (jax.Array, np.ndarray)) or len(pair) != 2:
    got = f"shape {jnp.shape(pair)}" if hasattr(pair, "shape") else f"{len(pair)} entries"
    raise ValueError(f"{owner}: {arg} must be a pair (forward, backward) of states "
                     f"[B,H]=({batch}, {size}) or one array [2,B,H], got {got}")
  return tuple(check_state(owner, f"{arg}[{i}] ({d})", h, batch, size)
               for i, (d, h) in enumerate(zip(("forward", "backward"), pair)))


def check_state(owner: str, arg: str, h, batch: int, size: int) -> Array | None:
  if h is None:
    return None
  h = jnp.asarray(h)
  if h.shape != (batch, size):
    raise ValueError(f"{owner}: {arg} must have shape [B,H]=({batch}, {size}), got {h.shape}")
  return h


def stacked_initial_states(owner: str, h0, hidden_sizes: Sequence[int], bidirectional: bool,
                           batch: int, arg: str = "h0") -> list:
  """A stack's initial states as one entry per layer: [B,H_i] or None, or
  with ``bidirectional`` a (forward, backward) pair of those.

  ``h0`` is None (zeros), such a sequence, or torch's layout: one array
  [L·dirs,B,H] (layer-major, forward before backward) when every layer has
  the same H.
  """
  n, dirs = len(hidden_sizes), 2 if bidirectional else 1
  if h0 is None:
    return [(None, None) if bidirectional else None] * n
  if isinstance(h0, (jax.Array, np.ndarray)):
    want = (n * dirs, batch, hidden_sizes[0])
    if len(set(hidden_sizes)) != 1 or h0.shape != want:
      raise ValueError(f"{owner}: {arg} as one array takes torch's layout [L*dirs,B,H]={want} "
                       f"(every layer the same H), got shape {h0.shape} for hidden sizes "
                       f"{tuple(hidden_sizes)}; else pass one state per layer")
    h0 = [tuple(h0[i * 2:i * 2 + 2]) if bidirectional else h0[i] for i in range(n)]
  if len(h0) != n:
    raise ValueError(f"{owner}: {arg} must have one entry per layer ({n}), got {len(h0)}")
  if bidirectional:
    return [check_pair(owner, f"{arg}[{i}]", h, batch, size)
            for i, (h, size) in enumerate(zip(h0, hidden_sizes))]
  return [check_state(owner, f"{arg}[{i}]", h, batch, size)
          for i, (h, size) in enumerate(zip(h0, hidden_sizes))]


class Bidirectional(nn.Module):
  """A forward and a backward `GRU` (submodules ``forward``/``backward``).

  Outputs [B,T,2H] ("concat") or [B,T,H] ("sum"); with ``return_sequences``
  False, the two final states [B,2H] / [B,H].  The backward layer runs each
  sequence's valid steps in reverse, so with padding the outputs line up;
  with ``resets`` [B,T] (segment starts) each segment runs on its own both ways.
  ``h0`` is a pair (forward, backward) of initial states [B,H] (None: zeros);
  the backward one enters at each sequence's last valid step.  With
  ``return_state``, returns ``(outputs, (h_forward, h_backward))``, the final
  states [B,H] (the backward one after step 0).
  """
  hidden_size: int
  merge_mode: str = "concat"
  return_sequences: bool = True
  return_state: bool = False
  gru_kwargs: dict | None = None
  deterministic: bool | None = None  # as `GRU.deterministic`

  @nn.compact
  def __call__(self, xs, mask=None, h0=None, *, deterministic=None, example_ids=None,
               resets=None):
    xs, mask, resets = as_arrays(xs, mask, resets)
    check_sequence_input("Bidirectional", xs, mask, resets)
    deterministic = resolve_deterministic(self.deterministic, deterministic)
    if self.merge_mode not in ("concat", "sum"):
      raise ValueError(f"merge_mode must be 'concat' or 'sum', got {self.merge_mode!r}")
    kw = dict(self.gru_kwargs or {})
    check_gru_kwargs("Bidirectional", kw, BIDIRECTIONAL_SETS)
    h0 = check_pair("Bidirectional", "h0", h0, xs.shape[0], self.hidden_size)
    runs = [GRU(self.hidden_size, reverse=rev, return_sequences=self.return_sequences,
                return_state=True, name=name, **kw)(
                    xs, mask, h, deterministic=deterministic, example_ids=example_ids,
                    resets=resets)
            for name, rev, h in (("forward", False, h0[0]), ("backward", True, h0[1]))]
    return merge_directions(self.merge_mode, runs, self.return_state)


def merge_directions(merge_mode: str, runs, return_state: bool):
  """(outputs, h_last) of the forward and backward layers -> a Bidirectional's result."""
  (out_f, h_f), (out_b, h_b) = runs
  out = jnp.concatenate([out_f, out_b], -1) if merge_mode == "concat" else out_f + out_b
  return (out, (h_f, h_b)) if return_state else out


class StackedGRU(nn.Module):
  """``len(hidden_sizes)`` GRU layers (``layer_0``, ``layer_1``, ...), each returning sequences.

  ``dropout_between`` applies (per-example) dropout to the outputs of every
  layer but the last.  Returns hs [B,T,H_last]; bidirectional, [B,T,2H_last]
  with ``merge_mode="concat"`` or [B,T,H_last] with "sum".

  ``h0``: initial states, one entry per layer: [B,H_i] (None: zeros), or with
  ``bidirectional`` a (forward, backward) pair; or torch's ``h0`` layout, one
  array [L·dirs,B,H], when every layer has the same H.  With
  ``return_state``, returns ``(hs, states)``: each layer's final state(s) in
  the per-layer form; ``jnp.stack(jax.tree.leaves(states))`` is torch's
  ``h_n`` [L·dirs,B,H].
  """
  hidden_sizes: Sequence[int]
  bidirectional: bool = False
  merge_mode: str = "concat"
  dropout_between: float = 0.0
  return_state: bool = False
  gru_kwargs: dict | None = None
  deterministic: bool | None = None  # as `GRU.deterministic`

  @nn.compact
  def __call__(self, xs, mask=None, h0=None, *, deterministic=None, example_ids=None,
               resets=None):
    xs, mask, resets = as_arrays(xs, mask, resets)
    check_sequence_input("StackedGRU", xs, mask, resets)
    check_rate("dropout_between", self.dropout_between)
    deterministic = resolve_deterministic(self.deterministic, deterministic)
    if not self.hidden_sizes:  # else the inputs would come back as if they were outputs
      raise ValueError("StackedGRU needs at least one hidden size")
    kw = dict(self.gru_kwargs or {})
    check_gru_kwargs("StackedGRU", kw,
                     BIDIRECTIONAL_SETS if self.bidirectional else STACKED_SETS)
    h0 = stacked_initial_states("StackedGRU", h0, self.hidden_sizes, self.bidirectional,
                                xs.shape[0])
    h, states = xs, []
    for i, size in enumerate(self.hidden_sizes):
      if self.bidirectional:
        layer = Bidirectional(size, merge_mode=self.merge_mode, return_state=True,
                              gru_kwargs=kw, name=f"layer_{i}")
      else:
        layer = GRU(size, return_state=True, name=f"layer_{i}", **kw)
      h, state = layer(h, mask, h0[i], deterministic=deterministic, example_ids=example_ids,
                       resets=resets)
      states.append(state)
      if i < len(self.hidden_sizes) - 1:
        h = SequenceDropout(self.dropout_between)(h, deterministic=deterministic,
                                                  example_ids=example_ids)
    return (h, tuple(states)) if self.return_state else h


class SequenceDropout(nn.Module):
  """Element-wise dropout on [B,...] features, per-example reproducible via ``example_ids``.

  ``deterministic`` as in `GRU`: the call's, else the attribute's, else no dropout.
  """
  rate: float
  deterministic: bool | None = None

  @nn.compact
  def __call__(self, x, *, deterministic=None, example_ids=None):
    check_rate("SequenceDropout rate", self.rate)
    if resolve_deterministic(self.deterministic, deterministic) or self.rate == 0:
      return x
    return x * dropout_multiplier(self.make_rng("dropout"), self.rate, x.shape[0], x.shape[1:],
                                  example_ids, x.dtype)


class SequenceBatchNorm(nn.Module):
  """Batch normalisation after a GRU layer: per-feature statistics over batch and time.

  Inputs [B,T,F] with mask [B,T] (padded steps are excluded from the
  statistics and output as zeros) or [B,F].  Running averages
  ``mean``/``var`` (collection ``batch_stats``) are used when
  ``use_running_average``; ``axis_name`` averages statistics across
  `pmap` devices, weighted by each device's count of valid steps.
  """
  momentum: float = 0.99
  epsilon: float = 1e-3
  use_running_average: bool | None = None
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None, *,
               use_running_average: bool | None = None) -> Array:
    use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
    check_batch_norm_input(x, mask)
    feat = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (feat,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (feat,), jnp.float32)
    scale = self.param("scale", nn.initializers.ones, (feat,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (feat,), jnp.float32)
    if use_ra:
      mean, var = ra_mean.value, ra_var.value
    else:
      mean, var, count = masked_moments(x, mask, self.axis_name, return_count=True)
      if not self.is_initializing():
        ra_mean.value, ra_var.value = running_averages(
            (ra_mean.value, ra_var.value), (mean, var), count, self.momentum)
    return normalize(x, mask, mean, var, scale, bias, self.epsilon)


def check_batch_norm_input(x: Array, mask: Array | None) -> None:
  if x.ndim not in (2, 3):
    raise ValueError(f"SequenceBatchNorm expects [B,T,F] or [B,F], got shape {x.shape}")
  if mask is not None and (x.ndim != 3 or mask.shape != x.shape[:2]):
    raise ValueError(f"SequenceBatchNorm: mask must have shape [B,T]={x.shape[:2]} for "
                     f"inputs {x.shape}, got {mask.shape}")


def running_averages(old: tuple[Array, ...], new: tuple[Array, ...], count: Array,
                     momentum: float) -> tuple[Array, ...]:
  """momentum·old + (1 − momentum)·new, each in its old dtype; old where count = 0.

  A batch with no valid step has no statistics (`masked_moments` gives 0 and
  0), and averaging those in would shrink the running variance towards 0.
  """
  return tuple(jnp.where(count > 0, momentum * o + (1 - momentum) * n, o).astype(o.dtype)
               for o, n in zip(old, new))


def masked_moments(x: Array, mask: Array | None, axis_name: str | None = None,
                   return_count: bool = False):
  """Per-feature mean and (biased) variance [F] of x [B,T,F] or [B,F] over valid steps.

  With ``axis_name`` the sums are taken across that mapped axis, so every
  device weighs in by its count of valid steps.  ``return_count``: also the
  number of valid steps (a scalar, across devices with ``axis_name``).
  """
  # At least float32 (bf16 sums drift), but float64 stays float64 under x64.
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  w = jnp.ones(x.shape[:-1], dtype) if mask is None else mask.astype(dtype)
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(dtype)
  sums = (jnp.sum(w), jnp.sum(xf * w[..., None], axes))
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  count = jnp.maximum(sums[0], 1.0)
  mean = sums[1] / count
  sq = jnp.sum(jnp.square(xf - mean) * w[..., None], axes)
  if axis_name is not None:
    sq = jax.lax.psum(sq, axis_name)
  return (mean, sq / count, sums[0]) if return_count else (mean, sq / count)


def normalize(x: Array, mask: Array | None, mean: Array, var: Array, scale: Array,
              bias: Array, epsilon: float) -> Array:
  """(x - mean) / sqrt(var + eps) * scale + bias in x's dtype; padded steps set to 0."""
  y = (x - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias
  y = y.astype(x.dtype)
  return y if mask is None else y * mask[..., None].astype(x.dtype)
