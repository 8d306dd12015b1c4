#!/usr/bin/env bash
# Step-wise thought visibility on one GPU (docs/results.md): lcot.experiment matrices side by side on the
# tiny model from scratch, 3 seeds, the warm-up and stage2 trained to their criterion (caps below):
#   hops_stepwise   hops task, --thought_visibility stepwise, the stage2-teacher protocol, rows nolatent, forcing
#                   (teacher-forced stage3) and states (state-supervised stage3)
#   moves_stepwise  the moves task, the same
#   hops_all        hops task, --thought_visibility all (every slot sees every thought image), row nolatent
#   hops_stepwise_wt, moves_stepwise_wt   as hops_stepwise and moves_stepwise with the warmup-teacher protocol
#                   (the step-wise warm-up is the teacher of stage2 and stage3)
#   hops_stepwise_k5  hops_stepwise_wt's state-supervised row with K = 5, one slot more than the most hops (the
#                   last slot's output is fed to no position, so K = hops leaves the last step to the answer)
#     PYTHONPATH=. bash benchmarks/chain_gpu.sh            # results under $OUT (default runs/chain)
# Each matrix's table goes to results/NAME/; $OUT/NAME.tgz holds its plan, measurements and logs (aggregate
# elsewhere with `python -m lcot.experiment --name NAME --run_dir <unpacked>/runs/experiments --aggregate_only`).
# Running it again resumes: finished jobs are skipped.
set -u -o pipefail
OUT=${OUT:-runs/chain}
LIMIT=${LIMIT:-540}
PY=${PYTHON:-python}
export PYTHONPATH=${PYTHONPATH:-.} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
mkdir -p "$OUT"
{ nvidia-smi -L; git rev-parse --short HEAD 2>/dev/null; $PY -c "import torch, transformers; print('torch', \
torch.__version__, 'transformers', transformers.__version__)"; nproc; } > "$OUT/env.txt" 2>&1
COMMON="--n 3000 --seeds 3 --model tiny --align centered --latent_grad truncated
  --latent_size 4 --warmup_steps ${WARMUP_CAP:-2500} --stage2_steps 1500 --stage3_steps 1500 --bsz 32 --lr 1e-3 --procs 8
  --probe_records 1000 --criterion_every 100"
run() {  # NAME TASK VISIBILITY PROTOCOL ROWS...
    local name=$1 task=$2 vis=$3 protocol=$4; shift 4
    timeout "$LIMIT" $PY -m lcot.experiment --name "$name" --task "$task" --thought_visibility "$vis" $COMMON \
        --protocol "$protocol" \
        --rows "$@" > "$OUT/$name.txt" 2>&1
    $PY -m lcot.experiment --name "$name" --aggregate_only >> "$OUT/$name.txt" 2>&1  # what finished, if cut short
    R=runs/experiments/$name
    tar czf "$OUT/$name.tgz" $R/plan.json $R/info.json $R/done $R/logs $R/s*/measure $R/s*/*/latent_metrics.jsonl \
        $R/s*/*/lcot.json results/$name 2>/dev/null
}
ONLY=${ONLY:-hops_stepwise moves_stepwise hops_all}  # a subset: ONLY="hops_all" bash benchmarks/chain_gpu.sh
for m in $ONLY; do
    case $m in
        hops_stepwise) run hops_stepwise hops stepwise stage2-teacher nolatent forcing states & ;;
        moves_stepwise) run moves_stepwise moves stepwise stage2-teacher nolatent forcing states & ;;
        hops_all) run hops_all hops all stage2-teacher nolatent & ;;
        hops_stepwise_wt) run hops_stepwise_wt hops stepwise warmup-teacher nolatent forcing states & ;;
        moves_stepwise_wt) run moves_stepwise_wt moves stepwise warmup-teacher nolatent forcing states & ;;
        hops_stepwise_k5) run hops_stepwise_k5 hops stepwise warmup-teacher nolatent states --latent_size 5 & ;;
        *) echo "chain_gpu.sh: unknown matrix $m (hops_stepwise, moves_stepwise, hops_all, hops_stepwise_wt," \
                "moves_stepwise_wt, hops_stepwise_k5)" >&2; exit 2 ;;
    esac
done
wait
for f in "$OUT"/*.txt; do echo "== $f"; tail -4 "$f"; done
