"""Column-split Pallas GRU kernels: one step spread over several programs.

`gru_jax.kernels.pallas_gru` gives each program a batch tile and the whole
[H,3H] recurrent matrix, so B=64 runs on four SMs, each a serial chain that
re-reads 192 KB of f32 weights every step.  Here the grid is
(B/tile, S): program (i, j) owns hidden columns j·H/S … (j+1)·H/S−1 of batch
tile i and only their weight columns, [H,3H/S].  Every step it needs the
whole previous state, so the S programs of a tile exchange their columns
through global memory:

* the exchange buffer is filled beforehand with a sentinel NaN bit pattern
  (``SENTINEL``) that GPU arithmetic never produces (its NaN is 0x7FFFFFFF);
* a program stores its new columns there, then re-loads the full row with
  volatile loads (which bypass the L1 cache) until no element is the
  sentinel.  Every element says for itself whether it has landed, so no
  barrier, counter or memory fence is needed, and no slot is reused (the
  buffer has one slot per step), so no slot can be read stale.

This needs all programs of a tile resident at once (checked against the SM
count in `applies`); a spin is bounded (``SPIN_LIMIT``) so that a broken
assumption shows as NaN outputs, not as a hang: an element that never arrived
is still the sentinel NaN, and it flows into the state.
Only the "reset_after" variant is split (its one recurrent matmul per step
needs only the previous state; "seed" would need a second exchange of r⊙h),
without recurrent dropout.  In Pallas interpret mode the programs run one
after another, so only S=1 can run there (tests); S>1 is checked on GPU by
`experiments/gpu_check.py`.

The backward kernel exchanges the gate gradients [dã_z, dã_r, dhn] the same
way and computes its columns of dh_{t-1} = Σ_g dã_g·W_gᵀ.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gru_jax import cell as cell_lib
from gru_jax.kernels._pallas_common import (add_flags, at as _at, call, dot as _dot,
                                             gate_loader, row_loader, time_loop)
from gru_jax.kernels.fused_rnn import Config, Residuals

Array = jax.Array

SENTINEL = 0x7FBADBAD
# Spins per wait before giving up (about a second); after one gives up, a
# program stops waiting altogether, so a broken run ends quickly, with NaNs.
SPIN_LIMIT = 1 << 20
# True: the backward kernel waits for its three gate rows together (one memory
# round trip per step) instead of one after another.  Correct on an H100, but
# 2-8% slower there at every shape timed (train 64x1000x128x128: 5.55 against
# 5.44 ms; experiments/gpu_check.py phase 2c), so off.
JOINT_WAIT = False


def _sentinel_fill(shape) -> Array:
  return lax.bitcast_convert_type(jnp.full(shape, SENTINEL, jnp.int32), jnp.float32)


def applies(*, variant: str, hidden_size: int, batch: int, tile: int, split: int,
            has_rm: bool, interpret: bool, sm_count: int | None,
            zoneout: bool = False) -> tuple[bool, str]:
  """(applies, reason) for the column-split kernels with ``split`` programs per tile."""
  if split < 1:
    return False, "split is off"
  if variant != "reset_after":
    return False, f"only variant='reset_after' is split, got {variant!r}"
  if has_rm:
    return False, "recurrent dropout is not split"
  if zoneout:
    return False, "zoneout is not split"
  if hidden_size % split or (hidden_size // split) & (hidden_size // split - 1):
    return False, f"hidden_size={hidden_size} / split={split} is not a power of two"
  if interpret:
    return (split == 1, "interpret mode runs programs in turn: split must be 1")
  if hidden_size // split < 16:
    return False, f"{hidden_size // split} columns per program < 16, the smallest Triton matmul"
  if sm_count is None:  # the spin-waits need every program resident: do not guess
    return False, "the device's SM count is unknown"
  programs = batch // tile * split
  if programs > sm_count:
    return False, f"{programs} programs would not all be resident on {sm_count} SMs"
  return True, "fits"


def _wait(ref, idxs, limit, interpret: bool):
  """Loads ref[idx] for each of ``idxs`` until no element of any is the sentinel.

  Returns (values, spins).  All slots are loaded before any is checked, so
  waiting on several costs one memory round trip, not one each.
  """
  if interpret:  # programs run in turn: a slot is complete when it is read
    return tuple(ref[idx] for idx in idxs), jnp.int32(0)
  from jax.experimental.pallas import triton as plgpu
  views = [ref.at[idx] for idx in idxs]
  load = lambda: tuple(plgpu.load(v, volatile=True) for v in views)

  def pending(vs):
    hits = [jnp.max(jnp.where(lax.bitcast_convert_type(v, jnp.int32) == SENTINEL, 1, 0))
            for v in vs]
    return functools.reduce(jnp.maximum, hits) > 0

  # The limit rides in the carry: Pallas-Triton's while lowering mixes up
  # constants captured by the condition.
  def cond(c):
    return pending(c[0]) & (c[1] < c[2])

  def body(c):
    return load(), c[1] + 1, c[2]

  vs, spins, _ = lax.while_loop(cond, body, (load(), jnp.int32(0), limit))
  return vs, spins


def _specs(ax: int, n: int, bt: int, hsz: int, hs: int):
  """BlockSpecs over the (tile i, column block j) grid, in the caller's layout."""
  if ax == 0:
    seq = lambda tail, idx: pl.BlockSpec((n, bt) + tail, lambda i, j: (0, i) + idx(j))
  else:
    seq = lambda tail, idx: pl.BlockSpec((bt, n) + tail, lambda i, j: (i, 0) + idx(j))
  return dict(
      gates=seq((3, hs), lambda j: (0, j)),  # own columns of each gate
      own=seq((hs,), lambda j: (j,)),
      row=seq((hsz,), lambda j: (0,)),  # the full row: the forward's exchange
      gates_row=seq((3, hsz), lambda j: (0, 0)),  # the backward's exchange
      mask=seq((), lambda j: ()),
      state_own=pl.BlockSpec((bt, hs), lambda i, j: (i, j)),
      state_row=pl.BlockSpec((bt, hsz), lambda i, j: (i, 0)),
      weights=pl.BlockSpec((3, hsz, hs), lambda i, j: (0, 0, j)),
      bias3=pl.BlockSpec((3, hs), lambda i, j: (0, j)),
      bias=pl.BlockSpec((hs,), lambda i, j: (j,)),
  )


# Integer arithmetic only: Pallas-Triton lowers bool->int conversions and scalar
# selects of literals to i1 values that its while loop then rejects.
def _limit(stalled):
  """Spins allowed now: SPIN_LIMIT, or 0 once any wait of this program gave up."""
  return jnp.int32(SPIN_LIMIT) * (1 - jnp.minimum(stalled, 1))


def _gave_up(spins):
  return spins // SPIN_LIMIT  # 1 if the wait hit the limit, else 0


# ---------------------------------------------------------------- forward

def _forward_kernel(*refs, ax: int, n: int, reverse: bool, hs: int, save: bool, has_mask: bool,
                    has_rs: bool, interpret: bool):
  refs = list(refs)
  xp_ref, w_ref, b_ref, bhn_ref, h0_row_ref, h0_ref = refs[:6]
  flag_refs = refs[6:6 + has_mask + has_rs]  # mask, resets: those given
  outs = refs[7 + has_mask + has_rs:]  # after the aliased exchange input
  ex_ref, hlast_ref = outs[0], outs[-1]
  res_refs = outs[1:-1]
  wz, wr, wc = w_ref[0], w_ref[1], w_ref[2]  # [H, hs]: this program's columns
  bz, br, bc = b_ref[0], b_ref[1], b_ref[2]
  bhn = bhn_ref[...]
  cols = pl.ds(pl.program_id(1) * hs, hs)
  time_of = lambda i: n - 1 - i if reverse else i

  load = gate_loader(xp_ref, flag_refs, ax, time_of)

  def step(i, h_prev, h_row, inputs):
    t = time_of(i)
    xz, xr, xc = inputs[:3]
    h = h_prev
    if has_rs:  # the stored state is the one carried in, before the reset
      h, h_row = (cell_lib.restart(a, inputs[-1] != 0) for a in (h, h_row))
    z = jax.nn.sigmoid(xz + bz + _dot(h_row, wz))
    r = jax.nn.sigmoid(xr + br + _dot(h_row, wr))
    hn = _dot(h_row, wc) + bhn
    c = jnp.tanh(xc + bc + r * hn)
    h_new = h + z * (c - h)
    if has_mask:
      h_new = jnp.where((inputs[3] != 0)[:, None], h_new, h)
    ex_ref[_at(ax, t, cols)] = h_new  # first: the other programs wait on it
    if save:
      for ref, v in zip(res_refs, (h_prev, z, r, c, hn)):
        ref[_at(ax, t)] = v.astype(ref.dtype)
    return h_new

  h = step(0, h0_ref[...].astype(jnp.float32), h0_row_ref[...].astype(jnp.float32), load(0))

  def body(i, carry, cur):  # step i+1's inputs are in flight while this one waits
    h, stalled = carry
    (h_row,), spins = _wait(ex_ref, [_at(ax, time_of(i - 1))], _limit(stalled), interpret)
    return step(i, h, h_row, cur), stalled + _gave_up(spins)

  h, _ = time_loop(n, load, body, (h, jnp.int32(0)), prefetch=True, start=1)
  hlast_ref[...] = h


def forward(w_h, b_x, b_hn, xp, h0, mask, *, cfg: Config, save: bool, tile: int, split: int,
            num_warps: int, rs=None):
  """Same contract as `gru_jax.kernels.fused_rnn.xla_forward` ("reset_after", no dropout)."""
  ax = cfg.time_axis
  n, batch = (xp.shape[0], xp.shape[1]) if ax == 0 else (xp.shape[1], xp.shape[0])
  hsz = h0.shape[-1]
  hs = hsz // split
  sp = _specs(ax, n, tile, hsz, hs)
  seq_shape = xp.shape[:2] + (hsz,)
  h0 = h0.astype(jnp.float32)
  args = [xp.reshape(xp.shape[:2] + (3, hsz)), w_h.reshape(hsz, 3, hsz).transpose(1, 0, 2),
          b_x.reshape(3, hsz), b_hn, h0, h0]
  in_specs = [sp["gates"], sp["weights"], sp["bias3"], sp["bias"], sp["state_row"],
              sp["state_own"]]
  add_flags(args, in_specs, sp["mask"], mask, rs)
  args.append(_sentinel_fill(seq_shape))
  in_specs.append(sp["row"])
  n_res = 5 if save else 0
  out_shape = ([jax.ShapeDtypeStruct(seq_shape, jnp.float32)]
               + [jax.ShapeDtypeStruct(seq_shape, jnp.float32)] * n_res
               + [jax.ShapeDtypeStruct(h0.shape, jnp.float32)])
  out_specs = [sp["row"]] + [sp["own"]] * n_res + [sp["state_own"]]
  kernel = functools.partial(_forward_kernel, ax=ax, n=n, reverse=cfg.reverse, hs=hs,
                             save=save, has_mask=mask is not None, has_rs=rs is not None,
                             interpret=cfg.interpret)
  states, *res, h_last = call(
      kernel, interpret=cfg.interpret, grid=(batch // tile, split), out_shape=out_shape,
      in_specs=in_specs, out_specs=out_specs, aliases={len(args) - 1: 0},
      num_warps=num_warps, num_stages=1)(*args)
  # The exchange holds every step's carried state; outputs are zero at masked steps.
  hs_out = states if mask is None else jnp.where(mask[..., None], states, 0.0)
  return h_last, hs_out, (Residuals(*res) if save else None)


# ---------------------------------------------------------------- backward

def _backward_kernel(*refs, ax: int, n: int, reverse: bool, hs: int, has_mask: bool,
                     has_rs: bool, interpret: bool):
  refs = list(refs)
  wt_ref, prev_ref, z_ref, r_ref, c_ref, hn_ref, g_ref, glast_ref = refs[:8]
  flag_refs = refs[8:8 + has_mask + has_rs]  # mask, resets: those given
  ex_ref, dxp_ref, dh0_ref = refs[9 + has_mask + has_rs:]
  wzt, wrt, wct = wt_ref[0], wt_ref[1], wt_ref[2]  # [H, hs]: W_gᵀ's columns = W_g's rows
  cols = pl.ds(pl.program_id(1) * hs, hs)
  time_of = lambda i: i if reverse else n - 1 - i  # opposite to the forward loop
  seq_refs = [prev_ref, z_ref, r_ref, c_ref, hn_ref, g_ref] + flag_refs

  load = row_loader(seq_refs, ax, time_of)

  def body(i, carry, cur):
    dh, stalled = carry
    t = time_of(i)
    hp, z, r, c, hn, g = cur[:6]
    restart = cur[-1] != 0 if has_rs else None  # this step started from zero
    if has_rs:
      hp = cell_lib.restart(hp, restart)
    d = dh + g
    if has_mask:
      keep = (cur[6] != 0)[:, None]
      d = jnp.where(keep, d, 0.0)
    da_c = d * z * (1 - c * c)
    da_z = d * (c - hp) * z * (1 - z)
    dhn = da_c * r
    da_r = dhn * hn * (1 - r)
    for gate, v in enumerate((da_z, da_r, dhn)):
      ex_ref[_at(ax, t, gate, cols)] = v
    for gate, v in enumerate((da_z, da_r, da_c)):
      dxp_ref[_at(ax, t, gate, slice(None))] = v.astype(dxp_ref.dtype)
    dhin = jnp.zeros_like(dh)
    groups = [[0, 1, 2]] if JOINT_WAIT else [[0], [1], [2]]
    for gates in groups:
      rows, spins = _wait(ex_ref, [_at(ax, t, g) for g in gates], _limit(stalled), interpret)
      stalled = stalled + _gave_up(spins)
      for g, row in zip(gates, rows):
        dhin = dhin + _dot(row, (wzt, wrt, wct)[g])
    direct = d * (1 - z)
    if has_mask:
      direct = jnp.where(keep, direct, dh)
    dh = direct + dhin
    return (dh if restart is None else cell_lib.restart(dh, restart)), stalled

  dh = glast_ref[...].astype(jnp.float32)
  dh, _ = time_loop(n, load, body, (dh, jnp.int32(0)), prefetch=True)
  dh0_ref[...] = dh


def backward(w_h, res: Residuals, mask, g_last, g_hs, *, cfg: Config, tile: int, split: int,
             num_warps: int, rs=None):
  """Same contract as `gru_jax.kernels.fused_rnn.xla_backward` ("reset_after", no dropout)."""
  ax = cfg.time_axis
  n, batch = (res.z.shape[0], res.z.shape[1]) if ax == 0 else (res.z.shape[1], res.z.shape[0])
  hsz = res.z.shape[-1]
  hs = hsz // split
  sd = res.z.dtype
  sp = _specs(ax, n, tile, hsz, hs)
  wt = w_h.reshape(hsz, 3, hsz).transpose(1, 2, 0)  # wt[g] = W_gᵀ
  seqs = [res.prev, res.z, res.r, res.c, res.hn, g_hs.astype(sd)]
  args = [wt] + seqs + [g_last.astype(sd)]
  in_specs = [sp["weights"]] + [sp["own"]] * len(seqs) + [sp["state_own"]]
  add_flags(args, in_specs, sp["mask"], mask, rs)
  gates_shape = res.z.shape[:2] + (3, hsz)
  args.append(_sentinel_fill(gates_shape))
  in_specs.append(sp["gates_row"])
  out_shape = [jax.ShapeDtypeStruct(gates_shape, jnp.float32),
               jax.ShapeDtypeStruct(gates_shape, sd), jax.ShapeDtypeStruct((batch, hsz), sd)]
  out_specs = [sp["gates_row"], sp["gates"], sp["state_own"]]
  kernel = functools.partial(_backward_kernel, ax=ax, n=n, reverse=cfg.reverse, hs=hs,
                             has_mask=mask is not None, has_rs=rs is not None,
                             interpret=cfg.interpret)
  _, dxp, dh0 = call(kernel, interpret=cfg.interpret, grid=(batch // tile, split),
                     out_shape=out_shape, in_specs=in_specs, out_specs=out_specs,
                     aliases={len(args) - 1: 0}, num_warps=num_warps, num_stages=1)(*args)
  return dh0, dxp.reshape(res.z.shape[:2] + (3 * hsz,)), None
