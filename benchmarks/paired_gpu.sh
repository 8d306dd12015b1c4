#!/usr/bin/env bash
# The speed target rows on one GPU, each row against its baseline in N alternating pairs in one process (bench.py
# --paired), with bench.py's default eager latent step and with the compiled one (--compile_step on; bench.py's runner
# switches build lcot.fast.Runner with the matching keyword). From the repo root:
#     PYTHONPATH=. bash benchmarks/paired_gpu.sh 3b   # 3B full fine-tuning: stage2, stage3 (truncated, adjoint),
#                                                     # teacher vs a forward, fp32 numerics with the eager noise floor
#     PYTHONPATH=. bash benchmarks/paired_gpu.sh 7b   # 7B LoRA + checkpointing: stage2, stage3 (eager, compiled
#                                                     # step; each over 5 min); the 7B teacher
#                                                     # (plain weights, as the precompute runs)
#     PYTHONPATH=. bash benchmarks/paired_gpu.sh step # 3B: the compiled step with inductor's tuning options
#     PYTHONPATH=. bash benchmarks/paired_gpu.sh floor3b        # 3B: each row beside the step's weight-streaming
#     PYTHONPATH=. bash benchmarks/paired_gpu.sh floor7b        # floor (bench's `floor` row), eager and compiled;
#     PYTHONPATH=. bash benchmarks/paired_gpu.sh floor7b_teacher  # the teacher at batch 2, 4 (the precompute's
#                                                     # --bsz) and 8
#     PYTHONPATH=. bash benchmarks/paired_gpu.sh teacher_batches  # the teacher at batch 8 and 16, 3B and 7B,
#                                                     # eager and compiled step
#     PYTHONPATH=. bash benchmarks/paired_gpu.sh adapters7b  # 7B LoRA under bf16 autocast (as the trainer): the
#                                                     # chain's adapter weights cast once or in every product
#     PYTHONPATH=. bash benchmarks/paired_gpu.sh skinny7b  # the same: lcot.fast.skinny's kernels or cuBLAS's
#     PYTHONPATH=. bash benchmarks/paired_gpu.sh final3b   # the target rows on the default GPU path (compiled step)
#     PYTHONPATH=. bash benchmarks/paired_gpu.sh final7b   # the same at 7B (LoRA training, plain-weight teacher)
#     PYTHONPATH=. bash benchmarks/paired_gpu.sh adjoint3b # the full gradient, its pass over the slots compiled or not
#     PYTHONPATH=. bash benchmarks/paired_gpu.sh adjoint7b # the same at 7B, compiled only
#     PYTHONPATH=. bash benchmarks/paired_gpu.sh flex3b    # final3b's rows with the compiled step's attention in
#                                                     # FlexAttention (the default) and in sdpa's kernel
#     PYTHONPATH=. bash benchmarks/paired_gpu.sh flex7b_teacher  # the 7B teacher at batch 2, the same two ways
#     PYTHONPATH=. bash benchmarks/paired_gpu.sh teachers  # the teacher at batch 2 (3B, 7B) and 16 (3B), as the
#                                                     # precompute runs it (since 10d4e61: no answer pass)
# Batch 2, K=32, bf16, random weights, lcot's packed vision attention in every row. Tables in $OUT. The modes
# before final3b keep the adjoint's pass over the slots uncompiled (--adjoint_compile off), as they measured it.
set -u -o pipefail
OUT=${OUT:-runs/bench_paired}
PAIRS=${PAIRS:-5}
PY=${PYTHON:-python3}
# the tables name their commit: git's, or LCOT_COMMIT=<hash> given on a machine that got the tree without .git
export PYTHONPATH=${PYTHONPATH:-.} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    TORCHINDUCTOR_CACHE_DIR=/tmp/lcot_bench_cache/inductor
mkdir -p "$OUT"
COMMON=(--batch 2 --latent_size 32 --iters 3 --warmup 2 --dtype bf16 --paired "$PAIRS")
CUT=260
source "$(dirname "$0")/one.sh"  # one NAME LIMIT [ENV=..] ARGS...
B3=(--shape 3b --stages stage2,stage3 --rows sft,latent_truncated_graph,latent_adjoint,forward,teacher_graph,stage3:sft,stage3:latent_truncated_graph,numerics_bf16,numerics_fp32)
B7=(--shape 7b --lora --gradient_checkpointing --freeze_vision --stages stage2,stage3 --no-fp32_check
    --rows sft,latent_truncated_graph,stage3:sft,stage3:latent_truncated_graph)
B7T=(--shape 7b --stages stage2 --rows forward,teacher_graph --no-fp32_check)
# the default path's rows (final3b, flex3b; final7b): 3B training, teacher and generation; 7B LoRA training; a teacher
F3=(--shape 3b --stages stage2,stage3 --no-fp32_check --rows sft,latent_truncated_graph,steps,stage3:sft,stage3:latent_truncated_graph,stage3:steps,forward,teacher_graph,teacher_steps,gen_latent_graph,gen_decode_graph,floor)
L7=(--shape 7b --lora --gradient_checkpointing --freeze_vision --no-fp32_check --autocast --batch 2 --latent_size 32
    --iters 2 --warmup 2 --dtype bf16 --paired "$PAIRS" --stages stage2,stage3
    --rows sft,latent_truncated_graph,steps,stage3:sft,stage3:latent_truncated_graph,stage3:steps,floor)
teacher_rows() { echo --shape "$1" --stages stage2 --no-fp32_check --rows forward,teacher_graph,teacher_steps,floor; }
case ${1:-3b} in
  3b)
    one b3_eager_step 200 $PY benchmarks/bench.py "${B3[@]}" "${COMMON[@]}"
    one b3_compiled_step 330 $PY benchmarks/bench.py --compile_step on --adjoint_compile off "${B3[@]}" "${COMMON[@]}" ;;
  7b)
    one b7_eager_step 300 $PY benchmarks/bench.py "${B7[@]}" "${COMMON[@]}"
    one b7_compiled_step 300 $PY benchmarks/bench.py --compile_step on "${B7[@]}" "${COMMON[@]}"
    one b7_teacher_eager_step 90 $PY benchmarks/bench.py "${B7T[@]}" "${COMMON[@]}"
    one b7_teacher_compiled_step 150 $PY benchmarks/bench.py --compile_step on "${B7T[@]}" "${COMMON[@]}" ;;
  step)  # the compiled step under inductor's tuning options (3B): step times, the teacher, the stage2 step
    S=(--shape 3b --stages stage2 --rows sft,latent_truncated_graph,forward,teacher_graph,gen_latent_graph,gen_decode_graph
       --no-fp32_check)
    one b3_step_compiled 300 $PY benchmarks/bench.py --compile_step on "${S[@]}" "${COMMON[@]}"
    one b3_step_coordinate_descent 300 TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 \
        $PY benchmarks/bench.py --compile_step on "${S[@]}" "${COMMON[@]}"
    one b3_step_autotune_gemm 300 TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 \
        $PY benchmarks/bench.py --compile_step on "${S[@]}" "${COMMON[@]}" ;;
  floor3b)
    F=(--shape 3b --stages stage2,stage3 --no-fp32_check --rows sft,latent_truncated_graph,latent_adjoint,steps,stage3:sft,stage3:latent_truncated_graph,stage3:steps,forward,teacher_graph,teacher_steps,floor)
    T=(--shape 3b --stages stage2 --no-fp32_check --rows forward,teacher_graph,teacher_steps,floor)
    one b3_floor_eager 200 $PY benchmarks/bench.py "${F[@]}" "${COMMON[@]}"
    one b3_floor_compiled 260 $PY benchmarks/bench.py --compile_step on --adjoint_compile off "${F[@]}" "${COMMON[@]}"
    for n in 4 8; do
      one b3_floor_teacher_batch$n 70 $PY benchmarks/bench.py "${T[@]}" "${COMMON[@]}" --batch $n
    done ;;
  floor7b)
    F=("${B7[@]}" --rows sft,latent_truncated_graph,steps,stage3:sft,stage3:latent_truncated_graph,stage3:steps,floor)
    one b7_floor_eager 270 $PY benchmarks/bench.py "${F[@]}" "${COMMON[@]}" --iters 2
    one b7_floor_compiled 270 $PY benchmarks/bench.py --compile_step on "${F[@]}" "${COMMON[@]}" --iters 2 ;;
  floor7b_teacher)
    T=(--shape 7b --stages stage2 --no-fp32_check --rows forward,teacher_graph,teacher_steps,floor)
    for n in 2 4 8; do
      one b7_floor_teacher_batch$n 100 $PY benchmarks/bench.py "${T[@]}" "${COMMON[@]}" --batch $n
    done
    one b7_floor_teacher_compiled_batch2 150 $PY benchmarks/bench.py --compile_step on "${T[@]}" "${COMMON[@]}" ;;
  teacher_batches)
    for shape in 3b 7b; do
      T=(--shape $shape --stages stage2 --no-fp32_check --rows forward,teacher_graph,teacher_steps,floor)
      one b${shape%b}_teacher_compiled_batch8 150 $PY benchmarks/bench.py --compile_step on "${T[@]}" "${COMMON[@]}" --batch 8
      one b${shape%b}_teacher_batch16 80 $PY benchmarks/bench.py "${T[@]}" "${COMMON[@]}" --batch 16
      one b${shape%b}_teacher_compiled_batch16 150 $PY benchmarks/bench.py --compile_step on "${T[@]}" "${COMMON[@]}" --batch 16
    done ;;
  adapters7b)  # 7B LoRA + checkpointing under the trainer's bf16 autocast: the chain's adapters cast once a chain
    # (lcot.fast.adapters, the default) against cast in every product (--no_cast_adapters), eager and compiled step
    L=(--shape 7b --lora --gradient_checkpointing --freeze_vision --no-fp32_check --autocast --batch 2 --latent_size 32
       --iters 2 --warmup 2 --dtype bf16 --paired "$PAIRS")
    A=("${L[@]}" --stages stage2,stage3
       --rows sft,latent_truncated_graph,steps,stage3:sft,stage3:latent_truncated_graph,stage3:steps,floor)
    C=("${L[@]}" --stages stage2 --rows sft,latent_truncated_graph,steps,floor)
    one b7_autocast_eager 110 $PY benchmarks/bench.py "${A[@]}"
    one b7_autocast_eager_percall 110 $PY benchmarks/bench.py --no_cast_adapters "${A[@]}"
    one b7_autocast_compiled 170 $PY benchmarks/bench.py --compile_step on "${C[@]}"
    one b7_autocast_compiled_percall 170 $PY benchmarks/bench.py --compile_step on --no_cast_adapters "${C[@]}" ;;
  skinny7b)  # 7B LoRA + checkpointing under autocast: the steps' products in lcot.fast.skinny's kernels (the default)
    # against cuBLAS's (--kernels off), compiled and eager step
    L=(--shape 7b --lora --gradient_checkpointing --freeze_vision --no-fp32_check --autocast --batch 2 --latent_size 32
       --iters 2 --warmup 2 --dtype bf16 --paired "$PAIRS" --stages stage2,stage3
       --rows sft,latent_truncated_graph,steps,stage3:sft,stage3:latent_truncated_graph,stage3:steps,floor)
    one b7_skinny_compiled 270 $PY benchmarks/bench.py --compile_step on "${L[@]}"
    one b7_cublas_compiled 270 $PY benchmarks/bench.py --compile_step on --kernels off "${L[@]}"
    one b7_skinny_eager 100 $PY benchmarks/bench.py "${L[@]}"
    one b7_cublas_eager 100 $PY benchmarks/bench.py --kernels off "${L[@]}" ;;
  final3b)  # the 3B target rows on lcot's default GPU path (the compiled step, --compile_step auto): training,
    # the teacher at batch 2 and 16, generation, each beside its floor (the full gradient: adjoint3b)
    one b3_final 280 $PY benchmarks/bench.py --compile_step auto "${F3[@]}" "${COMMON[@]}"
    one b3_final_teacher_batch16 150 $PY benchmarks/bench.py --compile_step auto $(teacher_rows 3b) "${COMMON[@]}" --batch 16 ;;
  final7b)  # the 7B rows the same way: LoRA + checkpointing under the trainer's autocast; the teacher on plain weights
    one b7_final 280 $PY benchmarks/bench.py --compile_step auto "${L7[@]}"
    one b7_final_teacher_batch16 150 $PY benchmarks/bench.py --compile_step auto $(teacher_rows 7b) "${COMMON[@]}" --batch 16 ;;
  adjoint3b)  # the full gradient under the compiled step: its pass over the slots compiled (the default; minutes of
    # compilation) and not (--adjoint_compile off)
    A=(--shape 3b --stages stage2 --no-fp32_check --rows sft,latent_adjoint "${COMMON[@]}")
    one b3_adjoint_slots_compiled 420 $PY benchmarks/bench.py --compile_step on "${A[@]}"
    one b3_adjoint_slots_uncompiled 110 $PY benchmarks/bench.py --compile_step on --adjoint_compile off "${A[@]}" ;;
  adjoint7b)  # the same at 7B (LoRA + checkpointing under autocast), compiled only
    A=(--shape 7b --lora --gradient_checkpointing --freeze_vision --no-fp32_check --autocast --stages stage2
       --rows sft,latent_adjoint --batch 2 --latent_size 32 --iters 2 --warmup 2 --dtype bf16 --paired 3)
    one b7_adjoint_slots_compiled 400 $PY benchmarks/bench.py --compile_step on "${A[@]}" ;;
  flex3b)  # final3b's rows, the compiled step's grouped attention in FlexAttention's decoding kernel (the default)
    # and in sdpa's kernel (--step_attention sdpa, the path of 79e2f1b)
    one b3_flex 280 $PY benchmarks/bench.py --compile_step on "${F3[@]}" "${COMMON[@]}"
    one b3_sdpa_steps 280 $PY benchmarks/bench.py --compile_step on --step_attention sdpa "${F3[@]}" "${COMMON[@]}" ;;
  flex7b_teacher)
    one b7_flex_teacher 170 $PY benchmarks/bench.py --compile_step on $(teacher_rows 7b) "${COMMON[@]}"
    one b7_sdpa_steps_teacher 170 $PY benchmarks/bench.py --compile_step on --step_attention sdpa $(teacher_rows 7b) "${COMMON[@]}" ;;
  teachers)
    one b3_teacher 190 $PY benchmarks/bench.py --compile_step on $(teacher_rows 3b) "${COMMON[@]}"
    one b7_teacher 190 $PY benchmarks/bench.py --compile_step on $(teacher_rows 7b) "${COMMON[@]}"
    one b3_teacher_batch16 150 $PY benchmarks/bench.py --compile_step on $(teacher_rows 3b) "${COMMON[@]}" --batch 16 ;;
  *) echo "usage: bash benchmarks/paired_gpu.sh 3b|7b|step|floor3b|floor7b|floor7b_teacher|teacher_batches|adapters7b|skinny7b|final3b|final7b|adjoint3b|adjoint7b|flex3b|flex7b_teacher|teachers" >&2
     exit 2 ;;
esac
