#!/usr/bin/env bash
# Multi-GPU checks on one machine with 2 GPUs. From the repo root:
#     PYTHONPATH=. bash benchmarks/multi_gpu.sh            # results in $OUT (default runs/multi_gpu)
#
# 1. a random "small" Qwen2.5-VL (0.5B-class text model, 8-block vision tower, 0.41B parameters, fp32)
#    and the synthetic dataset (224 px images -> 64 tokens each);
# 2. stage1 for $STEPS steps with the same global batch of 8: one GPU (bsz 4 x accum 2) and two GPUs with
#    DDP (bsz 4 x 1 per GPU); the per-step losses must agree (fp32; see "why they match" below);
# 3. teacher precompute split over 2 processes: exactly one complete file per record, no temporary files;
# 4. stage2 (truncated gradient: the CUDA-graph latent path under DDP) on 1 GPU and on 2 GPUs (DDP);
#    then stage2 in bf16 on 1 GPU (Trainer's autocast around the captured step: the path of real runs);
# 5. stage3 on 1 GPU and on 2 GPUs with FSDP2 (the graph path switches itself off under FSDP);
#    stage2 and stage3 use bsz 2: 1 GPU with accum 2, 2 GPUs with accum 1.
# Every step runs under a timeout and the script goes on after a failure; the summary at the end lists
# each step's exit status and time, the loss comparisons and throughput. Total: a few minutes on H100s.
#
# Why the losses match: Trainer's dataloader goes through accelerate's seedable sampler with the same
# seed in both runs, so it draws the same permutation; with 2 processes the batches of 4 are dealt out
# alternately (batch 2i to rank 0, 2i+1 to rank 1), which are exactly the two micro-batches of optimizer
# step i of the 1-GPU run with accumulation 2. The logged loss is the mean over micro-batches (1 GPU) or
# over ranks (DDP), and the gradients are the same mean, so the runs differ only by floating-point
# reduction order (all-reduce vs accumulation): ~1e-6 relative at step 1, growing slowly with Adam.
#
# Knobs (environment): OUT, WORK (/tmp/lcot_multi_gpu), STEPS (10), K (8), N (records, 160),
# SHAPE (small), STEP_TIMEOUT (s, 150), T_FSDP (s, 120), LAUNCH (the 2-process launcher), LAUNCH_FSDP
# (or skip), SINGLE (the 1-process prefix), TOL (0.02).
# A CPU dry run of the flow (tiny model, gloo; the teacher step then runs unsplit, as accelerate's
# PartialState needs cpu=True for gloo): SHAPE=tiny SINGLE= STEPS=4 K=2 N=16 LAUNCH_FSDP=skip
#   LAUNCH="python -m torch.distributed.run --nproc_per_node 2" PYTHONPATH=. bash benchmarks/multi_gpu.sh
set -u -o pipefail

OUT=${OUT:-runs/multi_gpu}
PY=${PYTHON:-python}
STEPS=${STEPS:-10}
K=${K:-8}
N=${N:-160}
SHAPE=${SHAPE:-small}
T=${STEP_TIMEOUT:-150}
TOL=${TOL:-0.02}
T_FSDP=${T_FSDP:-120}  # FSDP goes last; lcot.main's rank-0-only final save may hang there: see the log
LAUNCH=${LAUNCH:-$PY -m accelerate.commands.launch --config_file configs/accelerate/ddp.yaml --num_processes 2}
LAUNCH_FSDP=${LAUNCH_FSDP:-$PY -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml --num_processes 2}
SINGLE=${SINGLE-env CUDA_VISIBLE_DEVICES=0}
export PYTHONPATH=${PYTHONPATH:-.} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
W=${WORK:-/tmp/lcot_multi_gpu}  # models, data, checkpoints (GBs): outside $OUT, which keeps logs and summary
export MPLCONFIGDIR=$W/.cache/mpl HF_HOME=$W/.cache/hf TORCHINDUCTOR_CACHE_DIR=$W/.cache/inductor
mkdir -p "$OUT"
rm -rf "$W"
mkdir -p "$W"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"

step() {  # step NAME COMMAND...: run with a timeout, log to $OUT/NAME.log, record status and time
    local name=$1; shift
    local t0=$SECONDS rc
    echo "=== $name: $*" | tee "$OUT/$name.log"
    timeout --kill-after=20 "$T" "$@" >> "$OUT/$name.log" 2>&1
    rc=$?
    tail -n 5 "$OUT/$name.log"
    printf '%-22s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$([ "$rc" = 124 ] && echo TIMEOUT)" \
        | tee -a "$SUMMARY"
    return $rc
}

echo "== environment" | tee "$OUT/env.txt"
{ nvidia-smi --query-gpu=index,name,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, transformers, accelerate, peft, sys; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count(), 'transformers', \
transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__)"; } | tee -a "$OUT/env.txt"

step model $PY benchmarks/bench.py --shape "$SHAPE" --save_model "$W/model" --dtype fp32
step data $PY -m lcot.toy.synthetic --output_dir "$W/data" --n "$N" --test_fraction 0 --image_size 224
TRAIN=$W/data/train.jsonl
COMMON=(--model_name_or_path "$W/model" --train_jsonl "$TRAIN" --latent_size "$K" --max_steps "$STEPS"
        --logging_steps 1 --seed 0 --learning_rate 1e-4 --warmup_steps 0 --save_steps 100000 --overwrite_output_dir)

# -- stage1: 1 GPU (4 x accum 2) vs DDP (4 x 1 x 2 GPUs) ------------------------------------------------------
step stage1_1gpu $SINGLE $PY -m lcot.main --stage stage1 "${COMMON[@]}" --output_dir "$W/s1_1gpu" \
    --bsz 4 --grad_accum_steps 2
step stage1_ddp $LAUNCH -m lcot.main --stage stage1 "${COMMON[@]}" --output_dir "$W/s1_ddp" \
    --bsz 4 --grad_accum_steps 1
echo "== stage1 loss, 1 GPU (A) vs DDP on 2 GPUs (B)" | tee -a "$SUMMARY"
$PY benchmarks/check.py losses "$W/s1_1gpu" "$W/s1_ddp" --tol "$TOL" \
    --log-a "$OUT/stage1_1gpu.log" --log-b "$OUT/stage1_ddp.log" 2>&1 | tee -a "$SUMMARY"

# -- teacher precompute split over 2 processes ---------------------------------------------------------------
STUDENT=$W/s1_1gpu
[ -f "$STUDENT/config.json" ] || STUDENT=$W/model  # stage1 failed: the checks below still run
step teacher_ddp $LAUNCH -m lcot.precompute_teacher_latents --model_name_or_path "$STUDENT" \
    --train_jsonl "$TRAIN" --output_dir "$W/teacher" --k_max "$K" --bsz 4
grep -h "lcot: teacher latents" "$OUT/teacher_ddp.log" | tee -a "$SUMMARY"  # one line per process: i/2
$PY benchmarks/check.py teacher "$W/teacher" "$TRAIN" --k_max "$K" 2>&1 | tee -a "$SUMMARY"

# -- stage2 (truncated: graphed recurrence under DDP) and stage3 (FSDP2) ---------------------------------------
S23=(--model_name_or_path "$STUDENT" --train_jsonl "$TRAIN" --latent_size "$K" --max_steps "$((STEPS / 2))"
     --logging_steps 1 --seed 0 --learning_rate 1e-4 --warmup_steps 0 --save_steps 100000 --overwrite_output_dir
     --teacher_latent_dir "$W/teacher" --latent_grad truncated)
step stage2_1gpu $SINGLE $PY -m lcot.main --stage stage2 "${S23[@]}" --output_dir "$W/s2_1gpu" \
    --bsz 2 --grad_accum_steps 2
step stage2_ddp $LAUNCH -m lcot.main --stage stage2 "${S23[@]}" --output_dir "$W/s2_ddp" \
    --bsz 2 --grad_accum_steps 1
echo "== stage2 loss, 1 GPU (A) vs DDP on 2 GPUs (B)" | tee -a "$SUMMARY"
$PY benchmarks/check.py losses "$W/s2_1gpu" "$W/s2_ddp" --tol "$TOL" \
    --log-a "$OUT/stage2_1gpu.log" --log-b "$OUT/stage2_ddp.log" 2>&1 | tee -a "$SUMMARY"

# the path real runs take: --bf16 (Trainer autocast around the captured step), 1 GPU, graphed
step teacher_bf16 $LAUNCH -m lcot.precompute_teacher_latents --model_name_or_path "$STUDENT" \
    --train_jsonl "$TRAIN" --output_dir "$W/teacher_bf16" --k_max "$K" --bsz 4 --bf16
step stage2_1gpu_bf16 $SINGLE $PY -m lcot.main --stage stage2 "${S23[@]}" --output_dir "$W/s2_bf16" \
    --bsz 2 --grad_accum_steps 2 --bf16 --teacher_latent_dir "$W/teacher_bf16"
grep -h "graph capture failed" "$OUT"/stage2_*.log | head -3 | tee -a "$SUMMARY"

if [ "$LAUNCH_FSDP" != skip ]; then
    step stage3_1gpu $SINGLE $PY -m lcot.main --stage stage3 "${S23[@]}" --output_dir "$W/s3_1gpu" \
        --bsz 2 --grad_accum_steps 2
    T=$T_FSDP step stage3_fsdp $LAUNCH_FSDP -m lcot.main --stage stage3 "${S23[@]}" --output_dir "$W/s3_fsdp" \
        --bsz 2 --grad_accum_steps 1
    echo "== stage3 loss, 1 GPU (A) vs FSDP2 on 2 GPUs (B)" | tee -a "$SUMMARY"
    $PY benchmarks/check.py losses "$W/s3_1gpu" "$W/s3_fsdp" --tol "$TOL" \
        --log-a "$OUT/stage3_1gpu.log" --log-b "$OUT/stage3_fsdp.log" 2>&1 | tee -a "$SUMMARY"
    ls -la "$W/s3_fsdp" > "$OUT/stage3_fsdp_files.txt" 2>&1
fi

echo "total: ${SECONDS}s" | tee -a "$SUMMARY"
echo
echo "================ summary ($OUT/summary.txt)"
cat "$SUMMARY"
