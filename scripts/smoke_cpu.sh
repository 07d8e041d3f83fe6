#!/usr/bin/env bash
# CPU smoke test for newcomers: the whole pipeline in well under a minute, no GPU and no dataset needed.
#
# Builds a small synthetic Pascal-VOC tree (data/make_synthetic.py), then runs two incremental steps of
# VOC 15-1 (task 15-5s) with LGKD through run.py, one process per step as the paper scripts do: step 0
# learns background + classes 1-15, step 1 adds class 16 while distilling from the step-0 model
# (--prev_kd 1 --novel_kd 0 as scripts/voc/lgkd_15-1.sh). A ResNet-18 from scratch, 48-pixel crops and two
# epochs per step: the numbers printed at the end only show that everything runs (about 20 s on 2 cores).
#
# Usage: bash scripts/smoke_cpu.sh [OUT_DIR]        (default OUT_DIR: results/smoke_cpu)
# Environment:
#   PYTHON      interpreter (default: .venv/bin/python if it exists, else python3)
#   SMOKE_DATA  synthetic data root (default: data/synthetic_smoke; made once, reused afterwards)
#   DRY_RUN=1   print the commands ("+ ...") instead of running them
#   OMP_NUM_THREADS  torch threads (default 1: on a small CPU that something else also uses, two threads
#               ran the same steps seven times slower than one)
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT=${1:-results/smoke_cpu}
DATA=${SMOKE_DATA:-data/synthetic_smoke}
CSV="$OUT/results/smoke_voc_15-5s_LGKD.csv"

run() {
    if [[ -n "${DRY_RUN:-}" && "$DRY_RUN" != "0" ]]; then
        local word line="+"
        for word in "$@"; do line+=" $(printf '%q' "$word")"; done
        echo "$line"
    else
        echo "+ $*" >&2
        "$@"
    fi
}

if [[ ! -d "$DATA/PascalVOC2012" ]]; then
    run "$PYTHON" data/make_synthetic.py --dataset voc --out "$DATA" --num_train 160 --num_val 40 --size 64 --seed 0
fi
[[ -n "${DRY_RUN:-}" && "$DRY_RUN" != "0" ]] || rm -f "$CSV"

common=(
    --data_root "$DATA" --dataset voc --task 15-5s --overlap --name LGKD --method LGKD
    --backbone resnet18 --no_pretrained --crop_size 48 --batch_size 8 --epochs 2 --num_workers 0
    --opt_level O0 --device cpu --date smoke --no_resume
    --checkpoint "$OUT/checkpoints" --logdir "$OUT/logs" --results_dir "$OUT/results" --cache_dir "$OUT/cache"
)
run "$PYTHON" run.py "${common[@]}" --step 0 --lr 0.01
run "$PYTHON" run.py "${common[@]}" --step 1 --lr 0.001 --prev_kd 1 --novel_kd 0
run "$PYTHON" average_csv.py "$CSV"
