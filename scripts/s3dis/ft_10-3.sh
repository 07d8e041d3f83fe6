#!/usr/bin/env bash
# S3DIS: fine-tuning (lower bound), 10-3.
# 10 classes, then 3 per step (2 steps); 3DPC-CISS settings (scripts/lib/pointcloud.sh).
# Usage: DATA_ROOT=/path/to/data_root [FOLD=1] [NB_GPU=1] bash scripts/s3dis/ft_10-3.sh
# STEP0_CKPT, DRY_RUN, EXTRA_ARGS, RESULTS_DIR, PYTHON: see scripts/lib/common.sh.
set -euo pipefail
source "$(dirname "$0")/../lib/common.sh"
source "$(dirname "$0")/../lib/pointcloud.sh"

setup_experiment s3dis "$(fold_task 10-3)" FT FT
for step in 0 1; do
    run_step "$step" "${POINT_CLOUD_ARGS[@]}"
done
summarize_results
