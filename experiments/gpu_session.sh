#!/usr/bin/env bash
# The next device-tool session's measurements, in one call of under 600 s
# (docs/benchmarks.md, "Next GPU session"); everything lands under $OUT.
#   1. experiments.gpu_check: one Pallas check, one of the packed stores and one
#      of the Pallas kernels with zoneout against "xla" and "scan", then Keras-JAX at the two shapes where it is
#      unmeasured (Flax and Equinox were measured there on the H200), with
#      gru_jax, its XLA loops with packed stores and at unroll=8, and torch
#      beside it;
#   2. the Pallas kernels at H=256 with a column split (S=8 f32, S=16 bf16),
#      where only each program's share of the weights fits on chip: checked
#      against "xla" and "scan", then timed beside gru_jax's default ("xla") at
#      16x2000x256x256 (f32 forward: the ANCHORS row where Keras-JAX is
#      unmeasured and gru_jax took 16.5 ms on the H200, cuDNN 26.3);
#   3. gru_jax (as is, packed stores, unroll=8) and torch at train
#      128x500x1024x1024 (the cuDNN target) and forward 256x200x512x512,
#      without XLA_FLAGS, then (gru_jax and packed stores only) under two
#      settings (cuBLAS instead of XLA's Triton GEMMs; while loops recorded into
#      CUDA graphs).  Flags are a process setting, hence one process each; an
#      unknown flag fails only its own run.
# GPU_SESSION_TINY=1 rehearses it on CPU with tiny shapes (Pallas interpreted).
# The device tool brings back at most 8 files from $OUT, so every stage writes
# under $OUT/s/ and the end (or an early exit) packs them into
# $OUT/gpu_session.tgz; the tables are printed as they come too.
set -u
OUT=${OUT:?set OUT to the output directory}
S="$OUT/s"
mkdir -p "$S"
pack() { tar czf "$OUT/gpu_session.tgz" -C "$S" . && rm -rf "$S"; }
trap pack EXIT
if compgen -G ".whl/*.whl" > /dev/null; then  # Keras, Haiku, ml_collections: not in the image
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# x scales every budget and timeout: the CPU rehearsal interprets the Pallas
# kernels, and on a loaded 2-core machine its split stage overran 65 s.
x=1
if [[ "${GPU_SESSION_TINY:-0}" == 1 ]]; then
  x=3
  tiny=(--tiny --repeats=2)
  runs=train:8x20x16x16:float32,forward:8x40x16x32:float32
  probe_runs=train:8x30x16x32:float32,forward:4x20x8x16:float32
  # interpret mode runs only S=1; S=4 shows the refusal of an unchecked split
  s_a=1 s_b=4
  split_checks=16x12x16x32:float32:$s_a,16x12x16x32:bfloat16:$s_a
  split_runs=forward:16x30x16x32:float32,forward:16x30x16x32:bfloat16
else
  tiny=()
  runs=train:256x200x512x512:float32,forward:16x2000x256x256:float32
  probe_runs=train:128x500x1024x1024:float32,forward:256x200x512x512:float32
  # compiled for an H100 without one (experiments/gpu_hlo.py --ptxas): S=8 f32
  # spills 1 KB a thread in the forward kernel, S=16 bf16 nothing
  s_a=8 s_b=16
  split_checks=16x100x64x256:float32:$s_a,16x100x64x256:bfloat16:$s_b
  split_runs=forward:16x2000x256x256:float32,forward:16x2000x256x256:bfloat16,train:16x2000x256x256:bfloat16
fi
unroll=gru_jax/xla/reset_after/unroll=8
packed=gru_jax/xla/reset_after/packed  # 9 kernels a train step, not 16 (experiments/gpu_hlo.py)
# Each budget skips the runs left once it is spent; each timeout stops a run
# that overruns it (on the H100 the H=1024 train row took 240 s for nine
# implementations, mostly compiling).  195 + 90 + 120 + 2 x 85 = 575 s.
common=(--split_budget_s=0 --sweep=none --train_check=false ${tiny[@]+"${tiny[@]}"})
mkdir -p "$S/main"
timeout $((195 * x)) python3 -m experiments.gpu_check --out_dir="$S/main" \
  --budget_s=$((140 * x)) --max_checks=1 \
  --packed_checks=1 --zoneout_checks=1 \
  "${common[@]}" --impls=gru_jax,$packed,$unroll,keras,torch --runs=$runs \
  2>&1 | grep -v "^I[0-9]" | tail -30
echo "gpu_check exit ${PIPESTATUS[0]}"
echo "== column split at H=256"
mkdir -p "$S/split_h256"
timeout $((90 * x)) python3 -m experiments.gpu_check --out_dir="$S/split_h256" \
  --budget_s=$((65 * x)) \
  --max_checks=0 --packed_checks=0 --zoneout_checks=0 "${common[@]}" --split_checks=$split_checks \
  --impls=gru_jax,gru_jax/pallas/reset_after/split=$s_a,gru_jax/pallas/reset_after/split=$s_b \
  --runs=$split_runs 2>&1 | grep -v "^I[0-9]" | grep "split check\|not timed\|^| \|FAILED"
echo "exit ${PIPESTATUS[0]}"
probe=0
for flag in "" --xla_gpu_enable_triton_gemm=false \
    "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CONDITIONAL,WHILE --xla_gpu_graph_min_graph_size=1"; do
  probe=$((probe + 1))
  # Without flags, unroll=8 and torch too; under each flag only the default and packed
  # stores (torch does not read XLA_FLAGS).
  if [[ $probe == 1 ]]; then impls=gru_jax,$packed,$unroll,torch; limit=120; else
    impls=gru_jax,$packed; limit=85; fi
  echo "== probe $probe: XLA_FLAGS=$flag"
  mkdir -p "$S/xla_flags_$probe" && echo "$flag" > "$S/xla_flags_$probe/xla_flags.txt"
  XLA_FLAGS=$flag timeout $((limit * x)) python3 -m experiments.gpu_check \
    --out_dir="$S/xla_flags_$probe" --budget_s=$(((limit - 30) * x)) --max_checks=0 \
    --packed_checks=0 --zoneout_checks=0 "${common[@]}" \
    --impls=$impls --runs=$probe_runs 2>&1 | grep -v "^I[0-9]" | grep -A4 "^| step"
  echo "exit ${PIPESTATUS[0]}"
done
