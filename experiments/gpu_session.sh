#!/usr/bin/env bash
# The next device-tool session's measurements, in one call of under 600 s
# (docs/benchmarks.md, "Next GPU session"); everything lands under $OUT.
#   1. experiments.gpu_check: one Pallas check and one of the packed stores
#      against "xla" and "scan", then Keras-JAX at the two shapes where it is
#      unmeasured (Flax and Equinox were measured there on the H200), with
#      gru_jax, its XLA loops with packed stores and at unroll=8, and torch
#      beside it;
#   2. gru_jax (as is, packed stores, unroll=8) and torch at train
#      128x500x1024x1024 (the cuDNN target) and forward 256x200x512x512,
#      without XLA_FLAGS, then (without unroll=8) under two settings (cuBLAS
#      instead of XLA's Triton GEMMs; while loops recorded into CUDA graphs).
#      Flags are a process setting, hence one process each; an unknown flag
#      fails only its own run.
# GPU_SESSION_TINY=1 rehearses it on CPU with tiny shapes (Pallas interpreted).
set -u
OUT=${OUT:?set OUT to the output directory}
if compgen -G ".whl/*.whl" > /dev/null; then  # Keras, Haiku, ml_collections: not in the image
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ "${GPU_SESSION_TINY:-0}" == 1 ]]; then
  tiny=(--tiny --repeats=2)
  runs=train:8x20x16x16:float32,forward:8x40x16x32:float32
  probe_runs=train:8x30x16x32:float32,forward:4x20x8x16:float32
else
  tiny=()
  runs=train:256x200x512x512:float32,forward:16x2000x256x256:float32
  probe_runs=train:128x500x1024x1024:float32,forward:256x200x512x512:float32
fi
unroll=gru_jax/xla/reset_after/unroll=8
packed=gru_jax/xla/reset_after/packed  # 9 kernels a train step, not 16 (experiments/gpu_hlo.py)
# Each budget skips the runs left once it is spent; each timeout stops a run
# that overruns it (on the H100 the H=1024 train row took 240 s for nine
# implementations, mostly compiling).  230 + 130 + 2 x 110 = 580 s.
common=(--split_budget_s=0 --sweep=none --train_check=false ${tiny[@]+"${tiny[@]}"})
timeout 230 python3 -m experiments.gpu_check --out_dir="$OUT" --budget_s=170 --max_checks=1 \
  --packed_checks=1 \
  "${common[@]}" --impls=gru_jax,$packed,$unroll,keras,torch --runs=$runs \
  2>&1 | grep -v "^I[0-9]" | tail -30
echo "gpu_check exit ${PIPESTATUS[0]}"
probe=0
for flag in "" --xla_gpu_enable_triton_gemm=false \
    "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CONDITIONAL,WHILE --xla_gpu_graph_min_graph_size=1"; do
  probe=$((probe + 1))
  # Without flags, unroll=8 too; under each flag only the default and packed stores.
  if [[ $probe == 1 ]]; then impls=gru_jax,$packed,$unroll,torch; limit=130; else
    impls=gru_jax,$packed,torch; limit=110; fi
  echo "== probe $probe: XLA_FLAGS=$flag"
  mkdir -p "$OUT/xla_flags_$probe" && echo "$flag" > "$OUT/xla_flags_$probe/xla_flags.txt"
  XLA_FLAGS=$flag timeout $limit python3 -m experiments.gpu_check \
    --out_dir="$OUT/xla_flags_$probe" --budget_s=$((limit - 30)) --max_checks=0 --packed_checks=0 "${common[@]}" \
    --impls=$impls --runs=$probe_runs 2>&1 | grep -v "^I[0-9]" | grep -A4 "^| step"
  echo "exit ${PIPESTATUS[0]}"
done
