"""Rendering a mesh by ray casting, composited by depth with the static background."""
from dataclasses import dataclass
from typing import Dict

import numpy as np

from dataset.synthetic.geometry import (cast_rays, corner_weights, dot, interpolate, project,
                                        vertex_normals)
from dataset.synthetic.scene import Background, Mesh
from model import image_proc

# A visible point is hit by its own camera ray at its own depth, up to float32 error (~1e-6 m);
# 1 mm also accepts a surface grazing itself, which is still the same surface.
VISIBILITY_TOLERANCE = 1e-3


@dataclass
class Frame:
    """A rendered frame before the sensor model."""
    depth: np.ndarray     # (H, W) float64 metres, inf = nothing
    color: np.ndarray     # (H, W, 3) float32
    cosine: np.ndarray    # (H, W) |cos| between view ray and geometric normal
    is_object: np.ndarray  # (H, W) bool
    measured: np.ndarray  # (H, W) bool: real background measurement
    triangle: np.ndarray  # (H, W) int64 hit triangle of the object (-1 = none)
    bary: np.ndarray      # (H, W, 2) barycentrics of the object hit


def render(mesh: Mesh, vertices: np.ndarray, scene, rays: np.ndarray, intrinsics: Dict[str, float],
           background: Background, light: np.ndarray, ambient: float) -> Frame:
    """Ray casts the object at `vertices` (the mesh's rest or deformed positions, all in front
    of the camera; `scene` holds them) and composites it with the background by depth.
    Procedural objects are shaded with a two-sided Lambert term, ambient + (1 - ambient)
    |n . light|."""
    height, width = rays.shape[:2]
    # Only the pixels of the object's bounding box can hit it; casting just those is faster.
    uv = project(vertices, intrinsics)
    x0, y0 = np.clip(np.floor(uv.min(axis=0)).astype(np.int64) - 1, 0, [width, height])
    x1, y1 = np.clip(np.ceil(uv.max(axis=0)).astype(np.int64) + 2, 0, [width, height])
    t = np.full((height, width), np.inf)
    triangle = np.full((height, width), -1, np.int64)
    bary = np.zeros((height, width, 2))
    normal = np.zeros((height, width, 3))
    if x1 > x0 and y1 > y0:
        window = (slice(y0, y1), slice(x0, x1))
        t[window], triangle[window], bary[window], normal[window] = cast_rays(scene, rays[window])
    is_object = (triangle >= 0) & (t < background.depth)
    corners, weights = corner_weights(mesh.faces, triangle[is_object], bary[is_object])
    uv = interpolate(mesh.texcoords, corners, weights)
    albedo = image_proc.sample_points(mesh.texture, uv[:, 0], uv[:, 1])
    if mesh.procedural:
        n = interpolate(vertex_normals(vertices, mesh.faces, mesh.weld), corners, weights)
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
        albedo = albedo * (ambient + (1 - ambient) * np.abs(dot(n, light)))[:, None]
    color = background.color.copy()
    color[is_object] = albedo
    cosine = np.abs(np.sum(normal * rays, axis=-1)) / np.linalg.norm(rays, axis=-1)
    if not mesh.procedural:
        cosine[:] = 1.0
    return Frame(np.where(is_object, t, background.depth), color,
                 np.where(is_object, cosine, background.cosine), is_object,
                 background.measured & ~is_object, np.where(is_object, triangle, -1), bary)


def visible_points(scene, points: np.ndarray, intrinsics: Dict[str, float], background: Background):
    """Which (N, 3) points on the surface that `scene` holds the camera sees: inside the image,
    hit by their own camera ray no nearer than themselves (less VISIBILITY_TOLERANCE), and not
    behind the static background. Returns (N,) bool and the (N, 2) pixel coordinates."""
    height, width = background.depth.shape
    uv = project(points, intrinsics)
    z = points[:, 2]
    inside = (uv[:, 0] >= 0) & (uv[:, 0] <= width - 1) & (uv[:, 1] >= 0) & (uv[:, 1] <= height - 1)
    t, _, _, _ = cast_rays(scene, points / z[:, None])
    nearest = np.clip(np.round(uv).astype(np.int64), 0, [width - 1, height - 1])
    behind_background = background.depth[nearest[:, 1], nearest[:, 0]] < z - VISIBILITY_TOLERANCE
    return inside & (t >= z - VISIBILITY_TOLERANCE) & ~behind_background, uv


def flow_images(height: int, width: int, ys: np.ndarray, xs: np.ndarray, visible: np.ndarray,
                flow2d: np.ndarray, flow3d: np.ndarray):
    """Ground-truth flow images of the source pixels (ys, xs) (P,), with their (P, 2) optical
    and (P, 3) scene flow: optical flow (2, H, W) and scene flow (3, H, W) where the moved point
    is visible in the target (-inf elsewhere, DeepDeform's invalid value), and the scene flow of
    every source point (3, H, W; NaN off the object), which the graph builder takes."""
    optical_flow = np.full((2, height, width), -np.inf, np.float32)
    scene_flow = np.full((3, height, width), -np.inf, np.float32)
    scene_flow_all = np.full((3, height, width), np.nan, np.float32)
    optical_flow[:, ys[visible], xs[visible]] = flow2d[visible].T
    scene_flow[:, ys[visible], xs[visible]] = flow3d[visible].T
    scene_flow_all[:, ys, xs] = flow3d.T
    return optical_flow, scene_flow, scene_flow_all
