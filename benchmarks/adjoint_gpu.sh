#!/usr/bin/env bash
# --latent_grad adjoint on one GPU (the affordable full gradient, target <= 3x a plain SFT step): the CUDA test of its graphed products,
# then paired timings against the plain SFT step. From the repo root:
#     PYTHONPATH=. bash benchmarks/adjoint_gpu.sh 3b     # 3B full fine-tuning, stage2; graphed and eager products
#     PYTHONPATH=. bash benchmarks/adjoint_gpu.sh 7b     # 7B LoRA + gradient checkpointing, stage2 and stage3
#     PYTHONPATH=. bash benchmarks/adjoint_gpu.sh 3b_all # the 3B target rows in one process; the teacher at batch 8
#     PYTHONPATH=. bash benchmarks/adjoint_gpu.sh cli    # the GPU test, and stage2 through lcot.main on the tiny
#                                                        # model: full vs adjoint (fp32), adjoint in bf16 + GC
# Tables in $OUT (default runs/bench_adjoint). Batch 2, K=32, bf16, random weights.
set -u -o pipefail
OUT=${OUT:-runs/bench_adjoint}
PAIRS=${PAIRS:-5}
PY=${PYTHON:-python3}
export PYTHONPATH=${PYTHONPATH:-.} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
COMMON=(--batch 2 --latent_size 32 --iters 3 --warmup 2 --dtype bf16 --paired "$PAIRS" --no-fp32_check)
source "$(dirname "$0")/one.sh"  # one NAME LIMIT [ENV=..] ARGS...
gpu_test() {  # tests/test_adjoint.py, whose CUDA test checks the graphed products (skipped without a GPU)
  local t0=$SECONDS
  timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_adjoint.py > "$OUT/pytest_adjoint.log" 2>&1
  echo "=== pytest tests/test_adjoint.py rc=$? $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
  tail -1 "$OUT/pytest_adjoint.log"
}
case ${1:-3b} in
  3b)
    gpu_test
    one b3_adjoint 260 $PY benchmarks/bench.py --shape 3b --stages stage2 \
        --rows sft,latent_truncated_graph,latent_adjoint "${COMMON[@]}"
    one b3_adjoint_eager_products 170 $PY benchmarks/bench.py --adjoint_graphs off --shape 3b --stages stage2 \
        --rows sft,latent_adjoint "${COMMON[@]}" ;;
  7b)
    one b7_lora_gc 560 $PY benchmarks/bench.py --shape 7b --lora --gradient_checkpointing --freeze_vision \
        --stages stage2,stage3 --rows sft,latent_truncated_graph,latent_adjoint,stage3:sft,stage3:latent_truncated_graph,stage3:latent_adjoint \
        "${COMMON[@]}" ;;
  3b_all)  # all of the 3B target rows in one process, and the teacher at the precompute's batch of 8
    one b3_all 330 $PY benchmarks/bench.py --shape 3b --stages stage2,stage3 \
        --rows sft,latent_truncated_graph,latent_adjoint,forward,teacher_graph,stage3:sft,stage3:latent_truncated_graph,stage3:latent_adjoint \
        "${COMMON[@]}"
    one b3_teacher_bsz8 200 $PY benchmarks/bench.py --shape 3b --stages stage2 --rows forward,teacher_graph \
        "${COMMON[@]}" --batch 8 ;;
  cli)  # 20 stage2 steps of the tiny model with each gradient: full and adjoint (fp32) must log the same losses,
        # and adjoint must run in bf16 with gradient checkpointing
    gpu_test
    W=${WORK:-/tmp/lcot_adjoint_cli}
    rm -rf "$W"
    $PY -m lcot.toy.tiny --output_dir "$W/tiny" > /dev/null 2>&1
    $PY -m lcot.toy.synthetic --output_dir "$W/data" --n 200 --seed 0 > /dev/null 2>&1
    $PY -m lcot.precompute_teacher_latents --model_name_or_path "$W/tiny" --train_jsonl "$W/data/train.jsonl" \
        --output_dir "$W/teacher" --k_max 6 > /dev/null 2>&1
    # (bf16 without alignment: the teacher files are fp32, and training refuses another dtype)
    for run in "full" "adjoint" "adjoint --bf16 --gradient_checkpointing --align_weight 0"; do
      name=$(echo "$run" | cut -d' ' -f1-3 | tr -d ' -')
      $PY -m lcot.main --stage stage2 --model_name_or_path "$W/tiny" --train_jsonl "$W/data/train.jsonl" \
          --teacher_latent_dir "$W/teacher" --output_dir "$W/s2_$name" --latent_size 6 --max_steps 20 --bsz 8 \
          --grad_accum_steps 1 --learning_rate 2e-3 --logging_steps 5 --latent_grad $run > "$OUT/cli_$name.log" 2>&1
      echo "=== stage2 --latent_grad $run rc=$?" | tee -a "$OUT/summary.txt"
      grep -E "^step " "$OUT/cli_$name.log" | tee -a "$OUT/summary.txt"
    done ;;
  *) echo "usage: bash benchmarks/adjoint_gpu.sh 3b|7b|3b_all|cli" >&2; exit 2 ;;
esac
