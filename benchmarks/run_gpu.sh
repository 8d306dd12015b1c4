#!/usr/bin/env bash
# The single-GPU benchmark of the K latent steps' cost (H100/H200; benchmarks/RESULTS.md, "The first benchmark"). From the repo root:
#     PYTHONPATH=. bash benchmarks/run_gpu.sh          # results in $OUT (default runs/bench_gpu)
#
# 1. environment: GPU, driver, python/torch/CUDA/transformers/accelerate/peft versions (env.txt);
# 2. 3B-shaped random model, full fine-tuning rows, batch 2, K=32, bf16 (bench_3b.md/.json): plain SFT
#    step, latent full/truncated (eager, static, graphed), one forward, teacher precompute (eager, static,
#    graphed), generation per-step times, numerics (bf16 first 8 steps; fp32 all 32 steps);
# 3. 7B-shaped random model with LoRA (r=16) + gradient checkpointing, vision frozen, stage2 and stage3
#    batches (bench_7b_lora_gc.md/.json): the same rows (full-gradient row n/a with checkpointing);
# 4. if time is left: 3B full fine-tuning with an AdamW step in the training rows (peak memory of real
#    training steps: bench_3b_adamw.md/.json).
# Every run writes its table after each row, so a timeout still leaves the rows done so far.
# A global deadline (DEADLINE seconds, default 510) caps the whole script below 9 minutes.
set -u -o pipefail

OUT=${OUT:-runs/bench_gpu}
ITERS=${ITERS:-3}
K=${K:-32}
DTYPE=${DTYPE:-bf16}
BIG=${BIG:-3b}    # CPU dry run of this script: BIG=tiny LORA=tiny DTYPE=fp32 K=3 ITERS=1 (a few minutes)
LORA=${LORA:-7b}
DEADLINE=${DEADLINE:-510}
PY=${PYTHON:-python}
# the tables name their commit: git's, or LCOT_COMMIT=<hash> given on a machine that got the tree without .git
export PYTHONPATH=${PYTHONPATH:-.} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MPLCONFIGDIR=/tmp/lcot_bench_cache/mpl HF_HOME=/tmp/lcot_bench_cache/hf \
    TORCHINDUCTOR_CACHE_DIR=/tmp/lcot_bench_cache/inductor
mkdir -p "$OUT"

run() {  # run NAME LIMIT ARGS...: benchmarks/bench.py under min(LIMIT, time left), log in $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    local left=$((DEADLINE - SECONDS))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 45 ]; then
        echo "=== $name: skipped (${left}s left of the ${DEADLINE}s budget)" | tee -a "$OUT/summary.txt"
        return 0
    fi
    echo "=== $name (limit ${limit}s): $PY benchmarks/bench.py $*"
    local t0=$SECONDS
    timeout --kill-after=15 "$limit" $PY benchmarks/bench.py "$@" --out "$OUT/$name.md" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.log"
    echo "=== $name: rc=$rc in $((SECONDS - t0))s$([ "$rc" = 124 ] && echo ' (TIMEOUT: the table holds the rows done)')" \
        | tee -a "$OUT/summary.txt"
}

: > "$OUT/summary.txt"
{ echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import sys, torch, transformers, accelerate, peft; print('python', sys.version.split()[0]); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version()); \
print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None); \
print('transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo n/a) $(git status --porcelain 2>/dev/null | wc -l) changed files"
} 2>&1 | tee "$OUT/env.txt"

COMMON=(--batch 2 --latent_size "$K" --iters "$ITERS" --warmup 1 --dtype "$DTYPE")
run "bench_$BIG" 280 --shape "$BIG" "${COMMON[@]}"
run "bench_${LORA}_lora_gc" 200 --shape "$LORA" "${COMMON[@]}" --lora --gradient_checkpointing --freeze_vision \
    --stages stage2,stage3 --no-fp32_check
run "bench_${BIG}_adamw" 100 --shape "$BIG" "${COMMON[@]}" --iters 2 --optim --stages stage2,stage3 \
    --rows 'sft,latent_truncated_graph,stage3:sft,stage3:latent_truncated_graph' --no-fp32_check

echo
echo "================ summary"
cat "$OUT/summary.txt"
for f in "$OUT"/bench_*.md; do [ -f "$f" ] && { echo; echo "## $(basename "$f")"; cat "$f"; }; done
