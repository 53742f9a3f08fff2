"""Smoke test of experiments/benchmark.py: runs, writes JSON and PNG with the expected fields.

No timing assertions: speed targets live in the benchmark and docs/benchmarks.md.
"""
import json
import os

import jax.numpy as jnp
import pytest
from absl import flags

from experiments import benchmark


def test_main_writes_json_and_plot(tmp_path):
  out = str(tmp_path / "bench")
  argv = ["benchmark", "--shapes=2x3x4x8,2x5x4x8", "--mode=both", "--impls=gru_jax,flax",
          "--repeats=2", "--warmup=1", "--gap_ms=0", f"--out_dir={out}"]
  flags.FLAGS(argv)
  try:
    benchmark.main(argv[:1])
  finally:
    flags.FLAGS.unparse_flags()
  with open(os.path.join(out, "benchmark.json")) as f:
    res = json.load(f)
  assert os.path.getsize(os.path.join(out, "benchmark.png")) > 0
  assert {"jax_platform", "cpu_count", "versions", "argv"} <= set(res["machine"])
  assert [(r["mode"], r["shape"]) for r in res["results"]] == [
      ("train", [2, 3, 4, 8]), ("train", [2, 5, 4, 8]),
      ("forward", [2, 3, 4, 8]), ("forward", [2, 5, 4, 8])]
  for r in res["results"]:
    assert r["errors"] == {}
    assert set(r["timings"]) == {"gru_jax", "flax"}
    for t in r["timings"].values():
      assert {"median_ms", "p25_ms", "p75_ms", "runs", "tokens_per_s", "ratio_to_gru_jax"} <= set(t)
      assert t["runs"] == 2 and t["median_ms"] > 0
    assert r["timings"]["gru_jax"]["ratio_to_gru_jax"] == 1.0
    # the backend "auto" ran (on CPU "xla"); the peers have none
    assert r["timings"]["gru_jax"]["path"] == "xla" and "path" not in r["timings"]["flax"]


def test_unknown_impl_is_reported_not_fatal(tmp_path):
  res = benchmark.run(["2x3x4x8"], impls=["gru_jax", "nonesuch"], repeats=1, warmup=0, gap_ms=0,
                      out_dir=str(tmp_path), plot=False, log=lambda *_: None)
  assert "nonesuch" in res["results"][0]["errors"]
  assert "unknown implementation" in res["results"][0]["errors"]["nonesuch"]


def test_a_row_where_nothing_builds_keeps_the_other_rows(tmp_path):
  res = benchmark.run(["2x3x4x8", "2x3x4x0"], impls=["gru_jax", "gru_jax/xla"], repeats=1,
                      warmup=0, gap_ms=0, out_dir=str(tmp_path), plot=False,
                      log=lambda *_: None)
  good, bad = res["results"]
  assert set(good["timings"]) == {"gru_jax"} and bad["timings"] == {}
  assert "gru_jax/<backend>/<variant>" in good["errors"]["gru_jax/xla"]
  assert "hidden_size must be >= 1" in bad["errors"]["gru_jax"]
  assert os.path.exists(tmp_path / "benchmark.json")


def test_entrypoints_give_one_line_errors(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for args, message in [
      (["experiments.benchmark", "--repeats=0"], "error: flag --repeats=0: 0 is not a positive"),
      (["experiments.benchmark", "--shapes=abc"], "error: --shapes entries must be BxTxDxH"),
      (["experiments.memory", "--seq_lens=abc"], "error: --seq_lens must be integers"),
      (["experiments.memory", "--seq_lens=4", "stray"], "unexpected arguments"),
      (["experiments.memory", "--seq_lens="], "error: --seq_lens must be one or more integers"),
      (["experiments.benchmark", "--shapes="], "error: --shapes and --impls must each name"),
      (["experiments.benchmark", "--impls="], "error: --shapes and --impls must each name"),
  ]:
    r = subprocess.run([sys.executable, "-m", *args, f"--out_dir={tmp_path}"
                        if args[0].endswith("benchmark") else "--batch=1"],
                       cwd=root, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode != 0 and message in r.stderr, (args, r.stderr[-500:])
    assert "Traceback" not in r.stderr, args


@pytest.mark.slow
def test_gpu_check_rehearsal_on_cpu(tmp_path):
  """The prepared device script runs end to end on CPU (Pallas in interpret mode):
  correctness against the XLA path and autodiff (with segment resets too; then the packed
  "xla" loops against the unpacked ones, and the kernels with zoneout), a sweep, a timed run, at most the
  8 files the device tool returns, and no TensorFlow import (the GPU image has none)."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "out"
  r = subprocess.run(
      [sys.executable, "-m", "experiments.gpu_check", "--tiny", f"--out_dir={out}",
       "--repeats=2", "--max_checks=2", "--sweep=stages",
       "--runs=train:16x12x16x32:float32,forward:16x12x16x32:bfloat16",
       "--split_checks=16x12x16x32:float32:1",
       "--impls=gru_jax,gru_jax/xla/reset_after,gru_jax/pallas/reset_after,"
       "gru_jax/pallas/reset_after/split=1,gru_jax/pallas/reset_after/split=4,flax,torch"],
      cwd=root, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  files = sorted(os.listdir(out))
  assert files == ["benchmark.png", "results.json", "split.json", "summary.md"]
  res = json.load(open(out / "results.json"))
  split = res["split"]  # phase 2c, run in a child process: split=1 is all interpret mode runs
  assert split["returncode"] == 0 and split["errors"] == []
  assert len(split["checks"]) == 6 and all(c["ok"] and c["split"] == 1 for c in split["checks"])
  assert [c["resets"] for c in split["checks"]] == [False, True, False] * 2
  assert [(r["split"], r["joint_wait"], "train" in r) for r in split["timings"]] == [
      (0, False, True), (1, False, True), (1, True, True)]
  assert res["errors"] == [] and res["env"]["tensorflow_imported"] == []
  assert all(c["ok"] for c in res["correctness"]) and len(res["correctness"]) == 6
  assert [c.get("resets") for c in res["correctness"]] == [None, False, True, True, True, True]
  assert [c.get("packed") for c in res["correctness"]] == [None, False, False, True, False,
                                                           False]
  assert [c.get("zoneout") for c in res["correctness"]] == [None, False, False, False, True,
                                                            False]
  assert [c.get("split") for c in res["correctness"]] == [None] * 5 + [1]
  # a split with no passed check of its dtype in the run is not timed in that dtype
  assert res["not_timed"] == ["gru_jax/pallas/reset_after/split=4 float32",
                              "gru_jax/pallas/reset_after/split=1 bfloat16",
                              "gru_jax/pallas/reset_after/split=4 bfloat16"]
  assert "gru_jax/pallas/reset_after/split=1" in res["bench"][0]["timings"]
  assert len(res["sweep"]) == 5 and all("train" in row for row in res["sweep"])
  assert res["kernel_config"] in res["sweep"]
  assert [(b["mode"], b["dtype"]) for b in res["bench"]] == [("train", "float32"),
                                                              ("forward", "bfloat16")]
  assert "gru_jax/pallas/reset_after" in res["bench"][0]["timings"]
  assert "## Targets" in (out / "summary.md").read_text()
  tc = res["train_check"]  # the training loop end to end, on the Pallas path when on GPU
  assert tc["steps"] == 20 and tc["backend"] == "xla" and 0 < tc["test_mse"] < 1


def test_impl_options_set_and_restore_library_settings(tmp_path):
  """/chunks=N and /loop reach gru_jax while tracing and are restored after; bad ones are errors."""
  from gru_jax import scan
  from gru_jax.kernels import fused_rnn
  seen = []
  real = scan.cpu_chunks
  try:
    scan.cpu_chunks = lambda t: seen.append((scan.CPU_CHUNKS, fused_rnn.PRIMAL)) or real(t)
    res = benchmark.run(["2x50x4x8"], impls=["gru_jax/xla/seed/loop/chunks=3",
                                            "gru_jax/xla/seed/chunks=x"],
                        repeats=1, warmup=0, gap_ms=0, out_dir=str(tmp_path), plot=False,
                        log=lambda *_: None)
  finally:
    scan.cpu_chunks = real
  assert (3, "loop") in seen
  assert scan.CPU_CHUNKS is None and fused_rnn.PRIMAL is None
  r = res["results"][0]
  assert "gru_jax/xla/seed/loop/chunks=3" in r["timings"]
  assert "unknown option 'chunks=x'" in r["errors"]["gru_jax/xla/seed/chunks=x"]


def test_resets_option_reaches_gru(tmp_path, monkeypatch):
  """/resets=P times gru_jax with [B,T] segment resets; P outside [0,1] is refused."""
  from gru_jax import scan
  seen = []
  real = scan.effective_resets
  monkeypatch.setattr(scan, "effective_resets",
                      lambda r, *a, **k: seen.append(r.shape) or real(r, *a, **k))
  res = benchmark.run(["8x200x4x8"], impls=["gru_jax/xla/reset_after/resets=0.1",
                                            "gru_jax/xla/reset_after/resets=2"],
                      repeats=1, warmup=0, gap_ms=0, out_dir=str(tmp_path), plot=False,
                      log=lambda *_: None)
  r = res["results"][0]
  assert "gru_jax/xla/reset_after/resets=0.1" in r["timings"]
  assert "unknown option 'resets=2'" in r["errors"]["gru_jax/xla/reset_after/resets=2"]
  assert seen and set(seen) == {(8, 200)}, seen


def test_zoneout_option_reaches_the_xla_loops(tmp_path, monkeypatch):
  """/zoneout=P times gru_jax with [B,T,H] zoneout weights in the "xla" loops
  (not the scan), and "auto" resolves to "xla" with them; P outside [0,1] is refused."""
  from gru_jax.kernels import fused_rnn
  seen = []
  real = fused_rnn.recurrence  # looked up at every trace (`_make` caches its loops)
  monkeypatch.setattr(fused_rnn, "recurrence", lambda *a, zoneout=None, **k: seen.append(
      (k["impl"], zoneout.shape)) or real(*a, zoneout=zoneout, **k))
  res = benchmark.run(["8x30x4x8"], impls=["gru_jax/xla/reset_after/zoneout=0.1",
                                           "gru_jax/auto/seed/zoneout=0.1",
                                           "gru_jax/xla/reset_after/zoneout=-1"],
                      repeats=1, warmup=0, gap_ms=0, out_dir=str(tmp_path), plot=False,
                      log=lambda *_: None)
  r = res["results"][0]
  assert "gru_jax/xla/reset_after/zoneout=0.1" in r["timings"]
  assert r["timings"]["gru_jax/auto/seed/zoneout=0.1"]["path"] == "xla"
  assert "unknown option 'zoneout=-1'" in r["errors"]["gru_jax/xla/reset_after/zoneout=-1"]
  assert seen and set(seen) == {("xla", (30, 8, 8))}, seen  # [T,B,H]: AD on CPU, time-major


def test_unroll_option_reaches_the_loops(tmp_path, monkeypatch):
  """/unroll=N is the unroll the "xla" loops compile with; N < 1 is refused."""
  from gru_jax.kernels import fused_rnn
  seen = []
  real = fused_rnn._make
  monkeypatch.setattr(fused_rnn, "_make", lambda cfg: seen.append(cfg.unroll) or real(cfg))
  res = benchmark.run(["2x50x4x8"], impls=["gru_jax/xla/reset_after/unroll=4",
                                          "gru_jax/xla/reset_after/unroll=0"],
                      repeats=1, warmup=0, gap_ms=0, out_dir=str(tmp_path), plot=False,
                      log=lambda *_: None)
  r = res["results"][0]
  assert "gru_jax/xla/reset_after/unroll=4" in r["timings"]
  assert "unknown option 'unroll=0'" in r["errors"]["gru_jax/xla/reset_after/unroll=0"]
  assert seen and set(seen) == {4}, seen


def test_packed_option_reaches_the_loops(tmp_path, monkeypatch):
  """/packed makes the "xla" loops store packed rows, only for that implementation."""
  from gru_jax.kernels import fused_rnn
  seen = []
  real = fused_rnn._make
  monkeypatch.setattr(fused_rnn, "_make", lambda cfg: seen.append(cfg.packed) or real(cfg))
  res = benchmark.run(["2x5x4x8"], impls=["gru_jax/xla/seed/packed", "gru_jax/xla/seed"],
                      repeats=1, warmup=0, gap_ms=0, out_dir=str(tmp_path), plot=False,
                      log=lambda *_: None)
  assert set(res["results"][0]["timings"]) == {"gru_jax/xla/seed/packed", "gru_jax/xla/seed"}
  assert set(seen) == {True, False}, seen
  assert fused_rnn.PACKED is None  # restored after tracing


def test_split_option_reaches_the_kernels_and_pallas_never_times_xla(tmp_path, monkeypatch):
  """/split=N sets the Pallas kernels' column split while tracing that implementation
  only; a "pallas" name whose kernels do not apply is refused, not timed as "xla"."""
  from gru_jax.kernels import pallas_gru
  seen = []  # the setting each forward and backward kernel was built with
  real = pallas_gru.plan_split
  monkeypatch.setattr(pallas_gru, "plan_split", lambda **k: seen.append(k["split"]) or real(**k))
  for impl, want in [("gru_jax/pallas/reset_after/split=1", 1), ("gru_jax/pallas/reset_after", None)]:
    seen.clear()
    res = benchmark.run(["2x5x4x8"], impls=[impl], mode="train", repeats=1, warmup=0, gap_ms=0,
                        out_dir=str(tmp_path), plot=False, log=lambda *_: None)
    assert set(res["results"][0]["timings"]) == {impl}
    # the forward and the backward kernels (on CPU the dispatch does not consult it)
    assert len(seen) >= 2 and set(seen) == {want}, (impl, seen)
  assert pallas_gru.SPLIT is None  # restored
  with pytest.raises(ValueError, match="Pallas kernels do not apply at B=2, H=6"):
    benchmark.gru_jax_apply("gru_jax/pallas/reset_after", (2, 5, 4, 6), jnp.float32)
  with pytest.raises(ValueError, match="split=N"):
    benchmark.gru_jax_apply("gru_jax/xla/reset_after/split=x", (2, 5, 4, 8), jnp.float32)


def test_split_check_refuses_a_split_that_would_not_run():
  """--split_checks: a split the kernels would not run (interpret mode runs only S=1)
  is an error naming it, not a check of the fallback; bad entries name the format."""
  from experiments import gpu_check
  from gru_jax.kernels import pallas_gru
  with pytest.raises(ValueError, match="split 4 does not run at 16x12x16x32 float32"):
    gpu_check.split_check("16x12x16x32:float32:4")
  assert pallas_gru.SPLIT is None  # restored
  with pytest.raises(ValueError, match="BxTxDxH:dtype:S"):
    gpu_check.split_check("16x12x16x32:float32")
  assert gpu_check.split_option("gru_jax/pallas/reset_after/split=16") == 16
  assert gpu_check.split_option("gru_jax/pallas/reset_after") is None


# ---------------------------------------------------------------- same function, same gradients
# Every implementation the benchmark times is checked on its own weights and inputs: the
# weights are read into gru_jax's layout with gru_jax.convert, the float64 NumPy reference
# (tests/reference.py) gives the outputs, and float64 torch autograd of the same equations
# the gradients of the benchmark's loss, sum(outputs · ct), w.r.t. the parameters and x.
# A peer's parameter gradients are read into gru_jax's layout by the same converter (a
# signed permutation) and compared where that peer has a parameter.

CHECK_SHAPE = (3, 41, 5, 16)  # T >= 40: gru_jax's CPU training step runs in time chunks
# (dtype, relative tolerance of the forward, of the gradients): bf16 runs are checked
# loosely, to show each computes the same function (Equinox, Haiku, Keras and torch
# keep a bf16 state, so their errors grow along the sequence).
TOLERANCES = {"float32": (1e-5, 1e-5), "bfloat16": (3e-2, 5e-2)}
_slow = pytest.mark.slow
CHECKED = ([pytest.param(i, "float32", id=i) for i in benchmark.default_impls("cpu")]
           + [pytest.param(i, "float32", marks=_slow, id=i) for i in (
               "gru_jax/xla/reset_after/chunks=1", "gru_jax/xla/seed/loop",
               "gru_jax/xla/seed/packed", "gru_jax/xla/reset_after/unroll=3")]
           + [pytest.param(i, "bfloat16", id=f"{i}-bf16", marks=() if i == "keras" else _slow)
              for i in benchmark.default_impls("cpu")])


def _to_gru_jax(impl, native, tree):
  """(GRUParams, variant) of ``tree``, shaped like ``impl``'s parameters (weights or grads)."""
  from gru_jax import convert
  if impl.startswith("gru_jax"):
    return tree, "reset_after" if impl == benchmark.REFERENCE else impl.split("/")[2]
  if impl == "flax":
    return convert.from_flax_linen(tree, native["module"]), "reset_after"
  if impl == "equinox":
    import equinox as eqx
    return convert.from_equinox(eqx.combine(tree, native["static"])), "reset_after"
  if impl == "haiku":
    return convert.from_haiku(tree), "seed"
  if impl == "keras":
    import keras
    layer = native["module"].__class__.from_config(native["module"].get_config())
    layer.build(tuple(native["x"].shape))
    for var, value in zip(layer.trainable_variables, tree, strict=True):
      var.assign(value)
    return convert.from_keras(layer)
  assert impl == "torch", impl
  return convert.from_torch({n: g.detach() for n, g in tree.items()}), "reset_after"


def _f64(a):
  import numpy as np
  if hasattr(a, "detach"):
    a = a.detach().float()
  return np.asarray(a, np.float64)


def _torch_reference(params, x, ct, variant):
  """float64 autograd of the reference equations: (hs, d loss/d params, d loss/d x)."""
  import torch
  w_x, w_h, b_x, b_h, xs = (torch.tensor(_f64(a), requires_grad=True)
                            for a in (*params, x))
  hsz = w_h.shape[0]
  h, hs = torch.zeros(xs.shape[0], hsz, dtype=torch.float64), []
  for t in range(xs.shape[1]):
    gx = xs[:, t] @ w_x + b_x
    zr = torch.sigmoid(gx[:, :2 * hsz] + h @ w_h[:, :2 * hsz] + b_h[:2 * hsz])
    z, r = zr[:, :hsz], zr[:, hsz:]
    if variant == "seed":
      cand = torch.tanh(gx[:, 2 * hsz:] + (r * h) @ w_h[:, 2 * hsz:] + b_h[2 * hsz:])
    else:
      cand = torch.tanh(gx[:, 2 * hsz:] + r * (h @ w_h[:, 2 * hsz:] + b_h[2 * hsz:]))
    h = (1 - z) * h + z * cand
    hs.append(h)
  hs = torch.stack(hs, 1)
  (hs * torch.tensor(_f64(ct))).sum().backward()
  return hs.detach().numpy(), [a.grad.numpy() for a in (w_x, w_h, b_x, b_h)], xs.grad.numpy()


def _close(got, want, what, rtol):
  import numpy as np
  got, want = _f64(got), _f64(want)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  err = np.max(np.abs(got - want), initial=0.0)
  assert err <= rtol * max(np.max(np.abs(want), initial=0.0), 1.0), (what, err)


@pytest.mark.parametrize("impl,dtype", CHECKED)
def test_every_implementation_computes_the_same_function_and_gradients(impl, dtype):
  """Forward outputs and the train step's gradients (every parameter and x) against float64."""
  import jax
  import numpy as np
  from tests import reference
  fwd_tol, grad_tol = TOLERANCES[dtype]
  fwd = benchmark.build(impl, CHECK_SHAPE, "forward", dtype)
  params, variant = _to_gru_jax(impl, fwd.native, fwd.native["params"])
  want_hs = reference.run(params, _f64(fwd.native["x"]), variant=variant)[1]
  _close(fwd.result(), want_hs, f"{impl} forward", fwd_tol)
  train = benchmark.build(impl, CHECK_SHAPE, "train", dtype)
  native = train.native
  params, variant = _to_gru_jax(impl, native, native["params"])
  hs, grads, dx = _torch_reference(params, native["x"], native["ct"], variant)
  want_hs = reference.run(params, _f64(native["x"]), variant=variant)[1]
  _close(hs, want_hs, "torch float64 reference against tests/reference.py", 1e-10)
  got_grads, got_dx = train.result()
  assert got_dx is not None, f"{impl}: the train step does not differentiate x"
  _close(got_dx, dx, f"{impl} d/dx", grad_tol)
  # Where the peer has a parameter: the converter of a tree of ones is nonzero there.
  ones = jax.tree.map(lambda a: a * 0 + 1, native["params"])
  present = _to_gru_jax(impl, native, ones)[0]
  got = _to_gru_jax(impl, native, got_grads)[0]
  assert jax.tree.structure(got_grads) == jax.tree.structure(native["params"]), impl
  for name, g, w, where in zip(params._fields, got, grads, present, strict=True):
    where = _f64(where) != 0
    assert where.any() or (impl, name) == ("haiku", "b_h"), (impl, name)
    _close(np.where(where, _f64(g), 0), np.where(where, w, 0), f"{impl} d/d{name}", grad_tol)


def test_memory_rows_name_the_backend_they_measure(tmp_path, capsys):
  """experiments.memory: remat runs the "scan" backend, no remat the default ("xla" on CPU)."""
  from experiments import memory
  out = tmp_path / "mem.json"
  argv = ["memory", "--seq_lens=6", "--batch=2", "--input_size=3", "--hidden=8",
          "--remat_chunk=3", f"--out={out}"]
  flags.FLAGS(argv)
  try:
    memory.main(argv[:1])
  finally:
    flags.FLAGS.unparse_flags()
  rows = json.load(open(out))
  assert [(r["remat_chunk"], r["backend"]) for r in rows] == [(None, "xla"), (3, "scan")]
  assert " scan " in capsys.readouterr().out
