#!/usr/bin/env bash
# Cityscapes domains (cities): PLOP-style run (method FT + local POD), one city per step.
# Usage: DATA_ROOT=/path/to/cityscapes [NB_GPU=2] bash scripts/cityscapesDomain/plop_cityscapesDomain_1-1.sh
# Batch sizes are per GPU (the paper setting used 2 GPUs).
# Skip training step 0 with an already trained step-0 model:
#   STEP0_CKPT=path/to/step0_model.pth DATA_ROOT=... bash scripts/cityscapesDomain/plop_cityscapesDomain_1-1.sh
# Step 0 then only evaluates it (--ckpt STEP0_CKPT --test, which writes its results-CSV row) and
# step 1 starts from it (--step_ckpt STEP0_CKPT).
# Rerunning the script continues the experiment (finished steps are skipped, an interrupted one resumes);
# FRESH=1 starts it over. Other variables (DRY_RUN, EXTRA_ARGS, PYTHON): see scripts/lib/common.sh.
set -euo pipefail
source "$(dirname "$0")/../lib/common.sh"

# Local POD at every step; from step 1 the logits get their own POD factor, the new logits
# being summed into the background channel.
POD_ARGS=(--pod local --pod_factor 0.0001 --pod_logits)
POD_OPTIONS='{"switch": {"after": {"extra_channels": "sum", "factor": 0.001, "type": "local"}}}'
setup_experiment cityscapes_domain 1-1 PLOP FT checkpoints/step/
for step in $(seq 0 20); do
    if (( step == 0 )); then
        run_step "$step" --batch_size 12 --epochs 50 --lr 0.01 "${POD_ARGS[@]}"
    else
        run_step "$step" --batch_size 12 --epochs 50 --lr 0.001 "${POD_ARGS[@]}" --pod_options "$POD_OPTIONS"
    fi
done
summarize_results
