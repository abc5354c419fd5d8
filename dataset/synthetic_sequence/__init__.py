"""Synthetic RGB-D sequences with exact ground truth, in DeepDeform's sequence layout.

    python -m dataset.synthetic_sequence --out DIR --frames 40 --seed 0 [--object cloth|blob]
        [--motion bend,twist,bulge,turn,drift] [--detail] [--textures DIR] [--background DIR]

A textured deformable object (a cloth-like sheet or a closed body-like blob) moves smoothly
before a static background (a procedural room, or a real RGB-D frame): bending, twisting,
local bulges, a rigid turn large enough to bring surface unseen in frame 0 into view, drift;
`--detail` adds travelling wrinkles finer than a 5 cm deformation graph. Frames are ray cast
and passed through the pair generator's sensor model (dataset/synthetic/: noise growing with
depth, holes, edge dropout, millimetre quantisation, colour noise, JPEG).

Output, directly in DIR:
    color/NNNNNN.jpg            colour
    depth/NNNNNN.png            uint16 millimetres, 0 = missing
    mask/NNNNNN_<object>.png    the object's pixels, every frame (DeepDeform has frame 0's only)
    intrinsics.txt
    gt/gt.npz                   faces (F, 3) int32; vertices (T, V, 3) float32 metres, camera
                                coordinates of each frame; visible (T, V) bool, seen in frame t
    gt/mesh.ply                 the first frame's mesh
    gt/motion.json              the settings and the motion's parameters

Deterministic for a seed; a re-run skips finished frames (each file is written atomically) and
a longer run extends the sequence (the motion is a function of the frame index). Modules:
objects (meshes, textures) < motion < sequence (scene, frames, files, command line) <
pair_export (`python -m dataset.synthetic_sequence.export_pair`): a frame pair of a sequence
as a DeepDeform-format pair.
"""
from dataset.synthetic_sequence.motion import COMPONENTS, deform, draw_motion
from dataset.synthetic_sequence.objects import OBJECTS, ground_truth_topology, object_mesh
from dataset.synthetic_sequence.pair_export import export_pair
from dataset.synthetic_sequence.sequence import (GENERATOR_VERSION, SequenceError, SequenceScene, build_scene,
                                                 frame_name, frame_paths, generate_sequence, main,
                                                 read_ground_truth)

__all__ = ["COMPONENTS", "deform", "draw_motion", "OBJECTS", "ground_truth_topology", "object_mesh",
           "GENERATOR_VERSION", "SequenceError", "SequenceScene", "build_scene", "frame_name", "frame_paths",
           "generate_sequence", "main", "read_ground_truth", "export_pair"]
