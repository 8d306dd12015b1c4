#!/usr/bin/env bash
# The science run on one GPU (docs/results.md): small-model training speed, then the 3-seed experiment matrix.
#     PYTHONPATH=. bash benchmarks/science_gpu.sh          # results under $OUT (default runs/science)
#     NAME=hops_tiny_long SPEED_LIMIT=0 bash benchmarks/science_gpu.sh --seeds 1 --stage3_steps 5000 \
#         --rows grad pause nolatent                    # more lcot.experiment flags override the defaults
#
# 1. benchmarks/small_speed.py: stage2 of the 8M model on the hops task, records/s, the original path
#    (images processed in the main process every batch) against --preprocess, on the same card;
# 2. python -m lcot.experiment --name $NAME: the matrix (tiny model from scratch, hops task, 3 seeds, the
#    warm-up-teacher protocol with centred alignment; every row, see lcot/experiment.py);
# 3. $OUT/run.tgz: plan, info, measurements, logs and metrics of the run (aggregate elsewhere with
#    `python -m lcot.experiment --name $NAME --run_dir <unpacked>/runs/experiments --aggregate_only`).
# Running it again resumes the matrix: finished jobs are skipped.
set -u -o pipefail
OUT=${OUT:-runs/science}
NAME=${NAME:-hops_tiny}
SPEED_LIMIT=${SPEED_LIMIT:-110}
MATRIX_LIMIT=${MATRIX_LIMIT:-465}
PY=${PYTHON:-python}
export PYTHONPATH=${PYTHONPATH:-.} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
mkdir -p "$OUT"
{ nvidia-smi -L; $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', \
transformers.__version__)"; nproc; } > "$OUT/env.txt" 2>&1
if [ ! -f runs/small_speed/small_speed.md ] && [ "$SPEED_LIMIT" -gt 0 ]; then
    timeout "$SPEED_LIMIT" $PY benchmarks/small_speed.py --out runs/small_speed --n 3000 --baseline_steps 20 --steps 200 \
        > "$OUT/speed.txt" 2>&1
fi
cp runs/small_speed/small_speed.md "$OUT/" 2>/dev/null
timeout "$MATRIX_LIMIT" $PY -m lcot.experiment --name "$NAME" --task hops --n 3000 --seeds 3 --model tiny \
    --protocol warmup-teacher --align centered --latent_grad truncated --latent_size 4 \
    --warmup_steps 300 --stage2_steps 2000 --stage3_steps 1500 --bsz 32 --lr 1e-3 --procs 24 \
    --probe_records 1000 "$@" > "$OUT/matrix.txt" 2>&1
echo "matrix rc=$?" >> "$OUT/matrix.txt"
R=runs/experiments/$NAME
tar czf "$OUT/run.tgz" $R/plan.json $R/info.json $R/done $R/logs $R/s*/measure $R/s*/*/latent_metrics.jsonl \
    results/$NAME 2>/dev/null
tail -5 "$OUT/matrix.txt"
cat "$OUT/small_speed.md" 2>/dev/null
