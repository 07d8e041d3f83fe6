#!/usr/bin/env bash
# ScanNet v2: MiB (unbiased CE and KD, balanced init), 15-1.
# 15 classes, then 1 per step (6 steps); 3DPC-CISS settings (scripts/lib/pointcloud.sh).
# Usage: DATA_ROOT=/path/to/data_root [FOLD=1] [NB_GPU=1] bash scripts/scannet/mib_15-1.sh
# STEP0_CKPT=path/to/step0.pth: step 0 only evaluates it and step 1 starts from it.
# Rerunning the script continues the experiment (finished steps are skipped, an interrupted one resumes);
# FRESH=1 starts it over. Other variables (DRY_RUN, EXTRA_ARGS, PYTHON): see scripts/lib/common.sh.
set -euo pipefail
source "$(dirname "$0")/../lib/common.sh"
source "$(dirname "$0")/../lib/pointcloud.sh"

setup_experiment scannet "$(fold_task 15-1)" MiB MiB
for step in 0 1 2 3 4 5; do
    run_step "$step" "${POINT_CLOUD_ARGS[@]}"
done
summarize_results
