# shellcheck shell=bash
# Shared helpers of the experiment scripts in scripts/{voc,ade,cityscapesDomain}/. Sourced, not run.
#
# A script calls setup_experiment once, run_step once per incremental step, then summarize_results.
# Every step is one `torchrun ... run.py` call (one run.py call trains or tests exactly one step).
#
# Environment:
#   DATA_ROOT   required: dataset root (VOC: the directory holding PascalVOC2012/; ADE20k: the directory
#               holding ADEChallengeData2016/; Cityscapes: the Cityscapes root itself).
#   NB_GPU      processes (GPUs) per node; default: the number of CUDA_VISIBLE_DEVICES entries,
#               else of GPUs listed by `nvidia-smi -L`, else 1.
#   STEP0_CKPT  a trained step-0 model (e.g. the released 15-x-voc.pth): step 0 then only evaluates it
#               (--ckpt STEP0_CKPT --test, which writes its results-CSV row) and step 1 starts from it
#               (--step_ckpt STEP0_CKPT).
#   EXTRA_ARGS  extra run.py arguments appended to every call (split on whitespace, no quoting).
#   DRY_RUN=1   print each torchrun command line ("+ torchrun ...") instead of running it; nothing is
#               deleted and average_csv.py is not called.
#   RESULTS_DIR directory of the results CSV (default: results/ in the repository root, as in the
#               reference; when set it is also passed to run.py as --results_dir).
#   PYTHON      interpreter for average_csv.py (default: python).

LGKD_REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

die() {
    echo "error: $*" >&2
    exit 1
}

is_dry_run() {
    [[ -n "${DRY_RUN:-}" && "$DRY_RUN" != "0" ]]
}

absolute_path() {
    if [[ "$1" == /* ]]; then printf '%s' "$1"; else printf '%s' "$PWD/$1"; fi
}

require_data_root() {
    if [[ -z "${DATA_ROOT:-}" ]]; then
        die "DATA_ROOT is not set. Point it at the dataset root and run the script again, e.g." \
            "'DATA_ROOT=/datasets bash $0'. Pascal VOC: the directory that contains PascalVOC2012/" \
            "(create it by running data/download_voc.sh inside that directory); ADE20k: the directory" \
            "that contains ADEChallengeData2016/ (data/download_ade.sh); Cityscapes: the Cityscapes" \
            "root (leftImg8bit/, gtFine/; downloaded manually from cityscapes-dataset.com); S3DIS and" \
            "ScanNet: the directory that contains S3DIS/ or ScanNet/, cut into blocks by" \
            "data/prepare_3d.py (see data/README_3d.md)."
    fi
    [[ -d "$DATA_ROOT" ]] || die "DATA_ROOT=$DATA_ROOT is not a directory. Set DATA_ROOT to the dataset" \
        "root (see the top of scripts/lib/common.sh; data/download_voc.sh and data/download_ade.sh" \
        "download VOC and ADE20k)."
    DATA_ROOT=$(absolute_path "$DATA_ROOT")
}

default_nb_gpu() {
    local count=0
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        local devices
        IFS=',' read -r -a devices <<< "$CUDA_VISIBLE_DEVICES"
        count=${#devices[@]}
    elif command -v nvidia-smi > /dev/null 2>&1; then
        count=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU ') || count=0
    fi
    (( count > 0 )) || count=1
    echo "$count"
}

require_step0_ckpt() {
    [[ -n "${STEP0_CKPT:-}" ]] || return 0
    [[ -f "$STEP0_CKPT" ]] || die "STEP0_CKPT=$STEP0_CKPT is not a file. Set it to a trained step-0" \
        "checkpoint (e.g. the released 15-x-voc.pth), or unset it to train step 0."
    STEP0_CKPT=$(absolute_path "$STEP0_CKPT")
}

require_data_root
require_step0_ckpt
NB_GPU=${NB_GPU:-$(default_nb_gpu)}
[[ "$NB_GPU" =~ ^[1-9][0-9]*$ ]] || die "NB_GPU=$NB_GPU is not a positive integer (processes per node)."
if [[ -n "${RESULTS_DIR:-}" ]]; then
    RESULTS_DIR=$(absolute_path "$RESULTS_DIR")
    RESULTS_DIR_ARGS=(--results_dir "$RESULTS_DIR")
else
    RESULTS_DIR=results
    RESULTS_DIR_ARGS=()
fi
PORT=$((9000 + RANDOM % 1000))
DATE=$(date +%Y-%m-%d)
read -r -a EXTRA_ARGS_ARRAY <<< "${EXTRA_ARGS:-}"
# run.py, results/ and checkpoints/ are relative to the repository root, as in the reference.
cd "$LGKD_REPO_ROOT"

# setup_experiment DATASET TASK NAME METHOD [CHECKPOINT_DIR]
# Sets the settings shared by every step and deletes this run's results CSV (one row per step is appended).
setup_experiment() {
    DATASET=$1
    TASK=$2
    NAME=$3
    METHOD=$4
    CHECKPOINT_DIR=${5:-checkpoints/step}
    RESULTS_FILE="${RESULTS_DIR}/${DATE}_${DATASET}_${TASK}_${NAME}.csv"
    is_dry_run || rm -f "$RESULTS_FILE"
}

shell_quote() {
    if [[ "$1" =~ ^[A-Za-z0-9_./:=+,@%-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}

# run_step STEP [RUN_PY_ARGS...]: train (or, with STEP0_CKPT at step 0, evaluate) one step.
run_step() {
    local step=$1
    shift
    local args=(
        --date "$DATE" --data_root "$DATA_ROOT" --overlap --dataset "$DATASET" --task "$TASK"
        --name "$NAME" --method "$METHOD" --step "$step" --opt_level O1 --checkpoint "$CHECKPOINT_DIR" "$@"
    )
    if [[ -n "${STEP0_CKPT:-}" ]]; then
        if (( step == 0 )); then
            args+=(--ckpt "$STEP0_CKPT" --test)
        elif (( step == 1 )); then
            args+=(--step_ckpt "$STEP0_CKPT")
        fi
    fi
    args+=(${RESULTS_DIR_ARGS[@]+"${RESULTS_DIR_ARGS[@]}"} ${EXTRA_ARGS_ARRAY[@]+"${EXTRA_ARGS_ARRAY[@]}"})
    local cmd=(torchrun --master_port "$PORT" "--nproc_per_node=$NB_GPU" run.py "${args[@]}")
    if is_dry_run; then
        local word line="+"
        for word in "${cmd[@]}"; do
            line+=" $(shell_quote "$word")"
        done
        echo "$line"
    else
        "${cmd[@]}"
    fi
}

# summarize_results: print the bg / old / new / all / average mIoU of the finished run.
summarize_results() {
    is_dry_run && return 0
    "${PYTHON:-python}" average_csv.py "$RESULTS_FILE"
}
