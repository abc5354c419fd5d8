"""The rendered model's colour from keyframes' input images (FusionOptions.texture_keyframes).

The flow runs from the rendered model to the live frame. Rendered with the model's own colours
(per voxel, interpolated over marching cubes' triangles, 5 mm apart: about 3 px at 1 m), the
model's texture is a low-passed copy of what the camera saw, and DIS measures the motion from
it short (benchmarks/bench_fusion_flow.py: -0.30 px median beyond 10 px of the silhouette on
blob 11, against -0.13 px between two sensor frames). Here every rendered pixel's canonical
point is instead warped by the node motions of a keyframe (an input frame kept for this: the
first one, and every few frames after), projected into it and, where the keyframe saw it (its
depth agrees), given the keyframe's colour at that pixel, sharp as the camera took it. The
earliest keyframe that saw the point wins: the first frame is the canonical space itself (its
motion is exact), later ones carry only the drift the model had when they were taken. A point
no keyframe saw keeps the model's colour.

Why not the previous frame as the source image (a sharp pair): its pixels show where the
surface truly was, while the solve moves the model's points, so the model's lag at the previous
frame is carried into this one and never corrected; measured: worse (BENCHMARKS.md).
"""
from typing import Dict, Sequence, Tuple

import numpy as np
import torch

from fusion.graph import warp_with_anchors
from model import image_proc


def keyframe_colors(canonical: np.ndarray, anchors: np.ndarray, weights: np.ndarray, pixels: np.ndarray,
                    fallback: np.ndarray, keyframes: Sequence[Tuple[np.ndarray, np.ndarray, torch.Tensor,
                                                                    torch.Tensor]],
                    nodes: torch.Tensor, intrinsics: Dict[str, float], tolerance: float
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """Colours of rendered pixels from the keyframes that saw their canonical points.

    canonical (H, W, 3) float32 canonical point per pixel; anchors (H, W, A) int (-1: none) and
    weights (H, W, A) its node anchors; pixels (H, W) bool, the pixels to colour (those with
    all anchors); fallback (H, W, 3) float32 in [0, 1], the colour elsewhere and where no
    keyframe saw the point; keyframes, earliest first: (colour (H', W', 3) uint8, depth (H', W')
    float32 metres, rotations (N, 3, 3), translations (N, 3) of the nodes in that frame); nodes
    (N, 3) canonical node positions. A keyframe saw a point when the point, warped into it,
    projects inside it onto a depth within `tolerance` metres of its own. Returns (colour
    (H, W, 3) float32, source (H, W) int8: the keyframe each pixel's colour came from, -1: the
    fallback).
    """
    out = fallback.copy()
    source = np.full(pixels.shape, -1, np.int8)
    ys, xs = np.nonzero(pixels & (anchors >= 0).all(axis=-1))
    if ys.size == 0:
        return out, source
    points = torch.from_numpy(np.ascontiguousarray(canonical[ys, xs]))
    a = torch.from_numpy(anchors[ys, xs]).long()
    w = torch.from_numpy(weights[ys, xs])
    todo = np.arange(ys.size)
    fx, fy, cx, cy = intrinsics["fx"], intrinsics["fy"], intrinsics["cx"], intrinsics["cy"]
    for index, (color, depth, rotations, translations) in enumerate(keyframes):
        if todo.size == 0:
            break
        H, W = depth.shape
        p = warp_with_anchors(points[todo], a[todo], w[todo], nodes, rotations, translations).numpy()
        z = p[:, 2]
        front = z > 1e-6
        z_safe = np.where(front, z, 1.0)
        u = fx * p[:, 0] / z_safe + cx
        v = fy * p[:, 1] / z_safe + cy
        inside = front & (u >= 0) & (u <= W - 1) & (v >= 0) & (v <= H - 1)
        ui = np.clip(np.round(u), 0, W - 1).astype(np.int64)
        vi = np.clip(np.round(v), 0, H - 1).astype(np.int64)
        seen = inside & (np.abs(depth[vi, ui] - z) <= tolerance)
        if seen.any():
            sampled = image_proc.sample_points(color, u[seen], v[seen])
            hit = todo[seen]
            out[ys[hit], xs[hit]] = sampled.astype(np.float32) / 255
            source[ys[hit], xs[hit]] = index
        todo = todo[~seen]
    return out, source
