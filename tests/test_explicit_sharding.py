"""`gru`, `ln_gru` and the layers on inputs typed with Explicit mesh axes (JAX's explicit
sharding, `jax.make_mesh`'s default from JAX 0.9), and `ln_gru` inside `jax.shard_map`.

Under explicit sharding the loops' carries and buffers (made without the inputs'
sharding types) were refused by `lax.scan` and `dynamic_update_slice`; now each
device runs its rows of the batch.  The multi-device checks run in a subprocess
with 4 CPU devices (a 2×2 mesh); references: the float64 NumPy GRU
(tests/reference.py), and the same calls on unsharded arrays for gradients.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gru_jax import cell, layernorm
from tests import reference
from tests.e2e_util import JAX_CACHE_ENV, ROOT


def _close(got, want, tol=2e-5):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol)


def _problem(b=4, t=5, d=6, h=4, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  p = cell.init(ks[0], d, h, bias_init=jax.nn.initializers.normal(0.5))
  xs = jax.random.normal(ks[1], (b, t, d))
  h0 = jax.random.normal(ks[2], (b, h))
  mask = jnp.arange(t)[None] < jnp.array([t, 3, 1, 4][:b])[:, None]
  resets = jnp.zeros((b, t), bool).at[0, 2].set(True)
  return p, xs, h0, mask, resets


def test_ln_gru_inside_shard_map_with_vma_checks():
  """Its zero h0 did not vary over the mesh axes like the step's output (check_vma)."""
  from jax.sharding import PartitionSpec as P
  mesh = jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  p, xs, h0, mask, resets = _problem()
  ln = layernorm.init_ln(4)
  ln = layernorm.LNParams(*(a + 0.1 * jnp.arange(a.shape[0]) for a in ln))
  run = lambda p, xs, mask: layernorm.ln_gru(p, ln, xs, mask=mask, resets=resets)
  sharded = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P(), P("d"), P("d")),
                                  out_specs=P("d")))
  _close(sharded(p, xs, mask), run(p, xs, mask), 1e-6)
  loss = lambda f: lambda p: jnp.sum(f(p, xs, mask)[1] ** 2)
  _close(jax.jit(jax.grad(loss(sharded)))(p), jax.grad(loss(run))(p), 1e-5)


def _explicit_checks():
  """Runs in the subprocess (4 CPU devices); raises on the first disagreement."""
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

  import gru_jax
  from gru_jax import layers, models
  mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
  p, xs, h0, mask, resets = _problem()
  # Inputs sharded along B over "data" and along D over "model"; w_x's rows along "model".
  sp = cell.GRUParams(put(p.w_x, "model", None), p.w_h, p.b_x, p.b_h)
  sxs, sh0, smask, sresets = (put(xs, "data", None, "model"), put(h0, "data"),
                              put(mask, "data"), put(resets, "data"))
  # Every backend, both variants, forwards and backwards, time-major too.
  for backend in ("auto", "xla", "scan", "pallas"):
    for variant, reverse, time_major in (("seed", False, False), ("reset_after", True, True)):
      def run(p, xs, h0, mask, resets):
        tm = (lambda a: jnp.swapaxes(a, 0, 1)) if time_major else (lambda a: a)
        h_last, hs = gru_jax.gru(p, tm(xs), h0, mask=tm(mask), resets=tm(resets),
                                 reverse=reverse, variant=variant, time_major=time_major,
                                 backend=backend)
        return h_last, tm(hs)
      with jax.set_mesh(mesh):
        h_last, hs = jax.jit(run)(sp, sxs, sh0, smask, sresets)
        assert jax.typeof(hs).sharding.spec[0] == "data", jax.typeof(hs)
        loss = lambda f: lambda *a: jnp.sum(f(*a)[1] ** 2) + jnp.sum(f(*a)[0] ** 3)
        grads = jax.jit(jax.grad(loss(run), argnums=(0, 1, 2)))(sp, sxs, sh0, smask, sresets)
      want_last, want_hs = reference.run_segments(p, xs, np.asarray(h0), mask=np.asarray(mask),
                                                  resets=np.asarray(resets), reverse=reverse,
                                                  variant=variant)
      _close((h_last, hs), (want_last, want_hs))
      _close(grads, jax.grad(loss(run), argnums=(0, 1, 2))(p, xs, h0, mask, resets), 1e-4)
      print("gru", backend, variant, "ok", flush=True)
  with jax.set_mesh(mesh):  # eagerly, with gates
    got = gru_jax.gru(sp, sxs, sh0, mask=smask, return_gates=True)
  _close(got, gru_jax.gru(p, xs, h0, mask=mask, return_gates=True), 1e-5)
  _close(got[:2], reference.run(p, xs, np.asarray(h0), mask=np.asarray(mask)))
  assert jax.typeof(got[2].z).sharding.spec[0] == "data"
  k = jax.random.bernoulli(jax.random.key(7), 0.4, (4, 5, 4)).astype(jnp.float32)
  for zo, plain in ((put(k, "data"), k), (0.3, 0.3)):  # zoneout: per step and unit, or one
    with jax.set_mesh(mesh):
      got = jax.jit(lambda p, xs: gru_jax.gru(p, xs, sh0, mask=smask, zoneout_mask=zo))(sp, sxs)
    _close(got, gru_jax.gru(p, xs, h0, mask=mask, zoneout_mask=plain), 1e-5)
  print("zoneout ok", flush=True)

  # The layer-normalised GRU, and layers and a model: a train step's loss and gradients.
  ln = layernorm.LNParams(*(a + 0.1 * jnp.arange(a.shape[0]) for a in layernorm.init_ln(4)))
  with jax.set_mesh(mesh):
    got = jax.jit(lambda p, xs: layernorm.ln_gru(p, ln, xs, sh0, mask=smask))(sp, sxs)
  _close(got, layernorm.ln_gru(p, ln, xs, h0, mask=mask), 1e-5)
  print("ln_gru ok", flush=True)
  cases = {
      "GRU(layer_norm)": layers.GRU(4, layer_norm=True),
      "GRU(dropout)": layers.GRU(4, dropout=0.2, recurrent_dropout=0.2),
      "GRU(zoneout)": layers.GRU(4, zoneout=0.3),
      "StackedGRU(bidirectional)": layers.StackedGRU((4, 3), bidirectional=True,
                                                     dropout_between=0.2, return_state=True),
      "SequenceModel": models.SequenceModel("classification", 3, hidden_sizes=(4, 4)),
  }
  for name, module in cases.items():
    v = module.init(jax.random.key(0), xs, mask)
    # JAX 0.8 itself refuses the gradient of a Dense head's kernel here (both operands of
    # x^T g sharded along the contracted batch: "Contracting dimensions are sharded").
    head = isinstance(module, models.SequenceModel)
    grads = not head or jax.__version_info__ >= (0, 9)

    def step(v, xs, mask, module=module, head=head, grads=grads):
      def loss(v):
        kw = dict(train=True, mutable=["batch_stats"]) if head else dict(deterministic=False)
        out = module.apply(v, xs, mask, rngs={"dropout": jax.random.key(3)}, **kw)
        return sum(jnp.sum(a ** 2) for a in jax.tree.leaves(out))
      return jax.value_and_grad(loss)(v) if grads else loss(v)
    with jax.set_mesh(mesh):
      got = jax.jit(step)(v, sxs, smask)
    _close(got, step(v, xs, mask), 1e-4)
    print(name, "ok", flush=True)
  print("ALL OK")


@pytest.mark.slow
def test_explicit_sharding_on_a_2x2_mesh_of_cpu_devices():
  code = "from tests.test_explicit_sharding import _explicit_checks; _explicit_checks()"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4", **JAX_CACHE_ENV)
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout + r.stderr[-4000:]
