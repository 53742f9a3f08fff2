"""Smoke test of experiments/benchmark.py: runs, writes JSON and PNG with the expected fields.

No timing assertions: speed targets live in the benchmark and docs/benchmarks.md.
"""
import json
import os

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


def test_unknown_impl_is_reported_not_fatal(tmp_path):
  res = benchmark.run(["2x3x4x8"], impls=["gru_jax", "nonesuch"], repeats=1, warmup=0, gap_ms=0,
                      out_dir=str(tmp_path), plot=False, log=lambda *_: None)
  assert "nonesuch" in res["results"][0]["errors"]
  assert "unknown implementation" in res["results"][0]["errors"]["nonesuch"]
