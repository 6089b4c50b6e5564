#!/usr/bin/env bash
# Everything only a GPU can show, in one prepared call (docs/benchmarks.md, "GPU"):
#   1. tests: the kernels, models and samplers natively on the device (Triton, not interpret mode)
#      against their float64 references, including the flash-attention slow sweep;
#   2. attention TFLOP/s: this project's Pallas kernel vs cuDNN, JAX's stock Pallas kernel and XLA
#      (experiments.bench_attention), forward and forward + backward;
#   3. the kernel's tile / launch-option sweeps (experiments.tune_flash_attention);
#   4. the verify cost model (experiments.bench_verify): r(T), each drafter's propose, acceptance,
#      whole loops at full / zero acceptance, predicted vs measured speedups, top ops; on `small`
#      and `base`, and XLA command buffers for the while body side by side (interleaved r(T), and
#      the cost model again with command buffers on);
#   5. the quickstart on a short budget (training with the Pallas kernels, then speculative
#      decoding), and greedy identity of tree decoding in bf16 vs fp32 on the model it trained.
#
#   bash experiments/device_suite.sh OUTPUT_DIR           # everything: ~10 minutes on one H200
#   (stage times measured there: tests 77 s, slow sweep 16, attention 22 + 33, tuning 42 + 47 + 32,
#   verify 33 + 24, quickstart 120-160 (+ up to 30 s of head phase since), precision runs 4 x ~23;
#   with a 10-minute limit per call, split the stages over two calls with SUITE_STAGES)
#   SUITE_SMOKE=1 bash experiments/device_suite.sh /tmp/s # tiny sizes: checks the script on a CPU
#
# SUITE_STAGES=a,b runs only the named stages (tests, tests_slow_sweep, attention_fwd,
# attention_fwd_bwd, tune_fwd_d128, tune_fwd_bwd_d128, verify_small, verify_base, verify_cmdbuf_ab,
# verify_small_cmdbuf, quickstart, spec_precision, tune_fwd_d64); SUITE_TESTS overrides the test
# files.
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
  VERIFY=(--config=tiny --tokens=1,4 --tree_tokens=4 --drafters=mtp --steps=2 --repeats=2 --cache_len=64
          --prefix_len=16 --prompt_len=8 --new_tokens=4,8) BASE_VERIFY=(--config=tiny)
  AB_VERIFY=(--config=tiny --tokens=1,4 --steps=2 --repeats=2 --cache_len=64 --prefix_len=16)
  QUICK=(--minutes=0.1 --steps=4 --draft_minutes=0.05 --draft_steps=4 --draft_config=tiny
         --config=tiny --num_prompts=1 --prompt_len=8 --max_new_tokens=8 --batch_size=2 --seq_len=32
         --drafters=medusa_chain,model_chain --draft_gamma=3 --head_steps=4 --head_minutes=0.05)
  TUNE=(--seq_lens=64 --batch_tokens=128 --block_qs=16,32 --block_ks=16 --num_warps=4
        --num_stages=2 --repeats=2) TUNE_LIMIT=60
  SPEC=(--num_prompts=1 --prompt_len=8 --max_new_tokens=8 --stop_at_eos=false) SPEC_TREES=(4 8)
  WORKERS=2
else
  TEST_ARGS=(tests/test_flash_attention.py tests/test_flash_attention_export.py
             tests/test_decode_attention.py tests/test_attention.py tests/test_kv_cache.py
             tests/test_models.py tests/test_decoding.py tests/test_speculative.py)
  SLOW_ARGS=(tests/test_flash_attention.py -m slow -k "gpu")
  ATTN=(--seq_lens=1024,4096,16384 --batch_tokens=16384 --num_heads=16 --head_dim=128 --repeats=10
        --max_memory_gb=40)
  VERIFY=() BASE_VERIFY=(--config=base) AB_VERIFY=(--config=small --tokens=1,2,4,8,16,32,64)
  QUICK=(--minutes=1 --steps=2000 --draft_minutes=0.3 --draft_steps=1500 --head_minutes=0.5
         --num_prompts=4 --drafters=mtp_chain,medusa_chain,medusa_tree,model_chain)
  TUNE=(--seq_lens=4096 --batch_tokens=16384 --repeats=10) TUNE_LIMIT=80
  SPEC=(--num_prompts=4 --max_new_tokens=128 --stop_at_eos=false) SPEC_TREES=(14 60)
  WORKERS=8
fi
[[ -n "${SUITE_TESTS:-}" ]] && read -r -a TEST_ARGS <<< "$SUITE_TESTS"

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

want() { [[ -z "${SUITE_STAGES:-}" || ",$SUITE_STAGES," == *",$1,"* ]]; }
tune() {  # tune NAME HEAD_DIM HEADS MODE GRID...
  local name=$1 d=$2 h=$3 mode=$4
  shift 4
  want "$name" && stage "$name" "$TUNE_LIMIT" "$PY" -m experiments.tune_flash_attention \
    --mode="$mode" --head_dim="$d" --num_heads="$h" "${TUNE[@]}" "$@" --output="$WORK/$name"
}

want tests && stage tests 150 "$PY" -m pytest -q -n "$WORKERS" -p no:cacheprovider "${TEST_ARGS[@]}"
want tests_slow_sweep && stage tests_slow_sweep 60 "$PY" -m pytest -q -n "$WORKERS" \
  -p no:cacheprovider "${SLOW_ARGS[@]}"
want attention_fwd && stage attention_fwd 80 "$PY" -m experiments.bench_attention --mode=fwd \
  --dtype=bfloat16 --causal "${ATTN[@]}" --output="$WORK/attention_fwd"
want attention_fwd_bwd && stage attention_fwd_bwd 110 "$PY" -m experiments.bench_attention \
  --mode=fwd_bwd --dtype=bfloat16 --causal "${ATTN[@]}" --output="$WORK/attention_fwd_bwd"
tune tune_fwd_d128 128 16 fwd
tune tune_fwd_bwd_d128 128 16 fwd_bwd --num_stages=2
want verify_small && stage verify_small 150 "$PY" -m experiments.bench_verify --config=small \
  "${VERIFY[@]}" --workdir="$WORK/verify_small"
want verify_base && stage verify_base 150 "$PY" -m experiments.bench_verify "${VERIFY[@]}" \
  "${BASE_VERIFY[@]}" --workdir="$WORK/verify_base"
# XLA command buffers (CUDA graphs) for the loop bodies, WHILE included, side by side with XLA's
# default and with none: interleaved r(T) and whole plain / Medusa / EAGLE loops (`--ab_loops`, in
# plain steps: section 3's target is <= 1.15) of one checkout under three flag sets, then the whole
# cost model (loops at full acceptance) with command buffers on, to compare with verify_small.
CMDBUF="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CONDITIONAL,WHILE"
CMDBUF="$CMDBUF --xla_gpu_graph_min_graph_size=1"
want verify_cmdbuf_ab && stage verify_cmdbuf_ab 240 "$PY" -m experiments.bench_verify \
  "${AB_VERIFY[@]}" --ab="xla_default=." \
  --ab="none=. --xla_gpu_enable_command_buffer=" --ab="while=. $CMDBUF" --ab_loops=medusa,eagle \
  --workdir="$WORK/verify_cmdbuf_ab"
want verify_small_cmdbuf && stage verify_small_cmdbuf 150 env XLA_FLAGS="$CMDBUF" "$PY" \
  -m experiments.bench_verify --config=small "${VERIFY[@]}" --workdir="$WORK/verify_small_cmdbuf"
want quickstart && stage quickstart 200 "$PY" -m experiments.quickstart "${QUICK[@]}" \
  --workdir="$WORK/quickstart"
# Greedy identity vs decoding precision, on the model the quickstart trained.
for nodes in "${SPEC_TREES[@]}"; do  # Medusa's mc_sim_7b_63 paths of depth <= 3: the default tree, and more
  for precision in bf16 fp32; do
    want spec_precision && stage "spec_tree${nodes}_$precision" 40 "$PY" -m experiments.speculative \
      --workdir="$WORK/quickstart" --draft=medusa --tree="default:$nodes" --precision="$precision" \
      "${SPEC[@]}" --output="$WORK/spec_tree${nodes}_$precision"
  done
done
tune tune_fwd_d64 64 32 fwd --block_ks=64,128

# The tables people look at, last (the call's reply shows the end of the output).
for name in tests tests_slow_sweep; do echo "--- $name"; tail -n 4 "$WORK/$name.log"; done
for name in attention_fwd attention_fwd_bwd; do
  echo "--- $name"; grep -A 40 '^impl ' "$WORK/$name.log" | head -n 20; done
for name in tune_fwd_d128 tune_fwd_bwd_d128 tune_fwd_d64; do
  echo "--- $name"; grep -A 8 'block_q block_k' "$WORK/$name.log" 2>/dev/null; done
for name in verify_small verify_base verify_small_cmdbuf; do
  echo "--- $name"; head -n 40 "$WORK/$name/results.md" 2>/dev/null; done
echo "--- verify_cmdbuf_ab"; tail -n 25 "$WORK/verify_cmdbuf_ab.log" 2>/dev/null
echo "--- quickstart"; grep -A 8 '^drafter ' "$WORK/quickstart.log"
for f in "$WORK"/spec_*.log; do echo "--- $(basename "$f")"; grep -A 2 'tau  speedup' "$f"; done
cat "$WORK/stages.txt"
