#!/usr/bin/env bash
# The shipped hybrid front-end (checkpoints/nnrt_hybrid.pt), from its training data to the release:
#   ./run_train_hybrid.sh [WORKSPACE] [train.py flags...]
# 1. training pairs with real appearance (objects textured with scikit-image's photographs or
#    procedural prints, 50/50) and every motion family, 320x240, seeds recorded here;
# 2. stage 4_hybrid from checkpoints/nnrt_synthetic.pt (its PWC-Net, frozen): only the hybrid
#    head trains, through the solver (Cauchy reweighting, as it runs), DIS at the fine preset;
# 3. the weights-only release WORKSPACE/nnrt_hybrid.pt and the curve WORKSPACE/hybrid_4_hybrid/curve.png.
# With TWO_PASS=1, then also the head fine-tuned through the two-pass hybrid (--hybrid-passes 2:
# a second DIS + PWC-Net pass on the target resampled by the first solve, a second solve, both
# solves scored), from the release above: WORKSPACE/nnrt_hybrid_2pass.pt and its curve
# WORKSPACE/hybrid2_4_hybrid/curve.png (not the shipped default: see BENCHMARKS.md).
# Interrupted (Ctrl-C), the same command resumes: finished pairs are kept, training --resume's.
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
workspace=${1:-experiments}; [ $# -gt 0 ] && shift
data=data/hyb320
# The photographs come with scikit-image, which is optional (not in resources/requirements.txt:
# with it installed, the synthetic-sequence generator textures its objects with photographs too).
"$PY" -c "import skimage" 2>/dev/null || { echo "error: the training pairs need scikit-image: $PY -m pip install scikit-image==0.26.0" >&2; exit 1; }
"$PY" -m dataset.synthetic --out "$data" --split train --pairs 400 --seed 19 --width 320 --height 240 --textures mixed
"$PY" -m dataset.synthetic --out "$data" --split val --pairs 30 --seed 19 --width 320 --height 240 --textures mixed
"$PY" train.py --stage 4_hybrid --init checkpoints/nnrt_synthetic.pt --dataset-dir "$data" \
  --train-split train --val-split val --workspace "$workspace" --experiment hybrid_4_hybrid \
  --batch-size 2 --optimizer adam --learning-rate 5e-4 --lr-step 400 --lr-gamma 0.5 \
  --max-iterations 800 --val-every 100 --val-pairs 20 --num-workers 0 --threads 1 \
  --robust-loss cauchy --dis-preset fine --grad-clip 10 --checkpoint-every 50 --resume "$@"
"$PY" -m utils.checkpoints "$workspace/hybrid_4_hybrid/checkpoints/best.pt" "$workspace/nnrt_hybrid.pt" \
  --history checkpoints/nnrt_synthetic.pt
"$PY" -m utils.curves "$workspace/hybrid_4_hybrid" --out "$workspace/hybrid_4_hybrid/curve.png" \
  --title "stage 4_hybrid: validation EPE 3D (20 pairs of $data val)"
[ "${TWO_PASS:-0}" = 1 ] || exit 0
"$PY" train.py --stage 4_hybrid --init "$workspace/nnrt_hybrid.pt" --hybrid-passes 2 --dataset-dir "$data" \
  --train-split train --val-split val --workspace "$workspace" --experiment hybrid2_4_hybrid \
  --batch-size 2 --optimizer adam --learning-rate 2e-4 --lr-step 150 --lr-gamma 0.5 \
  --max-iterations 400 --val-every 50 --val-pairs 20 --num-workers 0 --threads 1 \
  --robust-loss cauchy --dis-preset fine --grad-clip 10 --checkpoint-every 25 --resume "$@"
"$PY" -m utils.checkpoints "$workspace/hybrid2_4_hybrid/checkpoints/best.pt" "$workspace/nnrt_hybrid_2pass.pt" \
  --history "$workspace/nnrt_hybrid.pt"
"$PY" -m utils.curves "$workspace/hybrid2_4_hybrid" --out "$workspace/hybrid2_4_hybrid/curve.png" \
  --title "stage 4_hybrid, two passes: validation EPE 3D (20 pairs of $data val)"
