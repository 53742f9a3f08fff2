"""The GRU recurrence with a hand-written VJP, shared by the XLA-loop and Pallas paths.

`recurrence` takes the hoisted input projection xp = x·w_x ([T,B,3H] when
``time_axis=0``, [B,T,3H] when ``time_axis=1``, gate blocks z, r, h̃) and
runs only the recurrent work.  Its backward pass

* reuses the gate activations the forward loop stored (z, r, h̃ and, for
  "reset_after", hn = h·W_hn + b_hn), so no matmul is recomputed;
* runs one reverse loop that carries dh and writes the gradient of xp,
  doing one [B,3H]x[3H,H] matmul per step ("reset_after") or two dependent
  ones ("seed", as its equations demand);
* computes dW_h after the loop with large [H,T·B]x[T·B,·] matmuls instead of
  accumulating h_{t-1}ᵀ·dA_t inside it.

Layout choices come from profiling XLA:CPU (docs/benchmarks.md):

* the loops read and write each gate's [B,H] block of xp with a dynamic slice
  at a static column offset; slicing columns out of a per-step [B,3H] slice
  instead compiles to unvectorised code, 5-10x slower;
* the time axis is either layout (``time_axis``), so the loops need no
  transposes of their own; stores into time-major buffers are the faster
  ones, so under AD on CPU `gru_jax.scan` moves [B,T,D] inputs time-major
  before the projection (the undifferentiated loop, one store per step,
  stays batch-major);
* peak temporary memory is kept low (no zero-filled output buffers, the
  backward loop writes into the dead xp), because XLA:CPU mmaps a temporary
  buffer above 32 MiB afresh on every call and pays a page fault per 4 KiB.

The loop bodies are pluggable (``impl``): "xla" here, "pallas" in
`gru_jax.kernels.pallas_gru`.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from gru_jax import cell as cell_lib

Array = jax.Array


class Config(NamedTuple):
  """Static settings that change the compiled program."""
  variant: str
  reverse: bool
  time_axis: int  # 0: arrays are [T,B,.]; 1: [B,T,.]
  impl: str  # "xla" or "pallas"
  unroll: int = 1
  interpret: bool = False  # Pallas interpret mode (CPU)
  # Undifferentiated "xla" calls: "loop" (the fori_loop below) or "scan" (a
  # time-major lax.scan); `default_primal` picks one.
  primal: str = "loop"
  # Differentiated "xla" calls: the forward loop stores its residuals as one
  # [.., 5H] (seed: 4H) slab row per step and the backward loop its dxp row as
  # one store, instead of one store per array (`default_packed`).
  packed: bool = False
  # "pallas": the column-split setting (`pallas_gru.SPLIT`) when the call was
  # traced; the forward and backward kernels both read this one.
  split: int | None = None


# On GPU the forward loop (which writes [B,T,H] buffers) is slower than a scan
# or level with it.  H200 forward medians, loop / scan: 64x1000x128x128 18.1 /
# 7.8 ms, 16x2000x256x256 30.6 / 16.2, 128x500x1024x1024 11.63 / 10.43,
# 256x200x512x512 3.69 / 3.65 (3.37 / 4.07 in an earlier session, not
# reproduced).  On CPU the loop is the faster one.
# Overrides `default_primal` when set ("loop" or "scan"); experiments/benchmark.py uses it.
PRIMAL: str | None = None


def default_primal(platform: str | None = None) -> str:
  """How an undifferentiated "xla" call runs on ``platform``: "loop" or "scan"."""
  if PRIMAL is not None:
    return PRIMAL
  return "scan" if (platform or jax.default_backend()) == "gpu" else "loop"


# Whether differentiated "xla" loops store packed rows (`Config.packed`).
# Compiled for an H100 without one (experiments/gpu_hlo.py, train
# 128x500x1024x1024), a forward + backward step launches 4 + 5 kernels packed
# against 8 + 8 unpacked, but no GPU has timed it yet, so it is off.  On the
# 2-core CPU it is slower (train 64x100x128x128: 56.0 against 46.5 ms;
# 16x500x64x256: 216 against 192), so it stays off there.  True or False
# overrides `default_packed`; experiments/benchmark.py's "/packed" option sets it.
PACKED: bool | None = None


def default_packed(platform: str | None = None) -> bool:
  """Whether differentiated "xla" loops on ``platform`` store packed rows."""
  del platform  # measured nowhere yet: see PACKED
  return bool(PACKED)


class Residuals(NamedTuple):
  """What the backward pass needs, each [T,B,H]/[B,T,H]."""
  prev: Array  # h_{t-1}: the carried state entering each step
  z: Array
  r: Array
  c: Array  # candidate h̃
  hn: Array | None  # "reset_after" only: h·W_hn + b_hn
  # Packed loops: [prev, z, r, c(, hn)] side by side, [T,B,5H]/[B,T,5H] (seed:
  # 4H); the fields above are then its column slices, read after the loops.
  slab: Array | None = None


def packed_residuals(slab: Array, hsz: int) -> Residuals:
  """Residuals whose fields are the column blocks of ``slab``."""
  blocks = [slab[..., k * hsz:(k + 1) * hsz] for k in range(slab.shape[-1] // hsz)]
  return Residuals(*blocks[:4], hn=blocks[4] if len(blocks) == 5 else None, slab=slab)


def take(a: Array, t, axis: int) -> Array:
  """a[t] along the time ``axis``: one [B,H] block."""
  return lax.dynamic_index_in_dim(a, t, axis, keepdims=False)


def put(buf: Array, v: Array, t, axis: int) -> Array:
  return lax.dynamic_update_index_in_dim(buf, v.astype(buf.dtype), t, axis)


def take_gate(xp: Array, t, gate: int, hsz: int, axis: int) -> Array:
  """Gate ``gate``'s [B,H] block of xp at step t, as one dynamic slice."""
  start = [0, 0, gate * hsz]
  start[axis] = t
  size = list(xp.shape[:2]) + [hsz]
  size[axis] = 1
  return lax.squeeze(lax.dynamic_slice(xp, start, size), (axis,))


def put_gate(buf: Array, v: Array, t, gate: int, axis: int) -> Array:
  start = [0, 0, gate * v.shape[-1]]
  start[axis] = t
  return lax.dynamic_update_slice(buf, jnp.expand_dims(v.astype(buf.dtype), axis), start)


# ---------------------------------------------------------------- XLA loops

def xla_forward(w_h, b_x, b_hn, xp, h0, mask, rm, *, cfg: Config, save: bool, rs=None,
                zk=None):
  """The forward loop. Returns (h_last [B,H], hs, Residuals or None).

  With ``save`` the loop writes the state entering each step and the gate
  activations for the backward pass, and ``hs`` is derived from the states;
  without it, only the outputs.  ``rs`` (bool, laid out like ``mask``):
  steps that start from a zero state (`gru_jax.scan.effective_resets`); the
  stored state is the one carried in, before that reset.  ``zk``: zoneout's
  weight of the old state, laid out like xp with H columns, or a scalar
  (`zoneout_at`); the residuals need nothing more for it.
  """
  ax = cfg.time_axis
  n = xp.shape[ax]
  sd = h0.dtype
  hsz = h0.shape[-1]
  shape = xp.shape[:2] + (hsz,)
  # The input bias is added per step inside the gate fusion: added to xp
  # outside, XLA:CPU makes an extra pass and temporary.
  bias = [b_x[i * hsz:(i + 1) * hsz] for i in range(3)]

  w_h = cell_lib.loop_weights(w_h, cfg.variant)
  names = ("prev", "z", "r", "candidate") + (("hn",) if cfg.variant == "reset_after" else ())
  read_back = jax.default_backend() == "cpu"

  def body(i, carry):
    h, bufs = carry
    t = n - 1 - i if cfg.reverse else i
    xz, xr, xc = (take_gate(xp, t, g, hsz, ax) + bias[g] for g in range(3))
    keep = None if mask is None else take(mask, t, ax)[:, None]
    if save and cfg.packed:  # one store of [h, z, r, h̃(, hn)] per step
      h_new, _, g, hn = _step(w_h, b_hn, rm, _reset(h, rs, t, ax), xz, xr, xc, keep,
                              cfg.variant, zk=zoneout_at(zk, t, ax, sd))
      row = jnp.concatenate([h, g.z, g.r, g.candidate] + ([] if hn is None else [hn]), -1)
      return h_new, (put(bufs[0], row, t, ax),)
    if not save:
      h_new, out, _, _ = _step(w_h, b_hn, rm, _reset(h, rs, t, ax), xz, xr, xc, keep,
                               cfg.variant, zk=zoneout_at(zk, t, ax, sd))
      return h_new, (put(bufs[0], out, t, ax),)
    bufs = dict(zip(names, bufs))
    # On CPU each gate is stored as soon as it is computed and read back from
    # its buffer: XLA:CPU then computes it inside the store's fusion, and a
    # step runs 10 kernels instead of 13 (train 64x100x128x128: 20.1 -> 19.6
    # ms).  The barrier on the index keeps XLA from folding the read into the
    # value.  Not measured on GPU, so not done there.
    t_read = lax.optimization_barrier(t) if read_back else None

    def through(name, v):
      bufs[name] = put(bufs[name], v, t, ax)
      return take(bufs[name], t_read, ax) if read_back else v

    through("prev", h)
    h_new, _, _, _ = _step(w_h, b_hn, rm, _reset(h, rs, t, ax), xz, xr, xc, keep, cfg.variant,
                           through, zoneout_at(zk, t, ax, sd))
    return h_new, tuple(bufs[k] for k in names)

  # Every slot is written, so the initial values are never read.
  if save and cfg.packed:
    shapes = [shape[:2] + (len(names) * hsz,)]
  else:
    shapes = [shape] * (len(names) if save else 1)
  if save and cfg.packed and jax.default_backend() == "gpu":
    # Unfilled (XLA's AllocateBuffer, no kernel): a fill is a pass over
    # [T,B,5H], 1.3 GB at train 128x500x1024x1024.  Only with the untimed
    # packed stores: JAX's own scan still avoids AllocateBuffer ("issues").
    bufs = tuple(lax.empty(s, sd) for s in shapes)
  else:
    # Distinct fill values keep XLA:CPU from filling one buffer and copying it
    # to the others (0.35 ms of the 64x100x128x128 CPU train step).
    bufs = tuple(jnp.full(s, i, sd) for i, s in enumerate(shapes))
  init = cell_lib.vary((h0, bufs), cell_lib.vma(w_h, b_x, b_hn, xp, h0, mask, rm, rs, zk))
  h_last, bufs = lax.fori_loop(0, n, body, init, unroll=cfg.unroll)
  if not save:
    return h_last, bufs[0], None
  if cfg.packed:
    res = packed_residuals(bufs[0], hsz)
  else:
    res = Residuals(*bufs[:4], hn=bufs[4] if len(bufs) == 5 else None)
  return h_last, outputs_from_prev(res.prev, h_last, mask, reverse=cfg.reverse, axis=ax), res


def _reset(h: Array, rs, t, axis: int) -> Array:
  """h, zeroed in the rows whose step t starts a new segment (``rs`` None: h)."""
  return h if rs is None else cell_lib.restart(h, take(rs, t, axis))


def zoneout_at(zk, t, axis: int, dtype):
  """Zoneout's weight of the old state at step t: [B,H], the scalar, or None."""
  if zk is None:
    return None
  return (zk if zk.ndim == 0 else take(zk, t, axis)).astype(dtype)


def _step(w_h, b_hn, rm, h, xz, xr, xc, keep, variant, through=None, zk=None):
  """One step from the gate inputs (bias included): (h_new, output, gates, hn).

  ``zk`` (zoneout): h_new = zk⊙h + (1−zk)⊙GRU(h, x), before the mask.
  """
  hin = h if rm is None else h * rm
  g, hn = cell_lib.split_gates(w_h, b_hn, h, xz, xr, xc, variant=variant,
                               h_drop=None if rm is None else hin, through=through)
  h_cell = cell_lib.blend(h, g)
  if zk is not None:
    h_cell = h_cell + zk * (h - h_cell)
  if keep is None:
    return h_cell, h_cell, g, hn
  return jnp.where(keep, h_cell, h), jnp.where(keep, h_cell, jnp.zeros_like(h_cell)), g, hn


def scan_forward(w_h, b_x, b_hn, xp, h0, mask, rm, *, cfg: Config, rs=None, zk=None):
  """The undifferentiated forward as a time-major `lax.scan`: (h_last, hs, None)."""
  ax, hsz = cfg.time_axis, h0.shape[-1]
  xp_tm = xp if ax == 0 else jnp.swapaxes(xp, 0, 1)
  mask_tm, rs_tm = (None if m is None else (m if ax == 0 else m.T) for m in (mask, rs))
  per_step = zk is not None and zk.ndim == 3
  zk_tm = (zk if ax == 0 else jnp.swapaxes(zk, 0, 1)) if per_step else None
  bias = [b_x[i * hsz:(i + 1) * hsz] for i in range(3)]
  w_h = cell_lib.loop_weights(w_h, cfg.variant)

  def body(h, inp):
    xp_t, m_t, r_t, k_t = inp
    h = cell_lib.restart(h, r_t)
    xz, xr, xc = (xp_t[:, i * hsz:(i + 1) * hsz] + bias[i] for i in range(3))
    k_t = zk if zk is not None and not per_step else k_t
    h_new, out, _, _ = _step(w_h, b_hn, rm, h, xz, xr, xc,
                             None if m_t is None else m_t[:, None], cfg.variant,
                             zk=None if k_t is None else k_t.astype(h.dtype))
    return h_new, out

  h_last, hs = lax.scan(body, h0, (xp_tm, mask_tm, rs_tm, zk_tm), reverse=cfg.reverse,
                        unroll=cfg.unroll)
  return h_last, hs if ax == 0 else jnp.swapaxes(hs, 0, 1), None


def xla_backward(w_h, b_hn, res: Residuals, mask, rm, g_last, g_hs, scratch, *, cfg: Config,
                 rs=None, zk=None):
  """The reverse loop. Returns (dh0 [B,H], dxp, drm [B,H] or None, dzk or None).

  Per step, with d the gradient reaching h_t:
    dã_c = d·z·(1−h̃²), dã_z = d·(h̃−h_{t-1})·z·(1−z),
    seed:        dq = dã_c·W_hcᵀ, dã_r = dq·h·r·(1−r), dh += dq·r + [dã_z,dã_r]·W_zrᵀ
    reset_after: dhn = dã_c·r,    dã_r = dhn·hn·(1−r), dh += [dã_z,dã_r,dhn]·W_hᵀ
  and dh += d·(1−z); dxp_t = [dã_z, dã_r, dã_c].  At a masked step d is zero
  and dh passes unchanged; a step that starts from zero (``rs``) passes none.
  Zoneout (``zk`` = k, h_t = k·h_{t-1} + (1−k)·h_cell): the steps above take
  d·(1−k), h_{t-1} also gets d·k directly, and dk = d·(h_{t-1} − h_cell) =
  −d·z·(h̃ − h_{t-1}).  ``scratch`` is a dead array shaped like xp (the
  forward's xp itself) that the loop overwrites, every step in full: a fresh
  zero-filled buffer would be hoisted by XLA's scheduler to before the
  forward loop and raise peak memory.
  """
  ax = cfg.time_axis
  n = res.z.shape[ax]
  sd = res.z.dtype
  hsz = res.z.shape[-1]
  seed = cfg.variant == "seed"
  # Transposed once here, so every step's matmul reads a contiguous operand.
  if seed:
    wt_zr, wt_c = (w.T for w in cell_lib.loop_weights(w_h, cfg.variant))
  else:
    wt = w_h.T

  packed = res.slab is not None
  zk_steps = zk is not None and zk.ndim != 0  # per step: dk written per step; scalar: summed

  def body(i, carry):
    dh, drm, buf, dzk = carry
    t = i if cfg.reverse else n - 1 - i  # opposite to the forward loop
    if packed:  # one [B,5H] (seed: 4H) row read, split in the gate fusion
      row = take(res.slab, t, ax)
      hp, z, r, c, *hn = (row[:, k * hsz:(k + 1) * hsz] for k in range(row.shape[-1] // hsz))
    else:
      hp, z, r, c = (take(a, t, ax) for a in (res.prev, res.z, res.r, res.c))
      hn = [] if seed else [take(res.hn, t, ax)]
    hp = _reset(hp, rs, t, ax)
    hin = hp if rm is None else hp * rm
    d = dh + take(g_hs, t, ax)
    if mask is not None:
      keep = take(mask, t, ax)[:, None]
      d = jnp.where(keep, d, jnp.zeros_like(d))
    d_all = d
    if zk is not None:
      k = zoneout_at(zk, t, ax, sd)
      dk = -d * z * (c - hp)
      dzk = put(dzk, dk, t, ax) if zk_steps else dzk + dk
      d = d * (1 - k)
    da_c = d * z * (1 - c * c)
    da_z = d * (c - hp) * z * (1 - z)
    if seed:
      dq = cell_lib.matmul(da_c, wt_c, sd)
      da_r = dq * hin * r * (1 - r)
      dhin = dq * r + cell_lib.matmul(jnp.concatenate([da_z, da_r], -1), wt_zr, sd)
    else:
      dhn = da_c * r
      da_r = dhn * hn[0] * (1 - r)
      dhin = cell_lib.matmul(jnp.concatenate([da_z, da_r, dhn], -1), wt, sd)
    direct = d * (1 - z)
    if zk is not None:
      direct = direct + d_all * k
    if mask is not None:
      direct = jnp.where(keep, direct, dh)
    if rm is not None:
      drm = drm + hp * dhin
      dhin = dhin * rm
    if packed:
      buf = put(buf, jnp.concatenate([da_z, da_r, da_c], -1), t, ax)
    else:
      for gate, v in enumerate((da_z, da_r, da_c)):
        buf = put_gate(buf, v, t, gate, ax)
    return _reset(direct + dhin, rs, t, ax), drm, buf, dzk

  drm0 = None if rm is None else jnp.zeros_like(rm)
  if zk is None:
    dzk0 = None
  else:  # per step: every slot is written; a scalar's [B,H] sum starts from zero
    rows = res.z.shape[:ax] + res.z.shape[ax + 1:]  # [B,H]
    dzk0 = jnp.zeros(zk.shape if zk_steps else rows, sd)
  init = (g_last.astype(sd), drm0, scratch.astype(sd), dzk0)
  init = cell_lib.vary(init, cell_lib.vma(w_h, b_hn, res, mask, rm, g_last, g_hs, scratch, zk))
  dh0, drm, dxp, dzk = lax.fori_loop(0, n, body, init, unroll=cfg.unroll)
  if zk is not None and not zk_steps:
    dzk = jnp.sum(dzk)
  return dh0, dxp, drm, dzk


# ---------------------------------------------------------------- shared pieces

def outputs_from_prev(prev: Array, h_last: Array, mask, *, reverse: bool, axis: int) -> Array:
  """Outputs from the states entering each step.

  h_t is the state entering the next step in running order (h_last after
  the last), zeroed at masked steps.  The loops store h_{t-1} rather than h_t
  because dW_h needs exactly that array; shifting h_t afterwards fuses the
  shift into the transpose feeding the dW_h matmul, which XLA:CPU compiles
  10x slower than this copy.
  """
  n = prev.shape[axis]
  last = jnp.expand_dims(h_last, axis).astype(prev.dtype)
  if n == 1:
    states = last
  elif reverse:
    states = jnp.concatenate([last, lax.slice_in_dim(prev, 0, n - 1, axis=axis)], axis)
  else:
    states = jnp.concatenate([lax.slice_in_dim(prev, 1, n, axis=axis), last], axis)
  if mask is None:
    return states
  return jnp.where(jnp.expand_dims(mask, -1), states, jnp.zeros_like(states))


def weight_grads(w_h, b_x, b_hn, res: Residuals, rm, dxp, *, cfg: Config, rs=None):
  """(dW_h [H,3H], db_x [3H], db_hn [H]) as large matmuls over all T·B rows.

  dW_h[:, z|r] = h_inᵀ·dã_{z|r}; the candidate block is (r⊙h_in)ᵀ·dã_c for
  "seed" (its matmul input is r⊙h) and h_inᵀ·(r⊙dã_c) for "reset_after"
  (dhn = r⊙dã_c).
  """
  hsz = res.z.shape[-1]
  sd = res.z.dtype
  hin = res.prev
  if rs is not None:  # the state a reset step starts from is zero
    hin = jnp.where(jnp.expand_dims(rs, -1), jnp.zeros_like(hin), hin)
  if rm is not None:
    hin = hin * jnp.expand_dims(rm, cfg.time_axis)
  contract = lambda a, b: jnp.tensordot(a, b, axes=((0, 1), (0, 1)),
                                        preferred_element_type=sd).astype(sd)
  db_x = jnp.sum(dxp, axis=(0, 1))
  dxc = dxp[..., 2 * hsz:]
  if cfg.variant == "reset_after":
    dhn = dxc * res.r
    dw_c = contract(hin, dhn)
    db_hn = jnp.sum(dhn, axis=(0, 1))
  else:
    dw_c = contract(res.r * hin, dxc)
    db_hn = jnp.zeros_like(b_hn)
  dw = jnp.concatenate([contract(hin, dxp[..., :2 * hsz]), dw_c], axis=1)
  return dw.astype(w_h.dtype), db_x.astype(b_x.dtype), db_hn.astype(b_hn.dtype)


def _loops(impl: str):
  if impl == "xla":
    return xla_forward, xla_backward
  if impl == "pallas":
    from gru_jax.kernels import pallas_gru  # imported lazily: Pallas is optional
    return pallas_gru.forward, pallas_gru.backward
  raise ValueError(f"impl must be 'xla' or 'pallas', got {impl!r}")


@functools.lru_cache(maxsize=None)
def _make(cfg: Config):
  forward, backward = _loops(cfg.impl)

  @jax.custom_vjp
  def fn(w_h, b_x, b_hn, xp, h0, mask, rm, rs, zk):
    if cfg.impl == "xla" and cfg.primal == "scan":
      h_last, hs, _ = scan_forward(w_h, b_x, b_hn, xp, h0, mask, rm, cfg=cfg, rs=rs, zk=zk)
    else:
      h_last, hs, _ = forward(w_h, b_x, b_hn, xp, h0, mask, rm, cfg=cfg, save=False, rs=rs,
                              zk=zk)
    return h_last, hs

  def fn_fwd(w_h, b_x, b_hn, xp, h0, mask, rm, rs, zk):
    h_last, hs, res = forward(w_h, b_x, b_hn, xp, h0, mask, rm, cfg=cfg, save=True, rs=rs,
                              zk=zk)
    return (h_last, hs), (w_h, b_x, b_hn, xp, h0, mask, rm, rs, zk, res)

  def fn_bwd(saved, cts):
    w_h, b_x, b_hn, xp, h0, mask, rm, rs, zk, res = saved
    g_last, g_hs = cts
    dh0, dxp, drm, dzk = backward(w_h, b_hn, res, mask, rm, g_last, g_hs, xp, cfg=cfg, rs=rs,
                                  zk=zk)
    dw, db_x, db_hn = weight_grads(w_h, b_x, b_hn, res, rm, dxp, cfg=cfg, rs=rs)
    return (dw, db_x, db_hn, dxp.astype(xp.dtype), dh0.astype(h0.dtype), None,
            None if rm is None else drm.astype(rm.dtype), None,
            None if zk is None else dzk.astype(zk.dtype))

  fn.defvjp(fn_fwd, fn_bwd)
  return fn


def recurrence(w_h: Array, b_x: Array, b_hn: Array, xp: Array, h0: Array,
               mask: Array | None = None, rm: Array | None = None, *, variant: str = "seed",
               reverse: bool = False, time_axis: int = 0, impl: str = "xla", unroll: int = 1,
               interpret: bool = False, primal: str | None = None,
               resets: Array | None = None, packed: bool | None = None,
               zoneout: Array | None = None) -> tuple[Array, Array]:
  """Runs the recurrence over the projected inputs with the hand-written VJP.

  Args:
    w_h: recurrent weights [H,3H] in the matmul (compute) dtype.
    b_x: the bias [3H] added to the input projection (`gru_jax.cell.folded_bias`).
    b_hn: the candidate's recurrent bias [H] ("reset_after"; unused by "seed").
    xp: input projection x·w_x without bias, [T,B,3H] (``time_axis=0``) or
      [B,T,3H] (``time_axis=1``), gate blocks (z, r, h̃), in the state dtype.
    h0: initial state [B,H] (state dtype).
    mask: bool [T,B] / [B,T] or None; a masked step carries h and outputs zero.
    rm: recurrent dropout multiplier [B,H] or None (applied where h enters the gates).
    primal: how an undifferentiated "xla" call runs: "loop" or "scan"; None
      picks by device (`default_primal`: "scan" on GPU, "loop" elsewhere).
    resets: bool, laid out like ``mask``, or None: the steps that start from a
      zero state, in running order (`gru_jax.scan.effective_resets` makes
      them from segment starts).
    packed: whether differentiated "xla" loops store one packed row per step
      (`Config.packed`); None: `default_packed`.  Same results either way.
    zoneout: zoneout's weight of the old state, laid out like xp with H
      columns, or a scalar; None: no zoneout.

  Returns:
    (h_last [B,H], hs [T,B,H] / [B,T,H]).  Differentiable in reverse mode
    (also twice); not forwards (a custom VJP): `gru_jax.gru` runs its "scan"
    backend under forward-mode AD (`gru_jax.scan.under_forward_mode`).
  """
  if primal is None:
    primal = default_primal()
  if primal not in ("loop", "scan"):
    raise ValueError(f"primal must be 'loop' or 'scan', got {primal!r}")
  if packed is None:
    packed = default_packed()
  split = None
  if impl == "pallas":
    from gru_jax.kernels import pallas_gru  # imported lazily: Pallas is optional
    split = pallas_gru.SPLIT
  cfg = Config(variant, bool(reverse), int(time_axis), impl, int(unroll), bool(interpret),
               primal, bool(packed) and impl == "xla", split)
  return _make(cfg)(w_h, b_x, b_hn, xp, h0, mask, rm, resets, zoneout)
