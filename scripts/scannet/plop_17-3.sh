#!/usr/bin/env bash
# ScanNet v2: PLOP-style (entropy pseudo-labels, adaptive factor; no POD), 17-3.
# 17 classes, then 3 per step (2 steps); 3DPC-CISS settings (scripts/lib/pointcloud.sh).
# Usage: DATA_ROOT=/path/to/data_root [FOLD=1] [NB_GPU=1] bash scripts/scannet/plop_17-3.sh
# STEP0_CKPT, DRY_RUN, EXTRA_ARGS, RESULTS_DIR, PYTHON: see scripts/lib/common.sh.
set -euo pipefail
source "$(dirname "$0")/../lib/common.sh"
source "$(dirname "$0")/../lib/pointcloud.sh"

setup_experiment scannet "$(fold_task 17-3)" PLOP PLOP
for step in 0 1; do
    run_step "$step" "${POINT_CLOUD_ARGS[@]}"
done
summarize_results
