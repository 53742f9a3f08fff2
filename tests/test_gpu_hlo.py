"""experiments/gpu_hlo.py: the HLO parser on known text, and a deviceless GPU compile.

The compile needs the CUDA plugin of the installed JAX's version
(jax-cuda12-plugin and jax-cuda12-pjrt, no NVIDIA libraries); .ci/run installs
it into .cuda-plugin/ for its pinned stage, and the test runs the tool in a
subprocess with it on the path.  Without it the test is skipped.
"""
import json
import os
import subprocess
import sys

import pytest

from experiments import gpu_hlo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(ROOT, ".cuda-plugin")

# Trimmed from the optimised HLO of a seed-variant forward loop compiled for an
# H100 with cuBLAS GEMMs: two tuple-typed custom calls, three fusions and the
# counter's fusion launch work; the rest does not.  A second loop has no known
# trip count and an empty body.
HLO = r"""
HloModule jit_fn, entry_computation_layout={(f32[16,32]{1,0})->f32[16,32]{1,0}}

%body.1 (arg_tuple.13: (s32[], f32[16,32], f32[16,12,128])) -> (s32[], f32[16,32], f32[16,12,128]) {
  %arg_tuple.13 = (s32[], f32[16,32]{1,0}, f32[16,12,128]{2,1,0}) parameter(0)
  %get-tuple-element.263 = f32[16,32]{1,0} get-tuple-element(%arg_tuple.13), index=1
  %custom-call.2 = (f32[16,64]{1,0}, s8[4194304]{0}) custom-call(%get-tuple-element.263, %get-tuple-element.263), custom_call_target="__cublas$lt$matmul"
  %get-tuple-element.235.0 = f32[16,64]{1,0} get-tuple-element(%custom-call.2), index=0
  %loop_add_multiply_fusion = (f32[16,1,32]{2,1,0}, f32[16,32]{1,0}) fusion(%get-tuple-element.263, %get-tuple-element.235.0), kind=kLoop, calls=%fused_add_multiply
  %bitcast.1.0 = f32[16,32]{1,0} bitcast(%get-tuple-element.263)
  %cublas-lt-matmul.2 = (f32[16,32]{1,0}, s8[4194304]{0}) custom-call(%bitcast.1.0, %bitcast.1.0), custom_call_target="__cublas$lt$matmul", output_to_operand_aliasing={{0}: (2, {})}
  %loop_dynamic_update_slice_fusion = f32[16,12,128]{2,1,0} fusion(%get-tuple-element.263), kind=kLoop, calls=%fused_dus
  %loop_add_fusion = f32[16,32]{1,0} fusion(%get-tuple-element.263), kind=kLoop, calls=%fused_add, control-predecessors={%loop_dynamic_update_slice_fusion, %custom-call.2}
  %get-tuple-element.262 = s32[] get-tuple-element(%arg_tuple.13), index=0
  %loop_add_fusion.1 = s32[] fusion(%get-tuple-element.262), kind=kLoop, calls=%fused_add.1
  ROOT %tuple.35 = (s32[], f32[16,32]{1,0}, f32[16,12,128]{2,1,0}) tuple(%loop_add_fusion.1, %loop_add_fusion, %loop_dynamic_update_slice_fusion)
}

%cond.1 (arg: (s32[], f32[16,32], f32[16,12,128])) -> pred[] {
  %arg = (s32[], f32[16,32]{1,0}, f32[16,12,128]{2,1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%body.2 (p: f32[4]) -> f32[4] {
  ROOT %p = f32[4]{0} parameter(0)
}

ENTRY %main.1 (a.1: f32[16,32]) -> f32[16,32] {
  %a.1 = f32[16,32]{1,0} parameter(0)
  %tuple.33 = (s32[], f32[16,32]{1,0}, f32[16,12,128]{2,1,0}) tuple(%a.1, %a.1, %a.1)
  %while.2 = (s32[], f32[16,32]{1,0}, f32[16,12,128]{2,1,0}) while(%tuple.33), condition=%cond.1, body=%body.1, backend_config={"known_trip_count":{"n":"12"},"known_init_step":{"init":"0","step":"1"}}
  %while.3 = f32[4]{0} while(%a.1), condition=%cond.1, body=%body.2
  ROOT %copy.1 = f32[16,32]{1,0} copy(%a.1)
}
"""


def test_loop_kernels_counts_what_each_iteration_launches():
  loops = gpu_hlo.loop_kernels(HLO)
  assert [lp["body"] for lp in loops] == ["body.1", "body.2"]
  assert loops[0]["trip_count"] == 12 and loops[1]["trip_count"] is None
  assert loops[0]["kernels"] == [
      "custom-call[__cublas$lt$matmul]:custom-call.2", "fusion:loop_add_multiply_fusion",
      "custom-call[__cublas$lt$matmul]:cublas-lt-matmul.2",
      "fusion:loop_dynamic_update_slice_fusion",
      "fusion:loop_add_fusion", "fusion:loop_add_fusion.1"]
  assert loops[1]["kernels"] == []
  assert gpu_hlo.summary(loops) == "12 × 6 kernels; ? × 0 kernels"
  assert gpu_hlo.summary([]) == "no while loops"


# Lines of XLA's thunk sequence dump for a Pallas forward (H100, unsplit kernel at
# 64x100x128x128), and ptxas -v's report on that kernel's PTX.
THUNKS = """
002: kCustomKernel [source       | next=006 (4)] loop_add_fusion grid: [3, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
005: kCustomKernel [source       | next=006 (1)] gemm_fusion_dot grid: [19200, 1, 1] threads: [64, 1, 1]  shared_memory: 1024 bytes
006: kCustomKernel [prev=005 (1) | sink        ] _forward_kernel grid: [4, 1, 1] threads: [256, 1, 1]  shared_memory: 212992 bytes
"""
PTXAS = """ptxas info    : Compiling entry function '_forward_kernel' for 'sm_90a'
ptxas info    : Function properties for _forward_kernel
    0 bytes stack frame, 16 bytes spill stores, 24 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
"""


def test_pallas_kernel_resources_are_read_from_xla_and_ptxas_reports():
  kernels = gpu_hlo.pallas_kernels(THUNKS)
  assert kernels == [dict(name="_forward_kernel", grid=[4, 1, 1], threads=256,
                          shared_memory=212992)]
  res = gpu_hlo.ptxas_resources(PTXAS)
  assert res == dict(registers=255, spill_stores=16, spill_loads=24)
  assert gpu_hlo.describe_kernel({**kernels[0], **res}) == (
      "_forward_kernel: grid 4x1x1, 256 threads, 208 KB shared, 255 registers, spills 16 / 24 B")
  with pytest.raises(ValueError, match="no register report"):
    gpu_hlo.ptxas_resources("ptxas fatal: unknown option")


def test_target_configs_describe_the_cards():
  text = gpu_hlo.target_config("h100")
  assert "core_count: 132" in text and 'device_description_str: "NVIDIA H100 80GB HBM3"' in text
  assert "memory_bandwidth: 4800000000000" in gpu_hlo.target_config("h200")


def _plugin_matches_jax() -> bool:
  """Whether .cuda-plugin/ holds the CUDA plugin of the installed JAX's version."""
  import glob
  import jax
  return bool(glob.glob(os.path.join(PLUGIN, f"jax_cuda12_plugin-{jax.__version__}.dist-info")))


@pytest.mark.skipif(not _plugin_matches_jax(),
                    reason="no CUDA plugin of this JAX's version in .cuda-plugin/ (.ci/run "
                           "installs one for its pinned stage)")
def test_packed_stores_cut_the_loop_kernels_on_an_h100(tmp_path):
  """Compiled for an H100 without one: unpacked, the forward loop stores its five
  residuals with five in-place update kernels and the backward loop dxp's three
  gate blocks with three; packed, one each, into an unfilled array.  Every loop
  keeps one GEMM."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([PLUGIN, ROOT]),
             XLA_FLAGS="--xla_gpu_enable_triton_gemm=false")  # GEMMs as cuBLAS calls
  subprocess.run([sys.executable, "-m", "experiments.gpu_hlo", "--shapes=16x12x32x32",
                  "--mode=train", f"--out_dir={tmp_path}"], env=env, check=True, cwd=ROOT,
                 capture_output=True, timeout=600)
  with open(tmp_path / "gpu_hlo.json") as f:
    res = {r["impl"]: r["loops"] for r in json.load(f)["results"]}
  stores = lambda lp: sum("dynamic_update_slice" in k for k in lp["kernels"])
  gemms = lambda lp: sum("cublas" in k for k in lp["kernels"])
  unpacked, packed = res["gru_jax/xla/reset_after"], res["gru_jax/xla/reset_after/packed"]
  assert [lp["trip_count"] for lp in unpacked + packed] == [12] * 4
  assert [stores(lp) for lp in unpacked] == [5, 3]
  assert [stores(lp) for lp in packed] == [1, 1]
  assert [gemms(lp) for lp in unpacked + packed] == [1] * 4
  assert [len(lp["kernels"]) for lp in packed] < [len(lp["kernels"]) for lp in unpacked]
  # The packed residual array is allocated unfilled; the unpacked arrays keep their fills.
  hlo = lambda impl: (tmp_path / f"train_16x12x32x32_{impl.replace('/', '_')}.hlo").read_text()
  assert 'custom_call_target="AllocateBuffer"' in hlo("gru_jax/xla/reset_after/packed")
  assert "AllocateBuffer" not in hlo("gru_jax/xla/reset_after")


@pytest.mark.skipif(not _plugin_matches_jax(),
                    reason="no CUDA plugin of this JAX's version in .cuda-plugin/")
def test_split_kernels_at_h256_fit_an_h100(tmp_path):
  """Compiled for an H100 without one: at H=256 (bf16 weights, 384 KB in all) a column
  split of 16 gives each of a batch tile's 16 programs 3·256·16 weights, and XLA
  accepts both kernels within the card's 227 KB of shared memory a block."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([PLUGIN, ROOT]))
  subprocess.run([sys.executable, "-m", "experiments.gpu_hlo", "--shapes=16x6x8x256",
                  "--mode=train", "--dtype=bfloat16", f"--out_dir={tmp_path}",
                  "--impls=gru_jax/pallas/reset_after/split=16"], env=env, check=True, cwd=ROOT,
                 capture_output=True, timeout=600)
  with open(tmp_path / "gpu_hlo.json") as f:
    (res,) = json.load(f)["results"]
  assert res["loops"] == []  # the time loops run inside the kernels
  kernels = {k["name"]: k for k in res["pallas_kernels"]}
  assert set(kernels) == {"_forward_kernel", "_backward_kernel"}
  for k in kernels.values():
    assert k["grid"] == [1, 16, 1] and k["threads"] == 128
    assert 0 < k["shared_memory"] <= 232448
