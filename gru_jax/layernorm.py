"""Layer-normalised GRU (Ba, Kiros & Hinton 2016) as pure functions.

Each gate block's pre-activation from x and from h is normalised over its H
features on its own, then scaled and shifted::

    a_x = LN(x·w_x; γ_x, β_x) + b_x            (per block z, r, h; hoisted out of the loop)
    a_h = LN(h·w_h[:, zr]; γ_h, β_h) + b_h      (z and r blocks)
    seed:        h̃ = tanh(a_x[h] + LN((r⊙h)·w_h[:, h]) + b_h[h])
    reset_after: h̃ = tanh(a_x[h] + r ⊙ (LN(h·w_h[:, h]) + b_h[h]))

The update is the project's: h' = (1−z)⊙h + z⊙h̃.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gru_jax import cell as cell_lib
from gru_jax import scan as scan_lib
from gru_jax.cell import GRUParams

Array = jax.Array


class LNParams(NamedTuple):
  """Scales and shifts of the normalised pre-activations, each [3H] (blocks z, r, h)."""
  gamma_x: Array
  beta_x: Array
  gamma_h: Array
  beta_h: Array


cell_lib.register_for_export(LNParams)


def init_ln(hidden_size: int, dtype=jnp.float32) -> LNParams:
  one, zero = jnp.ones((3 * hidden_size,), dtype), jnp.zeros((3 * hidden_size,), dtype)
  return LNParams(one, zero, one, zero)


def _ln(a: Array, gamma: Array, beta: Array, nblocks: int, eps: float) -> Array:
  blocks = a.reshape(a.shape[:-1] + (nblocks, a.shape[-1] // nblocks))
  mean = blocks.mean(-1, keepdims=True)
  var = jnp.square(blocks - mean).mean(-1, keepdims=True)
  out = ((blocks - mean) * jax.lax.rsqrt(var + eps)).reshape(a.shape)
  return out * gamma + beta


def ln_gru(params: GRUParams, ln: LNParams, xs: Array, h0: Array | None = None, *,
           mask: Array | None = None, reverse: bool = False, variant: str = "seed",
           eps: float = 1e-5, unroll: int = 1, resets: Array | None = None):
  """Layer-normalised GRU over xs [B,T,D] -> (h_last [B,H], hs [B,T,H]).

  Runs in xs's dtype: the parameters are cast to it, as `gru` casts them.
  ``mask`` [B,T] and ``resets`` [B,T] (segment starts) as in `gru_jax.gru`.
  """
  cell_lib.check_variant(variant)
  xs, h0, mask, resets = (None if a is None else jnp.asarray(a) for a in (xs, h0, mask, resets))
  if not jnp.issubdtype(xs.dtype, jnp.floating):
    raise ValueError(f"xs must be floating point, got {xs.dtype} (shape {xs.shape})"
                     + cell_lib.not_float_hint(xs.dtype))
  if xs.ndim != 3 or xs.shape[-1] != params.input_size:
    raise ValueError(f"xs must be [B,T,D] with D={params.input_size} (w_x {params.w_x.shape}), "
                     f"got shape {xs.shape}")
  b, t = xs.shape[:2]
  hsz = params.hidden_size
  for name, m in (("mask", mask), ("resets", resets)):
    if m is not None and jnp.shape(m) != (b, t):
      raise ValueError(f"{name} must have shape [B,T]=({b}, {t}), got {jnp.shape(m)}")
  if h0 is not None and h0.shape != (b, hsz):
    raise ValueError(f"h0 must have shape [B,H]=({b}, {hsz}), got {h0.shape}")
  for name, v in zip(LNParams._fields, ln):
    if v.shape != (3 * hsz,):
      raise ValueError(f"ln.{name} must have shape [3H]=({3 * hsz},), got {v.shape}")
  mesh = cell_lib.explicit_mesh(params, ln, xs, h0, mask, resets)
  if mesh is not None:  # explicit sharding types: each device runs its rows, as in `gru`
    named = {k: v for k, v in (("xs", xs), ("h0", h0), ("mask", mask), ("resets", resets))
             if v is not None}
    in_specs = cell_lib.batch_specs(mesh, xs, 0, (named, params, ln),
                                    ({k: 0 for k in named}, GRUParams(*[None] * 4),
                                     LNParams(*[None] * 4)))
    out_specs = cell_lib.batch_specs(mesh, xs, 0, (2, 3), (0, 0))

    def per_shard(named, params, ln):
      return ln_gru(params, ln, named.pop("xs"), named.pop("h0", None), **named,
                    reverse=reverse, variant=variant, eps=eps, unroll=unroll)
    return cell_lib.shard_over_batch(per_shard, mesh, (named, params, ln), in_specs, out_specs)
  # Inside `jax.shard_map` (check_vma): the carry varies over the axes any input does.
  axes = cell_lib.vma(params, ln, xs, h0, mask, resets)
  params, ln, xs, h0, mask, resets = cell_lib.vary((params, ln, xs, h0, mask, resets), axes)
  # Run in the inputs' dtype, as `gru` does: weights of another dtype (float32 on bf16
  # inputs) would promote the new state and break the scan's carry type.
  # The loop's invariants enter it in float32 (at least) and are cast inside:
  # JAX sums their gradients over the steps in the dtype they enter with.
  acc = jnp.promote_types(xs.dtype, jnp.float32)
  w_h, b_h, gamma_h, beta_h = (jnp.asarray(a).astype(acc) for a in (params.w_h, params.b_h,
                                                                      ln.gamma_h, ln.beta_h))
  params = GRUParams(*(jnp.asarray(a).astype(xs.dtype) for a in params))
  ln = LNParams(*(jnp.asarray(a).astype(xs.dtype) for a in ln))
  if mask is not None:  # as in `gru`: NaN or inf padding must not reach the gradients
    xs = jnp.where(mask.astype(bool)[..., None], xs, jnp.zeros((), xs.dtype))
  ax = _ln(jnp.einsum("btd,dk->tbk", xs, params.w_x), ln.gamma_x, ln.beta_x, 3, eps) + params.b_x
  h0 = (cell_lib.vary(jnp.zeros((b, hsz), xs.dtype), axes) if h0 is None
        else h0.astype(xs.dtype))  # as `gru` does
  mask_tm = None if mask is None else mask.astype(bool).T
  rs_tm = None
  if resets is not None and t > 0:
    rs_tm = scan_lib.effective_resets(jnp.asarray(resets, bool).T, mask_tm, reverse=reverse,
                                      axis=0)
  # Gate-block slices of the weights and LN parameters, taken once outside the loop.
  invariants = (w_h, b_h, gamma_h, beta_h, w_h[:, :2 * hsz], w_h[:, 2 * hsz:],
                gamma_h[:2 * hsz], gamma_h[2 * hsz:], beta_h[:2 * hsz], beta_h[2 * hsz:])

  def body(h, inp):
    ax_t, m_t, r_t = inp
    w_h, b_h, gamma_h, beta_h, w_zr, w_c, g_zr, g_c, be_zr, be_c = (
        a.astype(xs.dtype) for a in invariants)
    h = cell_lib.restart(h, r_t)
    if variant == "seed":
      ah = _ln(h @ w_zr, g_zr, be_zr, 2, eps)
      ah = ah + b_h[:2 * hsz]
      z = jax.nn.sigmoid(ax_t[:, :hsz] + ah[:, :hsz])
      r = jax.nn.sigmoid(ax_t[:, hsz:2 * hsz] + ah[:, hsz:])
      hc = _ln((r * h) @ w_c, g_c, be_c, 1, eps)
      cand = jnp.tanh(ax_t[:, 2 * hsz:] + hc + b_h[2 * hsz:])
    else:
      ah = _ln(h @ w_h, gamma_h, beta_h, 3, eps) + b_h
      z = jax.nn.sigmoid(ax_t[:, :hsz] + ah[:, :hsz])
      r = jax.nn.sigmoid(ax_t[:, hsz:2 * hsz] + ah[:, hsz:2 * hsz])
      cand = jnp.tanh(ax_t[:, 2 * hsz:] + r * ah[:, 2 * hsz:])
    h_new = cell_lib.blend(h, cell_lib.Gates(z, r, cand))
    out = h_new
    if m_t is not None:
      h_new = jnp.where(m_t[:, None], h_new, h)
      out = jnp.where(m_t[:, None], out, 0)
    return h_new, out

  h_last, hs = jax.lax.scan(body, h0, (ax, mask_tm, rs_tm), reverse=reverse,
                            unroll=cell_lib.check_unroll(unroll))
  return h_last, jnp.swapaxes(hs, 0, 1)
