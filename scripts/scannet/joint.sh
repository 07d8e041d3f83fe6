#!/usr/bin/env bash
# ScanNet v2: joint (offline) training on all 20 classes, upper bound.
# 3DPC-CISS settings (scripts/lib/pointcloud.sh).
# Usage: DATA_ROOT=/path/to/data_root [FOLD=1] [NB_GPU=1] bash scripts/scannet/joint.sh
# STEP0_CKPT=path/to/model.pth only evaluates that model (--ckpt STEP0_CKPT --test) instead of training.
# Rerunning the script continues the experiment (finished steps are skipped, an interrupted one resumes);
# FRESH=1 starts it over. Other variables (DRY_RUN, EXTRA_ARGS, PYTHON): see scripts/lib/common.sh.
set -euo pipefail
source "$(dirname "$0")/../lib/common.sh"
source "$(dirname "$0")/../lib/pointcloud.sh"

setup_experiment scannet "$(fold_task offline)" Joint FT
run_step 0 "${POINT_CLOUD_ARGS[@]}"
