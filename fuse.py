"""Non-rigid fusion of an RGB-D sequence into a canonical model, and meshes out.

    python fuse.py --sequence DIR --out OUT [--object NAME | --mask PNG] [--frames START:END[:STEP]]
                   [--flow network|dis|gt] [--checkpoint C] [--voxel-size 0.005] [--truncation 0.025]
                   [--device auto] [--resume] [--oracle-motion] [--deepdeform-names] [--show]

DIR holds color/NNNNNN.jpg, depth/NNNNNN.png (uint16 mm), mask/NNNNNN_<object>.png (the first
frame's is used) and intrinsics.txt. Every frame is tracked against the model rendered at the
previous frame's motion, integrated warped into a sparse TSDF, and the deformation graph grows
where the surface does. Writes OUT/canonical.ply, OUT/frames/NNNNNN.ply (the canonical mesh
warped into every frame: one topology), OUT/nodes.npz, OUT/frames.csv, OUT/fusion_options.json,
OUT/preview.png and OUT/fusion.mp4; OUT/state.pt every --save-every frames for --resume. Score a
synthetic sequence with `python evaluate.py --sequence DIR --reconstruction OUT`.
"""
import sys

from utils.fusion_run import main

if __name__ == "__main__":
    sys.exit(main())
