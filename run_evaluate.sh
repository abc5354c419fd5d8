#!/usr/bin/env bash
# Graph Error 3D and EPE 3D: ./run_evaluate.sh DATASET_DIR SPLIT PREDICTIONS_DIR
set -euo pipefail
if [ $# -lt 3 ]; then sed -n '2p' "$0"; exit 2; fi
cd "$(dirname "$0")"
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
exec "$PY" evaluate.py --dataset-dir "$1" --split "$2" --predictions "$3"
