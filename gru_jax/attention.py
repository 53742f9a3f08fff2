"""Attention over encoder outputs for a GRU decoder, as pure functions.

The decoder of Bahdanau et al. (2015), whose RNNsearch is a GRU encoder–decoder:
at every step the top decoder layer's previous state s [B,H] scores the encoder
outputs h_j through keys k_j (computed once per source), a softmax over the
valid source steps gives α [B,S], and the context c_t = Σ_j α_j h_j [B,C]
enters decoder layer 0 beside the embedded previous token.

* "additive" (Bahdanau et al.): e_j = v·tanh(s·W_q + k_j), keys k_j = h_j·W_k + b [B,S,A];
* "multiplicative" (Luong et al. 2015, "general"): e_j = s·k_j, keys k_j = h_j·W_k [B,S,H].

`decode` runs the teacher-forced decoder over L steps with `jax.lax.scan`.
Matmul operands take ``compute_dtype`` (e.g. bf16); the state, scores,
softmax and outputs stay in the state's dtype.  Nothing here knows
Flax: `gru_jax.models.Seq2Seq` creates the parameters and calls `decode`.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from gru_jax import cell as cell_lib
from gru_jax.cell import GRUParams

Array = jax.Array
KINDS = ("additive", "multiplicative")


def attend(energies: Array, memory: Array, mask: Array) -> tuple[Array, Array]:
  """Softmax over the valid source steps: energies [B,S], memory [B,S,C], mask [B,S]
  -> (context [B,C], weights [B,S]); padded steps weigh 0 (a row with none valid: all 0)."""
  low = jnp.finfo(energies.dtype).min
  alpha = jax.nn.softmax(jnp.where(mask, energies, low), axis=-1)
  alpha = jnp.where(mask, alpha, 0.0)
  return jnp.einsum("bs,bsc->bc", alpha, memory.astype(alpha.dtype)), alpha


def scores(kind: str, s: Array, keys: Array, w_query: Array | None = None,
           v: Array | None = None, compute_dtype=None) -> Array:
  """Energies e [B,S] of the query state s [B,H] against keys [B,S,A].

  "additive": v·tanh(s·w_query + k_j) with w_query [H,A], v [A];
  "multiplicative": s·k_j (A = H).  Matmul operands in ``compute_dtype``
  (default: s's dtype), results in s's dtype.
  """
  sd = s.dtype
  cd = jnp.dtype(compute_dtype or sd)
  if kind == "multiplicative":
    return jnp.einsum("bsa,ba->bs", keys.astype(cd), s.astype(cd), preferred_element_type=sd)
  q = cell_lib.matmul(s, w_query.astype(cd), sd)
  hidden = jnp.tanh(keys.astype(sd) + q[:, None])
  # v as an [A,1] matrix: the matrix-vector dot was slower on XLA:CPU (train 78 against 76 ms).
  return cell_lib.matmul(hidden, v.astype(cd)[:, None], sd)[..., 0]


def _check(cells, states, embedded, memory, keys, mask, kind, w_query, v,
           output_drops, recurrent_masks, zoneout) -> None:
  """Shape checks at the public boundary; errors name the argument and the shapes."""
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  if not cells or len(cells) != len(states):
    raise ValueError(f"cells and states must be one per layer, got {len(cells)} cells and "
                     f"{len(states)} states")
  if embedded.ndim != 3:
    raise ValueError(f"embedded must be [B,L,E], got shape {embedded.shape}")
  b, _, e = embedded.shape
  if memory.ndim != 3 or memory.shape[0] != b:
    raise ValueError(f"memory must be [B,S,C] with B={b}, got shape {memory.shape}")
  s, c = memory.shape[1:]
  if keys.ndim != 3 or keys.shape[:2] != (b, s):
    raise ValueError(f"keys must be [B,S,A]=({b}, {s}, A) to match memory {memory.shape}, got "
                     f"{keys.shape}")
  if tuple(mask.shape) != (b, s):
    raise ValueError(f"mask must be [B,S]=({b}, {s}), got {tuple(mask.shape)}")
  d_in = e + c
  for i, (p, h) in enumerate(zip(cells, states)):
    if p.w_x.shape[0] != d_in:
      want = f"E+C={e}+{c}" if i == 0 else f"H_{i - 1}={d_in}"
      raise ValueError(f"cells[{i}].w_x must have {want} rows, got shape {p.w_x.shape}")
    if tuple(h.shape) != (b, p.hidden_size):
      raise ValueError(f"states[{i}] must be [B,H]=({b}, {p.hidden_size}), got {h.shape}")
    d_in = p.hidden_size
  top = cells[-1].hidden_size
  if kind == "multiplicative" and keys.shape[-1] != top:
    raise ValueError(f"multiplicative keys must be [B,S,H] with H={top} (the top state), got "
                     f"{keys.shape}")
  if kind == "additive":
    a = keys.shape[-1]
    if w_query is None or tuple(w_query.shape) != (top, a) or v is None or \
        tuple(v.shape) != (a,):
      raise ValueError(f"additive attention needs w_query [H,A]=({top}, {a}) and v [A]=({a},), "
                       f"got {None if w_query is None else w_query.shape} and "
                       f"{None if v is None else v.shape}")
  for name, group, shape in (("output_drops", output_drops, lambda h: (b, embedded.shape[1], h)),
                             ("recurrent_masks", recurrent_masks, lambda h: (b, h))):
    if group is None:
      continue
    if len(group) != len(cells):
      raise ValueError(f"{name} must be one per layer ({len(cells)}), got {len(group)}")
    for i, (m, p) in enumerate(zip(group, cells)):
      if m is not None and tuple(m.shape) != shape(p.hidden_size):
        raise ValueError(f"{name}[{i}] must have shape {shape(p.hidden_size)}, got {m.shape}")
  if zoneout is None:
    return
  if len(zoneout) != len(cells):
    raise ValueError(f"zoneout must be one per layer ({len(cells)}), got {len(zoneout)}")
  for i, (k, p) in enumerate(zip(zoneout, cells)):
    want = (b, embedded.shape[1], p.hidden_size)
    if k is not None and jnp.ndim(k) != 0 and tuple(jnp.shape(k)) != want:
      raise ValueError(f"zoneout[{i}] must be a scalar or have shape [B,L,H_{i}]={want}, got "
                       f"{tuple(jnp.shape(k))}")


def decode(cells: Sequence[GRUParams], states: Sequence[Array], embedded: Array,
           memory: Array, keys: Array, mask: Array | None = None, *, kind: str,
           variant: str = "seed",
           w_query: Array | None = None, v: Array | None = None,
           output_drops: Sequence[Array | None] | None = None,
           recurrent_masks: Sequence[Array | None] | None = None,
           zoneout: Sequence[Array | float | None] | None = None,
           compute_dtype=None, unroll: int = 1, remat: bool = True):
  """The teacher-forced GRU decoder with attention, over L steps.

  Args:
    cells: one `GRUParams` per decoder layer; layer 0's w_x is [E+C,3H_0] (rows:
      the embedding's, then the context's), layer i's [H_{i-1},3H_i].
    states: the initial state of each layer, [B,H_i] (their dtype is the state dtype).
    embedded: the embedded previous tokens [B,L,E].
    memory: the encoder outputs h_j [B,S,C]; keys: [B,S,A] (see the module docstring).
    mask: bool [B,S], the valid source steps; None: all.
    kind: "additive" (needs w_query [H_top,A] and v [A]) or "multiplicative".
    variant: the GRU's, "seed" or "reset_after".
    output_drops: per layer, a dropout multiplier [B,L,H_i] for its output, or None.
    recurrent_masks: per layer, a recurrent dropout multiplier [B,H_i], or None.
    zoneout: per layer, the old state's weight k (zoneout, as `gru_jax.gru`'s
      ``zoneout_mask``: h = k⊙h_{t−1} + (1−k)⊙GRU(h_{t−1}, x_t)), [B,L,H_i] or a
      scalar, or None.
    compute_dtype: matmul operand dtype (e.g. jnp.bfloat16); None: the state's.
    unroll: `lax.scan`'s unroll.
    remat: recompute each step in the backward pass instead of storing its
      [B,S,A] activations (additive, train B=64, S=40, L=41, H=A=128 on the
      2-core CPU: 121 ms a step stored, 74 ms recomputed).

  Returns:
    (final states, one [B,H_i] per layer; top outputs [B,L,H_top] after its
    dropout; contexts [B,L,C]; attention weights α [B,L,S]).
  """
  states = tuple(jnp.asarray(h) for h in states)
  embedded, memory, keys = (jnp.asarray(a) for a in (embedded, memory, keys))
  mask = jnp.ones(memory.shape[:2], bool) if mask is None else jnp.asarray(mask)
  _check(cells, states, embedded, memory, keys, mask, kind, w_query, v, output_drops,
         recurrent_masks, zoneout)
  cell_lib.check_variant(variant)
  sd = states[0].dtype
  cd = jnp.dtype(compute_dtype or sd)
  mask = mask.astype(bool)
  n = len(cells)
  # Loop-invariant weights enter the loop in the state dtype (at least float32)
  # and are cast inside: JAX sums their gradients over the steps in the dtype
  # they enter with (see `gru_jax.scan._recurrence_scan`).
  acc = jnp.promote_types(sd, jnp.float32)
  w_in = [p.w_x.astype(acc) for p in cells]
  bias = [cell_lib.folded_bias(p, variant).astype(acc) for p in cells]
  # Split for "seed" here, not in the loop body, where XLA:CPU copies the slices every
  # step (`gru_jax.cell.loop_weights`).
  w_h = [cell_lib.loop_weights(p.w_h.astype(acc), variant) for p in cells]
  b_h = [p.b_h.astype(acc) for p in cells]
  w_query = None if w_query is None else w_query.astype(acc)
  v = None if v is None else v.astype(acc)
  rec = tuple(recurrent_masks) if recurrent_masks is not None else (None,) * n
  rec = tuple(None if m is None else m.astype(sd) for m in rec)
  time_major = lambda a: jnp.swapaxes(a, 0, 1)
  drops = None
  if output_drops is not None and any(d is not None for d in output_drops):
    drops = tuple(None if d is None else time_major(d.astype(sd)) for d in output_drops)
  # Zoneout: per-step weights go through the scan's inputs, scalars are closed over.
  zk = (None,) * n if zoneout is None else tuple(
      None if k is None else jnp.asarray(k).astype(sd) for k in zoneout)
  zk_steps = tuple(None if k is None or k.ndim == 0 else time_major(k) for k in zk)
  zk_steps = zk_steps if any(k is not None for k in zk_steps) else None

  def body(carry, inp):
    e_t, drops_t, zk_t = inp
    cast = lambda w: w.astype(cd)
    energies = scores(kind, carry[-1], keys, None if w_query is None else cast(w_query),
                      None if v is None else cast(v), cd)
    context, alpha = attend(energies, memory, mask)
    context = context.astype(sd)
    new, x = [], None
    for i in range(n):
      h = carry[i]
      # Layer 0 projects [e_t, c_t] here.  Projecting e for all steps before the loop
      # and only c_t inside was slower on XLA:CPU (train B=64, S=40, L=41, H=A=128,
      # E=32: additive 87-91 against 78 ms, multiplicative 73-76 against 59).
      x = jnp.concatenate([e_t, context], -1) if i == 0 else x
      xp = cell_lib.matmul(x, cast(w_in[i]), sd) + bias[i].astype(sd)
      g = cell_lib.recurrent_gates(jax.tree.map(cast, w_h[i]), b_h[i].astype(sd), h, xp,
                                   variant=variant,
                                   h_drop=None if rec[i] is None else h * rec[i])
      h_new = cell_lib.blend(h, g).astype(sd)
      k = zk_t[i] if zk_t is not None and zk_t[i] is not None else zk[i]
      h = h_new if k is None else h_new + k * (h - h_new)
      new.append(h)
      x = h if drops_t is None or drops_t[i] is None else h * drops_t[i]
    return tuple(new), (x, context, alpha)

  step = jax.checkpoint(body) if remat else body
  final, (outs, contexts, alpha) = lax.scan(
      step, states, (time_major(embedded.astype(sd)), drops, zk_steps), unroll=unroll)
  return final, time_major(outs), time_major(contexts), time_major(alpha)
