"""The GRU cell as pure functions on a `GRUParams` pytree.

Two variants share one parameter layout and one update-gate convention
(z weights the candidate, as in the founding document):

* ``"seed"`` -- the founding document's equations, reset before the matmul::

      z  = σ(x·w_x[:,z] + h·w_h[:,z] + b_z)
      r  = σ(x·w_x[:,r] + h·w_h[:,r] + b_r)
      h̃  = tanh(x·w_x[:,h] + (r⊙h)·w_h[:,h] + b_h)
      h' = (1−z)⊙h + z⊙h̃                      with b = b_x + b_h

* ``"reset_after"`` -- the cuDNN / PyTorch / Keras-default form::

      h̃  = tanh(x·w_x[:,h] + b_x[h] + r⊙(h·w_h[:,h] + b_h[h]))

Gate blocks are ordered (z, r, h) along the 3H axis.  Nothing here knows
about Flax or training.
"""
from __future__ import annotations

import operator
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
VARIANTS = ("seed", "reset_after")


class GRUParams(NamedTuple):
  """GRU weights. Shapes: w_x [D,3H], w_h [H,3H], b_x [3H], b_h [3H]."""
  w_x: Array
  w_h: Array
  b_x: Array
  b_h: Array

  @property
  def input_size(self) -> int:
    return self.w_x.shape[0]

  @property
  def hidden_size(self) -> int:
    return self.w_h.shape[0]


def register_for_export(cls: type) -> type:
  """Lets `jax.export` serialise calls whose arguments or results hold ``cls``."""
  try:
    jax.export.register_namedtuple_serialization(cls, serialized_name=f"gru_jax.{cls.__name__}")
  except (AttributeError, ValueError):  # an older JAX, or registered already (a reload)
    pass
  return cls


register_for_export(GRUParams)


class Gates(NamedTuple):
  """Per-step gate activations, each [..., H]."""
  z: Array
  r: Array
  candidate: Array


register_for_export(Gates)


def check_variant(variant: str) -> None:
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def check_int(name: str, value, low: int | None = None, high: int | None = None,
              high_name: str = "") -> int:
  """``value`` (a Python, NumPy or scalar JAX int; not a bool) as an int in [low, high),
  else a ValueError naming ``name``."""
  try:
    v = None if isinstance(value, bool) else operator.index(value)
  except TypeError:
    v = None
  if v is None or (low is not None and v < low) or (high is not None and v >= high):
    want = (f" in [{low}, {high_name}={high})" if high is not None
            else f" >= {low}" if low is not None else "")
    raise ValueError(f"{name} must be an int{want}, got {value!r}")
  return v


def check_unroll(unroll) -> int:
  # lax.scan reads a bool as "all or nothing"; the fused paths read an int, so take only ints.
  return check_int("unroll", unroll, 1)


def vma(*trees) -> frozenset:
  """The `jax.shard_map` mesh axes any array in ``trees`` varies over; empty outside one."""
  axes = set()
  for leaf in jax.tree.leaves(trees):
    aval = jax.typeof(leaf)
    mat = getattr(aval, "mat", None)  # JAX >= 0.10: aval.mat.varying; before: aval.vma
    axes |= set(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())
  return frozenset(axes)


def vary(tree, axes: frozenset):
  """Each array in ``tree`` marked as varying over ``axes`` (values unchanged).

  Under `jax.shard_map` with ``check_vma``, a loop's carry must vary over the
  same axes on entry as on exit, and arrays made inside (zeros, buffers) vary
  over none; the recurrences mark theirs like their inputs.
  """
  if not axes:
    return tree

  def one(a):
    missing = tuple(sorted(axes - vma(a)))
    if not missing:
      return a
    if hasattr(jax.lax, "pcast"):  # JAX >= 0.9; pvary before
      return jax.lax.pcast(a, missing, to="varying")
    return jax.lax.pvary(a, missing)
  return jax.tree.map(one, tree)


def explicit_mesh(*trees):
  """The mesh of the first array in ``trees`` typed with Explicit mesh axes
  (JAX's explicit sharding, the default of `jax.make_mesh` from JAX 0.9); None if none is."""
  for leaf in jax.tree.leaves(trees):
    mesh = getattr(getattr(jax.typeof(leaf), "sharding", None), "mesh", None)
    if getattr(mesh, "explicit_axes", ()):
      return mesh
  return None


def batch_specs(mesh, xs: Array, batch_axis: int, tree, batch_dims):
  """PartitionSpecs for ``tree`` (arrays, or ints giving a rank) on ``mesh``: each
  array's dimension ``batch_dims`` (a matching tree of ints, or None for
  replicated) sharded as xs's ``batch_axis`` is, every other dimension replicated."""
  from jax.sharding import PartitionSpec
  spec = tuple(jax.typeof(xs).sharding.spec)
  entry = spec[batch_axis] if batch_axis < len(spec) else None

  def one(a, dim):
    parts = [None] * (a if isinstance(a, int) else jnp.ndim(a))
    if dim is not None:
      parts[dim] = entry
    return PartitionSpec(*parts)
  return jax.tree.map(one, tree, batch_dims, is_leaf=lambda d: d is None)


def shard_over_batch(fn: Callable, mesh, args: tuple, in_specs: tuple, out_specs):
  """``fn(*args)`` run per batch shard under `jax.shard_map` on ``mesh``.

  For inputs typed with Explicit mesh axes: a recurrence's carry and buffers
  are made without the inputs' sharding types, which the loops refuse, while
  inside `jax.shard_map` every shard is a plain local array.  Rows of a batch
  are independent, so the result is the unsharded computation's.  Each input
  is first resharded to its spec (batch dimension kept, the rest replicated).
  """
  from jax.sharding import NamedSharding
  args = jax.tree.map(lambda a, sp: jax.sharding.reshard(a, NamedSharding(mesh, sp)),
                      args, in_specs)
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(*args)


def _blockwise(init_fn: Callable, key: Array, rows: int, hidden: int, dtype) -> Array:
  """Initialises each of the three [rows,H] gate blocks on its own.

  Glorot and orthogonal initialisers are defined per matrix; applying them
  to the fused [rows,3H] matrix would give the wrong fan-out and break
  orthogonality of the recurrent blocks.
  """
  keys = jax.random.split(key, 3)
  draw = _draw_dtype(dtype)
  return jnp.concatenate([init_fn(k, (rows, hidden), draw) for k in keys], axis=1).astype(dtype)


def _draw_dtype(dtype):
  """float32 for narrower floats: the orthogonal initialiser's QR has no bf16/f16 kernel."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
    return jnp.dtype(jnp.float32)
  return dtype


def init(key: Array, input_size: int, hidden_size: int, *, variant: str = "seed",
         dtype=jnp.float32,
         kernel_init: Callable = jax.nn.initializers.glorot_uniform(),
         recurrent_init: Callable = jax.nn.initializers.orthogonal(),
         bias_init: Callable = jax.nn.initializers.zeros) -> GRUParams:
  """Initialises GRU parameters with the founding document's advice.

  Xavier/Glorot-uniform input weights and orthogonal recurrent weights, each
  per gate block; zero biases.  ``variant`` is accepted for symmetry with
  `step` (both variants use the same layout).  bf16 and float16 weights are
  drawn in float32 and rounded.
  """
  check_variant(variant)
  if input_size < 1 or hidden_size < 1:
    raise ValueError(f"input_size and hidden_size must be >= 1, got {input_size}, {hidden_size}")
  kx, kh, kbx, kbh = jax.random.split(key, 4)
  return GRUParams(
      w_x=_blockwise(kernel_init, kx, input_size, hidden_size, dtype),
      w_h=_blockwise(recurrent_init, kh, hidden_size, hidden_size, dtype),
      b_x=bias_init(kbx, (3 * hidden_size,), _draw_dtype(dtype)).astype(dtype),
      b_h=bias_init(kbh, (3 * hidden_size,), _draw_dtype(dtype)).astype(dtype),
  )


def input_projection(params: GRUParams, x: Array, *, variant: str = "seed") -> Array:
  """x·w_x plus every bias that does not sit behind the reset gate. [...,D] -> [...,3H].

  For "seed" all of b_h folds in here; for "reset_after" the candidate's
  b_h block stays inside the reset product, so only its z and r blocks do.
  """
  return jnp.dot(x, params.w_x.astype(x.dtype)) + folded_bias(params, variant).astype(x.dtype)


def folded_bias(params: GRUParams, variant: str) -> Array:
  """The bias [3H] added to x·w_x: b_x + b_h, less b_h's candidate block for "reset_after"."""
  if variant == "seed":
    return params.b_x + params.b_h
  return params.b_x + jnp.asarray(params.b_h).at[2 * params.hidden_size:].set(0)


def recurrent_gates(w_h: Array | tuple[Array, Array], b_h: Array, h: Array, xp: Array, *,
                    variant: str, h_drop: Array | None = None) -> Gates:
  """Gates from the hoisted input projection ``xp`` [B,3H] and state h [B,H].

  ``w_h`` is [H,3H], or inside a loop the pair `loop_weights` makes for "seed".

  ``h_drop`` is h with recurrent dropout applied: it feeds the matmuls,
  while the undropped h is what the update blends (variational dropout).
  Matmuls run in ``w_h``'s dtype (bf16 compute) and accumulate in h's dtype.
  """
  hsz = h.shape[-1]
  g, _ = split_gates(w_h, b_h[2 * hsz:], h, xp[..., :hsz], xp[..., hsz:2 * hsz],
                     xp[..., 2 * hsz:], variant=variant, h_drop=h_drop)
  return g


def loop_weights(w_h: Array, variant: str) -> Array | tuple[Array, Array]:
  """w_h [H,3H] as `split_gates` takes it inside a loop: split for "seed".

  "seed" multiplies by w_h[:, :2H] and w_h[:, 2H:] separately; sliced inside a
  loop body, XLA:CPU copies both slices (768 KB at H=256) every step (forward
  16x500x64x256 took 49.7 ms; in a profile the copies were 14.7 ms of it; split
  outside, 26.2 ms), so loops split it once and pass the pair.
  """
  if variant != "seed":
    return w_h
  hsz = w_h.shape[0]
  return w_h[:, :2 * hsz], w_h[:, 2 * hsz:]


def split_gates(w_h: Array | tuple[Array, Array], b_hn: Array, h: Array, xz: Array, xr: Array,
                xc: Array, *, variant: str, h_drop: Array | None = None,
                through: Callable[[str, Array], Array] | None = None
                ) -> tuple[Gates, Array | None]:
  """`recurrent_gates` with the projection given per gate: xz, xr, xc each [B,H].

  ``w_h`` is [H,3H], or for "seed" the pair `loop_weights` makes.  ``b_hn``
  [H] is the candidate's recurrent bias (used by "reset_after" only).
  Returns the gates and, for "reset_after", hn = h·W_hn + b_hn (None for
  "seed"), which the hand-written backward pass reuses.  Loops pass whole
  per-gate blocks: on XLA:CPU, slicing columns of a per-step slice of the
  projection inside the gate fusion defeats vectorisation.  ``through(name,
  v)``, if given, is applied to each of "z", "r", "hn", "candidate" as it is
  computed, and what it returns is used from then on (a loop stores each
  gate and continues from the stored copy).
  """
  through = through or (lambda _, v: v)
  hsz = h.shape[-1]
  hin = h if h_drop is None else h_drop
  if variant == "seed":
    w_zr, w_c = w_h if isinstance(w_h, tuple) else loop_weights(w_h, variant)
    # Two dependent matmuls: the candidate's input r⊙h needs r first.
    hzr = matmul(hin, w_zr, h.dtype)
    z = through("z", jax.nn.sigmoid(xz + hzr[..., :hsz]))
    r = through("r", jax.nn.sigmoid(xr + hzr[..., hsz:]))
    cand = through("candidate", jnp.tanh(xc + matmul(r * hin, w_c, h.dtype)))
    return Gates(z, r, cand), None
  hh = matmul(hin, w_h, h.dtype)
  z = through("z", jax.nn.sigmoid(xz + hh[..., :hsz]))
  r = through("r", jax.nn.sigmoid(xr + hh[..., hsz:2 * hsz]))
  hn = through("hn", hh[..., 2 * hsz:] + b_hn.astype(h.dtype))
  cand = through("candidate", jnp.tanh(xc + r * hn))
  return Gates(z, r, cand), hn


def matmul(a: Array, w: Array, out_dtype) -> Array:
  """a·w with operands in w's dtype and the result, accumulated, in ``out_dtype``.

  bf16 operands with a float32 result accumulate in float32 on every
  backend; on XLA:CPU this is also 2-4x faster than a bf16 result cast after.
  """
  a = a.astype(w.dtype)
  if w.dtype == out_dtype:
    return jnp.dot(a, w)
  return jnp.dot(a, w, preferred_element_type=out_dtype)


def restart(h: Array, flags: Array | None) -> Array:
  """h [B,H] zeroed in the rows whose flag [B] is set (a segment starts there); None: h."""
  return h if flags is None else jnp.where(flags[:, None], jnp.zeros_like(h), h)


def blend(h: Array, g: Gates) -> Array:
  """h' = (1−z)⊙h + z⊙h̃, written with one multiply."""
  return h + g.z * (g.candidate - h)


def not_float_hint(dtype) -> str:
  """What to do about a non-floating input dtype, for error messages."""
  if jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_):
    return "; embed integer tokens first"
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return "; the GRU is real-valued: pass real and imaginary parts as features"
  return ""


def _check_step_args(params: GRUParams, h: Array, x: Array) -> None:
  # The projection runs in x's dtype and the recurrent matmul accumulates in h's,
  # so an integer x or h would truncate the weights (or the sums) to integers.
  for name, a in (("x", x), ("h", h)):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got dtype {a.dtype} (shape {a.shape})"
                       + (not_float_hint(a.dtype) if name == "x" else ""))
  if x.shape[-1] != params.input_size:
    raise ValueError(f"x has feature size {x.shape[-1]} (shape {x.shape}) but params expect "
                     f"input_size={params.input_size} (w_x {params.w_x.shape})")
  if h.shape[-1] != params.hidden_size:
    raise ValueError(f"h has size {h.shape[-1]} (shape {h.shape}) but params expect "
                     f"hidden_size={params.hidden_size} (w_h {params.w_h.shape})")
  if h.shape[:-1] != x.shape[:-1]:
    raise ValueError(f"h {h.shape} and x {x.shape} must share leading (batch) dims")


def gates(params: GRUParams, h: Array, x: Array, *, variant: str = "seed",
          recurrent_dropout_mask: Array | None = None) -> Gates:
  """Update gate z, reset gate r and candidate h̃ for one step. h [...,H], x [...,D].

  ``recurrent_dropout_mask`` [...,H] (or anything that broadcasts to h) multiplies
  h where it enters the matmuls, as `gru_jax.gru`'s does; the blend uses h itself.
  """
  check_variant(variant)
  _check_step_args(params, h, x)
  h_drop = None
  if recurrent_dropout_mask is not None:
    rm = jnp.asarray(recurrent_dropout_mask)
    try:
      fits = jnp.broadcast_shapes(rm.shape, h.shape) == h.shape
    except ValueError:
      fits = False
    if not fits:
      raise ValueError(f"recurrent_dropout_mask {rm.shape} must broadcast to h {h.shape}")
    h_drop = h * rm.astype(h.dtype)
  xp = input_projection(params, x, variant=variant)
  return recurrent_gates(params.w_h, params.b_h, h, xp, variant=variant, h_drop=h_drop)


def step(params: GRUParams, h: Array, x: Array, *, variant: str = "seed",
         recurrent_dropout_mask: Array | None = None) -> Array:
  """One GRU step. h [...,H], x [...,D] -> h' [...,H] (``recurrent_dropout_mask``: see `gates`)."""
  return blend(h, gates(params, h, x, variant=variant,
                        recurrent_dropout_mask=recurrent_dropout_mask))
