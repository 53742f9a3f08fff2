r"""One prepared GPU session: Pallas-vs-XLA correctness, then timings of every implementation.

  python -m experiments.gpu_check --out_dir=$OUT            # on the GPU machine
  python -m experiments.gpu_check --tiny --out_dir=/tmp/gc  # rehearsal on CPU (interpret mode)

1. Environment: devices, versions, and a check that nothing imported
   TensorFlow (the device machine may not have it; nothing here needs it).
2. Correctness, for the ANCHORS.md shapes where the kernel applies (and a tiny
   problem against the float64 NumPy reference): the "pallas" backend against
   "xla" and against "scan" (plain autodiff), forward outputs and gradients of
   sum(hs·ct) + sum(h_last·ct_last) w.r.t. params, inputs and h0, with a
   padding mask, both variants, float32 and bf16 weights, with and without
   segment resets.  Then the "xla" loops with packed stores
   (`gru_jax.kernels.fused_rnn.PACKED`) against the unpacked ones and "scan".
   Then, for each --split_checks entry, the kernels at that column split
   (e.g. H=256, where only a split program's share of the weights fits).
   Relative error ‖a−b‖/‖b‖ per output, limits 2e-3 (f32, TF32 dots) and
   3e-2 (bf16).
2b. End to end: `gru_jax.train.train_and_evaluate` on the adding problem
   (experiments/configs/adding.py: GRU(128), B=64, T=200, 2,000 steps; the
   Pallas path on GPU), its test MSE and wall time.  Needs ml_collections, which
   the device image lacks: carry its wheel (docs/benchmarks.md), else skipped.
2c. The column-split kernels (`gru_jax.kernels.pallas_split`), in a child
   process: each (split, warps, joint wait) configuration checked as in 2 (f32, f32
   reversed and time-major with resets, bf16), the correct ones timed against the unsplit
   kernel on three H=128 shapes; the fastest at the first shape is used below.
   Writes split.json.
3. Kernel sweep on the first cuDNN target shape (batch tile, warps, prefetch,
   bf16 weights); the fastest float32 configuration is used from then on.
4. Timing: `experiments.benchmark` on the ANCHORS.md shapes, the two cuDNN
   targets first, until ``--budget_s`` runs out.
Every phase is guarded (an error is recorded, the next phase still runs) and
results.json is rewritten after each step, so a run cut off by the device's
time limit still returns what it measured.  Files (the device tool returns at
most 8): <out_dir>/results.json, split.json, summary.md, benchmark.png.  Exit status 1 if
a correctness check failed.
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
flags.DEFINE_list("runs", [], "mode:BxTxDxH:dtype entries to time instead of the ANCHORS.md "
                  "list (then a bf16 train run of the first shape).")
flags.DEFINE_integer("max_checks", 99, "Correctness checks to run (after the float64 one).")
flags.DEFINE_integer("packed_checks", 99, "Checks of the packed \"xla\" loops to run "
                     "(PACKED_CHECKS), after the Pallas ones.")
flags.DEFINE_integer("zoneout_checks", 99, "Checks of the Pallas kernels with zoneout to run "
                     "(ZONEOUT_CHECKS).")
flags.DEFINE_list("split_checks", [], "BxTxDxH:dtype:S entries: the Pallas kernels with a "
                  "column split of S (pallas_gru.SPLIT) checked as in 2, reset_after, reversed, "
                  "time-major, with resets.  A .../split=S implementation is timed in a dtype only "
                  "if a check of that S and dtype passed in the same run.")
flags.DEFINE_bool("train_check", True, "Run the adding experiment end to end (phase 2b).")
flags.DEFINE_enum("sweep", "default", ["default", "stages", "none"], "Kernel sweep to run.")
flags.DEFINE_float("budget_s", 420.0, "Wall-clock budget for the whole run; phases past it are skipped.")
flags.DEFINE_float("split_budget_s", 200.0, "Budget of the column-split phase (2c), 0 to skip it.")
flags.DEFINE_bool("split_phase", False, "Internal: run only phase 2c (the main run starts it "
                  "as a subprocess, so a kernel that faults cannot take the rest down).")
FLAGS = flags.FLAGS
FLAGS.set_default("out_dir", os.environ.get("OUT", "runs/gpu_check"))
FLAGS.set_default("repeats", 10)

# ANCHORS.md, H100 table: (mode, shape), the cuDNN targets first.
ANCHOR_SHAPES = [
    ("train", "64x1000x128x128"), ("train", "128x500x1024x1024"),
    ("train", "64x100x128x128"), ("train", "256x200x512x512"),
    ("forward", "64x1000x128x128"), ("forward", "64x100x128x128"),
    ("forward", "256x200x512x512"), ("forward", "128x500x1024x1024"),
    ("forward", "16x2000x256x256"),
]
TINY_SHAPES = [("train", "16x12x16x32"), ("forward", "16x12x16x32"), ("train", "32x6x8x16")]
# (shape, variant, dtype, reverse, resets) checked against xla and scan; masks
# always on; resets: segment starts at 5% of the steps.
CHECKS = [("64x100x128x128", "reset_after", "float32", False, False),
          ("64x100x128x128", "seed", "float32", True, True),
          ("64x100x128x128", "seed", "float32", True, False),
          ("64x100x128x128", "reset_after", "bfloat16", False, False),
          ("64x1000x128x128", "reset_after", "float32", False, False),
          ("32x50x64x64", "seed", "bfloat16", False, False)]
TINY_CHECKS = [("16x12x16x32", "reset_after", "float32", False, False),
               ("16x12x16x32", "seed", "bfloat16", True, True)]
# The "xla" loops' packed stores (`fused_rnn.PACKED`, untimed on a GPU so far)
# against the unpacked loops and scan, same fields; run with every session.
PACKED_CHECKS = [("128x100x256x512", "reset_after", "float32", True, True),
                 ("64x50x64x128", "seed", "bfloat16", False, False)]
TINY_PACKED_CHECKS = [("8x12x16x32", "reset_after", "float32", True, True)]
# The Pallas kernels with zoneout (Bernoulli(0.1) weights per step and unit; never run
# on a GPU so far, so "auto" keeps zoneout on "xla") against "xla" and scan, same fields.
ZONEOUT_CHECKS = [("64x100x128x128", "reset_after", "float32", False, True),
                  ("64x100x128x128", "seed", "bfloat16", True, False)]
TINY_ZONEOUT_CHECKS = [("16x12x16x32", "seed", "float32", True, True)]
# Kernel configurations swept: (batch tile, warps, prefetch, Triton stages, weight dtype).
SWEEP = [(16, 4, True, 1, "float32"), (16, 4, False, 1, "float32"), (16, 8, True, 1, "float32"),
         (16, 8, False, 1, "float32"), (16, 16, True, 1, "float32"), (32, 8, True, 1, "float32"),
         (16, 8, True, 1, "bfloat16"), (16, 4, True, 1, "bfloat16")]
# A shorter second sweep: Triton's own pipelining against the hand-written prefetch.
SWEEP_STAGES = [(16, 8, True, 1, "float32"), (16, 8, False, 2, "float32"),
                (16, 8, False, 3, "float32"), (16, 8, True, 2, "float32"),
                (16, 8, True, 1, "bfloat16")]
GPU_IMPLS = ["gru_jax", "gru_jax/xla/reset_after", "gru_jax/pallas/reset_after",
             "gru_jax/scan/reset_after", "gru_jax/pallas/seed", "flax", "equinox", "haiku",
             "keras", "torch"]
# Issue 5 targets: (mode, shape, gru_jax must be at least as fast as ...).
TARGETS = [("train", "64x1000x128x128", "torch"), ("train", "128x500x1024x1024", "torch")]
TOLERANCE = {"float32": 2e-3, "bfloat16": 3e-2}
# Column-split kernels and the shapes they are timed on.
# (programs per tile, warps, backward waits for its three gate rows together)
SPLIT_CONFIGS = [(4, 4, False), (4, 4, True), (4, 2, True), (2, 4, True), (8, 4, True),
                 (8, 2, True)]
SPLIT_SHAPES = ["64x1000x128x128", "64x100x128x128", "256x200x128x128"]


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


def compare(shape, variant: str, dtype: str, reverse: bool = False,
            time_major: bool = False, cache: dict | None = None, resets: bool = False,
            packed: bool = False, zoneout: bool = False) -> dict:
  """Pallas vs XLA vs scan on one problem with a padding mask: forward and gradients.

  ``resets``: segment starts at 5% of the steps (`gru_jax.gru(..., resets=)`).
  ``packed``: checks the "xla" loops with packed stores instead of Pallas
  (the "xla" reference keeps the unpacked ones).  ``zoneout``: every backend gets
  Bernoulli(0.1) zoneout weights [B,T,H].

  ``cache`` keeps the "xla" and "scan" results across calls (the split phase
  checks many kernel configurations against the same references).
  """
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
  starts = jax.random.bernoulli(jax.random.fold_in(key, 9), 0.05, (b, t)) if resets else None
  zk = (jax.random.bernoulli(jax.random.fold_in(key, 10), 0.1, (b, t, h)).astype(jnp.float32)
        if zoneout else None)
  cd = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32

  def run(backend):
    def loss(p, x, h0):
      tm = (lambda a: jnp.swapaxes(a, 0, 1)) if time_major else (lambda a: a)
      h_last, hs = gru_jax.gru(p, tm(x), h0, mask=tm(mask), variant=variant, backend=backend,
                               compute_dtype=cd, reverse=reverse, time_major=time_major,
                               resets=None if starts is None else tm(starts),
                               zoneout_mask=None if zk is None else tm(zk))
      hs = tm(hs)
      return jnp.sum(hs * ct) + jnp.sum(h_last * ct_last), (h_last, hs)
    (_, outs), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        params, x, h0)
    return jax.tree.map(lambda a: jax.device_get(a), (outs, grads))

  key = (tuple(shape), variant, dtype, reverse, time_major, resets, zoneout)
  refs = (cache or {}).get(key) or (run("xla"), run("scan"))
  if cache is not None:
    cache[key] = refs
  if packed:
    from gru_jax.kernels import fused_rnn
    saved, fused_rnn.PACKED = fused_rnn.PACKED, True
    try:
      got = run("xla")
    finally:
      fused_rnn.PACKED = saved
  else:
    got = run("pallas")
  xla, scan = refs
  names = ["h_last", "hs", "w_x", "w_h", "b_x", "b_h", "x", "h0"]
  flat = lambda tree: jax.tree.leaves(tree)
  vs_xla = {n: rel_err(a, b) for n, a, b in zip(names, flat(got), flat(xla))}
  vs_scan = {n: rel_err(a, b) for n, a, b in zip(names, flat(got), flat(scan))}
  worst = max(list(vs_xla.values()) + list(vs_scan.values()))
  return dict(shape=list(shape), variant=variant, dtype=dtype, reverse=reverse,
              time_major=time_major, resets=resets, packed=packed, zoneout=zoneout,
              vs_xla=vs_xla,
              vs_scan=vs_scan,
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


def split_option(impl: str) -> int | None:
  """S of an implementation name's /split=S option, else None."""
  opts = [o for o in impl.split("/")[3:] if o.startswith("split=")]
  return int(opts[-1][6:]) if opts and opts[-1][6:].isdigit() else None


def split_check(entry: str) -> dict:
  """One --split_checks entry, BxTxDxH:dtype:S: `compare` with pallas_gru.SPLIT = S
  (reset_after, reversed, time-major, with resets); the setting is restored after."""
  from gru_jax.kernels import pallas_gru
  try:
    shape_text, dtype, split = entry.split(":")
    shape, split = benchmark.parse_shape(shape_text), int(split)
  except ValueError:
    raise ValueError(f"--split_checks entries are BxTxDxH:dtype:S, got {entry!r}") from None
  import jax
  import jax.numpy as jnp
  cd = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  gpu = jax.default_backend() == "gpu"
  saved = pallas_gru.SPLIT, pallas_gru.SPLIT_WARPS
  set_split(split, pallas_gru.SPLIT_WARPS)
  try:
    # A check that silently ran "xla" or the unsplit kernel would pass for nothing.
    ok, why = pallas_gru.supported(hidden_size=shape[3], batch=shape[0], compute_dtype=cd,
                                   state_dtype=jnp.float32, platform=jax.default_backend())
    runs = pallas_gru.plan_split(split=split, variant="reset_after", hidden_size=shape[3],
                                 batch=shape[0], compute_dtype=cd, has_rm=False,
                                 interpret=not gpu, sm_count=pallas_gru._sm_count() if gpu else None)
    if not ok or runs != split:
      raise ValueError(f"split {split} does not run at {shape_text} {dtype}: "
                       f"{why if not ok else f'the kernels would run split {runs}'}")
    c = compare(shape, "reset_after", dtype, reverse=True, time_major=True, resets=True)
  finally:
    set_split(*saved)
  c["split"] = split
  return c


def kernel_applies(shape, dtype: str) -> bool:
  import jax
  import jax.numpy as jnp
  from gru_jax.kernels import pallas_gru
  ok, _ = pallas_gru.supported(hidden_size=shape[3], batch=shape[0],
                               compute_dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32,
                               state_dtype=jnp.float32, platform=jax.default_backend())
  return ok


def train_check(tiny: bool) -> dict:
  """The adding experiment through `train_and_evaluate`: test MSE, steps and wall time."""
  import tempfile
  import jax.numpy as jnp
  from experiments.configs import adding
  from gru_jax import scan, train
  cfg = adding.get_config()
  if tiny:
    cfg.dataset.seq_len, cfg.num_train_steps, cfg.eval_every_steps = 20, 20, 20
    cfg.batch_size, cfg.model.hidden_sizes = 16, (16,)
  backend = scan.resolve_backend("auto", hidden_size=cfg.model.hidden_sizes[0],
                                 batch=cfg.batch_size, compute_dtype=jnp.float32,
                                 state_dtype=jnp.float32)
  t0 = time.time()
  with tempfile.TemporaryDirectory() as workdir:
    res = train.train_and_evaluate(cfg, workdir)
  return dict(config="adding", seq_len=cfg.dataset.seq_len, steps=cfg.num_train_steps,
              backend=backend, wall_s=time.time() - t0,
              test_mse=res["test"].get("mse"), validation_mse=res["validation"].get("mse"))


def set_kernel(tile: int, warps: int, prefetch: bool, stages: int = 1) -> None:
  from gru_jax.kernels import fused_rnn, pallas_gru
  pallas_gru.BATCH_TILE, pallas_gru.NUM_WARPS, pallas_gru.PREFETCH = tile, warps, prefetch
  pallas_gru.NUM_STAGES = stages
  fused_rnn._make.cache_clear()  # the kernels are built per configuration


def sweep(shape, configs, repeats: int, log) -> list:
  """Forward and train times of the Pallas backend for each configuration."""
  rows = []
  for tile, warps, prefetch, stages, dtype in configs:
    if shape[0] % tile:
      continue
    set_kernel(tile, warps, prefetch, stages)
    row = dict(tile=tile, num_warps=warps, prefetch=prefetch, num_stages=stages, dtype=dtype)
    try:
      steps = {m: benchmark.build("gru_jax/pallas/reset_after", shape, m, dtype)
               for m in ("forward", "train")}
      for s in steps.values():
        s()
      times = benchmark.time_interleaved(steps, repeats, warmup=2, gap_s=0.0)
      row.update({m: benchmark.summarise(s, shape)["median_ms"] for m, s in times.items()})
    except Exception as e:  # noqa: BLE001 - one configuration failing is a result
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    log("sweep", json.dumps(row))
    rows.append(row)
  return rows


def set_split(split: int | None, warps: int, joint: bool = False) -> None:
  from gru_jax.kernels import fused_rnn, pallas_gru, pallas_split
  pallas_gru.SPLIT, pallas_gru.SPLIT_WARPS = split, warps
  pallas_split.JOINT_WAIT = joint
  fused_rnn._make.cache_clear()


def split_phase(out_dir: str, tiny: bool, budget_s: float, log) -> dict:
  """Phase 2c: the column-split kernels (`gru_jax.kernels.pallas_split`).

  Each (split, warps, joint wait) configuration is checked against "xla" and "scan"
  (forward and gradients, padding mask, forward/reverse time, batch/time-major
  layout); the correct ones are then timed, forward and train, on the shapes
  where the split applies, against the unsplit kernel (split 0).  Writes
  <out_dir>/split.json after every step.
  """
  t0 = time.time()
  res = dict(checks=[], timings=[], errors=[])
  path = os.path.join(out_dir, "split.json")

  def save():
    with open(path, "w") as f:
      json.dump(res, f, indent=1)

  configs = [(1, 4, False), (1, 4, True)] if tiny else SPLIT_CONFIGS
  check_shape = benchmark.parse_shape("16x12x16x32" if tiny else "64x200x128x128")
  good, refs = [], {}
  for split, warps, joint in configs:
    set_split(split, warps, joint)
    ok = True
    for reverse, time_major, dtype in ((False, False, "float32"), (True, True, "float32"),
                                       (False, False, "bfloat16")):
      try:  # the reversed, time-major check has resets too
        c = compare(check_shape, "reset_after", dtype, reverse, time_major, cache=refs,
                    resets=time_major)
      except Exception as e:  # noqa: BLE001 - a failing configuration is a result
        c = dict(ok=False, error=f"{type(e).__name__}: {str(e)[:500]}")
      c.update(split=split, warps=warps, joint_wait=joint, seconds=round(time.time() - t0, 1))
      res["checks"].append(c)
      log("split check", json.dumps({k: c.get(k) for k in ("split", "warps", "joint_wait",
                                                           "dtype", "reverse", "time_major",
                                                           "resets", "worst", "ok", "error")}))
      ok = ok and c["ok"]
      save()
    if ok:
      good.append((split, warps, joint))
  shapes = [TINY_SHAPES[0][1]] if tiny else SPLIT_SHAPES
  for shape_text in shapes:
    shape = benchmark.parse_shape(shape_text)
    for split, warps, joint in [(0, 0, False)] + good:
      if time.time() - t0 > budget_s:
        res["errors"].append(f"budget spent before {shape_text} split={split}")
        save()
        return res
      set_split(split, warps, joint)
      row = dict(shape=shape_text, split=split, warps=warps, joint_wait=joint)
      try:
        steps = {m: benchmark.build("gru_jax/pallas/reset_after", shape, m, "float32")
                 for m in ("forward", "train")}
        for st in steps.values():
          st()
        times = benchmark.time_interleaved(steps, FLAGS.repeats, warmup=2, gap_s=0.0)
        row.update({m: benchmark.summarise(st, shape)["median_ms"] for m, st in times.items()})
      except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
      log("split timing", json.dumps(row))
      res["timings"].append(row)
      save()
  set_split(None, 4, False)
  return res


def run_split_subprocess(out_dir: str, budget_s: float, log) -> dict:
  """Runs phase 2c in a child process (with a hard timeout) and returns its split.json."""
  import subprocess
  cmd = [sys.executable, "-m", "experiments.gpu_check", "--split_phase", f"--out_dir={out_dir}",
         f"--split_budget_s={budget_s}", f"--repeats={FLAGS.repeats}"] + (
             ["--tiny"] if FLAGS.tiny else [])
  try:
    # The parent holds its share of GPU memory already; the child takes less.
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.25")
    proc = subprocess.run(cmd, timeout=budget_s + 90, check=False, env=env)
    rc = proc.returncode
  except subprocess.TimeoutExpired:
    rc = "timeout"
  try:
    with open(os.path.join(out_dir, "split.json")) as f:
      res = json.load(f)
  except (OSError, ValueError):
    res = dict(checks=[], timings=[], errors=[])
  res["returncode"] = rc
  log("split phase exit:", rc)
  return res


def best_split(res: dict, shape_text: str):
  """(split, warps, joint wait) with the fastest train step at ``shape_text`` (split 0:
  unsplit), or None."""
  rows = [r for r in res.get("timings", []) if r["shape"] == shape_text and "train" in r]
  if not rows:
    return None
  best = min(rows, key=lambda r: r["train"])
  return best["split"], best["warps"] or 4, best.get("joint_wait", False)


def targets_text(bench: list) -> list[str]:
  """The issue's GPU targets from the timings that were made."""
  lines = []
  by = {(r["mode"], r["dtype"], "x".join(map(str, r["shape"]))): r for r in bench}
  for mode, shape, peer in TARGETS:
    r = by.get((mode, "float32", shape))
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
      lines.append(f"- {r['mode']} {r['dtype']} {'x'.join(map(str, r['shape']))}: faster than "
                   f"{', '.join(peers)}: {'yes' if not slower else 'no (' + ', '.join(slower) + ')'}")
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out_dir = FLAGS.out_dir
  os.makedirs(out_dir, exist_ok=True)
  t_start = time.time()
  left = lambda: FLAGS.budget_s - (time.time() - t_start)
  log = lambda *a: print(f"[{time.time() - t_start:6.1f}s]", *a, flush=True)
  results = dict(errors=[])

  def save():
    with open(os.path.join(out_dir, "results.json"), "w") as f:
      json.dump(results, f, indent=1)

  def guarded(name, fn, *args, **kw):
    try:
      return fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 - recorded; the next phase still runs
      import traceback
      traceback.print_exc()
      results["errors"].append(f"{name}: {type(e).__name__}: {str(e)[:2000]}")
      log(f"{name} FAILED: {type(e).__name__}: {str(e)[:500]}")
      return None
    finally:
      save()

  if FLAGS.split_phase:
    split_phase(out_dir, FLAGS.tiny, FLAGS.split_budget_s, log)
    return

  env = environment()
  results["env"] = env
  log("environment:", json.dumps(env))
  save()

  # 2. correctness
  checks = []
  results["correctness"] = checks
  ref = guarded("float64 reference", reference_check)
  if ref is not None:
    checks.append(ref)
    log("float64 reference:", ref)
  for shape_text, variant, dtype, reverse, resets in (TINY_CHECKS if FLAGS.tiny else CHECKS)[
      :FLAGS.max_checks]:
    shape = benchmark.parse_shape(shape_text)
    if not kernel_applies(shape, dtype):
      log(f"correctness {shape_text} {dtype}: kernel does not apply (falls back to xla)")
      continue
    c = guarded(f"correctness {shape_text} {variant} {dtype}", compare, shape, variant, dtype,
                reverse, resets=resets)
    if c is not None:
      checks.append(c)
      log(f"correctness {shape_text} {variant} {dtype} reverse={reverse} resets={resets}: "
          f"worst rel err "
          f"{c['worst']:.2e} {'ok' if c['ok'] else 'FAILED'}")
  for shape_text, variant, dtype, reverse, resets in (
      TINY_PACKED_CHECKS if FLAGS.tiny else PACKED_CHECKS)[:FLAGS.packed_checks]:
    c = guarded(f"packed {shape_text} {variant} {dtype}", compare,
                benchmark.parse_shape(shape_text), variant, dtype, reverse, resets=resets,
                packed=True)
    if c is not None:
      checks.append(c)
      log(f"packed stores {shape_text} {variant} {dtype} reverse={reverse} resets={resets}: "
          f"worst rel err {c['worst']:.2e} {'ok' if c['ok'] else 'FAILED'}")
  for shape_text, variant, dtype, reverse, resets in (
      TINY_ZONEOUT_CHECKS if FLAGS.tiny else ZONEOUT_CHECKS)[:FLAGS.zoneout_checks]:
    shape = benchmark.parse_shape(shape_text)
    if not kernel_applies(shape, dtype):
      log(f"zoneout {shape_text} {dtype}: kernel does not apply (falls back to xla)")
      continue
    c = guarded(f"zoneout {shape_text} {variant} {dtype}", compare, shape, variant, dtype,
                reverse, resets=resets, zoneout=True)
    if c is not None:
      checks.append(c)
      log(f"pallas zoneout {shape_text} {variant} {dtype} reverse={reverse} resets={resets}: "
          f"worst rel err {c['worst']:.2e} {'ok' if c['ok'] else 'FAILED'}")
  for entry in FLAGS.split_checks:
    c = guarded(f"split check {entry}", split_check, entry)
    if c is not None:
      checks.append(c)
      log(f"split check {entry}: worst rel err {c['worst']:.2e} {'ok' if c['ok'] else 'FAILED'}")
  all_ok = bool(checks) and all(c["ok"] for c in checks) and not results["errors"]

  # 2b. the experiment entrypoint's training loop, end to end
  if FLAGS.train_check:
    try:
      import ml_collections  # noqa: F401 - the device image may lack it
      tc = guarded("train check", train_check, FLAGS.tiny)
      if tc is not None:
        results["train_check"] = tc
        log("train check:", json.dumps(tc))
    except ImportError as e:
      results["train_check"] = {"skipped": f"{e}"}
      log("train check skipped:", e)
    save()

  # 2c. column-split kernels, in a child process; adopted below if faster
  if FLAGS.split_budget_s > 0 and kernel_applies(benchmark.parse_shape(
      (TINY_SHAPES if FLAGS.tiny else ANCHOR_SHAPES)[0][1]), "float32"):
    split = run_split_subprocess(out_dir, FLAGS.split_budget_s, log)
    results["split"] = split  # a configuration that fails its checks is not timed or used
    save()

  # 3. kernel sweep; keep the fastest float32 train configuration
  shapes = TINY_SHAPES if FLAGS.tiny else ANCHOR_SHAPES
  runs = [(m, s, "float32") for m, s in shapes] + [("train", shapes[0][1], "bfloat16")]
  if FLAGS.runs:
    runs = [tuple(r.split(":")) for r in FLAGS.runs]
  first = benchmark.parse_shape(shapes[0][1])
  if FLAGS.sweep != "none" and kernel_applies(first, "float32"):
    configs = SWEEP if FLAGS.sweep == "default" else SWEEP_STAGES
    rows = guarded("sweep", sweep, first, configs, FLAGS.repeats, log) or []
    results["sweep"] = rows
    good = [r for r in rows if "train" in r and r["dtype"] == "float32"]
    if good:
      best = min(good, key=lambda r: r["train"])
      set_kernel(best["tile"], best["num_warps"], best["prefetch"], best["num_stages"])
      results["kernel_config"] = best
      log("kernel configuration used below:", best)
    save()
  choice = best_split(results.get("split", {}), shapes[0][1])
  if choice is not None:
    set_split(*choice)
    results["split_used"] = choice
    log("column split used below (split, warps, joint wait):", choice)

  # 4. benchmark
  impls = FLAGS.impls
  if impls == ["all"]:
    impls = GPU_IMPLS if env["platform"] == "gpu" else [
        "gru_jax", "gru_jax/xla/reset_after", "gru_jax/pallas/reset_after", "flax", "torch"]
  checked = {(c["split"], c["dtype"]) for c in checks if c.get("split") and c["ok"]}
  bench = []
  results["bench"] = bench
  for mode, shape_text, dtype in runs:
    if left() < 20:
      log(f"budget spent: skipping {mode} {shape_text} {dtype}")
      results.setdefault("skipped", []).append(f"{mode} {shape_text} {dtype}")
      continue
    names = impls if dtype == "float32" else [n for n in impls if n != "gru_jax/pallas/seed"]
    unchecked = [n for n in names if split_option(n) is not None
                 and (split_option(n), dtype) not in checked]
    if unchecked:
      log(f"not timed in {dtype}, no passed {dtype} check of their split in this run "
          "(--split_checks):", unchecked)
      results.setdefault("not_timed", []).extend(f"{n} {dtype}" for n in unchecked)
      names = [n for n in names if n not in unchecked]
    res = guarded(f"bench {mode} {shape_text} {dtype}", benchmark.run, [shape_text], mode=mode,
                  dtype=dtype, impls=names, repeats=FLAGS.repeats, warmup=2,
                  gap_ms=0.0 if env["platform"] == "gpu" else 10.0, out_dir=out_dir,
                  plot=False, log=log)
    if res is not None:
      bench += res["results"]
      results["machine"] = res["machine"]
      save()
  if bench:
    guarded("plot", benchmark.make_plot, dict(machine=results["machine"], results=[
        r for r in bench if r["dtype"] == "float32"]), os.path.join(out_dir, "benchmark.png"))
  try:
    os.remove(os.path.join(out_dir, "benchmark.json"))  # results.json holds it all
  except OSError:
    pass

  summary = ["# gpu_check summary", "", f"devices: {env['devices']}", "",
             "## Correctness (pallas vs xla / scan; relative error, worst output)", ""]
  summary += [f"- {c.get('shape', 'tiny')} {c.get('variant', '')} {c.get('dtype', '')} "
              f"reverse={c.get('reverse', '')} resets={c.get('resets', '')}: "
              f"{c.get('worst', c.get('max_abs'))} "
              f"{'ok' if c['ok'] else 'FAILED'}" for c in checks]
  summary += ["", "## End-to-end training (adding problem)", "",
              json.dumps(results.get("train_check", "not run"))]
  summary += ["", "## Kernel sweep (median ms)", ""] + [json.dumps(r) for r in
                                                        results.get("sweep", [])]
  summary += ["", "## Timings (median ms, ratio to gru_jax)", ""]
  for dtype in ("float32", "bfloat16"):
    part = [r for r in bench if r["dtype"] == dtype]
    if part:
      summary += [f"### {dtype}", "", benchmark.format_table(dict(results=part)), ""]
  summary += ["## Targets", ""] + targets_text(bench)
  summary += ["", "## Errors", ""] + (results["errors"] or ["none"])
  tf = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets"))
  summary += ["", f"TensorFlow modules imported: {tf or 'none'}",
              f"total wall time {time.time() - t_start:.0f} s"]
  results["wall_s"] = time.time() - t_start
  save()
  with open(os.path.join(out_dir, "summary.md"), "w") as f:
    f.write("\n".join(summary) + "\n")
  log("\n".join(summary))
  if not all_ok:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
