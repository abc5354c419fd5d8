#!/usr/bin/env bash
# The four training stages in order, each from the best checkpoint of the one before:
#   ./run_train.sh DATASET_DIR EXPERIMENT [WORKSPACE] [train.py flags for every stage...]
# e.g. ./run_train.sh data/synthetic mymodel experiments --max-iterations 30000
# Stage outputs: WORKSPACE/EXPERIMENT_<stage>/checkpoints/{last,best}.pt; an interrupted run
# continues where it stopped when started again (--resume). Set INIT=checkpoint.pt to start
# stage 0 from existing weights (e.g. a pretrained PWC-Net in the reference's layout).
# At the end the last stage's best checkpoint is exported weights-only, with the history of the
# stages, to WORKSPACE/EXPERIMENT.pt (what checkpoints/ ships; use it with --checkpoint).
set -euo pipefail
if [ $# -lt 2 ]; then sed -n '2,9p' "$0"; exit 2; fi
cd "$(dirname "$0")"
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
dataset=$1; experiment=$2; workspace=${3:-experiments}; shift $(( $# < 3 ? $# : 3 ))
previous=${INIT:-}
stages=()
for stage in 0_flow 1_solver 2_mask 3_refine; do
  init=(); [ -n "$previous" ] && init=(--init "$previous")
  "$PY" train.py --stage "$stage" --dataset-dir "$dataset" --experiment "${experiment}_${stage}" \
    --workspace "$workspace" --resume "${init[@]}" "$@"
  previous="$workspace/${experiment}_${stage}/checkpoints/best.pt"
  stages+=("$previous")
done
"$PY" -m utils.checkpoints "$previous" "$workspace/$experiment.pt" --history "${stages[@]:0:3}"
