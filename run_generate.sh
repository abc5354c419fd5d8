#!/usr/bin/env bash
# Predictions on a split: ./run_generate.sh DATASET_DIR SPLIT [MODEL] [OUT_DIR] [generate.py flags...]
#   MODEL: a checkpoint file (the flow network), `dis`, `gt`, or `default` (the shipped
#          checkpoint, else DIS). OUT_DIR defaults to predictions/<split>_<model name>.
set -euo pipefail
if [ $# -lt 2 ]; then sed -n '2,4p' "$0"; exit 2; fi
cd "$(dirname "$0")"
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
dataset=$1; split=$2; model=${3:-default}; shift $(( $# < 3 ? $# : 3 ))
case "$model" in
  dis|gt) flags=(--flow "$model"); name=$model ;;
  default) flags=(); name=default ;;
  *) flags=(--flow network --checkpoint "$model"); name=$(basename "$model" .pt) ;;
esac
out=${1:-predictions/${split}_${name}}; [ $# -gt 0 ] && shift
exec "$PY" generate.py --dataset-dir "$dataset" --split "$split" --out "$out" "${flags[@]}" "$@"
