"""The fusion loop's dense depth term: projective point-to-plane associations of the rendered
model's points with the live depth (DynamicFusion's data term), and the live normals they use.

Each term is one residual n . (warp(x) - y) of the solver (model/solver/terms.py icp_terms): a
model point x with its anchors, the live point y at the pixel x projects to, and y's unit normal
n. The loop makes them at the previous motion, where every rendered point projects to its own
pixel, and (--icp-reassociate) again at the motion just solved, where they project elsewhere.
"""
from typing import Dict

import numpy as np
import torch


def pixel_normals(points: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) points -> (H, W, 3) unit normals towards the camera from central differences
    (zero where a neighbour is missing)."""
    p = points
    dx = torch.zeros_like(p)
    dy = torch.zeros_like(p)
    dx[:, 1:-1] = p[:, 2:] - p[:, :-2]
    dy[1:-1] = p[2:] - p[:-2]
    n = torch.cross(dx, dy, dim=-1)
    ok = (p[..., 2] > 0)
    ok[:, 1:-1] &= (p[:, 2:, 2] > 0) & (p[:, :-2, 2] > 0)
    ok[1:-1] &= (p[2:, ..., 2] > 0) & (p[:-2, ..., 2] > 0)
    n = torch.where(ok[..., None], n, torch.zeros_like(n))
    n = n / n.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    flip = (n * p).sum(dim=-1) > 0
    return torch.where(flip[..., None], -n, n)


def point_to_plane_terms(mask: np.ndarray, live: np.ndarray, model_normals: np.ndarray, anchors: np.ndarray,
                         weights: np.ndarray, target_points: torch.Tensor, normals: torch.Tensor,
                         intrinsics: Dict[str, float], stride: int, max_distance: float,
                         max_normal_angle: float, boundary: np.ndarray) -> Dict[str, torch.Tensor]:
    """The SolverProblem's icp_* fields for one frame.

    mask (H, W) bool: the rendered model's pixels; live (H, W, 3) float32: their model points at
    the motion the terms are made at; model_normals (H, W, 3): the rendered normals (the normal
    check); anchors (H, W, 4) int, weights (H, W, 4): each pixel's anchors; target_points,
    normals (H, W, 3): the live frame's points and pixel_normals; boundary (H, W) bool: its
    pixels at a depth jump. Every `stride`-th model pixel in each direction is associated with
    the live pixel its point projects to, and kept where the live depth is valid and off a depth
    jump, within `max_distance` m of the point's depth and with normals within `max_normal_angle`
    degrees. Dense where the flow is sparse: weak texture leaves DIS little to match, the depth
    still constrains the motion along every normal of the model (tangential motion stays the
    flow's and ARAP's)."""
    H, W = mask.shape
    sub = np.zeros((H, W), bool)
    sub[::stride, ::stride] = True
    ys, xs = np.nonzero(sub & mask & (anchors >= 0).all(axis=-1) & (live[..., 2] > 0))
    source = live[ys, xs]
    u = np.round(source[:, 0] / source[:, 2] * intrinsics["fx"] + intrinsics["cx"]).astype(np.int64)
    v = np.round(source[:, 1] / source[:, 2] * intrinsics["fy"] + intrinsics["cy"]).astype(np.int64)
    inside = (u >= 0) & (u < W) & (v >= 0) & (v < H)
    ys, xs, source, u, v = ys[inside], xs[inside], source[inside], u[inside], v[inside]
    target = target_points.numpy()[v, u]
    ok = (target[:, 2] > 0) & (np.abs(target[:, 2] - source[:, 2]) <= max_distance)
    cos = (normals.numpy()[v, u] * model_normals[ys, xs]).sum(axis=-1)
    ok &= cos >= np.cos(np.radians(max_normal_angle))
    ok &= ~boundary[v, u]
    ys, xs, source, u, v = ys[ok], xs[ok], source[ok], u[ok], v[ok]
    return {"icp_sample": torch.zeros(ys.shape[0], dtype=torch.int64),
            "icp_source_points": torch.from_numpy(np.ascontiguousarray(source)),
            "icp_anchors": torch.from_numpy(anchors[ys, xs]).long(),
            "icp_anchor_weights": torch.from_numpy(weights[ys, xs]),
            "icp_target_points": target_points[v, u].float(),
            "icp_target_normals": normals[v, u].float(),
            "icp_weights": torch.ones(ys.shape[0])}
