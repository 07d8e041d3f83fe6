#!/usr/bin/env bash
# ScanNet v2: EWC (parameter regularisation), 17-3.
# 17 classes, then 3 per step (2 steps); 3DPC-CISS settings (scripts/lib/pointcloud.sh).
# Usage: DATA_ROOT=/path/to/data_root [FOLD=1] [NB_GPU=1] bash scripts/scannet/ewc_17-3.sh
# STEP0_CKPT=path/to/step0.pth: step 0 only evaluates it and step 1 starts from it.
# Rerunning the script continues the experiment (finished steps are skipped, an interrupted one resumes);
# FRESH=1 starts it over. Other variables (DRY_RUN, EXTRA_ARGS, PYTHON): see scripts/lib/common.sh.
set -euo pipefail
source "$(dirname "$0")/../lib/common.sh"
source "$(dirname "$0")/../lib/pointcloud.sh"

setup_experiment scannet "$(fold_task 17-3)" EWC EWC
for step in 0 1; do
    run_step "$step" "${POINT_CLOUD_ARGS[@]}"
done
summarize_results
