#!/usr/bin/env bash
# A NaN on one rank, on 2 GPUs (NCCL): a NaN loss on rank 1 only must stop both processes at that step with
# exit 3 within seconds, and the last checkpoint must load. From the repo root:
#     PYTHONPATH=. bash benchmarks/nan_one_rank_gpu.sh          # logs and summary in $OUT (runs/nan_one_rank)
# 1. tests/test_multi_process.py: two processes started directly (each one's exit code is seen);
# 2. the same injection under `accelerate launch` with DDP and with FSDP (configs/accelerate/*.yaml): the time
#    from the failing step to the launcher's exit, and each process's message;
# 3. a full disk on one rank during a checkpoint save (DDP): every process exits with code 4.
set -u -o pipefail
OUT=${OUT:-runs/nan_one_rank}
W=${WORK:-/tmp/lcot_nan}
PY=${PYTHON:-python3}
export PYTHONPATH=${PYTHONPATH:-.} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" && rm -rf "$W" && mkdir -p "$W"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
nvidia-smi --query-gpu=name --format=csv,noheader | tee -a "$SUMMARY"
t0=$SECONDS
$PY -m pytest -q -p no:cacheprovider tests/test_multi_process.py > "$OUT/pytest.log" 2>&1
echo "pytest tests/test_multi_process.py rc=$? $((SECONDS - t0))s: $(tail -n 1 "$OUT/pytest.log")" | tee -a "$SUMMARY"
$PY - <<PY >> "$OUT/setup.log" 2>&1
from lcot.toy.tiny import build_tiny
from lcot.toy.synthetic import generate
build_tiny("$W/tiny", seed=0)
generate("$W/data", n=30, seed=0)
PY
$PY -m lcot.precompute_teacher_latents --model_name_or_path "$W/tiny" --train_jsonl "$W/data/train.jsonl" \
    --output_dir "$W/teacher" --k_max 3 --bsz 6 --benefit_records 0 >> "$OUT/setup.log" 2>&1
for cfg in ddp fsdp; do
  t0=$(date +%s.%N)
  timeout --kill-after=10 300 $PY -m accelerate.commands.launch --config_file configs/accelerate/$cfg.yaml \
      --num_processes 2 benchmarks/nan_one_rank.py --bad_rank 1 --bad_step 3 -- --stage stage2 \
      --model_name_or_path "$W/tiny" --train_jsonl "$W/data/train.jsonl" --output_dir "$W/out_$cfg" \
      --latent_size 3 --latent_grad truncated --teacher_latent_dir "$W/teacher" --bsz 2 --grad_accum_steps 1 --max_steps 6 \
      --save_steps 1 --logging_steps 1 --warmup_steps 0 > "$OUT/launch_$cfg.log" 2>&1
  rc=$?
  took=$(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')")
  msgs=$(grep -c "lcot: error: loss is nan at step 3 on rank 1 of 2" "$OUT/launch_$cfg.log")
  echo "accelerate $cfg: launcher rc=$rc in ${took}s (start to exit), messages naming step 3 / rank 1: $msgs," \
       "checkpoints: $(ls "$W/out_$cfg" | grep -c '^checkpoint-') ($(ls "$W/out_$cfg" | tr '\n' ' '))" | tee -a "$SUMMARY"
  $PY -c "from lcot.pipeline.load import load; from lcot.pipeline.runs import last_checkpoint; import torch; \
m, _ = load(last_checkpoint('$W/out_$cfg')); print('last checkpoint', last_checkpoint('$W/out_$cfg'), 'loads, finite:', \
all(torch.isfinite(p).all().item() for p in m.parameters()))" 2>&1 | tail -n 1 | tee -a "$SUMMARY"
done
# 3. a full disk on rank 1 while it writes its part of checkpoint-3 (DDP): both processes must exit with code 4
t0=$(date +%s.%N)
timeout --kill-after=10 300 $PY -m accelerate.commands.launch --config_file configs/accelerate/ddp.yaml \
    --num_processes 2 benchmarks/nan_one_rank.py --fault disk --bad_rank 1 --bad_step 3 -- --stage stage2 \
    --model_name_or_path "$W/tiny" --train_jsonl "$W/data/train.jsonl" --output_dir "$W/out_disk" \
    --latent_size 3 --latent_grad truncated --teacher_latent_dir "$W/teacher" --bsz 2 --grad_accum_steps 1 \
    --max_steps 6 --save_steps 1 --logging_steps 1 --warmup_steps 0 > "$OUT/launch_disk.log" 2>&1
rc=$?
echo "accelerate ddp, full disk on rank 1 at checkpoint-3: launcher rc=$rc in $(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')")s," \
     "exit codes: $(grep -o 'exitcode *: *-\?[0-9]*' "$OUT/launch_disk.log" | tr -s ' ' | tr '\n' ' ')," \
     "messages: $(grep -c 'no space left on device while writing' "$OUT/launch_disk.log"), left: $(ls -A "$W/out_disk" | tr '\n' ' ')" \
     | tee -a "$SUMMARY"
