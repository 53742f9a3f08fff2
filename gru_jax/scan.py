"""The GRU run over a whole sequence.

The input projection for every time step is done outside the loop; the loop
does only the recurrent work.  Three implementations of the loop
(``backend``):

* "xla": an XLA loop with a hand-written VJP (`gru_jax.kernels.fused_rnn`):
  stores the gate activations, runs one reverse loop, and computes dW_h with
  large matmuls after it.  Works on every device; the default.  On CPU,
  under AD, it runs time-major and in chunks of time steps, so XLA:CPU
  overlaps one chunk's matmuls with the next chunk's loop (`cpu_chunks`).
* "pallas": the same VJP with the loops as fused Pallas kernels
  (`gru_jax.kernels.pallas_gru`): GPU, or interpret mode on CPU (slow, for tests).
* "scan": a plain `jax.lax.scan` differentiated by JAX.  The only path with
  ``return_gates`` and ``remat_chunk``, and the one
  forward-mode AD (`jax.jvp`, `jax.jacfwd`) runs whatever the backend asked
  for: the other two have custom VJPs, which JAX cannot differentiate forwards.
* "auto": "pallas" on GPU when the kernel applies, else "xla".  With zoneout
  (``zoneout_mask``) "auto" runs "xla": the kernels take zoneout (ask for
  "pallas"), but no GPU has timed them with it yet.

``resets`` (segment starts: RL episodes, packed sequences) run on every
backend; "auto" picks for them as without (`AUTO_PALLAS_RESETS`).
"""
from __future__ import annotations

import functools
import math
import operator

import jax
import jax.numpy as jnp
from jax import lax

from gru_jax import cell as cell_lib
from gru_jax.cell import Gates, GRUParams
from gru_jax.kernels import fused_rnn as rec_lib

Array = jax.Array
BACKENDS = ("auto", "xla", "pallas", "scan")


def _validate(params: GRUParams, xs, h0, mask, input_dropout_mask, recurrent_dropout_mask,
              time_major: bool, variant: str, backend: str, remat_chunk,
              resets=None, zoneout_mask=None) -> tuple[int, int]:
  """Checks user-facing arguments; returns (B, T). Errors name the argument and shapes."""
  cell_lib.check_variant(variant)
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if not isinstance(params, GRUParams):
    raise TypeError(f"params must be a GRUParams, got {type(params).__name__}")
  for name, a in zip(GRUParams._fields, params):
    if jnp.ndim(a) != (2 if name.startswith("w") else 1):
      raise ValueError(f"params.{name} must be {'2-D' if name.startswith('w') else '1-D'} "
                       "(w_x [D,3H], w_h [H,3H], b_x [3H], b_h [3H]), got shape "
                       f"{jnp.shape(a)}")
  d, h3 = params.w_x.shape
  hsz = params.w_h.shape[0]
  if params.w_h.shape != (hsz, 3 * hsz) or h3 != 3 * hsz or params.b_x.shape != (3 * hsz,) \
      or params.b_h.shape != (3 * hsz,):
    raise ValueError("inconsistent GRUParams shapes: expected w_x [D,3H], w_h [H,3H], b_x [3H], "
                     f"b_h [3H], got w_x {params.w_x.shape}, w_h {params.w_h.shape}, "
                     f"b_x {params.b_x.shape}, b_h {params.b_h.shape}")
  layout = "[T,B,D]" if time_major else "[B,T,D]"
  if getattr(xs, "ndim", None) != 3:
    raise ValueError(f"xs must have rank 3 {layout}, got shape {getattr(xs, 'shape', None)}")
  if not jnp.issubdtype(xs.dtype, jnp.floating):
    raise ValueError(f"xs must be floating point, got dtype {xs.dtype} (shape {xs.shape})"
                     + cell_lib.not_float_hint(xs.dtype))
  if xs.shape[-1] != d:
    raise ValueError(f"xs {layout} has feature size D={xs.shape[-1]} (shape {xs.shape}) but "
                     f"params.w_x has shape {params.w_x.shape} (input_size={d})")
  t, b = (xs.shape[0], xs.shape[1]) if time_major else (xs.shape[1], xs.shape[0])
  if h0 is not None and tuple(h0.shape) != (b, hsz):
    raise ValueError(f"h0 must have shape [B,H]=({b}, {hsz}), got {tuple(h0.shape)}")
  for name, m in (("mask", mask), ("resets", resets)):
    want = (t, b) if time_major else (b, t)
    if m is not None and tuple(m.shape) != want:
      raise ValueError(f"{name} must have shape {'[T,B]' if time_major else '[B,T]'}={want} to "
                       f"match xs {tuple(xs.shape)}, got {tuple(m.shape)}")
  if input_dropout_mask is not None and tuple(input_dropout_mask.shape) != (b, d):
    raise ValueError(f"input_dropout_mask must have shape [B,D]=({b}, {d}), "
                     f"got {tuple(input_dropout_mask.shape)}")
  if recurrent_dropout_mask is not None and tuple(recurrent_dropout_mask.shape) != (b, hsz):
    raise ValueError(f"recurrent_dropout_mask must have shape [B,H]=({b}, {hsz}), "
                     f"got {tuple(recurrent_dropout_mask.shape)}")
  if zoneout_mask is not None:
    want = (t, b, hsz) if time_major else (b, t, hsz)
    if zoneout_mask.ndim != 0 and tuple(zoneout_mask.shape) != want:
      raise ValueError(f"zoneout_mask must be a scalar or have shape "
                       f"{'[T,B,H]' if time_major else '[B,T,H]'}={want}, "
                       f"got {tuple(zoneout_mask.shape)}")
    if not jnp.issubdtype(zoneout_mask.dtype, jnp.floating):
      raise ValueError(f"zoneout_mask must be floating point (the weight of the old state, "
                       f"in [0, 1]), got dtype {zoneout_mask.dtype}")
  if remat_chunk is not None:
    # Any int (NumPy's too, as for unroll); not a bool, which would mean chunks of one step.
    try:
      ok = not isinstance(remat_chunk, bool) and operator.index(remat_chunk) >= 1
    except TypeError:
      ok = False
    if not ok:
      raise ValueError(f"remat_chunk must be a positive int or None, got {remat_chunk!r}")
  return b, t


def effective_resets(resets: Array, mask: Array | None, *, reverse: bool,
                     axis: int) -> Array:
  """The valid steps that start from a zero state, in running order.

  ``resets`` (bool, [B,T] with ``axis=1`` or [T,B] with ``axis=0``) marks
  segment starts in time order: resets[t] puts a boundary between steps t-1
  and t (for t = 0, between h0 and the first step).  A valid step starts
  from zero when a boundary lies between it and the valid step run just
  before it, or the start of the run where h0 enters (the sequence's start,
  or its end when ``reverse``).  Masked steps are skipped, so a boundary on
  one takes effect at the next valid step run.  Returns bool in the layout
  of ``resets``; False at masked steps.
  """
  seg = jnp.cumsum(resets.astype(jnp.int32), axis=axis)  # each step's segment number
  valid = jnp.ones(seg.shape, bool) if mask is None else mask
  n = seg.shape[axis]
  if not reverse:
    # The segment of the last valid step before t; 0 (h0's) before the first.
    seen = lax.cummax(jnp.where(valid, seg, 0), axis=axis)
    edge = jnp.zeros_like(lax.slice_in_dim(seg, 0, 1, axis=axis))
    before = jnp.concatenate([edge, lax.slice_in_dim(seen, 0, n - 1, axis=axis)], axis)
    return valid & (seg > before)
  # The segment of the first valid step after t; the last step's (h0's) after the last.
  total = lax.slice_in_dim(seg, n - 1, n, axis=axis)
  seen = lax.cummin(jnp.where(valid, seg, total), axis=axis, reverse=True)
  after = jnp.concatenate([lax.slice_in_dim(seen, 1, n, axis=axis), total], axis)
  return valid & (after > seg)


# Whether "auto" may pick the Pallas kernels when ``resets`` are given.  On an
# H100 (2026-11-28, experiments/gpu_check.py) the kernels' reset path passed the
# checks against "xla" and autodiff and trained 64x1000x128x128 in 5.67 ms against
# 22.3 on "xla".  False keeps resets on "xla".
AUTO_PALLAS_RESETS = True


def resolve_backend(backend: str, *, hidden_size: int, batch: int, compute_dtype,
                    state_dtype, return_gates: bool = False, remat_chunk=None,
                    platform: str | None = None, resets: bool = False,
                    variant: str = "reset_after", recurrent_dropout: bool = False,
                    zoneout: bool = False) -> str:
  """The implementation `gru` will run: "xla", "pallas" or "scan".

  "scan" is forced by ``return_gates`` and ``remat_chunk`` (the fused paths
  store their own residuals and return no gates).  With ``zoneout`` "auto"
  runs "xla" (the kernels with zoneout are untimed on a GPU).
  "pallas" falls back to "xla", without error, where the kernel does not apply (see
  `gru_jax.kernels.pallas_gru.supported`); "auto" picks "pallas" only on GPU,
  and with ``resets`` only if `AUTO_PALLAS_RESETS`.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "scan" or return_gates or remat_chunk is not None:
    return "scan"
  untimed = zoneout or (resets and not AUTO_PALLAS_RESETS)
  if backend == "xla" or (backend == "auto" and untimed):
    return "xla"
  platform = platform or jax.default_backend()
  if backend == "auto" and platform != "gpu":
    return "xla"
  from gru_jax.kernels import pallas_gru  # lazily: Pallas is only needed here
  ok, _ = pallas_gru.supported(hidden_size=hidden_size, batch=batch,
                               compute_dtype=compute_dtype, state_dtype=state_dtype,
                               platform=platform, variant=variant, has_rm=recurrent_dropout,
                               zoneout=zoneout)
  return "pallas" if ok else "xla"


def _project(xs: Array, w: Array, out_dtype) -> Array:
  """The hoisted input projection xs·w, [..,D]x[D,3H].

  On CPU with float32 operands its weight gradient multiplies an explicitly
  transposed xs: XLA:CPU ran xsᵀ·dxp in the transposed-operand form 1.3x slower
  than the plain product of a materialised xsᵀ (2.65 against 2.0 ms for
  [128,6400]x[6400,384], the transpose 0.25 ms), which took the train step
  64x100x128x128 from 23.3-23.7 to 22.3 ms, 16x500x64x256 from 87.5 to 81.3 and
  64x100x512x512 from 244.5 to 234.7 (docs/benchmarks.md).
  """
  if jax.default_backend() != "cpu" or not xs.dtype == w.dtype == jnp.dtype(out_dtype):
    return cell_lib.matmul(xs, w, out_dtype)
  return _project_nn(xs, w)


@jax.custom_vjp
def _project_nn(xs: Array, w: Array) -> Array:
  return jnp.dot(xs, w)


def _project_nn_fwd(xs, w):
  return jnp.dot(xs, w), (xs, w)


def _project_nn_bwd(saved, g):
  xs, w = saved
  # The barrier keeps XLA from folding the transpose back into the dot.
  xs_t = jax.lax.optimization_barrier(xs.reshape(-1, xs.shape[-1]).T)
  return jnp.dot(g, w.T), jnp.dot(xs_t, g.reshape(-1, g.shape[-1]))


_project_nn.defvjp(_project_nn_fwd, _project_nn_bwd)


def _recurrence_scan(project, w_h, b_h, xs_tm, h0, mask_tm, rec_mask, *, variant, reverse,
                     unroll, return_gates, remat_chunk, resets_tm=None, compute_dtype=None,
                     zoneout_tm=None):
  """The plain `lax.scan` loop, differentiated by JAX.

  ``project`` maps inputs [...,D] to input projections [...,3H].  xs_tm
  [T,B,D], h0 [B,H], mask_tm [T,B] or None, resets_tm [T,B] (`effective_resets`)
  or None, zoneout_tm [T,B,H], a scalar or None (the old state's weight)
  -> (h_last, hs [T,B,H], gates).  w_h [H,3H] and b_h [3H] in any
  dtype; the matmuls take w_h in ``compute_dtype`` (default: h0's).
  """
  # JAX sums a loop-invariant's gradient over the steps in the dtype it enters
  # the loop with, so w_h, b_h and the dropout mask enter in float32 (at least)
  # and are cast inside: entering in bf16, dW_h over T=1000 was 18% off.
  acc = jnp.promote_types(h0.dtype, jnp.float32)
  compute_dtype = jnp.dtype(compute_dtype or h0.dtype)
  w_loop = cell_lib.loop_weights(w_h.astype(acc), variant)
  b_h = b_h.astype(acc)
  rec_mask = None if rec_mask is None else rec_mask.astype(acc)
  # A scalar zoneout weight (evaluation) is the same at every step: closed over.
  # Cast once here, not per step.
  per_step_zo = zoneout_tm is not None and zoneout_tm.ndim == 3
  if zoneout_tm is not None:
    zoneout_tm = zoneout_tm.astype(h0.dtype)
  zo_const = None if zoneout_tm is None or per_step_zo else zoneout_tm

  def body(h, inp):
    xp_t, m_t, r_t, zo_t = inp
    h = cell_lib.restart(h, r_t)
    g = cell_lib.recurrent_gates(jax.tree.map(lambda w: w.astype(compute_dtype), w_loop),
                                 b_h.astype(h.dtype), h, xp_t, variant=variant,
                                 h_drop=None if rec_mask is None else
                                 h * rec_mask.astype(h.dtype))
    h_new = cell_lib.blend(h, g)
    zo_t = zo_const if zo_t is None else zo_t
    if zo_t is not None:  # zoneout: k⊙h + (1−k)⊙h_new
      h_new = h_new + zo_t * (h - h_new)
    out = h_new
    if m_t is not None:
      keep = m_t[:, None]
      h_new = jnp.where(keep, h_new, h)
      out = jnp.where(keep, out, jnp.zeros_like(out))
    return h_new, (out, g if return_gates else None)

  if remat_chunk is None:
    h_last, (hs, gs) = jax.lax.scan(
        body, h0, (project(xs_tm), mask_tm, resets_tm, zoneout_tm if per_step_zo else None),
        reverse=reverse, unroll=unroll)
    return h_last, hs, gs

  # Chunked rematerialisation: the backward pass keeps only each chunk's first
  # state and recomputes the chunk, input projection included, so neither the
  # [T,B,3H] projections nor per-step gates are ever stored for all T.
  t, b = xs_tm.shape[:2]
  n_chunks = math.ceil(t / remat_chunk)
  pad = n_chunks * remat_chunk - t
  if mask_tm is None:
    mask_tm = jnp.ones((t, b), bool)
  if pad:  # padded steps are masked out, so they carry the state unchanged
    xs_tm = jnp.concatenate([xs_tm, jnp.zeros((pad,) + xs_tm.shape[1:], xs_tm.dtype)])
    mask_tm = jnp.concatenate([mask_tm, jnp.zeros((pad, b), bool)])
    if resets_tm is not None:
      resets_tm = jnp.concatenate([resets_tm, jnp.zeros((pad, b), bool)])
    if per_step_zo:
      zoneout_tm = jnp.concatenate(
          [zoneout_tm, jnp.zeros((pad,) + zoneout_tm.shape[1:], zoneout_tm.dtype)])
  chunked = lambda a: a.reshape((n_chunks, remat_chunk) + a.shape[1:])

  @jax.checkpoint
  def chunk_body(h, inp):
    x_c, m_c, r_c, z_c = inp
    return jax.lax.scan(body, h, (project(x_c), m_c, r_c, z_c), reverse=reverse,
                        unroll=unroll)

  h_last, (hs, gs) = jax.lax.scan(
      chunk_body, h0, (chunked(xs_tm), chunked(mask_tm),
                       None if resets_tm is None else chunked(resets_tm),
                       chunked(zoneout_tm) if per_step_zo else None), reverse=reverse)
  unchunk = lambda a: a.reshape((n_chunks * remat_chunk,) + a.shape[2:])[:t]
  return h_last, unchunk(hs), jax.tree.map(unchunk, gs)


def _projected(w_x, w_h, b_x, b_hn, xs, h0, mask, rm, rs, zk=None, *, time_major: bool,
               variant: str, reverse: bool, unroll: int, impl: str):
  """The "xla"/"pallas" backends: projection, then `fused_rnn.recurrence`.

  No bias and no transpose of xp: the loops add the bias per step and read xp
  in the layout of xs.
  """
  xp = _project(xs, w_x, h0.dtype)
  return rec_lib.recurrence(
      w_h, b_x, b_hn, xp, h0, mask, rm, variant=variant, reverse=reverse, resets=rs,
      zoneout=zk, time_axis=0 if time_major else 1, impl=impl, unroll=unroll,
      interpret=jax.default_backend() != "gpu")


# On CPU the sequence runs in chunks of consecutive steps, each projected and
# run on its own, with each chunk's projection made to wait for the loop two
# chunks back.  XLA:CPU's thunk executor then runs a chunk's projection on the
# second core while the previous chunk's forward loop runs on the first, and
# in the backward pass a chunk's dx and weight-gradient matmuls while the next
# chunk's backward loop runs; unchunked, each of those waits for its whole loop
# (train 64x100x128x128: 19.8 -> 17.1 ms).  Undifferentiated, chunks keep the
# program's temporaries under the 32 MiB above which XLA:CPU's buffer is mapped
# afresh on every call (docs/benchmarks.md).  Overrides `cpu_chunks` and
# `cpu_forward_chunks` when set.
CPU_CHUNKS: int | None = None


def _forced_chunks(t: int) -> int:
  """`CPU_CHUNKS`, at least 1 and at most one chunk per step."""
  return max(1, min(int(CPU_CHUNKS), t))


def cpu_chunks(t: int) -> int:
  """How many chunks a differentiated CPU call of T steps runs in.

  Follows measurements, not a model (train step B×T×D×H, ms, unchunked ->
  chunked): 64×20×128×128 4.37 -> 4.57 with 2 chunks, so T < 40 runs
  unchunked; 64×50×128×128 10.33 -> 9.58 (5 chunks); 64×100×128×128 19.8 ->
  17.1 (5); 16×500×64×256 74.8 -> 66.1 (5; 10 chunks gave 73-76);
  32×1000×64×128 112.8 -> 102.9 (10).
  """
  if CPU_CHUNKS is not None:
    return _forced_chunks(t)
  if t < 40:
    return 1
  return max(min(5, t // 10), min(10, t // 100))


def cpu_forward_chunks(t: int, xp_bytes: int) -> int:
  """How many chunks an undifferentiated CPU call runs in; xp_bytes: size of x·w_x.

  Unchunked, the temporaries are about the projection x·w_x [B,T,3H]; with k
  chunks about 3/k of it (two chunks' projections are live at once).  Chunks
  are made when the projection passes 24 MiB, enough of them to stay near
  8 MiB each (forward, ms: 64×100×512×512, 37.5 MiB, 70.6-74.0 -> 65.2-65.5
  with 5 chunks; 32×1000×64×128, 46.9 MiB, 38.9-46.8 -> 28.6-30.0 with 5;
  below the threshold 64×50×128×128 3.76 -> 3.91 with 5 and 64×100×128×128
  7.13 -> 7.48, so smaller calls run whole).
  """
  if CPU_CHUNKS is not None:
    return _forced_chunks(t)
  if xp_bytes <= 24 * 2**20:
    return 1
  return max(1, min(-(-xp_bytes // (8 * 2**20)), t // 10))


def _chunked(w_x, w_h, b_x, b_hn, xs, h0, mask, rm, rs, zk=None, *, chunks: int,
             time_major: bool, reverse: bool, **static):
  """`_projected` in ``chunks`` runs of consecutive steps.

  The state is carried from chunk to chunk in running order (last chunk
  first when ``reverse``), so the result is the unchunked one.
  """
  if chunks == 1:
    return _projected(w_x, w_h, b_x, b_hn, xs, h0, mask, rm, rs, zk, time_major=time_major,
                      reverse=reverse, **static)
  ax = 0 if time_major else 1
  cut = lambda a, lo, hi: None if a is None else lax.slice_in_dim(a, lo, hi, axis=ax)
  t = xs.shape[ax]
  edges = [round(i * t / chunks) for i in range(chunks + 1)]
  spans = list(zip(edges[:-1], edges[1:]))
  h, outs, before = h0, {}, None
  for lo, hi in (reversed(spans) if reverse else spans):
    x_c = cut(xs, lo, hi)
    if before is not None:
      x_c = _waits_for(x_c, before)
    before = h
    zk_c = zk if zk is None or zk.ndim == 0 else cut(zk, lo, hi)
    h, outs[lo] = _projected(w_x, w_h, b_x, b_hn, x_c, h, cut(mask, lo, hi), rm,
                             cut(rs, lo, hi), zk_c, time_major=time_major, reverse=reverse,
                             **static)
  return h, jnp.concatenate([outs[lo] for lo, _ in spans], axis=ax)


def _waits_for(x: Array, h: Array) -> Array:
  """x, given a data dependency on h ([B,H]) that does not change its value.

  XLA:CPU's thunk executor orders work only by the buffers it reads and
  writes (an `optimization_barrier` emits no thunk), so the dependency is an
  add of 0·h[0,0], with h made finite first so a NaN in one sequence does not
  reach the others.
  """
  v = lax.stop_gradient(h[:1, :1]).astype(x.dtype)
  return x + 0 * jnp.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)


@functools.lru_cache(maxsize=None)
def _cpu(time_major: bool, chunks: int, forward_chunks: int, **static):
  """The "xla" backend on CPU, in chunks of time steps (`cpu_chunks`, `cpu_forward_chunks`).

  XLA:CPU's loops store [B,H] blocks into time-major buffers faster.  With
  five residuals per step that pays for moving [B,T,D] x in and hs out (train
  64x100x128x128: 21.7 -> 20.2 ms); with one output per step it does not
  (forward 64x100x512x512: 71.8 batch-major, 76.4 time-major), so the primal
  runs in the caller's layout and the forward rule time-major.
  """
  @jax.custom_vjp
  def run(w_x, w_h, b_x, b_hn, xs, h0, mask, rm, rs, zk):
    return _chunked(w_x, w_h, b_x, b_hn, xs, h0, mask, rm, rs, zk, chunks=forward_chunks,
                    time_major=time_major, **static)

  def run_fwd(w_x, w_h, b_x, b_hn, xs, h0, mask, rm, rs, zk):
    mask_tm, rs_tm = (m if time_major or m is None else m.T for m in (mask, rs))
    to_tm = lambda a: a if time_major or a is None or a.ndim == 0 else jnp.swapaxes(a, 0, 1)

    def chunked(w_x, w_h, b_x, b_hn, xs, h0, rm, zk):  # everything but the bool masks
      h_last, hs = _chunked(w_x, w_h, b_x, b_hn, to_tm(xs), h0, mask_tm, rm, rs_tm, to_tm(zk),
                            chunks=chunks, time_major=True, **static)
      return h_last, to_tm(hs)
    return jax.vjp(chunked, w_x, w_h, b_x, b_hn, xs, h0, rm, zk)  # residuals: the VJP

  def run_bwd(vjp, cts):
    *grads, d_rm, d_zk = vjp(cts)
    return (*grads, None, d_rm, None, d_zk)  # None: the bool masks' cotangents

  run.defvjp(run_fwd, run_bwd)
  return run


def ad_traces() -> tuple[str, ...]:
  """The autodiff transformations this call is traced under, innermost first.

  "jvp" for forward mode (`jax.jvp`, `jax.jacfwd`), "linearize" for reverse
  mode (`jax.grad`, `jax.vjp`), seen through `jax.vmap` (batching) traces,
  e.g. ("linearize", "jvp") inside ``jax.jvp(jax.grad(f))``.  The walk stops
  at a function staged on its own (the body of a `jax.jit`, `lax.scan` or
  `jax.checkpoint`): JAX traces such a body once and reuses its program under
  every transformation applied from outside, so its choice of path must not
  depend on them.  Reads JAX internals; on any surprise it answers ().
  """
  try:
    from jax._src import core
    from jax._src.interpreters import ad, batching
    found = []
    trace = core.trace_ctx.trace
    while True:
      if isinstance(trace, ad.JVPTrace):
        found.append("jvp")
      elif isinstance(trace, ad.LinearizeTrace):
        found.append("linearize")
      elif not isinstance(trace, batching.BatchTrace):
        return tuple(found)
      trace = trace.parent_trace
  except Exception:  # pylint: disable=broad-except
    return ()


def under_forward_mode(traces: tuple[str, ...] | None = None) -> bool:
  """Whether this call is differentiated forwards (`jax.jvp`, `jax.jacfwd`; `ad_traces`).

  JAX cannot run a `jax.custom_vjp` function forwards, so the fused backends
  step aside for the plain scan there.  Not seen (see `ad_traces`): a jvp
  applied from outside to a staged function, and the linear function
  `jax.linearize` returns (traced as reverse mode); those need
  ``backend="scan"``, or JAX refuses the custom VJP.  ``traces``: `ad_traces`,
  if the caller has read them already.
  """
  found = ad_traces() if traces is None else traces
  return bool(found) and found[0] == "jvp"


@functools.partial(jax.named_call, name="gru")
def gru(params: GRUParams, xs: Array, h0: Array | None = None, *, mask: Array | None = None,
        reverse: bool = False, time_major: bool = False, variant: str = "seed",
        unroll: int = 1, return_gates: bool = False,
        input_dropout_mask: Array | None = None, recurrent_dropout_mask: Array | None = None,
        compute_dtype=None, remat_chunk: int | None = None, backend: str = "auto",
        resets: Array | None = None, zoneout_mask: Array | None = None):
  """Runs a GRU over a batch of sequences.

  Args:
    params: `GRUParams` with w_x [D,3H], w_h [H,3H], b_x [3H], b_h [3H].
    xs: inputs [B,T,D] ([T,B,D] if ``time_major``), floating point.
    h0: initial state [B,H]; zeros when None.
    mask: bool [B,T] ([T,B] if ``time_major``), any pattern.  At a masked step
      the state is carried unchanged and the output is zero, so ``h_last`` is
      each sequence's state after its last valid step.
    reverse: run from the last step to the first.  With a mask, each
      sequence's valid steps run backwards and outputs stay at their own
      positions, so forward and backward outputs line up.
    time_major: layout of ``xs``, ``mask`` and the returned ``hs``.
    variant: "seed" (reset before the matmul) or "reset_after".
    unroll: `lax.scan` unroll factor.
    return_gates: also return the per-step `Gates`, each [B,T,H] ([T,B,H] if
      ``time_major``), at the steps' own positions (also with ``reverse``).
    input_dropout_mask: [B,D] multiplier applied to x at every step.
    recurrent_dropout_mask: [B,H] multiplier applied to h where it enters the
      gates at every step (variational dropout: "dropout before the gates").
    compute_dtype: dtype of matmul operands (e.g. jnp.bfloat16); the state,
      accumulation and outputs stay in xs's dtype.
    remat_chunk: if set, recompute activations in chunks of this many steps
      in the backward pass (memory O(T/chunk + chunk) instead of O(T)).
    backend: "auto" (default), "xla", "pallas" or "scan"; see the module
      docstring.  Every backend gives the same results; "pallas" and "auto"
      fall back to "xla" where the kernel does not apply, and
      ``return_gates``/``remat_chunk`` always run "scan".
    resets: bool [B,T] ([T,B] if ``time_major``) or None: segment starts in
      time order (episode starts in RL, packed sequences).  resets[b,t] puts a
      boundary before step t, and the state starts from zero after every
      boundary, so each segment is run as a sequence of its own, in either
      direction: forwards the first segment starts from h0 (from zero if
      resets[b,0]); with ``reverse`` the last one does.  A boundary on a
      masked step takes effect at the next valid step run (`effective_resets`).
    zoneout_mask: float [B,T,H] ([T,B,H] if ``time_major``) or a scalar, the
      weight k of the old state (zoneout, Krueger et al. 2016):
      h_t = k⊙h_{t−1} + (1−k)⊙GRU(h_{t−1}, x_t).  Bernoulli(rate) draws in
      training, the rate itself in evaluation.  Runs on every backend;
      "auto" takes "xla" for it (the kernels with zoneout are untimed on a GPU).

  Returns:
    ``(h_last [B,H], hs [B,T,H])``, plus gates when ``return_gates``.

  Inputs typed with Explicit mesh axes (explicit sharding) run each device's
  rows of the batch under `jax.shard_map`; outputs are sharded like xs along B.
  """
  # Lists and NumPy arrays are welcome; the checks below read .shape and .dtype.
  xs, h0, mask, input_dropout_mask, recurrent_dropout_mask, resets, zoneout_mask = (
      None if a is None else jnp.asarray(a)
      for a in (xs, h0, mask, input_dropout_mask, recurrent_dropout_mask, resets,
                zoneout_mask))
  b, t = _validate(params, xs, h0, mask, input_dropout_mask, recurrent_dropout_mask,
                   time_major, variant, backend, remat_chunk, resets, zoneout_mask)
  mesh = cell_lib.explicit_mesh(params, xs, h0, mask, input_dropout_mask,
                                recurrent_dropout_mask, resets, zoneout_mask)
  if mesh is not None:
    return _on_explicit_mesh(mesh, params, xs, h0, mask=mask, reverse=reverse,
                             time_major=time_major, variant=variant, unroll=unroll,
                             return_gates=return_gates, input_dropout_mask=input_dropout_mask,
                             recurrent_dropout_mask=recurrent_dropout_mask,
                             compute_dtype=compute_dtype, remat_chunk=remat_chunk,
                             backend=backend, resets=resets, zoneout_mask=zoneout_mask)
  # Inside `jax.shard_map` (check_vma): every input varies over the axes any one
  # does, so the loops' carries and the custom VJPs' cotangents agree; the
  # transpose of this marking sums an invariant input's gradient over the axes.
  ins = (params, xs, h0, mask, input_dropout_mask, recurrent_dropout_mask, resets, zoneout_mask)
  axes = cell_lib.vma(*ins)
  (params, xs, h0, mask, input_dropout_mask, recurrent_dropout_mask, resets,
   zoneout_mask) = cell_lib.vary(ins, axes)
  unroll = cell_lib.check_unroll(unroll)
  remat_chunk = None if remat_chunk is None else operator.index(remat_chunk)
  state_dtype = xs.dtype
  try:
    compute_dtype = jnp.dtype(compute_dtype or state_dtype)
  except TypeError as e:
    raise ValueError(f"compute_dtype must be a floating-point dtype (e.g. jnp.bfloat16), got "
                     f"{compute_dtype!r}") from e
  if not jnp.issubdtype(compute_dtype, jnp.floating):
    raise ValueError(f"compute_dtype must be a floating-point dtype (e.g. jnp.bfloat16), got "
                     f"{compute_dtype}")
  # Symbolic shapes (`jax.export`): the kernels' tiling and the CPU chunk
  # counts need concrete B and T, so such calls run the unchunked "xla" loops.
  symbolic = not all(isinstance(v, int) for v in (b, t))
  if symbolic and backend in ("auto", "pallas"):
    backend = "xla"
  impl = resolve_backend(backend, hidden_size=params.hidden_size, batch=b,
                         compute_dtype=compute_dtype, state_dtype=state_dtype,
                         return_gates=return_gates, remat_chunk=remat_chunk,
                         resets=resets is not None, variant=variant,
                         recurrent_dropout=recurrent_dropout_mask is not None,
                         zoneout=zoneout_mask is not None)
  traces = ad_traces()
  if (not symbolic and (t == 0 or b == 0)) or (impl != "scan" and under_forward_mode(traces)):
    # T = 0 or B = 0: nothing to fuse (the fused loops need a step and a batch
    # tile).  Forward-mode AD: the fused paths are custom VJPs, which it cannot run.
    impl = "scan"
  elif impl == "pallas" and axes:
    impl = "xla"  # pallas_call's outputs would need their shard_map axes spelled out
  elif impl == "pallas" and len(traces) > 1:
    impl = "xla"  # differentiated twice: the outer AD would differentiate the kernels'
    # pallas_calls, which have no derivatives; the "xla" loops do
  if h0 is None:
    h0 = cell_lib.vary(jnp.zeros((b, params.hidden_size), state_dtype), axes)
  h0 = h0.astype(state_dtype)
  mask = None if mask is None else mask.astype(bool)
  if mask is not None:
    # A masked step's input is never used, but the weight gradient multiplies it
    # by a zero cotangent, so NaN or inf padding would make every gradient NaN.
    xs = jnp.where(mask[..., None], xs, jnp.zeros((), xs.dtype))
  rs = None
  if resets is not None and t > 0:
    rs = effective_resets(resets.astype(bool), mask, reverse=bool(reverse),
                          axis=0 if time_major else 1)
  rec_mask = None if recurrent_dropout_mask is None else recurrent_dropout_mask.astype(state_dtype)
  if impl != "scan":
    if input_dropout_mask is not None:
      xs = xs * (input_dropout_mask[None] if time_major else input_dropout_mask[:, None])
    args = (params.w_x.astype(compute_dtype), params.w_h.astype(compute_dtype),
            cell_lib.folded_bias(params, variant).astype(state_dtype),
            params.b_h[2 * params.hidden_size:].astype(state_dtype), xs, h0, mask, rec_mask, rs,
            None if zoneout_mask is None else zoneout_mask.astype(state_dtype))
    static = dict(variant=variant, reverse=bool(reverse), unroll=unroll, impl=impl)
    if impl == "xla" and jax.default_backend() == "cpu" and not symbolic:
      xp_bytes = b * t * 3 * params.hidden_size * jnp.dtype(state_dtype).itemsize
      return _cpu(bool(time_major), cpu_chunks(t), cpu_forward_chunks(t, xp_bytes),
                  **static)(*args)
    return _projected(*args, time_major=time_major, **static)
  xs_tm = xs if time_major else jnp.swapaxes(xs, 0, 1)  # x is D wide: cheaper than moving xp
  if input_dropout_mask is not None:
    xs_tm = xs_tm * input_dropout_mask[None]
  w_x = params.w_x.astype(compute_dtype)
  bias = cell_lib.folded_bias(params, variant).astype(state_dtype)
  mask_tm, rs_tm = (m if time_major or m is None else m.T for m in (mask, rs))
  zo_tm = zoneout_mask
  if zo_tm is not None and zo_tm.ndim == 3 and not time_major:
    zo_tm = jnp.swapaxes(zo_tm, 0, 1)
  h_last, hs, gs = _recurrence_scan(
      lambda x: cell_lib.matmul(x, w_x, state_dtype) + bias,
      params.w_h, params.b_h, xs_tm, h0, mask_tm, rec_mask, variant=variant, reverse=reverse,
      unroll=unroll, return_gates=return_gates, remat_chunk=remat_chunk, resets_tm=rs_tm,
      compute_dtype=compute_dtype, zoneout_tm=zo_tm)
  if not time_major:
    hs = jnp.swapaxes(hs, 0, 1)
    if gs is not None:
      gs = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), gs)
  if return_gates:
    return h_last, hs, Gates(*gs)
  return h_last, hs


def _on_explicit_mesh(mesh, params: GRUParams, xs: Array, h0: Array | None, **kw):
  """`gru` on inputs typed with Explicit mesh axes: each device runs its rows of
  the batch (`cell.shard_over_batch`); outputs are sharded like xs along B."""
  bt = 1 if kw["time_major"] else 0
  zo = kw.pop("zoneout_mask")
  if zo is not None and zo.ndim == 0:  # one weight for every row: passed to each shard as is
    kw["zoneout_mask"], zo = zo, None
  named = {k: v for k, v in (("xs", xs), ("h0", h0), ("mask", kw.pop("mask")),
                             ("resets", kw.pop("resets")), ("zoneout_mask", zo),
                             ("input_dropout_mask", kw.pop("input_dropout_mask")),
                             ("recurrent_dropout_mask", kw.pop("recurrent_dropout_mask")))
           if v is not None}
  dims = {k: bt if k in ("xs", "mask", "resets", "zoneout_mask") else 0 for k in named}
  in_specs = cell_lib.batch_specs(mesh, xs, bt, (named, params),
                                  (dims, GRUParams(None, None, None, None)))
  gates = kw["return_gates"]
  out_specs = cell_lib.batch_specs(  # h_last [B,H], hs and each gate like xs
      mesh, xs, bt, (2, 3) + ((Gates(3, 3, 3),) if gates else ()),
      (0, bt) + ((Gates(bt, bt, bt),) if gates else ()))

  def per_shard(named, params):
    return tuple(gru(params, named.pop("xs"), named.pop("h0", None), **named, **kw))
  return cell_lib.shard_over_batch(per_shard, mesh, (named, params), in_specs, out_specs)
