#!/usr/bin/env bash
# Everything only a GPU can show, in one prepared call (docs/benchmarks.md, "GPU"):
#   1. tests: the kernels, models and samplers natively on the device (Triton, not interpret mode)
#      against their float64 references, including the flash-attention slow sweep;
#   2. attention TFLOP/s: this project's Pallas kernel vs cuDNN, JAX's stock Pallas kernel and XLA
#      (experiments.bench_attention), forward and forward + backward;
#   3. verify cost r(T) of the sampler's chain verify step (experiments.bench_verify);
#   4. the quickstart on a short budget (training with the Pallas kernels, then speculative decoding).
#
#   bash experiments/device_suite.sh OUTPUT_DIR           # full run (under 10 minutes on one H200)
#   SUITE_SMOKE=1 bash experiments/device_suite.sh /tmp/s # tiny sizes: checks the script on a CPU
#
# Every stage has its own time limit and log; a failing stage does not stop the next. After each
# stage all logs and results so far are packed into OUTPUT_DIR/suite.tgz (a killed call still
# returns what finished) and OUTPUT_DIR/stages.txt lists each stage's exit code and seconds.
set -u
OUT_DIR=${1:?usage: device_suite.sh OUTPUT_DIR}
WORK=${SUITE_WORK:-/tmp/device_suite}
PY=${PYTHON:-python3}
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT_DIR"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=1

if [[ -n "${SUITE_SMOKE:-}" ]]; then
  TEST_ARGS=(tests/test_decode_attention.py -k "triton or matches") SLOW_ARGS=(-k "nothing_matches")
  ATTN=(--seq_lens=64,128 --batch_tokens=256 --num_heads=2 --head_dim=32 --repeats=2)
  VERIFY=(--tokens=1,4 --steps=4 --repeats=2 --cache_len=64 --prefix_len=16) BASE_VERIFY=(--config=tiny)
  QUICK=(--minutes=0.1 --steps=4 --draft_minutes=0.05 --draft_steps=4 --draft_config=tiny
         --config=tiny --num_prompts=1 --prompt_len=8 --max_new_tokens=8 --batch_size=2 --seq_len=32
         --drafters=medusa_chain,model_chain --draft_gamma=3)
  WORKERS=2
else
  TEST_ARGS=(tests/test_flash_attention.py tests/test_flash_attention_export.py
             tests/test_decode_attention.py tests/test_attention.py tests/test_kv_cache.py
             tests/test_models.py tests/test_decoding.py tests/test_speculative.py)
  SLOW_ARGS=(tests/test_flash_attention.py -m slow -k "gpu")
  ATTN=(--seq_lens=1024,4096,16384 --batch_tokens=16384 --num_heads=16 --head_dim=128 --repeats=10
        --max_memory_gb=40)
  VERIFY=() BASE_VERIFY=(--config=base --precisions=bf16)
  QUICK=(--minutes=1.5 --steps=2000 --draft_minutes=0.3 --draft_steps=1500 --num_prompts=4
         --drafters=mtp_chain,medusa_chain,medusa_tree,model_chain)
  WORKERS=8
fi

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "=== $name (limit ${limit}s): $*" | tee -a "$WORK/stages.txt"
  timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  echo "=== $name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$WORK/stages.txt"
  tar czf "$OUT_DIR/suite.tgz" --exclude=data_cache --exclude=checkpoints -C "$WORK" . && cp "$WORK/stages.txt" "$OUT_DIR/stages.txt"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  "$PY" -c 'import jax, flax, sys; print(sys.version.split()[0], "jax", jax.__version__, "flax",
  flax.__version__, jax.devices())'; } > "$WORK/info.log" 2>&1
cat "$WORK/info.log"

stage tests 150 "$PY" -m pytest -q -n "$WORKERS" -p no:cacheprovider "${TEST_ARGS[@]}"
stage tests_slow_sweep 60 "$PY" -m pytest -q -n "$WORKERS" -p no:cacheprovider "${SLOW_ARGS[@]}"
stage attention_fwd 80 "$PY" -m experiments.bench_attention --mode=fwd --dtype=bfloat16 \
  --causal "${ATTN[@]}" --output="$WORK/attention_fwd"
stage attention_fwd_bwd 110 "$PY" -m experiments.bench_attention --mode=fwd_bwd --dtype=bfloat16 \
  --causal "${ATTN[@]}" --output="$WORK/attention_fwd_bwd"
stage verify_small 60 "$PY" -m experiments.bench_verify --config=small "${VERIFY[@]}" \
  --workdir="$WORK/verify_small"
stage verify_base 50 "$PY" -m experiments.bench_verify "${VERIFY[@]}" "${BASE_VERIFY[@]}" \
  --workdir="$WORK/verify_base"
stage quickstart 200 "$PY" -m experiments.quickstart "${QUICK[@]}" --workdir="$WORK/quickstart"

# The tables people look at, last (the call's reply shows the end of the output).
for name in tests tests_slow_sweep; do echo "--- $name"; tail -n 4 "$WORK/$name.log"; done
for name in attention_fwd attention_fwd_bwd; do
  echo "--- $name"; grep -A 40 '^impl ' "$WORK/$name.log" | head -n 20; done
for name in verify_small verify_base; do echo "--- $name"; cat "$WORK/$name/results.md" 2>/dev/null; done
echo "--- quickstart"; grep -B 2 -A 12 'drafter' "$WORK/quickstart.log" | tail -n 16
cat "$WORK/stages.txt"
