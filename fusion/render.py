"""Rendering the model into a live camera: ray casting the warped canonical mesh.

One ray per pixel through the triangle mesh whose vertices are the canonical vertices moved
by the current warp (Open3D's RaycastingScene). Per pixel: live depth, colour, the canonical
point that is seen there (barycentric interpolation of the canonical vertices, so it lies on
the canonical surface exactly) and the live surface normal.
"""
from dataclasses import dataclass
from typing import Dict

import numpy as np


@dataclass
class Rendering:
    depth: np.ndarray          # (H, W) float32 metres, 0 = no model
    color: np.ndarray          # (H, W, 3) float32 in [0, 1]
    canonical: np.ndarray      # (H, W, 3) float32 canonical point seen at each pixel (NaN: none)
    points: np.ndarray         # (H, W, 3) float32 live point (0 where no model)
    normals: np.ndarray        # (H, W, 3) float32 live normal, towards the camera
    mask: np.ndarray           # (H, W) bool: the model is seen here


def pixel_rays(intrinsics: Dict[str, float], height: int, width: int) -> np.ndarray:
    """(H, W, 6) rays from the camera centre with direction z = 1, so a hit's t is its depth."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    directions = np.stack(((xs - intrinsics["cx"]) / intrinsics["fx"],
                           (ys - intrinsics["cy"]) / intrinsics["fy"], np.ones_like(xs)), axis=-1)
    return np.concatenate((np.zeros_like(directions), directions), axis=-1).astype(np.float32)


def render(live_vertices: np.ndarray, canonical_vertices: np.ndarray, faces: np.ndarray,
           colors: np.ndarray, intrinsics: Dict[str, float], height: int, width: int,
           max_grazing_cos: float = 0.1) -> Rendering:
    """Renders the mesh (V, 3) live vertices / faces (F, 3) into the (height, width) camera.

    Pixels whose surface is seen at a grazing angle (|cos| < max_grazing_cos) are left out: their
    depth is unreliable and their colour smeared.
    """
    import open3d as o3d
    import open3d.core as o3c

    H, W = height, width
    empty = Rendering(np.zeros((H, W), np.float32), np.zeros((H, W, 3), np.float32),
                      np.full((H, W, 3), np.nan, np.float32), np.zeros((H, W, 3), np.float32),
                      np.zeros((H, W, 3), np.float32), np.zeros((H, W), bool))
    if faces.shape[0] == 0:
        return empty
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3c.Tensor(np.ascontiguousarray(live_vertices, np.float32)),
                        o3c.Tensor(np.ascontiguousarray(faces, np.uint32)))
    rays = pixel_rays(intrinsics, H, W)
    hit = scene.cast_rays(o3c.Tensor(rays))
    t = hit["t_hit"].numpy()
    ids = hit["primitive_ids"].numpy().astype(np.int64)
    uv = hit["primitive_uvs"].numpy()
    normals = hit["primitive_normals"].numpy()
    direction = rays[..., 3:] / np.linalg.norm(rays[..., 3:], axis=-1, keepdims=True)
    cos = (normals * direction).sum(axis=-1)
    mask = np.isfinite(t) & (np.abs(cos) >= max_grazing_cos)
    normals = np.where((cos > 0)[..., None], -normals, normals)     # face the camera
    tri = faces[np.where(mask, ids, 0)]                                # (H, W, 3)
    b = np.stack((1 - uv[..., 0] - uv[..., 1], uv[..., 0], uv[..., 1]), axis=-1)[..., None]
    canonical = (b * canonical_vertices[tri]).sum(axis=-2)
    color = (b * colors[tri]).sum(axis=-2)
    depth = np.where(mask, t, 0).astype(np.float32)
    points = (rays[..., 3:] * depth[..., None]).astype(np.float32)
    return Rendering(depth=depth, color=np.where(mask[..., None], color, 0).astype(np.float32),
                     canonical=np.where(mask[..., None], canonical, np.nan).astype(np.float32),
                     points=points, normals=np.where(mask[..., None], normals, 0).astype(np.float32),
                     mask=mask)
