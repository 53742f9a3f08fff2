#!/usr/bin/env bash
# The next device-tool session's measurements, in one call (docs/benchmarks.md,
# "Next GPU session"); everything lands under $OUT.
#   1. experiments.gpu_check: one correctness check, then the H=1024 cuDNN
#      target, unroll=2, and Keras-JAX at the two shapes where it is unmeasured
#      (Flax and Equinox were measured at all three on the H200);
#   2. gru_jax and torch at 128x500x1024x1024 and 256x200x512x512, train and
#      forward, without XLA_FLAGS and then under two settings (cuBLAS instead
#      of XLA's Triton GEMMs; while loops recorded into CUDA graphs). Flags are a process
#      setting, hence one subprocess each; an unknown flag only fails its own run.
# GPU_SESSION_TINY=1 rehearses it on CPU with tiny shapes (Pallas interpreted).
set -u
OUT=${OUT:?set OUT to the output directory}
if compgen -G ".whl/*.whl" > /dev/null; then  # Keras, Haiku, ml_collections: not in the image
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ "${GPU_SESSION_TINY:-0}" == 1 ]]; then
  tiny=(--tiny --repeats=2) runs=train:8x20x16x16:float32,forward:8x40x16x32:float32
  probe_shapes=8x30x16x32,4x20x8x16 budget=120 probe_s=60
else
  tiny=() runs=train:128x500x1024x1024:float32,train:256x200x512x512:float32,forward:16x2000x256x256:float32
  probe_shapes=128x500x1024x1024,256x200x512x512 budget=240 probe_s=90
fi
# The device tool allows 600 s a call: 320 + 3 x 90 leaves room for the installs.
timeout $((budget + 80)) python3 -m experiments.gpu_check --out_dir="$OUT" --budget_s=$budget --split_budget_s=0 \
  --sweep=none --max_checks=1 --train_check=false "${tiny[@]}" \
  --impls=gru_jax,gru_jax/xla/reset_after/unroll=2,keras,torch \
  --runs=$runs 2>&1 | grep -v "^I[0-9]" | tail -40
echo "gpu_check exit ${PIPESTATUS[0]}"
probe=0
for flag in "" --xla_gpu_enable_triton_gemm=false \
    "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CONDITIONAL,WHILE --xla_gpu_graph_min_graph_size=1"; do
  probe=$((probe + 1))
  echo "== XLA_FLAGS=$flag"
  XLA_FLAGS=$flag timeout $probe_s python3 -m experiments.benchmark --shapes=$probe_shapes \
    --mode=both --impls=gru_jax,torch --repeats=10 --gap_ms=0 \
    --out_dir="$OUT/xla_flags_$probe" 2>&1 | grep -v "^I[0-9]" | tail -6
  echo "exit ${PIPESTATUS[0]}"
  echo "$flag" > "$OUT/xla_flags_$probe/flag.txt" 2>/dev/null || true
done
