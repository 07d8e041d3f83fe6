# shellcheck shell=bash
# Shared helpers of the experiment scripts in scripts/{voc,ade,cityscapesDomain}/. Sourced, not run.
#
# A script calls setup_experiment once, run_step once per incremental step, then summarize_results.
# Every step is one `torchrun ... run.py` call (one run.py call trains or tests exactly one step).
#
# Rerunning a script continues the experiment: run.py skips a finished step (its checkpoint exists and
# was trained with the same options; a missing results row is rewritten), resumes an interrupted one from
# its last finished epoch, and refuses a step whose files were written with other options. The results
# CSV is kept, and keeps the date the experiment started on (recorded in
# {checkpoint dir}/{task}-{dataset}_{name}.date), so a rerun on another day still completes it.
# FRESH=1 starts over: it deletes this experiment's checkpoints, date file and today's CSV first.
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
#   FRESH=1     start the experiment over (see above) instead of continuing it.
#   DRY_RUN=1   print each torchrun command line ("+ torchrun ...") instead of running it; nothing is
#               deleted and average_csv.py is not called.
#   RESULTS_DIR directory of the results CSV (default: results/ in the repository root, as in the
#               reference; when set it is also passed to run.py as --results_dir).
#   CHECKPOINT_DIR  directory of the checkpoints (default: the script's, checkpoints/step in the
#               repository root, as in the reference); passed to run.py as --checkpoint.
#   PYTHON      interpreter for average_csv.py (default: the repository's .venv/bin/python if it
#               exists, else python).
# torchrun is taken from PATH, else from the repository's .venv/bin (no need to activate it).

LGKD_REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

die() {
    echo "error: $*" >&2
    exit 1
}

is_dry_run() {
    [[ -n "${DRY_RUN:-}" && "$DRY_RUN" != "0" ]]
}

is_fresh() {
    [[ -n "${FRESH:-}" && "$FRESH" != "0" ]]
}

say() {
    echo "[experiment] $*" >&2
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

# The launcher: torchrun from PATH, else the repository's virtual environment (not activated).
find_torchrun() {
    if is_dry_run; then
        TORCHRUN=torchrun
    elif command -v torchrun > /dev/null 2>&1; then
        TORCHRUN=torchrun
    elif [[ -x "$LGKD_REPO_ROOT/.venv/bin/torchrun" ]]; then
        TORCHRUN="$LGKD_REPO_ROOT/.venv/bin/torchrun"
    else
        die "torchrun was not found in PATH nor in $LGKD_REPO_ROOT/.venv/bin. Create the environment" \
            "('make venv' in $LGKD_REPO_ROOT) or activate the one with PyTorch installed" \
            "('. .venv/bin/activate'), then run the script again. Nothing was deleted or run."
    fi
}

require_data_root
require_step0_ckpt
find_torchrun
NB_GPU=${NB_GPU:-$(default_nb_gpu)}
[[ "$NB_GPU" =~ ^[1-9][0-9]*$ ]] || die "NB_GPU=$NB_GPU is not a positive integer (processes per node)."
USER_CHECKPOINT_DIR=""
[[ -z "${CHECKPOINT_DIR:-}" ]] || USER_CHECKPOINT_DIR=$(absolute_path "$CHECKPOINT_DIR")
if [[ -n "${RESULTS_DIR:-}" ]]; then
    RESULTS_DIR=$(absolute_path "$RESULTS_DIR")
    RESULTS_DIR_ARGS=(--results_dir "$RESULTS_DIR")
else
    RESULTS_DIR=results
    RESULTS_DIR_ARGS=()
fi
PORT=$((9000 + RANDOM % 1000))
TODAY=$(date +%Y-%m-%d)
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$LGKD_REPO_ROOT/.venv/bin/python" ]]; then PYTHON="$LGKD_REPO_ROOT/.venv/bin/python"; else PYTHON=python; fi
fi
read -r -a EXTRA_ARGS_ARRAY <<< "${EXTRA_ARGS:-}"
# run.py, results/ and checkpoints/ are relative to the repository root, as in the reference.
cd "$LGKD_REPO_ROOT"

# experiment_checkpoints: this experiment's step checkpoints ({prefix}_{step}.pth and _{step}_last.pth),
# one per line. Other experiments whose name starts with the same text are not matched.
experiment_checkpoints() {
    local file rest
    for file in "${CHECKPOINT_PREFIX}"_*.pth; do
        [[ -e "$file" ]] || continue
        rest=${file#"${CHECKPOINT_PREFIX}_"}
        [[ "$rest" =~ ^[0-9]+(_last)?\.pth$ ]] && printf '%s\n' "$file"
    done
    return 0
}

# A training run of this experiment holds {prefix}_{step}.lock (flock) while it lives.
refuse_if_running() {
    local lock
    command -v flock > /dev/null 2>&1 || return 0
    for lock in "${CHECKPOINT_PREFIX}"_*.lock; do
        [[ -e "$lock" ]] || continue
        flock -n "$lock" true || die "a run of this experiment is still training ($lock is locked:" \
            "$(cat "$lock" 2> /dev/null)). Stop it first; nothing was deleted."
    done
}

# setup_experiment DATASET TASK NAME METHOD [CHECKPOINT_DIR]
# Sets the settings shared by every step, and the experiment's date (DATE): the recorded one when the
# experiment has already started (continuing it), today's otherwise. With FRESH=1, first deletes the
# experiment's checkpoints, its date file and today's results CSV.
setup_experiment() {
    DATASET=$1
    TASK=$2
    NAME=$3
    METHOD=$4
    CHECKPOINT_DIR=${USER_CHECKPOINT_DIR:-${5:-checkpoints/step}}
    CHECKPOINT_PREFIX="${CHECKPOINT_DIR%/}/${TASK}-${DATASET}_${NAME}"
    local date_file="${CHECKPOINT_PREFIX}.date" started
    DATE=$TODAY
    if is_dry_run; then
        # What a real run would use, without deleting or writing anything.
        if ! is_fresh && [[ -f "$date_file" && -n "$(experiment_checkpoints)" ]]; then
            DATE=$(< "$date_file")
        fi
        RESULTS_FILE="${RESULTS_DIR}/${DATE}_${DATASET}_${TASK}_${NAME}.csv"
        return 0
    fi
    if is_fresh; then
        refuse_if_running
        local file
        while IFS= read -r file; do
            rm -f -- "$file"
        done < <(experiment_checkpoints)
        rm -f -- "$date_file" "${RESULTS_DIR}/${TODAY}_${DATASET}_${TASK}_${NAME}.csv"
        say "FRESH=1: deleted the checkpoints and results of ${TASK}-${DATASET} ${NAME}; starting over."
    fi
    started=$(experiment_checkpoints)
    if [[ -n "$started" && -f "$date_file" ]]; then
        DATE=$(< "$date_file")
        [[ "$DATE" =~ ^[A-Za-z0-9._-]*$ ]] || die "$date_file holds '$DATE', not a date. Delete it (or" \
            "run with FRESH=1 to start the experiment over)."
        say "continuing ${TASK}-${DATASET} ${NAME}, started on ${DATE}: finished steps are skipped."
    elif [[ -n "$started" ]]; then
        say "continuing ${TASK}-${DATASET} ${NAME} (no recorded date: results go to today's CSV)."
    fi
    mkdir -p "$(dirname "$date_file")"
    printf '%s\n' "$DATE" > "$date_file"
    RESULTS_FILE="${RESULTS_DIR}/${DATE}_${DATASET}_${TASK}_${NAME}.csv"
}

# has_results_row STEP: the results CSV already holds that step's row.
has_results_row() {
    [[ -f "$RESULTS_FILE" ]] && grep -q "^$1," "$RESULTS_FILE"
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
            if ! is_dry_run && has_results_row 0; then
                say "step 0: STEP0_CKPT already evaluated (row 0 of $RESULTS_FILE); skipped."
                return 0
            fi
            args+=(--ckpt "$STEP0_CKPT" --test)
        elif (( step == 1 )); then
            args+=(--step_ckpt "$STEP0_CKPT")
        fi
    fi
    args+=(${RESULTS_DIR_ARGS[@]+"${RESULTS_DIR_ARGS[@]}"} ${EXTRA_ARGS_ARRAY[@]+"${EXTRA_ARGS_ARRAY[@]}"})
    local cmd=("$TORCHRUN" --master_port "$PORT" "--nproc_per_node=$NB_GPU" run.py "${args[@]}")
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
    "$PYTHON" average_csv.py "$RESULTS_FILE"
}
