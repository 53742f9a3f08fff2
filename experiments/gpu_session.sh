#!/usr/bin/env bash
# The next device-tool session's measurements, in one call (docs/benchmarks.md,
# "Next GPU session"); everything lands under $OUT.
#   1. experiments.gpu_check: one correctness check, then the H=1024 cuDNN
#      target, unroll=2, and Keras-JAX at the two shapes where it is unmeasured
#      (Flax and Equinox were measured at all three on the H200);
#   2. the H=1024 train step again under two XLA_FLAGS settings (cuBLAS instead
#      of XLA's Triton GEMMs; while loops inside CUDA graphs). Flags are a
#      process setting, hence one subprocess each; an unknown flag only fails
#      its own run.
# GPU_SESSION_TINY=1 rehearses it on CPU with tiny shapes (Pallas interpreted).
set -u
OUT=${OUT:?set OUT to the output directory}
if compgen -G ".whl/*.whl" > /dev/null; then  # Keras, Haiku, ml_collections: not in the image
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ "${GPU_SESSION_TINY:-0}" == 1 ]]; then
  tiny=(--tiny --repeats=2) runs=train:8x20x16x16:float32,forward:8x40x16x32:float32
  big=8x30x16x32 budget=120 probe_s=60
else
  tiny=() runs=train:128x500x1024x1024:float32,train:256x200x512x512:float32,forward:16x2000x256x256:float32
  big=128x500x1024x1024 budget=300 probe_s=95
fi
# The device tool allows 600 s a call: 380 + 2 x 95 leaves room for the installs.
timeout $((budget + 80)) python3 -m experiments.gpu_check --out_dir="$OUT" --budget_s=$budget --split_budget_s=0 \
  --sweep=none --max_checks=1 --train_check=false "${tiny[@]}" \
  --impls=gru_jax,gru_jax/xla/reset_after/unroll=2,keras,torch \
  --runs=$runs 2>&1 | grep -v "^I[0-9]" | tail -40
echo "gpu_check exit ${PIPESTATUS[0]}"
probe=0
for flag in --xla_gpu_enable_triton_gemm=false \
    --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CONDITIONAL,WHILE; do
  probe=$((probe + 1))
  echo "== XLA_FLAGS=$flag"
  XLA_FLAGS=$flag timeout $probe_s python3 -m experiments.benchmark --shapes=$big --mode=train \
    --impls=gru_jax,gru_jax/xla/reset_after/unroll=2,torch --repeats=10 \
    --out_dir="$OUT/xla_flags_$probe" 2>&1 | grep -v "^I[0-9]" | tail -4
  echo "exit ${PIPESTATUS[0]}"
  echo "$flag" > "$OUT/xla_flags_$probe/flag.txt" 2>/dev/null || true
done
