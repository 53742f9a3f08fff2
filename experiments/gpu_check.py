r"""One prepared GPU session: Pallas-vs-XLA correctness, then timings of every implementation.

  python -m experiments.gpu_check --out_dir=$OUT            # on the GPU machine
  python -m experiments.gpu_check --tiny --out_dir=/tmp/gc  # rehearsal on CPU (interpret mode)

1. Environment: devices, versions, and a check that nothing imported
   TensorFlow (the device machine may not have it; nothing here needs it).
2. Correctness, for the ANCHORS.md shapes where the kernel applies (and a tiny
   problem against the float64 NumPy reference): the "pallas" backend against
   "xla" and against "scan" (plain autodiff), forward outputs and gradients of
   sum(hs·ct) + sum(h_last·ct_last) w.r.t. params, inputs and h0, with a
   padding mask, both variants, float32 and bf16 weights.  Relative error
   ‖a−b‖/‖b‖ per output, limits 2e-3 (f32, TF32 dots) and 3e-2 (bf16).
3. Timing: `experiments.benchmark` on the ANCHORS.md shapes, the two cuDNN
   targets first, each written to its own JSON as soon as it is done, until
   ``--budget_s`` runs out; then a short sweep of the kernel's batch tile and
   warps on the first target shape.
Writes <out_dir>/env.json, correctness.json, bench_*.json/png, sweep.json and
summary.md (tables and the issue's targets, met or not).  Exit status 1 if a
correctness check failed.
"""
from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

from absl import app, flags

from experiments import benchmark  # defines --out_dir, --repeats, --impls, used here too

flags.DEFINE_bool("tiny", False, "Tiny shapes (CPU rehearsal: Pallas runs in interpret mode).")
flags.DEFINE_float("budget_s", 420.0, "Wall-clock budget for the timing phase.")
FLAGS = flags.FLAGS
FLAGS.set_default("out_dir", os.environ.get("OUT", "runs/gpu_check"))
FLAGS.set_default("repeats", 20)

# ANCHORS.md, H100 table: (mode, shape), the cuDNN targets first.
ANCHOR_SHAPES = [
    ("train", "64x1000x128x128"), ("train", "128x500x1024x1024"),
    ("train", "64x100x128x128"), ("train", "256x200x512x512"),
    ("forward", "64x1000x128x128"), ("forward", "64x100x128x128"),
    ("forward", "256x200x512x512"), ("forward", "128x500x1024x1024"),
    ("forward", "16x2000x256x256"),
]
TINY_SHAPES = [("train", "16x12x16x32"), ("forward", "16x12x16x32"), ("train", "32x6x8x16")]
# Issue 5 targets: (mode, shape, gru_jax must be at least as fast as ...).
TARGETS = [("train", "64x1000x128x128", "torch"), ("train", "128x500x1024x1024", "torch")]
TOLERANCE = {"float32": 2e-3, "bfloat16": 3e-2}


def environment() -> dict:
  import jax
  info = dict(devices=[str(d) for d in jax.devices()], platform=jax.default_backend(),
              jax=jax.__version__, tensorflow_imported=sorted(
                  m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets")))
  try:
    import torch
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.cuda.is_available()
    if torch.cuda.is_available():
      info["cudnn"] = torch.backends.cudnn.version()
  except ImportError:
    info["torch"] = None
  return info


def rel_err(a, b) -> float:
  import numpy as np
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))


def compare(shape, variant: str, dtype: str) -> dict:
  """Pallas vs XLA vs scan on one problem with a padding mask: forward and gradients."""
  import jax
  import jax.numpy as jnp
  import gru_jax
  b, t, d, h = shape
  key = jax.random.key(7)
  params = gru_jax.cell.init(key, d, h)
  params = params._replace(b_x=0.1 * jax.random.normal(jax.random.fold_in(key, 1), (3 * h,)),
                           b_h=0.1 * jax.random.normal(jax.random.fold_in(key, 2), (3 * h,)))
  x = jax.random.normal(jax.random.fold_in(key, 3), (b, t, d))
  h0 = 0.5 * jax.random.normal(jax.random.fold_in(key, 4), (b, h))
  lengths = jax.random.randint(jax.random.fold_in(key, 5), (b,), 1, t + 1)
  mask = jnp.arange(t)[None] < lengths[:, None]
  ct = jax.random.normal(jax.random.fold_in(key, 6), (b, t, h))
  ct_last = jax.random.normal(jax.random.fold_in(key, 8), (b, h))
  cd = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32

  def run(backend):
    def loss(p, x, h0):
      h_last, hs = gru_jax.gru(p, x, h0, mask=mask, variant=variant, backend=backend,
                               compute_dtype=cd)
      return jnp.sum(hs * ct) + jnp.sum(h_last * ct_last), (h_last, hs)
    (_, outs), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        params, x, h0)
    return jax.tree.map(lambda a: jax.device_get(a), (outs, grads))

  got, xla, scan = run("pallas"), run("xla"), run("scan")
  names = ["h_last", "hs", "w_x", "w_h", "b_x", "b_h", "x", "h0"]
  flat = lambda tree: jax.tree.leaves(tree)
  vs_xla = {n: rel_err(a, b) for n, a, b in zip(names, flat(got), flat(xla))}
  vs_scan = {n: rel_err(a, b) for n, a, b in zip(names, flat(got), flat(scan))}
  worst = max(list(vs_xla.values()) + list(vs_scan.values()))
  return dict(shape=list(shape), variant=variant, dtype=dtype, vs_xla=vs_xla, vs_scan=vs_scan,
              worst=worst, ok=bool(worst <= TOLERANCE[dtype]))


def reference_check() -> dict:
  """The Pallas backend against the float64 NumPy reference on a tiny problem."""
  import jax
  import numpy as np
  import gru_jax
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from tests import reference
  out = {}
  for variant in ("seed", "reset_after"):
    p = gru_jax.cell.init(jax.random.key(1), 8, 16)
    x = jax.random.normal(jax.random.key(2), (16, 5, 8))
    h_last, hs = gru_jax.gru(p, x, variant=variant, backend="pallas")
    ref_last, ref_hs = reference.run(p, x, variant=variant)
    out[variant] = float(np.abs(np.asarray(hs) - ref_hs).max())
  return dict(max_abs=out, ok=all(v < 2e-3 for v in out.values()))


def kernel_applies(shape, dtype: str) -> bool:
  import jax
  import jax.numpy as jnp
  from gru_jax.kernels import pallas_gru
  ok, _ = pallas_gru.supported(hidden_size=shape[3], batch=shape[0],
                               compute_dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32,
                               state_dtype=jnp.float32, platform=jax.default_backend())
  return ok


def sweep(shape, out_dir: str, repeats: int) -> list:
  """Forward+backward time of the Pallas backend for a few batch tiles and warp counts."""
  from gru_jax.kernels import fused_rnn, pallas_gru
  rows = []
  saved = pallas_gru.BATCH_TILE, pallas_gru.NUM_WARPS
  try:
    for tile in (16, 32):
      for warps in (4, 8):
        if shape[0] % tile:
          continue
        pallas_gru.BATCH_TILE, pallas_gru.NUM_WARPS = tile, warps
        fused_rnn._make.cache_clear()  # the kernels are built per config
        steps = {m: benchmark.build("gru_jax/pallas/reset_after", shape, m, "float32")
                 for m in ("forward", "train")}
        times = benchmark.time_interleaved(steps, repeats, warmup=2, gap_s=0.0)
        rows.append(dict(tile=tile, num_warps=warps, **{
            m: benchmark.summarise(s, shape)["median_ms"] for m, s in times.items()}))
  finally:
    pallas_gru.BATCH_TILE, pallas_gru.NUM_WARPS = saved
    fused_rnn._make.cache_clear()
  with open(os.path.join(out_dir, "sweep.json"), "w") as f:
    json.dump(rows, f, indent=1)
  return rows


def targets_text(bench: list) -> list[str]:
  """The issue's GPU targets from the timings that were made."""
  lines = []
  by = {(r["mode"], "x".join(map(str, r["shape"]))): r for r in bench}
  for mode, shape, peer in TARGETS:
    r = by.get((mode, shape))
    if r is None or peer not in r["timings"]:
      lines.append(f"- {mode} {shape}: at least {peer}'s speed: not measured")
      continue
    ours = min((v["median_ms"], n) for n, v in r["timings"].items() if n.startswith("gru_jax"))
    theirs = r["timings"][peer]["median_ms"]
    verdict = "met" if ours[0] <= theirs else f"missed, {ours[0] / theirs:.2f}x slower"
    lines.append(f"- {mode} {shape}: best gru_jax {ours[1]} {ours[0]:.2f} ms vs {peer} "
                 f"{theirs:.2f} ms: {verdict}")
  for r in bench:
    ours = min((v["median_ms"] for n, v in r["timings"].items() if n.startswith("gru_jax")),
               default=None)
    peers = {n: r["timings"][n]["median_ms"] for n in ("flax", "equinox", "keras")
             if n in r["timings"]}
    if ours is not None and peers:
      slower = [n for n, v in peers.items() if ours > v]
      lines.append(f"- {r['mode']} {'x'.join(map(str, r['shape']))}: faster than "
                   f"{', '.join(peers)}: {'yes' if not slower else 'no (' + ', '.join(slower) + ')'}")
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out_dir = FLAGS.out_dir
  os.makedirs(out_dir, exist_ok=True)
  t_start = time.time()
  log = lambda *a: print(*a, flush=True)

  env = environment()
  log("environment:", json.dumps(env))
  with open(os.path.join(out_dir, "env.json"), "w") as f:
    json.dump(env, f, indent=1)

  shapes = TINY_SHAPES if FLAGS.tiny else ANCHOR_SHAPES
  checks = [reference_check()]
  log("float64 reference:", checks[0])
  for shape_text in dict.fromkeys(s for _, s in shapes):
    shape = benchmark.parse_shape(shape_text)
    for dtype in ("float32", "bfloat16"):
      if not kernel_applies(shape, dtype):
        log(f"correctness {shape_text} {dtype}: kernel does not apply (falls back to xla)")
        continue
      for variant in ("reset_after", "seed"):
        c = compare(shape, variant, dtype)
        checks.append(c)
        log(f"correctness {shape_text} {variant} {dtype}: worst rel err {c['worst']:.2e} "
            f"{'ok' if c['ok'] else 'FAILED'}")
  with open(os.path.join(out_dir, "correctness.json"), "w") as f:
    json.dump(checks, f, indent=1)
  all_ok = all(c["ok"] for c in checks)

  impls = FLAGS.impls
  if FLAGS.tiny and impls == ["all"]:  # exercise the Pallas path in interpret mode too
    impls = ["gru_jax", "gru_jax/xla/reset_after", "gru_jax/pallas/reset_after", "flax", "torch"]
  bench, t_bench = [], time.time()
  for mode, shape_text in shapes:
    if time.time() - t_bench > FLAGS.budget_s:
      log(f"budget spent: skipping {mode} {shape_text}")
      continue
    res = benchmark.run([shape_text], mode=mode, impls=impls, repeats=FLAGS.repeats, warmup=2,
                        gap_ms=0.0 if env["platform"] == "gpu" else 10.0,
                        out_dir=os.path.join(out_dir, f"bench_{mode}_{shape_text}"), log=log)
    bench += res["results"]
  rows = []
  if bench and time.time() - t_bench < FLAGS.budget_s and kernel_applies(
      benchmark.parse_shape(shapes[0][1]), "float32"):
    rows = sweep(benchmark.parse_shape(shapes[0][1]), out_dir, max(3, FLAGS.repeats // 2))

  summary = ["# gpu_check summary", "", f"devices: {env['devices']}", "",
             "## Correctness (pallas vs xla / scan; relative error, worst output)", ""]
  summary += [f"- {c.get('shape', 'tiny')} {c.get('variant', '')} {c.get('dtype', '')}: "
              f"{c.get('worst', c.get('max_abs'))} {'ok' if c['ok'] else 'FAILED'}" for c in checks]
  summary += ["", "## Timings (median ms, ratio to gru_jax)", "",
              benchmark.format_table(dict(results=bench)) if bench else "none",
              "", "## Targets", ""] + targets_text(bench)
  if rows:
    summary += ["", "## Kernel sweep (ms)", ""] + [json.dumps(r) for r in rows]
  tf = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets"))
  summary += ["", f"TensorFlow modules imported: {tf or 'none'}",
              f"total wall time {time.time() - t_start:.0f} s"]
  with open(os.path.join(out_dir, "summary.md"), "w") as f:
    f.write("\n".join(summary) + "\n")
  log("\n".join(summary))
  if not all_ok:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
