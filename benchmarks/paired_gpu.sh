#!/usr/bin/env bash
# Issue 11's targets with a steadier verdict: each row against its baseline in N alternating pairs, in one
# process (bench.py --paired), on one GPU. From the repo root:
#     PYTHONPATH=. bash benchmarks/paired_gpu.sh          # tables in $OUT (default runs/bench_paired)
# 3B full fine-tuning, batch 2, K=32, bf16: stage2 and stage3 latent steps (the default exact path) vs the plain
# SFT step, teacher vs a forward; then the same with LCOT_COMPILE_STEP=1; then the 7B teacher (plain weights).
set -u -o pipefail
OUT=${OUT:-runs/bench_paired}
PAIRS=${PAIRS:-7}
PY=${PYTHON:-python3}
# the tables name their commit: git's, or LCOT_COMMIT=<hash> given on a machine that got the tree without .git
export PYTHONPATH=${PYTHONPATH:-.} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    TORCHINDUCTOR_CACHE_DIR=/tmp/lcot_bench_cache/inductor
mkdir -p "$OUT"
ROWS=sft,latent_truncated_graph,forward,teacher_graph,stage3:sft,stage3:latent_truncated_graph
COMMON=(--batch 2 --latent_size 32 --iters 3 --warmup 2 --dtype bf16 --paired "$PAIRS" --no-fp32_check)
CUT=220
source "$(dirname "$0")/one.sh"  # one NAME LIMIT [ENV=..] ARGS...
: > "$OUT/summary.txt"
one b3_exact 230 $PY benchmarks/bench.py --shape 3b --stages stage2,stage3 --rows "$ROWS" "${COMMON[@]}"
one b3_compiled_step 230 LCOT_COMPILE_STEP=1 $PY benchmarks/bench.py --shape 3b --stages stage2,stage3 --rows "$ROWS" \
    "${COMMON[@]}"
one b7_teacher 110 $PY benchmarks/bench.py --shape 7b --stages stage2 --rows forward,teacher_graph "${COMMON[@]}"
