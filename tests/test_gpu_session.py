"""experiments/gpu_session.sh, the next device session's one call, rehearsed on CPU.

The device tool brings back at most 8 files from $OUT, no more than two folders
down; a script that wrote more would lose most of a scarce GPU session's
results (the fourteenth session's wrote 15).  With GPU_SESSION_TINY=1 every stage
runs at tiny shapes, the Pallas kernels in interpret mode.
"""
import json
import os
import subprocess
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_session_script_runs_every_stage_and_returns_one_archive(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  env = dict(os.environ, GPU_SESSION_TINY="1", OUT=str(out), JAX_PLATFORMS="cpu")
  r = subprocess.run(["bash", "experiments/gpu_session.sh"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=1800)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert sorted(os.listdir(out)) == ["gpu_session.tgz"]  # well within the tool's 8 files
  with tarfile.open(out / "gpu_session.tgz") as tar:
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
    tar.extractall(tmp_path / "x", **safe)
  got = lambda stage: json.load(open(tmp_path / "x" / stage / "results.json"))
  stages = ["main", "split_h256", "xla_flags_1", "xla_flags_2", "xla_flags_3"]
  assert sorted(os.listdir(tmp_path / "x")) == sorted(stages)
  for stage in stages:  # every stage ran to its end and timed gru_jax
    res = got(stage)
    assert res["errors"] == [], (stage, res["errors"])
    assert res["bench"] and all("gru_jax" in b["timings"] for b in res["bench"]), stage
  main = got("main")
  assert [c.get("packed") for c in main["correctness"]] == [None, False, True, False]
  assert [c.get("zoneout") for c in main["correctness"]] == [None, False, False, True]
  assert all(c["ok"] for c in main["correctness"])
  split = got("split_h256")  # interpret mode runs S=1 only: S=4 is left untimed
  assert [(c["split"], c["dtype"], c["ok"]) for c in split["correctness"][1:]] == [
      (1, "float32", True), (1, "bfloat16", True)]
  assert sorted(split["not_timed"]) == ["gru_jax/pallas/reset_after/split=4 bfloat16",
                                        "gru_jax/pallas/reset_after/split=4 float32"]
  assert all("gru_jax/pallas/reset_after/split=1" in b["timings"] for b in split["bench"])
  # Each flagged probe ran under its own XLA_FLAGS, which the archive records.
  flags = [(tmp_path / "x" / f"xla_flags_{i}" / "xla_flags.txt").read_text().strip()
           for i in (1, 2, 3)]
  assert flags[0] == "" and flags[1] == "--xla_gpu_enable_triton_gemm=false"
  assert "WHILE" in flags[2]
