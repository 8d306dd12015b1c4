#!/usr/bin/env bash
# Step-wise thought visibility on one GPU (docs/results.md): the hops matrix with --thought_visibility stepwise
# and cumulative side by side, each with the no-latent baseline and the teacher-forced stage3 row.
#     PYTHONPATH=. bash benchmarks/chain_gpu.sh            # results under $OUT (default runs/chain)
# Each experiment's table goes to results/hops_<visibility>/; $OUT/<visibility>.tgz holds its plan, measurements
# and logs (aggregate elsewhere with `python -m lcot.experiment --name hops_<visibility> --run_dir <unpacked>/runs/experiments
# --aggregate_only`). Running it again resumes: finished jobs are skipped.
set -u -o pipefail
OUT=${OUT:-runs/chain}
LIMIT=${LIMIT:-540}
PY=${PYTHON:-python}
VISIBILITIES=${VISIBILITIES:-stepwise cumulative}
export PYTHONPATH=${PYTHONPATH:-.} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
mkdir -p "$OUT"
{ nvidia-smi -L; git rev-parse --short HEAD 2>/dev/null; $PY -c "import torch, transformers; print('torch', \
torch.__version__, 'transformers', transformers.__version__)"; nproc; } > "$OUT/env.txt" 2>&1
for v in $VISIBILITIES; do
    timeout "$LIMIT" $PY -m lcot.experiment --name "hops_$v" --thought_visibility "$v" --task hops --n 3000 \
        --seeds 3 --model tiny --protocol stage2-teacher --align centered --latent_grad truncated --latent_size 4 \
        --warmup_steps 300 --stage2_steps 1500 --stage3_steps 1500 --bsz 32 --lr 1e-3 --procs 12 \
        --probe_records 1000 --rows nolatent forcing "$@" > "$OUT/$v.txt" 2>&1 &
done
wait
for v in $VISIBILITIES; do
    R=runs/experiments/hops_$v
    $PY -m lcot.experiment --name "hops_$v" --aggregate_only >> "$OUT/$v.txt" 2>&1  # what finished, if cut short
    tar czf "$OUT/$v.tgz" $R/plan.json $R/info.json $R/done $R/logs $R/s*/measure $R/s*/*/latent_metrics.jsonl \
        results/hops_$v 2>/dev/null
    tail -3 "$OUT/$v.txt"
done
