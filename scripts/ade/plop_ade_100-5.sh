#!/usr/bin/env bash
# ADE20k: PLOP, 100-5.
# Usage: DATA_ROOT=/path/to/data_root [NB_GPU=2] bash scripts/ade/plop_ade_100-5.sh
# Batch sizes are per GPU (the paper setting used 2 GPUs).
# Skip training step 0 with an already trained step-0 model:
#   STEP0_CKPT=path/to/step0_model.pth DATA_ROOT=... bash scripts/ade/plop_ade_100-5.sh
# Step 0 then only evaluates it (--ckpt STEP0_CKPT --test, which writes its results-CSV row) and
# step 1 starts from it (--step_ckpt STEP0_CKPT).
# Rerunning the script continues the experiment (finished steps are skipped, an interrupted one resumes);
# FRESH=1 starts it over. Other variables (DRY_RUN, EXTRA_ARGS, PYTHON): see scripts/lib/common.sh.
set -euo pipefail
source "$(dirname "$0")/../lib/common.sh"

setup_experiment ade 100-5 PLOP PLOP
for step in $(seq 0 10); do
    if (( step == 0 )); then
        run_step "$step" --batch_size 6 --epochs 60 --lr 0.02
    else
        run_step "$step" --batch_size 6 --epochs 60 --lr 0.002
    fi
done
summarize_results
