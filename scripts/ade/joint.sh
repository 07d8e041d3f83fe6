#!/usr/bin/env bash
# ADE20k: joint (offline) training on all 151 classes, upper bound.
# Usage: DATA_ROOT=/path/to/data_root [NB_GPU=2] bash scripts/ade/joint.sh
# Batch size is per GPU (the paper setting used 2 GPUs).
# STEP0_CKPT=path/to/model.pth only evaluates that model (--ckpt STEP0_CKPT --test) instead of training.
# Rerunning the script continues the experiment (finished steps are skipped, an interrupted one resumes);
# FRESH=1 starts it over. Other variables (DRY_RUN, EXTRA_ARGS, PYTHON): see scripts/lib/common.sh.
set -euo pipefail
source "$(dirname "$0")/../lib/common.sh"

setup_experiment ade offline Joint FT
run_step 0 --batch_size 8 --epochs 60 --lr 0.02
