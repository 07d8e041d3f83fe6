#!/usr/bin/env bash
# S3DIS: LGKD (label-guided KD, PLOP-style pseudo-labels; no POD), 8-1.
# 8 classes, then 1 per step (6 steps); 3DPC-CISS settings (scripts/lib/pointcloud.sh).
# Usage: DATA_ROOT=/path/to/data_root [FOLD=1] [NB_GPU=1] bash scripts/s3dis/lgkd_8-1.sh
# LGKD's 3D weights are not public: --prev_kd 1 --novel_kd 0 are the paper's values for
# VOC 15-1 (several steps), used by analogy.
# STEP0_CKPT=path/to/step0.pth: step 0 only evaluates it and step 1 starts from it.
# Rerunning the script continues the experiment (finished steps are skipped, an interrupted one resumes);
# FRESH=1 starts it over. Other variables (DRY_RUN, EXTRA_ARGS, PYTHON): see scripts/lib/common.sh.
set -euo pipefail
source "$(dirname "$0")/../lib/common.sh"
source "$(dirname "$0")/../lib/pointcloud.sh"

setup_experiment s3dis "$(fold_task 8-1)" LGKD LGKD
for step in 0 1 2 3 4 5; do
    if (( step == 0 )); then
        run_step "$step" "${POINT_CLOUD_ARGS[@]}"
    else
        run_step "$step" "${POINT_CLOUD_ARGS[@]}" --prev_kd 1 --novel_kd 0
    fi
done
summarize_results
