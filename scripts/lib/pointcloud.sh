# shellcheck shell=bash
# Shared settings of the point-cloud scripts in scripts/{s3dis,scannet}/. Sourced after common.sh.
#
# They follow the 3DPC-CISS protocol (Yang et al., CVPR 2023, code leolyj/3DPC-CISS; its
# scripts/train_*_segmentor.sh): DGCNN from scratch, 2,048 points per 1 m block, Adam with lr 0.001 at
# every step, halved every 50 of 100 epochs, a batch of 32 blocks, overlapped (3DPC-CISS) filtering.
# DATA_ROOT is the directory that contains S3DIS/ or ScanNet/ after `python data/prepare_3d.py`.
#
# Environment (besides those of common.sh):
#   FOLD   3DPC-CISS's class order: 0 (default: the order of the class-name file) or 1 (alphabetical,
#          the task name gets the suffix _cv1). One fold per run of a script.
#   NB_GPU processes; the 32 blocks of a batch are split between them (32 must be a multiple of NB_GPU),
#          so the global batch stays 3DPC-CISS's with synchronised batch normalisation (--norm_act default).

POINT_CLOUD_GLOBAL_BATCH=32
FOLD=${FOLD:-0}
case "$FOLD" in
    0) FOLD_SUFFIX="" ;;
    1) FOLD_SUFFIX="_cv1" ;;
    *) die "FOLD=$FOLD is not a class-order fold of 3DPC-CISS. Use FOLD=0 (default) or FOLD=1." ;;
esac
(( POINT_CLOUD_GLOBAL_BATCH % NB_GPU == 0 )) || die "NB_GPU=$NB_GPU does not divide the batch of" \
    "$POINT_CLOUD_GLOBAL_BATCH blocks of 3DPC-CISS. Use NB_GPU=1, 2, 4, 8, 16 or 32."
# run.py options of every step (the point-cloud defaults of run.py, written out so that the scripts
# state the protocol they run).
POINT_CLOUD_ARGS=(
    --batch_size "$((POINT_CLOUD_GLOBAL_BATCH / NB_GPU))" --epochs 100 --lr 0.001 --optimizer adam
    --lr_policy step --lr_decay_epochs 50 --lr_decay_factor 0.5 --num_points 2048
)

# fold_task SETTING: the --task name of SETTING (e.g. 15-5) in the chosen fold (15-5 or 15-5_cv1).
fold_task() {
    printf '%s%s' "$1" "$FOLD_SUFFIX"
}
