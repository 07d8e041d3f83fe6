#!/usr/bin/env bash
# ADE20k: LGKD, 100-10.
# Usage: DATA_ROOT=/path/to/data_root [NB_GPU=2] bash scripts/ade/lgkd_ade_100-10.sh
# Batch sizes are per GPU (the paper setting used 2 GPUs).
# Skip training step 0 with an already trained step-0 model (e.g. the released 100-10-ade.pth):
#   STEP0_CKPT=path/to/100-10-ade.pth DATA_ROOT=... bash scripts/ade/lgkd_ade_100-10.sh
# Step 0 then only evaluates it (--ckpt STEP0_CKPT --test, which writes its results-CSV row) and
# step 1 starts from it (--step_ckpt STEP0_CKPT).
# Rerunning the script continues the experiment (finished steps are skipped, an interrupted one resumes);
# FRESH=1 starts it over. Other variables (DRY_RUN, EXTRA_ARGS, PYTHON): see scripts/lib/common.sh.
set -euo pipefail
source "$(dirname "$0")/../lib/common.sh"

setup_experiment ade 100-10 LGKD LGKD
for step in 0 1 2 3 4 5; do
    if (( step == 0 )); then
        run_step "$step" --batch_size 8 --epochs 60 --lr 0.02
    else
        run_step "$step" --batch_size 8 --epochs 60 --lr 0.002 --prev_kd 1 --novel_kd 1
    fi
done
summarize_results
