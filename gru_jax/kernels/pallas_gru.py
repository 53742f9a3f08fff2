"""Fused Pallas GRU kernels: the whole time loop in one kernel, forward and backward.

Batch rows are independent, so the grid runs one program per tile of
``BATCH_TILE`` rows.  Each program loads the three recurrent [H,H] weight
blocks once, keeps them on chip, and loops over all T steps inside the
kernel (a `fori_loop`), reading the precomputed input projection xp[t] and
writing h_t, without returning to XLA between steps.  The backward kernel
runs the same loop in reverse time and writes d xp; the weight gradients are
then large XLA matmuls shared with the XLA path
(`gru_jax.kernels.fused_rnn.weight_grads`).

Written for the Triton-style `pl.pallas_call` with BlockSpecs: on GPU it
compiles with Triton (``num_warps``), elsewhere it runs in Pallas interpret
mode (slow; for tests).  Every load and store is a [tile,H] or [H,H] block,
so H must be a power of two (a Triton requirement), and the weights must fit
in shared memory (`supported`).  The state and all elementwise math are
float32 (the state dtype); the matmuls run in the weights' dtype (bf16 or
f32) with f32 accumulation.  Masks and reset flags (`gru_jax.scan.effective_resets`)
arrive as int32 and are read per step with the inputs; a reset step zeroes
the state it starts from, and in the backward loop the gradient it passes on.
Zoneout's weight k of the old state arrives per step ([tile,H], read with the
inputs) or as one value for all steps; the backward kernel also writes dk.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from gru_jax import cell as cell_lib
from gru_jax.kernels import pallas_split
from gru_jax.kernels._pallas_common import (add_flags, at as _at, call, dot as _dot,
                                             gate_loader, row_loader, time_loop)
from gru_jax.kernels.fused_rnn import Config, Residuals, outputs_from_prev

Array = jax.Array

# Measured on an H200 (experiments/gpu_check.py sweep, train 64x1000x128x128,
# f32, ms): tile 16 / 8 warps / prefetch 7.62, 4 warps 8.02, 16 warps 8.58,
# tile 32 15.1; without prefetch 10.9 (8 warps) and 11.2 (4 warps).
BATCH_TILE = 16
NUM_WARPS = 8
# Load step t+1's inputs while step t computes, so their memory latency is off
# the recurrence's critical path (the sweep above: 1.4x on the train step).
PREFETCH = True
# Triton's own software pipelining of the loop's loads (1 = off).  Without the
# prefetch, 2 or 3 stages overflow shared memory (254/303 KB > 227 KB); with
# it, 2 stages measured 7.86 ms against 7.97 for 1 (same run): noise.
NUM_STAGES = 1
# Column split (`gru_jax.kernels.pallas_split`): S programs per batch tile, each
# owning H/S hidden columns, exchanging the state through global memory every
# step.  None: S = H / SPLIT_COLUMNS from H = 128 up where the unsplit kernel fits
# too (where it was measured; the unsplit kernel's whole weights are a quarter the
# size at H=64); 0: off; an int: that S, also at H whose whole weights do not fit
# on chip but each program's share does (`plan_split`; not yet timed on a GPU:
# compiled for an H100 without one, `python -m experiments.gpu_hlo --ptxas=...`,
# bf16 H=256 at S=8 or 16 uses no local memory, f32 H=256 spills 1-3 KB a thread).
# Applies to "reset_after" without recurrent dropout.  H200, f32, train /
# forward ms (gpu_check phase 2c): 64x1000x128x128 unsplit 7.74 / 3.17, S=2
# 6.20 / 2.46, S=4 5.55 / 2.38, S=8 6.29 / 3.01, S=4 with 8 warps 6.71 / 3.17;
# 64x100x128x128 1.11 / 0.55 unsplit, 0.82 / 0.42 S=4, 0.78 / 0.41 S=8;
# 256x200x128x128 2.04 / 0.92 unsplit, 1.63 / 0.71 S=4.
SPLIT: int | None = None
SPLIT_COLUMNS = 32
SPLIT_WARPS = 4
# Shared memory an H100 program may use is 227 KB; leave room for the tiles.
SMEM_BUDGET_BYTES = 200 * 1024


def weight_bytes(hidden_size: int, compute_dtype) -> int:
  """On-chip bytes of the recurrent weights: 3·H·H·itemsize."""
  return 3 * hidden_size * hidden_size * jnp.dtype(compute_dtype).itemsize


def supported(*, hidden_size: int, batch: int, compute_dtype, state_dtype, platform: str,
              variant: str = "reset_after", has_rm: bool = False,
              zoneout: bool = False) -> tuple[bool, str]:
  """(applies, reason) for running the kernels on ``platform``.

  On GPU the recurrent weights a program keeps on chip must fit
  ``SMEM_BUDGET_BYTES``: all 3·H·H of them for the one-program-per-tile
  kernels, 3·H·H/S with a column split of S (`plan_split`).
  """
  if hidden_size & (hidden_size - 1):
    return False, f"hidden_size={hidden_size} is not a power of two"
  if jnp.dtype(state_dtype) != jnp.float32:
    return False, f"the kernel keeps a float32 state; got state dtype {jnp.dtype(state_dtype)}"
  if jnp.dtype(compute_dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    return False, f"compute dtype must be float32 or bfloat16, got {jnp.dtype(compute_dtype)}"
  if platform != "gpu":
    return True, "interpret mode"
  if hidden_size < 16:
    return False, f"hidden_size={hidden_size} < 16, the smallest Triton matmul"
  if batch % BATCH_TILE:
    return False, f"batch={batch} is not a multiple of the {BATCH_TILE}-row tile"
  split = plan_split(split=SPLIT, variant=variant, hidden_size=hidden_size, batch=batch,
                     compute_dtype=compute_dtype, has_rm=has_rm, interpret=False,
                     sm_count=_sm_count(), zoneout=zoneout)
  need = weight_bytes(hidden_size, compute_dtype) // max(split, 1)
  if need > SMEM_BUDGET_BYTES:
    per = f"/{split} (a column split of {split})" if split else ""
    return False, (f"recurrent weights need {need // 1024} KB of shared memory a program "
                   f"(3·H·H·{jnp.dtype(compute_dtype).itemsize} B{per}), more than the "
                   f"{SMEM_BUDGET_BYTES // 1024} KB budget")
  return True, "fits"


def _sm_count() -> int | None:
  """Streaming multiprocessors of the GPU (JAX's `core_count`), None if not reported."""
  return getattr(jax.devices()[0], "core_count", None)


def plan_split(*, split: int | None, variant: str, hidden_size: int, batch: int, compute_dtype,
               has_rm: bool, interpret: bool, sm_count: int | None,
               zoneout: bool = False) -> int:
  """The column split S the kernels run with (0: the one-program-per-tile kernels).

  ``split`` is the setting (`SPLIT`).  None: S = H / ``SPLIT_COLUMNS`` where the
  unsplit kernel's weights fit too (H = 128 in f32, where the split was
  measured faster); an int: that S wherever the split applies, including H
  where only its share of the weights fits (H = 256, 512: compiled but not yet
  timed on a GPU).
  """
  if split is None:
    fits = weight_bytes(hidden_size, compute_dtype) <= SMEM_BUDGET_BYTES
    split = hidden_size // SPLIT_COLUMNS if hidden_size >= 128 and fits and not interpret else 0
  ok, _ = pallas_split.applies(variant=variant, hidden_size=hidden_size, batch=batch,
                               tile=_tile(batch, interpret), split=split, has_rm=has_rm,
                               interpret=interpret, sm_count=sm_count, zoneout=zoneout)
  return split if ok else 0


def _split(cfg: Config, batch: int, hsz: int, rm, compute_dtype, zk=None) -> int:
  return plan_split(split=cfg.split, variant=cfg.variant, hidden_size=hsz, batch=batch,
                    compute_dtype=compute_dtype, has_rm=rm is not None,
                    interpret=cfg.interpret, sm_count=None if cfg.interpret else _sm_count(),
                    zoneout=zk is not None)


def _tile(batch: int, interpret: bool) -> int:
  if not interpret:
    return BATCH_TILE
  for bt in (BATCH_TILE, 8, 4, 2, 1):
    if batch % bt == 0:
      return bt
  return 1


def _specs(cfg: Config, n: int, bt: int, hsz: int):
  """BlockSpecs for the per-tile arrays, in the caller's layout."""
  if cfg.time_axis == 0:
    seq = lambda *tail: pl.BlockSpec((n, bt) + tail, lambda i: (0, i) + (0,) * len(tail))
  else:
    seq = lambda *tail: pl.BlockSpec((bt, n) + tail, lambda i: (i, 0) + (0,) * len(tail))
  return dict(
      gates=seq(3, hsz),  # xp / dxp viewed as [..,3,H]
      seq=seq(hsz),  # [T,B,H] / [B,T,H]
      mask=seq(),  # [T,B] / [B,T]
      state=pl.BlockSpec((bt, hsz), lambda i: (i, 0)),
      weights=pl.BlockSpec((3, hsz, hsz), lambda i: (0, 0, 0)),
      bias3=pl.BlockSpec((3, hsz), lambda i: (0, 0)),
      bias=pl.BlockSpec((hsz,), lambda i: (0,)),
  )


def _add_optional(args: list, in_specs: list, sp: dict, mask, rs, rm, zk) -> None:
  """Appends the mask, resets, dropout multiplier and zoneout weight, those given, in
  that order; a scalar zoneout weight goes in as an [H] row."""
  add_flags(args, in_specs, sp["mask"], mask, rs)
  if rm is not None:
    args.append(rm)
    in_specs.append(sp["state"])
  if zk is not None and zk.ndim == 0:
    args.append(jnp.full(sp["bias"].block_shape, zk, jnp.float32))
    in_specs.append(sp["bias"])
  elif zk is not None:
    args.append(zk.astype(jnp.float32))
    in_specs.append(sp["seq"])


def _zoneout_mode(zk) -> str | None:
  """How the kernels read zoneout's weight: "step" ([tile,H] per step), "const", or None."""
  return None if zk is None else ("const" if zk.ndim == 0 else "step")


def _optional_refs(refs: list, k: int, has_mask: bool, has_rs: bool, has_rm: bool,
                   zk_mode: str | None):
  """(flag refs, rm ref, zk ref, index after them) from ``refs[k:]``, as `_add_optional`
  laid them out."""
  flags = refs[k:k + has_mask + has_rs]
  k += has_mask + has_rs
  rm_ref = refs[k] if has_rm else None
  k += has_rm
  zk_ref = refs[k] if zk_mode else None
  return flags, rm_ref, zk_ref, k + bool(zk_mode)


def _step_rows(inputs, has_mask: bool, has_rs: bool, zk_mode: str | None, zk_const):
  """(keep [tile,1] or None, restart [tile] or None, k [tile,H]/[H] or None) from a step's
  loaded rows after its leading ones: mask, resets, per-step zoneout weight."""
  keep = (inputs[0] != 0)[:, None] if has_mask else None
  restart = inputs[has_mask] != 0 if has_rs else None
  k = inputs[has_mask + has_rs] if zk_mode == "step" else zk_const
  return keep, restart, k


def _call(kernel, cfg: Config, batch: int, out_shape, in_specs, out_specs, bt: int):
  return call(kernel, interpret=cfg.interpret, grid=(batch // bt,), out_shape=out_shape,
              in_specs=in_specs, out_specs=out_specs, num_warps=NUM_WARPS,
              num_stages=NUM_STAGES)


# ---------------------------------------------------------------- forward

def _forward_kernel(*refs, cfg: Config, n: int, save: bool, has_mask: bool, has_rs: bool,
                    has_rm: bool, zk_mode: str | None):
  refs = list(refs)
  xp_ref, w_ref, b_ref, bhn_ref, h0_ref = refs[:5]
  flag_refs, rm_ref, zk_ref, k = _optional_refs(refs, 5, has_mask, has_rs, has_rm, zk_mode)
  out_refs = refs[k:]
  ax, seed = cfg.time_axis, cfg.variant == "seed"
  # Loaded once: the recurrent weights stay on chip for all T steps.
  wz, wr, wc = w_ref[0], w_ref[1], w_ref[2]
  bz, br, bc = b_ref[0], b_ref[1], b_ref[2]
  bhn = bhn_ref[...]
  rm = rm_ref[...] if has_rm else None
  zk_const = zk_ref[...] if zk_mode == "const" else None

  time_of = lambda i: n - 1 - i if cfg.reverse else i

  load = gate_loader(xp_ref, flag_refs + ([zk_ref] if zk_mode == "step" else []), ax, time_of)

  def body(i, h_prev, inputs):
    t = time_of(i)
    xz, xr, xc = inputs[:3]
    keep, restart, zk = _step_rows(inputs[3:], has_mask, has_rs, zk_mode, zk_const)
    # The stored state is the one carried in, before a reset (as the XLA loop).
    h = h_prev if restart is None else cell_lib.restart(h_prev, restart)
    hin = h if rm is None else h * rm
    z = jax.nn.sigmoid(xz + bz + _dot(hin, wz))
    r = jax.nn.sigmoid(xr + br + _dot(hin, wr))
    if seed:
      hn = None
      c = jnp.tanh(xc + bc + _dot(r * hin, wc))
    else:
      hn = _dot(hin, wc) + bhn
      c = jnp.tanh(xc + bc + r * hn)
    h_cell = h + z * (c - h)
    if zk is not None:  # zoneout: k·h + (1−k)·h_cell
      h_cell = h_cell + zk * (h - h_cell)
    h_new = h_cell if keep is None else jnp.where(keep, h_cell, h)
    if save:
      parts = (h_prev, z, r, c) + (() if seed else (hn,))
    else:
      parts = (h_cell if keep is None else jnp.where(keep, h_cell, 0.0),)
    for ref, v in zip(out_refs[:-1], parts):
      ref[_at(ax, t)] = v.astype(ref.dtype)
    return h_new

  out_refs[-1][...] = time_loop(n, load, body, h0_ref[...].astype(jnp.float32), prefetch=PREFETCH)


def forward(w_h, b_x, b_hn, xp, h0, mask, rm, *, cfg: Config, save: bool, rs=None, zk=None):
  """Same contract as `gru_jax.kernels.fused_rnn.xla_forward`."""
  ax = cfg.time_axis
  n, batch = (xp.shape[0], xp.shape[1]) if ax == 0 else (xp.shape[1], xp.shape[0])
  hsz = h0.shape[-1]
  bt = _tile(batch, cfg.interpret)
  split = _split(cfg, batch, hsz, rm, w_h.dtype, zk)
  if split:
    return pallas_split.forward(w_h, b_x, b_hn, xp, h0, mask, cfg=cfg, save=save, tile=bt,
                                split=split, num_warps=SPLIT_WARPS, rs=rs)
  sp = _specs(cfg, n, bt, hsz)
  seq_shape = xp.shape[:2] + (hsz,)
  args = [xp.reshape(xp.shape[:2] + (3, hsz)), w_h.reshape(hsz, 3, hsz).transpose(1, 0, 2),
          b_x.reshape(3, hsz), b_hn, h0]
  in_specs = [sp["gates"], sp["weights"], sp["bias3"], sp["bias"], sp["state"]]
  _add_optional(args, in_specs, sp, mask, rs, rm, zk)
  n_seq = (5 if cfg.variant == "reset_after" else 4) if save else 1
  out_shape = [jax.ShapeDtypeStruct(seq_shape, h0.dtype)] * n_seq + [
      jax.ShapeDtypeStruct(h0.shape, h0.dtype)]
  out_specs = [sp["seq"]] * n_seq + [sp["state"]]
  kernel = functools.partial(_forward_kernel, cfg=cfg, n=n, save=save,
                             has_mask=mask is not None, has_rs=rs is not None,
                             has_rm=rm is not None, zk_mode=_zoneout_mode(zk))
  *seqs, h_last = _call(kernel, cfg, batch, out_shape, in_specs, out_specs, bt)(*args)
  if not save:
    return h_last, seqs[0], None
  res = Residuals(*seqs[:4], hn=seqs[4] if len(seqs) == 5 else None)
  return h_last, outputs_from_prev(res.prev, h_last, mask, reverse=cfg.reverse, axis=ax), res


# ---------------------------------------------------------------- backward

def _backward_kernel(*refs, cfg: Config, n: int, has_mask: bool, has_rs: bool, has_rm: bool,
                     zk_mode: str | None):
  refs = list(refs)
  seed = cfg.variant == "seed"
  wt_ref, prev_ref, z_ref, r_ref, c_ref = refs[:5]
  k = 5
  hn_ref = None
  if not seed:
    hn_ref, k = refs[k], k + 1
  g_ref, glast_ref = refs[k], refs[k + 1]
  flag_refs, rm_ref, zk_ref, k = _optional_refs(refs, k + 2, has_mask, has_rs, has_rm, zk_mode)
  dxp_ref, dh0_ref, *extra = refs[k:]
  drm_ref = extra.pop(0) if has_rm else None
  dzk_ref = extra.pop(0) if zk_mode else None
  ax = cfg.time_axis
  # Wᵀ blocks, loaded once: dh_in = Σ_g dã_g·W_gᵀ.
  wzt, wrt, wct = wt_ref[0], wt_ref[1], wt_ref[2]
  rm = rm_ref[...] if has_rm else None
  zk_const = zk_ref[...] if zk_mode == "const" else None

  time_of = lambda i: i if cfg.reverse else n - 1 - i  # opposite to the forward loop
  seq_refs = ([prev_ref, z_ref, r_ref, c_ref, g_ref] + ([] if seed else [hn_ref]) + flag_refs
              + ([zk_ref] if zk_mode == "step" else []))

  load = row_loader(seq_refs, ax, time_of)

  def body(i, carry, inputs):
    dh, drm, dzk = carry
    t = time_of(i)
    hp, z, r, c, g = inputs[:5]
    hn = None if seed else inputs[5]
    # restart: this step started from zero
    keep, restart, zk = _step_rows(inputs[6 - seed:], has_mask, has_rs, zk_mode, zk_const)
    if restart is not None:
      hp = cell_lib.restart(hp, restart)
    hin = hp if rm is None else hp * rm
    d = dh + g
    if keep is not None:
      d = jnp.where(keep, d, 0.0)
    d_all = d
    if zk is not None:  # h_t = k·h_{t-1} + (1−k)·h_cell: the cell's part takes d·(1−k)
      dk = -d * z * (c - hp)
      if zk_mode == "step":
        dzk_ref[_at(ax, t)] = dk.astype(dzk_ref.dtype)
      else:
        dzk = dzk + dk
      d = d * (1 - zk)
    da_c = d * z * (1 - c * c)
    da_z = d * (c - hp) * z * (1 - z)
    if seed:
      dq = _dot(da_c, wct)
      da_r = dq * hin * r * (1 - r)
      dhin = dq * r + _dot(da_z, wzt) + _dot(da_r, wrt)
    else:
      dhn = da_c * r
      da_r = dhn * hn * (1 - r)
      dhin = (_dot(da_z, wzt) + _dot(da_r, wrt)
              + _dot(dhn, wct))
    direct = d * (1 - z)
    if zk is not None:
      direct = direct + d_all * zk
    if keep is not None:
      direct = jnp.where(keep, direct, dh)
    if rm is not None:
      drm = drm + hp * dhin
      dhin = dhin * rm
    for g, v in enumerate((da_z, da_r, da_c)):
      dxp_ref[_at(ax, t, g, slice(None))] = v.astype(dxp_ref.dtype)
    dh = direct + dhin
    return (dh if restart is None else cell_lib.restart(dh, restart)), drm, dzk

  dh = glast_ref[...].astype(jnp.float32)
  zeros = jnp.zeros_like(dh)
  dh, drm, dzk = time_loop(n, load, body, (dh, zeros, zeros), prefetch=PREFETCH)
  dh0_ref[...] = dh
  if has_rm:
    drm_ref[...] = drm
  if zk_mode == "const":
    dzk_ref[...] = dzk


def backward(w_h, b_hn, res: Residuals, mask, rm, g_last, g_hs, scratch, *, cfg: Config,
             rs=None, zk=None):
  """Same contract as `gru_jax.kernels.fused_rnn.xla_backward`."""
  del b_hn, scratch  # hn is stored; the kernel writes a fresh dxp
  ax = cfg.time_axis
  n, batch = (res.z.shape[0], res.z.shape[1]) if ax == 0 else (res.z.shape[1], res.z.shape[0])
  hsz = res.z.shape[-1]
  sd = res.z.dtype
  bt = _tile(batch, cfg.interpret)
  split = _split(cfg, batch, hsz, rm, w_h.dtype, zk)
  if split:
    return pallas_split.backward(w_h, res, mask, g_last, g_hs, cfg=cfg, tile=bt, split=split,
                                 num_warps=SPLIT_WARPS, rs=rs) + (None,)
  sp = _specs(cfg, n, bt, hsz)
  wt = w_h.reshape(hsz, 3, hsz).transpose(1, 2, 0)  # wt[g] = W_gᵀ
  seqs = [res.prev, res.z, res.r, res.c] + ([] if res.hn is None else [res.hn])
  args = [wt] + seqs + [g_hs.astype(sd), g_last.astype(sd)]
  in_specs = [sp["weights"]] + [sp["seq"]] * (len(seqs) + 1) + [sp["state"]]
  _add_optional(args, in_specs, sp, mask, rs, rm, zk)
  gates_shape = res.z.shape[:2] + (3, hsz)
  out_shape = [jax.ShapeDtypeStruct(gates_shape, sd), jax.ShapeDtypeStruct((batch, hsz), sd)]
  out_specs = [sp["gates"], sp["state"]]
  if rm is not None:
    out_shape.append(jax.ShapeDtypeStruct((batch, hsz), sd))
    out_specs.append(sp["state"])
  zk_mode = _zoneout_mode(zk)
  if zk_mode:  # dk per step, or its [B,H] sum over steps for one weight
    out_shape.append(jax.ShapeDtypeStruct(res.z.shape if zk_mode == "step" else (batch, hsz),
                                          sd))
    out_specs.append(sp["seq"] if zk_mode == "step" else sp["state"])
  kernel = functools.partial(_backward_kernel, cfg=cfg, n=n, has_mask=mask is not None,
                             has_rs=rs is not None, has_rm=rm is not None, zk_mode=zk_mode)
  outs = list(_call(kernel, cfg, batch, out_shape, in_specs, out_specs, bt)(*args))
  dxp, dh0 = outs.pop(0).reshape(res.z.shape[:2] + (3 * hsz,)), outs.pop(0)
  drm = outs.pop(0) if rm is not None else None
  dzk = None
  if zk_mode:
    dzk = outs.pop(0)
    dzk = jnp.sum(dzk) if zk_mode == "const" else dzk
  return dh0, dxp, drm, dzk
