"""Synthetic training and test data in the DeepDeform format (docs/DESIGN.md 5.8).

    python -m dataset.synthetic --out DIR --split train --pairs 1000 --seed 0 [--real-frames F]

A pair is made in five steps:

1. Scene. A procedural, richly textured surface (`cloth`: a wavy sheet with an irregular
   outline; `bump`: a sheet with large bumps towards the camera; `cylinder`: a sheet bent into
   an arc of 100-220 degrees, which hides part of itself; `blob`: a closed lumpy ellipsoid) at
   0.8-2.5 m in front of a static textured box (back wall, optional floor and side wall); or,
   with `--real-frames`, the object of a real RGB-D frame, meshed from its depth, in front of
   the rest of that frame (the background, inpainted behind the object).
2. Motion. One family per pair, used in turn: `bend` (around an in-plane axis, over the whole
   object or as a fold on one side), `twist` (about an in-plane axis, angle growing along it),
   `rbf` (a Gaussian-RBF blend of the rigid motions of 3-6 control points), `bulge`
   (displacement along the normals under 2-5 Gaussian bumps), `large` (a moderate RBF blend plus
   a lateral shift calibrated to a mean image motion of 30-60 px at 640 px width); every family
   is followed by a small global rigid motion. Magnitudes scale with `--motion-scale`.
3. Rendering. Source and target are ray cast (open3d RaycastingScene) against the rest and the
   deformed mesh: the hit triangle and barycentrics give exact depth, texture and normal per
   pixel, composited by depth with the static background. Procedural objects are shaded
   (Lambert, two-sided); the target gets a mild illumination change.
4. Sensor. Depth noise sigma(z) = 1.2 mm + 1.9 mm/m^2 (z - 0.4 m)^2 (a Kinect-like axial noise
   model), missing depth at grazing angles, at depth discontinuities and in random blobs,
   millimetre quantisation; colour noise and JPEG. Measured real pixels are kept as they are.
5. Ground truth. Each source object pixel with stored depth lies on a known triangle (or vertex)
   of the mesh, so its deformed position p' is exact. Scene flow = p' - the point back-projected
   from the *stored* source depth, so that source point + scene flow = p' holds to float
   precision whatever the noise; optical flow = projection of p' - pixel. Both are valid only
   where p' projects inside the target image and is visible there: a ray from the camera to p'
   hits the deformed mesh no nearer than p' (less a 1 mm tolerance) and the static background
   is not in front of it. Elsewhere they are -inf. The deformation graph is built from the
   stored source depth with the scene flow of *every* source object pixel (its deformation is
   known even where the target does not see it), so nodes cover the whole object and each
   node's ground-truth deformation is exact.

Output (paths in the labels relative to DIR): `DIR/<split>_graphs.json` and, per pair,
`DIR/<split>/seqNNNN/` with color/, depth/, mask/, optical_flow/, scene_flow/, the seven graph
folders, intrinsics.txt and `pair.json` (the label and the settings that made it, written
last: a re-run skips pairs whose record and files all exist and were made with the same
settings, so an interrupted run resumes).

Pair i is drawn from a generator seeded by (seed, CRC-32 of the split name, i, attempt): pairs do
not depend on how many others are made, and splits made with the same seed do not share pairs.
A draw that cannot give a usable pair (object too small or out of view, no graph, large motion
off its range) is replaced by the next attempt, deterministically.

The package, one idea per module, each importing only those above it:
geometry (camera, vector helpers, ray casting) < textures < scene (procedural meshes, background)
< real (real frames as scenes) < motion < render < sensor < pair (one pair) < writer (files,
resume record) < splits (a split of pairs, worker processes, the command line; `__main__.py`).
The sequence generator (dataset/synthetic_sequence/) builds on the same modules.
"""
from dataset.graph import GraphError
from dataset.synthetic.geometry import (make_intrinsics, pixel_rays, project, rigid_fit_residual, rotation,
                                        vertex_normals)
from dataset.synthetic.motion import MOTIONS, deform
from dataset.synthetic.pair import make_pair
from dataset.synthetic.real import RealFrame, foreground_by_depth, load_real_frames, real_scene
from dataset.synthetic.render import VISIBILITY_TOLERANCE, Frame, render, visible_points
from dataset.synthetic.scene import (SHAPES, Background, Mesh, SceneError, cube_sphere, procedural_background,
                                     procedural_mesh)
from dataset.synthetic.sensor import noise_sigma, sensor_color, sensor_depth
from dataset.synthetic.splits import MAX_ATTEMPTS, generate, main, make_and_write, pair_rng
from dataset.synthetic.textures import procedural_texture
from dataset.synthetic.writer import (GENERATOR_VERSION, PAIR_RECORD, SOURCE_ID, TARGET_ID, graph_name, seq_id,
                                      write_pair)

__all__ = ["GraphError", "make_intrinsics", "pixel_rays", "project", "rigid_fit_residual", "rotation",
           "vertex_normals", "MOTIONS", "deform", "VISIBILITY_TOLERANCE", "visible_points", "make_pair", "RealFrame",
           "foreground_by_depth", "load_real_frames", "real_scene", "Frame", "render", "SHAPES",
           "Background", "Mesh", "SceneError", "cube_sphere", "procedural_background", "procedural_mesh", "noise_sigma",
           "sensor_color", "sensor_depth", "MAX_ATTEMPTS", "generate", "main", "make_and_write", "pair_rng",
           "procedural_texture", "GENERATOR_VERSION", "PAIR_RECORD", "SOURCE_ID", "TARGET_ID", "graph_name",
           "seq_id", "write_pair"]
