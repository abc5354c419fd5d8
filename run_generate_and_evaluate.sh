#!/usr/bin/env bash
# Predict, then score: ./run_generate_and_evaluate.sh DATASET_DIR SPLIT [MODEL] [OUT_DIR] [generate.py flags...]
#   MODEL and OUT_DIR as for run_generate.sh; the split needs ground truth.
set -euo pipefail
if [ $# -lt 2 ]; then sed -n '2,3p' "$0"; exit 2; fi
cd "$(dirname "$0")"
dataset=$1; split=$2; model=${3:-default}
case "$model" in dis|gt|default) name=$model ;; *) name=$(basename "$model" .pt) ;; esac
out=${4:-predictions/${split}_${name}}
./run_generate.sh "$dataset" "$split" "$model" "$out" "${@:5}"
./run_evaluate.sh "$dataset" "$split" "$out"
