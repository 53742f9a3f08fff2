"""Pieces shared by the Pallas GRU kernels (`pallas_gru`, `pallas_split`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def at(ax: int, t, *rest):
  """Index (t along the time axis ``ax``, all batch rows of the tile, *rest)."""
  return ((t, slice(None)) if ax == 0 else (slice(None), t)) + rest


def gate_loader(xp_ref, flag_refs, ax: int, time_of):
  """load(i) for a forward kernel: step time_of(i)'s three [tile,H] gate inputs, then
  its [tile] row of each of ``flag_refs`` (mask, resets: those given)."""
  def load(i):
    t = time_of(i)
    xs = tuple(xp_ref[at(ax, t, g, slice(None))] for g in range(3))
    return xs + tuple(ref[at(ax, t)] for ref in flag_refs)
  return load


def add_flags(args: list, in_specs: list, spec, *flags) -> None:
  """Appends each of ``flags`` (mask, resets) that is given, as int32: Triton loads no bools."""
  for f in flags:
    if f is not None:
      args.append(f.astype(jnp.int32))
      in_specs.append(spec)


def row_loader(refs, ax: int, time_of):
  """load(i) for a backward kernel: each ref's [tile,.] block at step time_of(i)."""
  def load(i):
    idx = at(ax, time_of(i))
    return tuple(ref[idx] for ref in refs)
  return load


def dot(a: jax.Array, w: jax.Array) -> jax.Array:
  """a·w with a cast to w's dtype, float32 accumulation and result."""
  return jnp.dot(a.astype(w.dtype), w, preferred_element_type=jnp.float32)


def call(kernel, *, interpret: bool, grid, out_shape, in_specs, out_specs, num_warps: int,
         num_stages: int, aliases=None):
  """`pl.pallas_call` with Triton's compiler parameters when compiled (not interpreted)."""
  kw = {}
  if not interpret:
    from jax.experimental.pallas import triton as plgpu
    kw["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs,
                        out_specs=out_specs, input_output_aliases=aliases or {},
                        interpret=interpret, **kw)


def time_loop(n: int, load, step, init, *, prefetch: bool, start: int = 0):
  """fori_loop over start <= i < n of ``step(i, carry, load(i))``, optionally software-pipelined.

  With ``prefetch`` the loads for i+1 are issued at the top of iteration i
  (clamped at the end) and carried, so their memory latency overlaps step i
  instead of stalling step i+1.
  """
  if not prefetch:
    return jax.lax.fori_loop(start, n, lambda i, c: step(i, c, load(i)), init)

  def body(i, c):
    carry, cur = c
    nxt = load(jnp.minimum(i + 1, n - 1))
    return step(i, carry, cur), nxt
  return jax.lax.fori_loop(start, n, body, (init, load(min(start, n - 1))))[0]
