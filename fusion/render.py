"""Rendering the model into a live camera: ray casting the warped canonical mesh.

One ray per pixel through the triangle mesh whose vertices are the canonical vertices moved
by the current warp (Open3D's RaycastingScene). Per pixel: live depth, colour, the canonical
point that is seen there (barycentric interpolation of the canonical vertices, so it lies on
the canonical surface exactly) and the live surface normal.
"""
from dataclasses import dataclass
from typing import Dict

import numpy as np

from dataset.synthetic import geometry


@dataclass
class Rendering:
    depth: np.ndarray          # (H, W) float32 metres, 0 = no model
    color: np.ndarray          # (H, W, 3) float32 in [0, 1]
    canonical: np.ndarray      # (H, W, 3) float32 canonical point seen at each pixel (NaN: none)
    points: np.ndarray         # (H, W, 3) float32 live point (0 where no model)
    normals: np.ndarray        # (H, W, 3) float32 live normal, towards the camera
    mask: np.ndarray           # (H, W) bool: the model is seen here


def pixel_rays(intrinsics: Dict[str, float], height: int, width: int) -> np.ndarray:
    """(H, W, 6) float32 rays (Open3D's origin + direction) from the camera centre with direction
    z = 1 (the generator's pixel_rays), so a hit's t is its depth."""
    directions = geometry.pixel_rays(width, height, intrinsics)
    return np.concatenate((np.zeros_like(directions), directions), axis=-1).astype(np.float32)


def render(live_vertices: np.ndarray, canonical_vertices: np.ndarray, faces: np.ndarray,
           colors: np.ndarray, intrinsics: Dict[str, float], height: int, width: int,
           max_grazing_cos: float = 0.1) -> Rendering:
    """Renders the mesh (V, 3) live vertices / faces (F, 3) into the (height, width) camera.

    Pixels whose surface is seen at a grazing angle (|cos| < max_grazing_cos) are left out: their
    depth is unreliable and their colour smeared.
    """
    import open3d.core as o3c

    H, W = height, width
    if faces.shape[0] == 0:
        return Rendering(np.zeros((H, W), np.float32), np.zeros((H, W, 3), np.float32),
                         np.full((H, W, 3), np.nan, np.float32), np.zeros((H, W, 3), np.float32),
                         np.zeros((H, W, 3), np.float32), np.zeros((H, W), bool))
    scene = geometry.raycasting_scene(live_vertices, faces)
    rays = pixel_rays(intrinsics, H, W)
    hit = scene.cast_rays(o3c.Tensor(rays))
    t = hit["t_hit"].numpy()
    ids = hit["primitive_ids"].numpy().astype(np.int64)
    uv = hit["primitive_uvs"].numpy()
    normals = hit["primitive_normals"].numpy()
    hit_pixels = np.isfinite(t)
    direction = rays[hit_pixels, 3:]
    n = normals[hit_pixels]
    cos = (n * direction).sum(axis=-1) / np.linalg.norm(direction, axis=-1)
    keep = np.abs(cos) >= max_grazing_cos
    ys, xs = np.nonzero(hit_pixels)
    ys, xs, cos, n, direction = ys[keep], xs[keep], cos[keep], n[keep], direction[keep]
    mask = np.zeros((H, W), bool)
    mask[ys, xs] = True
    # Only the pixels that see the model are interpolated (a fraction of the frame).
    tri = faces[ids[ys, xs]]                                             # (P, 3)
    u, v = uv[ys, xs, 0:1], uv[ys, xs, 1:2]

    def interpolate(values):
        return (1 - u - v) * values[tri[:, 0]] + u * values[tri[:, 1]] + v * values[tri[:, 2]]
    out = Rendering(np.zeros((H, W), np.float32), np.zeros((H, W, 3), np.float32),
                    np.full((H, W, 3), np.nan, np.float32), np.zeros((H, W, 3), np.float32),
                    np.zeros((H, W, 3), np.float32), mask)
    out.depth[ys, xs] = t[ys, xs]
    out.color[ys, xs] = interpolate(colors)
    out.canonical[ys, xs] = interpolate(canonical_vertices)
    out.points[ys, xs] = direction * t[ys, xs, None]
    out.normals[ys, xs] = np.where((cos > 0)[:, None], -n, n)          # face the camera
    return out
