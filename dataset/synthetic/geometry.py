"""Camera geometry, small vector helpers and ray casting shared by the synthetic generators."""
from typing import Dict, Optional

import numpy as np
import open3d as o3d

def make_intrinsics(width: int, height: int, focal: float) -> Dict[str, float]:
    """Pinhole intrinsics with fx = fy = focal * width, principal point at the image centre."""
    f = float(focal) * width
    return {"fx": f, "fy": f, "cx": (width - 1) / 2.0, "cy": (height - 1) / 2.0}


def pixel_rays(width: int, height: int, intrinsics: Dict[str, float]) -> np.ndarray:
    """(H, W, 3) float64 ray directions with z = 1, so that a hit distance is the depth."""
    x, y = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    return np.stack(((x - intrinsics["cx"]) / intrinsics["fx"],
                     (y - intrinsics["cy"]) / intrinsics["fy"], np.ones_like(x)), axis=-1)


def project(points: np.ndarray, intrinsics: Dict[str, float]) -> np.ndarray:
    """(N, 3) camera points -> (N, 2) pixel coordinates (x, y)."""
    z = points[:, 2]
    return np.stack((intrinsics["fx"] * points[:, 0] / z + intrinsics["cx"],
                     intrinsics["fy"] * points[:, 1] / z + intrinsics["cy"]), axis=1)


def rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """3x3 rotation by `angle` radians about `axis` (Rodrigues)."""
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def dot(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(N, 3) . (3,) -> (N,). Products with a 3-vector or 3x3 matrix are written out: numpy
    hands `(N, 3) @ (3, 3)` to a multi-threaded BLAS, which next to torch's spinning OpenMP
    threads can be 100 times slower on a machine with few cores."""
    return x[:, 0] * v[0] + x[:, 1] * v[1] + x[:, 2] * v[2]


def rotate(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    """(N, 3) points times the 3x3 matrix r: rows r x_n."""
    return np.stack((dot(x, r[0]), dot(x, r[1]), dot(x, r[2])), axis=1)


def random_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / max(np.linalg.norm(v), 1e-12)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly distributed 3x3 rotation (from a unit quaternion)."""
    q = rng.standard_normal(4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def vertex_normals(vertices: np.ndarray, faces: np.ndarray,
                   weld: Optional[np.ndarray] = None) -> np.ndarray:
    """(V, 3) unit normals, the area-weighted mean of the incident face normals (0 if none).
    With `weld` (V,) group ids, vertices of one group share the normal of all their faces."""
    v0, v1, v2 = (vertices[faces[:, k]] for k in range(3))
    face_normals = np.cross(v1 - v0, v2 - v0)
    ids = weld[faces] if weld is not None else faces
    count = int(ids.max()) + 1 if ids.size else 0
    normals = np.zeros((max(count, vertices.shape[0]), 3))
    for k in range(3):
        for c in range(3):
            normals[:count, c] += np.bincount(ids[:, k], weights=face_normals[:, c], minlength=count)
    normals = normals[weld] if weld is not None else normals[:vertices.shape[0]]
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)


def weld_groups(keys: np.ndarray) -> np.ndarray:
    """(V, k) integer keys -> (V,) int64 id of the first vertex with the same key."""
    shifted = keys - keys.min(axis=0)
    flat = np.ravel_multi_index(tuple(shifted.T), tuple(shifted.max(axis=0) + 1))
    _, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)].astype(np.int64)


def interpolate(values: np.ndarray, corners: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_k weights[n, k] * values[corners[n, k]]: (V, C), (N, 3), (N, 3) -> (N, C)."""
    return np.einsum("nk,nkc->nc", weights, values[corners])


def rigid_fit_residual(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N,) distances left after the best rigid fit (Kabsch) of (N, 3) source onto target."""
    cs, ct = source.mean(axis=0), target.mean(axis=0)
    u, _, vt = np.linalg.svd(np.einsum("ni,nj->ij", source - cs, target - ct))
    d = np.sign(np.linalg.det(vt.T @ u.T))
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return np.linalg.norm(rotate(source - cs, r) + ct - target, axis=1)


# ---------------------------------------------------------------------------------------------
# Ray casting


# Threads per ray cast (0 = all cores); worker processes share the cores out (set per process
# by the split driver, read at each cast).
RAY_THREADS = 0


def raycasting_scene(vertices: np.ndarray, faces: np.ndarray) -> o3d.t.geometry.RaycastingScene:
    """Open3D's ray-casting scene of a triangle mesh (V, 3), (F, 3), its BVH built on one thread:
    Embree's multi-threaded build can order triangles differently from run to run, and a ray
    through a shared edge then reports either triangle, so renders (and everything fused from
    them: an interrupted and resumed run's mesh) would differ in the last bits on machines with
    many cores. Casts stay threaded. Every ray cast of the project builds its scene here."""
    scene = o3d.t.geometry.RaycastingScene(nthreads=1)
    scene.add_triangles(o3d.core.Tensor(np.ascontiguousarray(vertices, dtype=np.float32)),
                        o3d.core.Tensor(np.ascontiguousarray(faces, dtype=np.uint32)))
    return scene


def cast_rays(scene: o3d.t.geometry.RaycastingScene, directions: np.ndarray):
    """Rays from the camera centre along (..., 3) directions -> hit distance in units of the
    direction (inf = miss), triangle id (-1 = miss), barycentrics (..., 2) and the geometric
    triangle normal (..., 3). A hit is (1-u-v) v0 + u v1 + v v2 (Embree's convention)."""
    rays = np.concatenate((np.zeros_like(directions), directions), axis=-1).astype(np.float32)
    hit = scene.cast_rays(o3d.core.Tensor(np.ascontiguousarray(rays)), nthreads=RAY_THREADS)
    t = hit["t_hit"].numpy().astype(np.float64)
    ids = hit["primitive_ids"].numpy()
    triangle = np.where(np.isfinite(t), ids.astype(np.int64), -1)
    return t, triangle, hit["primitive_uvs"].numpy().astype(np.float64), \
        hit["primitive_normals"].numpy().astype(np.float64)


def corner_weights(faces: np.ndarray, triangle: np.ndarray, bary: np.ndarray):
    """Hit triangles and barycentrics -> (N, 3) vertex ids and (N, 3) weights."""
    u, v = bary[:, 0], bary[:, 1]
    return faces[triangle].astype(np.int64), np.stack((1 - u - v, u, v), axis=1)
