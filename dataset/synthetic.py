"""Synthetic training and test data in the DeepDeform format (DESIGN.md 5.8).

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
"""
import concurrent.futures
import glob
import json
import multiprocessing
import os
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import open3d as o3d
import torch
from tqdm import tqdm

from dataset import io
from options import ArgumentParser, GraphOptions, SyntheticOptions, add_options, from_args, to_dict
from model import image_proc
from dataset.graph import GraphError, build_graph

SHAPES = ("cloth", "bump", "cylinder", "blob")
MOTIONS = ("bend", "twist", "rbf", "bulge", "large")
SOURCE_ID, TARGET_ID = "000000", "000001"
PAIR_RECORD = "pair.json"
# Stored in each pair's record and compared on resume: raise it whenever a change of this module
# changes what a pair looks like, so that old pairs are remade rather than mixed with new ones.
GENERATOR_VERSION = 1
MAX_ATTEMPTS = 30
# A visible deformed point is hit by its own camera ray at its own depth, up to float32 error
# (~1e-6 m); 1 mm also accepts a surface grazing itself, which is still the same surface.
VISIBILITY_TOLERANCE = 1e-3
# Real frames are meshed like the graph builder meshes them (DESIGN.md 5.1).
REAL_MESH_MAX_EDGE = 0.05
# Settings that do not change a pair's content, left out of the record compared on resume.
_JOB_FIELDS = ("out", "split", "pairs", "workers")


class SceneError(ValueError):
    """This draw cannot give a usable pair; the next attempt is drawn instead."""


# ---------------------------------------------------------------------------------------------
# Geometry helpers


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


def _dot(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(N, 3) . (3,) -> (N,). Products with a 3-vector or 3x3 matrix are written out: numpy
    hands `(N, 3) @ (3, 3)` to a multi-threaded BLAS, which next to torch's spinning OpenMP
    threads can be 100 times slower on a machine with few cores."""
    return x[:, 0] * v[0] + x[:, 1] * v[1] + x[:, 2] * v[2]


def _rotate(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    """(N, 3) points times the 3x3 matrix r: rows r x_n."""
    return np.stack((_dot(x, r[0]), _dot(x, r[1]), _dot(x, r[2])), axis=1)


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / max(np.linalg.norm(v), 1e-12)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
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


def _weld(keys: np.ndarray) -> np.ndarray:
    """(V, k) integer keys -> (V,) int64 id of the first vertex with the same key."""
    shifted = keys - keys.min(axis=0)
    flat = np.ravel_multi_index(tuple(shifted.T), tuple(shifted.max(axis=0) + 1))
    _, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)].astype(np.int64)


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Samples an (h, w, 3) float32 image at float pixel coordinates (N,), clamped to the
    border -> (N, 3) float32. (cv2.remap quantises positions to 1/32 pixel: plenty for colour.)
    The points are laid out as rows of 1024, since remap maps must stay below 32767 a side."""
    count = x.shape[0]
    cols = 1024
    rows = max(1, -(-count // cols))
    maps = np.zeros((2, rows * cols), np.float32)
    maps[0, :count], maps[1, :count] = x, y
    out = cv2.remap(image, maps[0].reshape(rows, cols), maps[1].reshape(rows, cols),
                    cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(-1, image.shape[2])[:count]


def _interpolate(values: np.ndarray, corners: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_k weights[n, k] * values[corners[n, k]]: (V, C), (N, 3), (N, 3) -> (N, C)."""
    return np.einsum("nk,nkc->nc", weights, values[corners])


def rigid_fit_residual(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N,) distances left after the best rigid fit (Kabsch) of (N, 3) source onto target."""
    cs, ct = source.mean(axis=0), target.mean(axis=0)
    u, _, vt = np.linalg.svd(np.einsum("ni,nj->ij", source - cs, target - ct))
    d = np.sign(np.linalg.det(vt.T @ u.T))
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return np.linalg.norm(_rotate(source - cs, r) + ct - target, axis=1)


# ---------------------------------------------------------------------------------------------
# Ray casting


# Threads per ray cast (0 = all cores); worker processes share the cores out.
_RAY_THREADS = 0


def _scene(vertices: np.ndarray, faces: np.ndarray) -> o3d.t.geometry.RaycastingScene:
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(np.ascontiguousarray(vertices, dtype=np.float32)),
                        o3d.core.Tensor(np.ascontiguousarray(faces, dtype=np.uint32)))
    return scene


def _cast(scene: o3d.t.geometry.RaycastingScene, directions: np.ndarray):
    """Rays from the camera centre along (..., 3) directions -> hit distance in units of the
    direction (inf = miss), triangle id (-1 = miss), barycentrics (..., 2) and the geometric
    triangle normal (..., 3). A hit is (1-u-v) v0 + u v1 + v v2 (Embree's convention)."""
    rays = np.concatenate((np.zeros_like(directions), directions), axis=-1).astype(np.float32)
    hit = scene.cast_rays(o3d.core.Tensor(np.ascontiguousarray(rays)), nthreads=_RAY_THREADS)
    t = hit["t_hit"].numpy().astype(np.float64)
    ids = hit["primitive_ids"].numpy()
    triangle = np.where(np.isfinite(t), ids.astype(np.int64), -1)
    return t, triangle, hit["primitive_uvs"].numpy().astype(np.float64), \
        hit["primitive_normals"].numpy().astype(np.float64)


def _corner_weights(faces: np.ndarray, triangle: np.ndarray, bary: np.ndarray):
    """Hit triangles and barycentrics -> (N, 3) vertex ids and (N, 3) weights."""
    u, v = bary[:, 0], bary[:, 1]
    return faces[triangle].astype(np.int64), np.stack((1 - u - v, u, v), axis=1)


# ---------------------------------------------------------------------------------------------
# Textures


def procedural_texture(rng: np.random.Generator, height: int, width: int, scale: float = 1.0,
                       saturation: float = 1.0, density: float = 1.0) -> np.ndarray:
    """(height, width, 3) float32 RGB in [0, 255], like a printed fabric: a palette of 4 colours,
    multi-octave noise (mostly in brightness), patches of stripes, many ellipses of the palette
    and fine grain, so that optical flow is trackable everywhere. `scale` multiplies feature
    sizes (texels), `saturation` the colourfulness, `density` the number of ellipses."""
    grey = rng.uniform(60, 200)
    palette = grey + saturation * rng.uniform(-90, 90, (4, 3)) + rng.uniform(-60, 60, (4, 1))
    palette = np.clip(palette, 0, 255)
    image = np.broadcast_to(palette[0], (height, width, 3)).astype(np.float32).copy()
    for cells, amplitude in ((3, 40), (9, 28), (25, 18), (70, 10)):
        gh = max(2, int(round(cells * height / max(height, width) / scale)))
        gw = max(2, int(round(cells * width / max(height, width) / scale)))
        grid = rng.standard_normal((gh, gw, 1)) * amplitude + \
            rng.standard_normal((gh, gw, 3)) * amplitude * 0.3 * saturation
        image += cv2.resize(grid.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    image = np.clip(image, 0, 255).astype(np.uint8)

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for _ in range(rng.integers(1, 4)):
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(6, 30) * scale
        phase = np.cos(angle) * x + np.sin(angle) * y
        stripes = np.sin(2 * np.pi * phase / period + rng.uniform(0, 2 * np.pi)) > rng.uniform(-0.5, 0.5)
        x0, x1 = np.sort(rng.uniform(0, width, 2))
        y0, y1 = np.sort(rng.uniform(0, height, 2))
        region = (x >= x0) & (x <= max(x1, x0 + width / 4)) & (y >= y0) & (y <= max(y1, y0 + height / 4))
        image[stripes & region] = palette[rng.integers(1, 4)].astype(np.uint8)

    count = int(density * rng.uniform(0.5, 1.5) * height * width / (45 * scale) ** 2) + 8
    for _ in range(count):
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (max(1, int(rng.uniform(1.5, 18) * scale)), max(1, int(rng.uniform(1.5, 18) * scale)))
        colour = np.clip(palette[rng.integers(0, 4)] + rng.uniform(-50, 50), 0, 255)
        thickness = -1 if rng.uniform() < 0.7 else max(1, int(rng.uniform(1, 3) * scale))
        cv2.ellipse(image, center, axes, float(rng.uniform(0, 180)), 0, 360,
                    tuple(float(c) for c in colour), thickness, cv2.LINE_AA)
    grain = rng.standard_normal((height, width, 1)).astype(np.float32) * 8
    return np.clip(image.astype(np.float32) + grain, 0, 255)


# ---------------------------------------------------------------------------------------------
# Meshes


@dataclass
class Mesh:
    """A textured triangle mesh in camera coordinates (metres)."""
    vertices: np.ndarray    # (V, 3) float64
    faces: np.ndarray       # (F, 3) int64
    texcoords: np.ndarray   # (V, 2) float64 texel coordinates (x, y) into `texture`
    texture: np.ndarray     # (h, w, 3) float32 RGB in [0, 255] (albedo, or a real image)
    # Procedural: the texture is an albedo to shade and the geometry is smooth. A real frame's
    # mesh carries its measured colour and its sensor noise, so it is neither shaded nor given
    # grazing-angle dropout (its noisy normals would punch speckles; the source frame already
    # has the holes the sensor made).
    procedural: bool
    # (V,) int64: for vertices duplicated along texture seams, the one vertex whose position
    # they all take (so that the surface stays closed whatever the floating-point rounding).
    weld: Optional[np.ndarray] = None


def _grid_faces(rows: int, cols: int, keep: Optional[np.ndarray] = None) -> np.ndarray:
    """Two triangles per cell of a rows x cols vertex grid (row-major ids); `keep` (rows-1,
    cols-1) bool selects cells."""
    i, j = np.meshgrid(np.arange(rows - 1), np.arange(cols - 1), indexing="ij")
    a = i * cols + j
    b, c = a + 1, a + cols
    d = c + 1
    faces = np.stack((np.stack((a, c, b), -1), np.stack((b, c, d), -1)), axis=2)
    if keep is not None:
        faces = faces[keep]
    return faces.reshape(-1, 3).astype(np.int64)


def _compact(faces: np.ndarray, count: int):
    """Ids of the vertices that faces use, and the faces renumbered to them."""
    used = np.flatnonzero(np.bincount(faces.reshape(-1), minlength=count))
    new_id = np.full(count, -1, dtype=np.int64)
    new_id[used] = np.arange(used.size)
    return used, new_id[faces]


def _waves(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, size: float, count: int,
           amplitude: Tuple[float, float]) -> np.ndarray:
    """Sum of `count` plane waves of random direction, wavelength 0.15-0.5 x size."""
    z = np.zeros_like(x)
    for _ in range(count):
        angle = rng.uniform(0, 2 * np.pi)
        k = 2 * np.pi / (rng.uniform(0.15, 0.5) * size)
        z += rng.uniform(*amplitude) * size * np.sin(
            k * (np.cos(angle) * x + np.sin(angle) * y) + rng.uniform(0, 2 * np.pi))
    return z


def _outline(rng: np.random.Generator, rows: int, cols: int, min_power: float) -> np.ndarray:
    """(rows-1, cols-1) bool cells inside a random superellipse with a wavy rim."""
    t, s = np.meshgrid((np.arange(rows - 1) + 0.5) / (rows - 1) * 2 - 1,
                       (np.arange(cols - 1) + 0.5) / (cols - 1) * 2 - 1, indexing="ij")
    power = rng.uniform(min_power, 8.0)
    radius = (np.abs(s) ** power + np.abs(t) ** power) ** (1.0 / power)
    phi = np.arctan2(t, s)
    rim = 1.0 + sum(rng.uniform(-0.05, 0.05) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
                    for k in range(2, 6))
    return radius <= rim


def procedural_mesh(rng: np.random.Generator, shape: str, options: SyntheticOptions,
                    intrinsics: Dict[str, float]) -> Mesh:
    """A textured surface of the family `shape`, placed at options.min/max_distance in front
    of the camera, spanning 30-60 % of the image width. Its grid cells are ~3 px on screen:
    the motions are smooth on that scale, and colour comes from the texture per pixel."""
    fx = intrinsics["fx"]
    distance = rng.uniform(options.min_distance, options.max_distance)
    size = rng.uniform(0.3, 0.6) * options.width * distance / fx   # metres
    pixels = size * fx / distance                                  # on-screen size
    feature_scale = max(options.width / 640.0, 0.25)
    n = int(np.clip(round(pixels / 3), 16, 256))

    if shape in ("cloth", "bump", "cylinder"):
        width_m = size * (rng.uniform(1.1, 1.6) if shape == "cylinder" else 1.0)
        height_m = size * rng.uniform(0.75, 1.3)
        cols, rows = n, max(8, int(round(n * height_m / width_m)))
        t, s = np.meshgrid(np.linspace(0, 1, rows), np.linspace(0, 1, cols), indexing="ij")
        x, y = (s - 0.5) * width_m, (t - 0.5) * height_m
        if shape == "cloth":
            z = _waves(rng, x, y, size, int(rng.integers(3, 7)), (0.01, 0.04))
            keep = _outline(rng, rows, cols, 2.0)
        elif shape == "bump":
            z = _waves(rng, x, y, size, int(rng.integers(1, 4)), (0.003, 0.012))
            for _ in range(rng.integers(1, 4)):
                cx, cy = rng.uniform(-0.3, 0.3, 2) * size
                r = rng.uniform(0.1, 0.25) * size
                z -= rng.uniform(0.08, 0.25) * size * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
            keep = _outline(rng, rows, cols, 3.0)
        else:
            arc = np.deg2rad(rng.uniform(100, 220))
            radius = width_m / arc
            phi = (s - 0.5) * arc
            z = rng.choice([-1.0, 1.0]) * radius * (1 - np.cos(phi))
            x = radius * np.sin(phi)
            z = z + _waves(rng, x, y, size, 2, (0.003, 0.01))
            keep = _outline(rng, rows, cols, 6.0)
        positions = np.stack((x, y, z - z.mean()), axis=-1).reshape(-1, 3)
        tilt = rotation([1, 0, 0], np.deg2rad(rng.uniform(-25, 25))) @ \
            rotation([0, 1, 0], np.deg2rad(rng.uniform(-25, 25)))
        orientation = tilt @ rotation([0, 0, 1], rng.uniform(0, 2 * np.pi))
        tex_h, tex_w = (int(np.clip(pixels * height_m / size * 1.2, 32, 2048)),
                        int(np.clip(pixels * width_m / size * 1.2, 32, 2048)))
        texcoords = np.stack((s.reshape(-1) * (tex_w - 1), t.reshape(-1) * (tex_h - 1)), axis=1)
        faces = _grid_faces(rows, cols, keep)
        keys = None
    elif shape == "blob":
        # A cube's six faces pushed onto a lumpy ellipsoid: unlike a latitude-longitude sphere
        # it has no poles where the texture pinches. Each face has its own tile of the texture
        # (2 x 3 tiles); edge vertices are duplicated with identical positions and welded for
        # normals, so the surface stays closed under every motion.
        cells = int(np.clip(round(np.pi * pixels / 4 / 3), 6, 128))
        tile = int(np.clip(np.pi * pixels / 4 * 1.2, 16, 1024))
        grid = np.tan(np.linspace(-1, 1, cells + 1) * np.pi / 4)
        v, u = np.meshgrid(grid, grid, indexing="ij")
        tv, tu = np.meshgrid(np.linspace(0, tile - 1, cells + 1), np.linspace(0, tile - 1, cells + 1),
                             indexing="ij")
        eye = np.eye(3)
        cube = [(eye[0], eye[1], eye[2]), (-eye[0], eye[2], eye[1]), (eye[1], eye[2], eye[0]),
                (-eye[1], eye[0], eye[2]), (eye[2], eye[0], eye[1]), (-eye[2], eye[1], eye[0])]
        lattice = np.arange(-cells, cells + 1, 2)
        lv, lu = np.meshgrid(lattice, lattice, indexing="ij")
        positions, texcoords, faces, keys = [], [], [], []
        for index, (normal, axis_u, axis_v) in enumerate(cube):
            positions.append((normal + u[..., None] * axis_u + v[..., None] * axis_v).reshape(-1, 3))
            keys.append((normal.astype(np.int64) * cells + lu[..., None] * axis_u.astype(np.int64)
                         + lv[..., None] * axis_v.astype(np.int64)).reshape(-1, 3))
            texcoords.append(np.stack((tu + (index % 3) * tile, tv + (index // 3) * tile), -1).reshape(-1, 2))
            faces.append(_grid_faces(cells + 1, cells + 1) + index * (cells + 1) ** 2)
        directions = np.concatenate(positions)
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        radius = np.ones(directions.shape[0])
        for _ in range(rng.integers(3, 8)):
            c = _random_unit(rng)
            radius += rng.uniform(-0.2, 0.3) * np.exp((_dot(directions, c) - 1) / rng.uniform(0.05, 0.3))
        axes = np.array([1.0, rng.uniform(0.7, 1.3), rng.uniform(0.7, 1.2)]) * size / 2
        positions = directions * radius[:, None] * axes
        orientation = _random_rotation(rng)
        texcoords, faces, keys = np.concatenate(texcoords), np.concatenate(faces), np.concatenate(keys)
        tex_h, tex_w = 2 * tile, 3 * tile
    else:
        raise ValueError(f"unknown shape family {shape!r}; choose from {SHAPES}")

    center = np.array([rng.uniform(-0.12, 0.12) * options.width / fx * distance,
                       rng.uniform(-0.12, 0.12) * options.height / fx * distance, distance])
    used, faces = _compact(faces, positions.shape[0])
    vertices = _rotate(positions[used], orientation) + center
    weld = _weld(keys[used]) if keys is not None else None
    if weld is not None:
        vertices = vertices[weld]
    texture = procedural_texture(rng, tex_h, tex_w, feature_scale)
    return Mesh(vertices, faces, texcoords[used], texture, procedural=True, weld=weld)


# ---------------------------------------------------------------------------------------------
# Background


@dataclass
class Background:
    """The static part of the scene as seen by the camera."""
    depth: np.ndarray     # (H, W) float64 metres, inf where nothing is seen
    color: np.ndarray     # (H, W, 3) float32 RGB
    cosine: np.ndarray    # (H, W) |cos| of the angle between view ray and surface normal
    measured: np.ndarray  # (H, W) bool: real measurements, kept as they are (no new noise)


def procedural_background(rng: np.random.Generator, intrinsics: Dict[str, float], width: int,
                          height: int, extent: Tuple[np.ndarray, np.ndarray],
                          margin: float) -> Background:
    """A textured back wall behind the object, with (by chance) a floor below it and a side
    wall beside it; all keep `margin` metres from the object's bounding box `extent` (min, max
    corners) so that moving objects stay in front of them."""
    low, high = extent
    rays = pixel_rays(width, height, intrinsics)
    wall_z = high[2] + margin + rng.uniform(0.2, 1.5)
    x_range = np.array([rays[..., 0].min(), rays[..., 0].max()]) * wall_z * 1.1
    y_range = np.array([rays[..., 1].min(), rays[..., 1].max()]) * wall_z * 1.1
    quads = [((x_range[0], y_range[0], wall_z), (x_range[1], y_range[0], wall_z),
              (x_range[0], y_range[1], wall_z), (x_range[1], y_range[1], wall_z), 1.0)]
    if rng.uniform() < 0.6:
        floor_y = high[1] + margin + rng.uniform(0.05, 0.6)
        quads.append(((x_range[0], floor_y, 0.05), (x_range[1], floor_y, 0.05),
                      (x_range[0], floor_y, wall_z), (x_range[1], floor_y, wall_z), 0.8))
        y_range[1] = min(y_range[1], floor_y)
    if rng.uniform() < 0.4:
        side = rng.choice([-1.0, 1.0])
        side_x = (high[0] if side > 0 else -low[0]) + margin + rng.uniform(0.1, 1.0)
        side_x *= side
        quads.append(((side_x, y_range[0], 0.05), (side_x, y_range[0], wall_z),
                      (side_x, y_range[1], 0.05), (side_x, y_range[1], wall_z), 0.9))

    vertices, faces, texcoords = [], [], []
    for index, (p00, p10, p01, p11, _) in enumerate(quads):
        vertices += [p00, p10, p01, p11]
        base = 4 * index
        faces += [(base, base + 2, base + 1), (base + 1, base + 2, base + 3)]
        texcoords += [(0, 0), (1, 0), (0, 1), (1, 1)]
    vertices, faces, texcoords = np.array(vertices), np.array(faces), np.array(texcoords, float)
    t, triangle, bary, normal = _cast(_scene(vertices, faces), rays)
    hit = triangle >= 0
    corners, weights = _corner_weights(faces, triangle[hit], bary[hit])
    uv = _interpolate(texcoords, corners, weights)
    plane = triangle[hit] // 2
    color = np.zeros((height, width, 3), np.float32)
    values = np.zeros((uv.shape[0], 3))
    # Walls are plainer than the object (less colour, fewer spots, half the texel density),
    # but textured enough to be tracked as static.
    tex_h, tex_w = max(height // 2, 16), max(width // 2, 16)
    scale = max(width / 1280.0, 0.25)
    for index, (*_, brightness) in enumerate(quads):
        texture = procedural_texture(rng, tex_h, tex_w, scale, saturation=0.3, density=0.3)
        sel = plane == index
        values[sel] = brightness * _bilinear(texture, uv[sel, 0] * (tex_w - 1), uv[sel, 1] * (tex_h - 1))
    color[hit] = values
    cosine = np.abs(np.sum(normal * rays, axis=-1)) / np.linalg.norm(rays, axis=-1)
    return Background(np.where(hit, t, np.inf), color, np.where(hit, cosine, 1.0),
                      np.zeros((height, width), bool))


# ---------------------------------------------------------------------------------------------
# Real frames


@dataclass
class RealFrame:
    """One real RGB-D frame (resized to the requested size) and its object."""
    name: str
    color: np.ndarray       # (H, W, 3) uint8 RGB
    depth: np.ndarray       # (H, W) float32 metres, 0 = invalid
    mask: np.ndarray        # (H, W) bool object
    object_id: str
    intrinsics: Dict[str, float]


def _resize_nearest(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-pixel resize that keeps pixel centres aligned (cv2's nearest shifts them)."""
    h, w = image.shape[:2]
    ys = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return image[ys][:, xs]


def foreground_by_depth(depth: np.ndarray, threshold: Optional[float] = None) -> np.ndarray:
    """(H, W) bool: the largest connected region nearer than `threshold` metres (default: Otsu's
    threshold on the histogram of valid depths, in 1 cm bins), after a morphological opening."""
    valid = depth > 0
    if not valid.any():
        return valid
    if threshold is None:
        counts, edges = np.histogram(depth[valid], bins=np.arange(0, depth[valid].max() + 0.02, 0.01))
        centres = (edges[:-1] + edges[1:]) / 2
        w0 = np.cumsum(counts)
        w1 = w0[-1] - w0
        m0 = np.cumsum(counts * centres) / np.maximum(w0, 1)
        m1 = ((counts * centres).sum() - np.cumsum(counts * centres)) / np.maximum(w1, 1)
        threshold = float(edges[1:][np.argmax(w0 * w1 * (m0 - m1) ** 2)])
    near = (valid & (depth < threshold)).astype(np.uint8)
    k = max(3, int(round(depth.shape[1] / 160)) | 1)
    near = cv2.morphologyEx(near, cv2.MORPH_OPEN, np.ones((k, k), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(near, connectivity=4)
    if count <= 1:
        return np.zeros_like(valid)
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def load_real_frames(folder: str, width: int, height: int,
                     depth_threshold: Optional[float] = None) -> List[RealFrame]:
    """Reads every frame of a folder laid out like a DeepDeform sequence:

        FOLDER/color/NAME.jpg (or .png)   colour
        FOLDER/depth/NAME.png             uint16 millimetres, 0 = invalid
        FOLDER/intrinsics.txt             4x4 (or 3x3) matrix
        FOLDER/mask/NAME_OBJECT.png       optional object mask (non-zero = object); without one,
                                          the object is the foreground by a depth threshold

    Frames are resized to width x height (intrinsics scaled to match) when their size differs.
    """
    colors = sorted(glob.glob(os.path.join(folder, "color", "*.jpg"))
                    + glob.glob(os.path.join(folder, "color", "*.png")))
    if not colors:
        raise FileNotFoundError(f"{folder}: no color/*.jpg or color/*.png frames")
    base_intrinsics = io.read_intrinsics(os.path.join(folder, "intrinsics.txt"))
    frames = []
    for color_path in colors:
        name = os.path.splitext(os.path.basename(color_path))[0]
        color = io.read_color(color_path)
        depth = io.read_depth(os.path.join(folder, "depth", name + ".png"))
        if depth.shape != color.shape[:2]:
            raise io.FormatError(f"{folder}: frame {name} has colour {color.shape[:2]} but depth "
                                 f"{depth.shape}")
        masks = sorted(glob.glob(os.path.join(folder, "mask", name + "_*.png"))
                       + glob.glob(os.path.join(folder, "mask", name + ".png")))
        if masks:
            mask = io.read_mask(masks[0])
            stem = os.path.splitext(os.path.basename(masks[0]))[0]
            object_id = stem[len(name) + 1:] or "object"
        else:
            mask, object_id = None, "foreground"
        h, w = depth.shape
        intrinsics = dict(base_intrinsics)
        if (w, h) != (width, height):
            sx, sy = width / w, height / h
            intrinsics = {"fx": intrinsics["fx"] * sx, "fy": intrinsics["fy"] * sy,
                          "cx": (intrinsics["cx"] + 0.5) * sx - 0.5,
                          "cy": (intrinsics["cy"] + 0.5) * sy - 0.5}
            interpolation = cv2.INTER_AREA if sx < 1 else cv2.INTER_LINEAR
            color = cv2.resize(color, (width, height), interpolation=interpolation)
            depth = _resize_nearest(depth, width, height)
            mask = _resize_nearest(mask, width, height) if mask is not None else None
        if mask is None:
            mask = foreground_by_depth(depth, depth_threshold)
        frames.append(RealFrame(name, color, depth, mask, object_id, intrinsics))
    return frames


def _object_surface(frame: RealFrame) -> np.ndarray:
    """(H, W) float32 metres: the real object's surface to mesh, 0 elsewhere. Holes inside the
    mask are inpainted; the depth is denoised with a bilateral filter (3 cm range sigma, so
    depth edges stay), since sensor noise would otherwise crumple the surface under rotation
    and make it hide itself in speckles; pieces of the mask cut off from the object by depth
    jumps of more than 5 cm (mixed pixels at the wall, slivers) smaller than a tenth of the
    largest piece are dropped."""
    height, width = frame.depth.shape
    mm = np.round(frame.depth * 1000).astype(np.uint16)
    holes = frame.mask & (mm == 0)
    filled = cv2.inpaint(mm, holes.astype(np.uint8), 3, cv2.INPAINT_TELEA) if holes.any() else mm
    depth = np.where(frame.mask, filled / 1000.0, 0).astype(np.float32)
    diameter = max(3, int(round(5 * width / 640)) | 1)
    smooth = cv2.bilateralFilter(depth, diameter, 0.03, diameter / 2)
    smooth = np.where(depth > 0, smooth, 0).astype(np.float32)

    jump = np.zeros((height, width), bool)
    for axis in (0, 1):
        a, b = np.delete(smooth, -1, axis=axis), np.delete(smooth, 0, axis=axis)
        cut = (a > 0) & (b > 0) & (np.abs(a - b) > REAL_MESH_MAX_EDGE)
        low, high = [(0, 0), (0, 0)], [(0, 0), (0, 0)]
        low[axis], high[axis] = (0, 1), (1, 0)
        jump |= np.pad(cut, low) | np.pad(cut, high)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        ((smooth > 0) & ~jump).astype(np.uint8), connectivity=4)
    if count <= 1:
        return np.zeros_like(smooth)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.concatenate(([False], areas >= 0.1 * areas.max()))
    return np.where(keep[labels], smooth, 0).astype(np.float32)


def real_scene(frame: RealFrame) -> Tuple[Mesh, Background, np.ndarray]:
    """The object of a real frame as a mesh (one vertex per pixel of `_object_surface`), the
    rest of the frame as the static background (colour and depth inpainted behind the object),
    and (H, W) int64 the vertex id of each pixel (-1 = none)."""
    height, width = frame.depth.shape
    mm = np.round(frame.depth * 1000).astype(np.uint16)
    mask_u8 = frame.mask.astype(np.uint8)
    points = image_proc.backproject_depth(torch.from_numpy(_object_surface(frame)), frame.intrinsics)
    vertices, vertex_pixels, faces = image_proc.mesh_from_depth(points, REAL_MESH_MAX_EDGE)
    vertices, vertex_pixels, faces = vertices.numpy().astype(np.float64), vertex_pixels.numpy(), \
        faces.numpy().astype(np.int64)
    pixel_vertex = np.full((height, width), -1, np.int64)
    pixel_vertex[vertex_pixels[:, 1], vertex_pixels[:, 0]] = np.arange(vertices.shape[0])
    mesh = Mesh(vertices, faces, vertex_pixels.astype(np.float64),
                frame.color.astype(np.float32), procedural=False)

    # The region behind the object (grown by a few pixels, so that its blurred rim does not
    # leak into the background) is inpainted; elsewhere the background is the measured frame.
    grow = max(1, int(round(3 * width / 640)))
    behind = cv2.dilate(mask_u8, np.ones((2 * grow + 1, 2 * grow + 1), np.uint8)) > 0
    color = cv2.inpaint(frame.color, behind.astype(np.uint8), 3, cv2.INPAINT_TELEA)
    depth_mm = cv2.inpaint(mm, (behind | (mm == 0)).astype(np.uint8), 3, cv2.INPAINT_TELEA)
    depth = np.where(behind, depth_mm / 1000.0, frame.depth).astype(np.float64)
    depth = np.where(depth > 0, depth, np.inf)
    background = Background(depth, color.astype(np.float32), np.ones((height, width)), ~behind)
    return mesh, background, pixel_vertex


# ---------------------------------------------------------------------------------------------
# Motion


def _in_plane_axes(rng: np.random.Generator):
    angle = rng.uniform(0, 2 * np.pi)
    return (np.array([np.cos(angle), np.sin(angle), 0.0]),
            np.array([-np.sin(angle), np.cos(angle), 0.0]), np.array([0.0, 0.0, 1.0]))


def _bend(rng, x, normals, size, scale):
    """Bends the object about an in-plane axis, towards or away from the camera: the coordinate
    a along e1 is wrapped onto a circle of radius R (total angle 40-110 degrees); as a fold,
    only the side a > a0 bends."""
    e1, e2, e3 = _in_plane_axes(rng)
    a = _dot(x, e1)
    a0 = rng.uniform(-0.2, 0.2) * size
    angle = scale * np.deg2rad(rng.uniform(40, 110)) * rng.choice([-1.0, 1.0])
    radius = (np.ptp(a) if np.ptp(a) > 0 else size) / angle
    along = a - a0
    if rng.uniform() < 0.4:
        along = np.maximum(along, 0.0)
        radius = radius / 2
    h = _dot(x, e3)
    theta = along / radius
    new_along = (radius - h) * np.sin(theta)
    new_h = radius - (radius - h) * np.cos(theta)
    return x + (new_along - along)[:, None] * e1 + (new_h - h)[:, None] * e3


def _twist(rng, x, normals, size, scale):
    """Rotates about an in-plane axis through the centroid by an angle growing linearly along
    it (30-90 degrees end to end)."""
    e1, _, _ = _in_plane_axes(rng)
    a = _dot(x, e1)
    total = scale * np.deg2rad(rng.uniform(30, 90)) * rng.choice([-1.0, 1.0])
    angle = total * (a - a.mean()) / max(np.ptp(a), 1e-9)
    c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
    return x * c + np.cross(e1, x) * s + np.outer(a, e1) * (1 - c)


def _rbf_blend(rng, x, normals, size, scale):
    """Blends the rigid motions (rotation up to 25 degrees, translation 3-15 % of the object
    size) of 3-6 control points on the surface with normalised Gaussian weights."""
    count = int(rng.integers(3, 7))
    centres = x[rng.choice(x.shape[0], count, replace=False)]
    sigma = rng.uniform(0.2, 0.35) * size
    logits = -((x[:, None, :] - centres[None]) ** 2).sum(-1) / (2 * sigma * sigma)
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    out = np.zeros_like(x)
    for k in range(count):
        r = rotation(_random_unit(rng), scale * np.deg2rad(rng.uniform(5, 25)))
        t = _random_unit(rng) * scale * rng.uniform(0.03, 0.15) * size
        out += weights[:, k:k + 1] * (_rotate(x - centres[k], r) + centres[k] + t)
    return out


def _bulge(rng, x, normals, size, scale):
    """Pushes the surface out or in under 2-5 Gaussian bumps (5-15 % of the object size high),
    each along the mean normal of the surface beneath it: a smooth field even where the
    normals of a real, noisy depth mesh are not."""
    offset = np.zeros_like(x)
    for _ in range(rng.integers(2, 6)):
        centre = x[rng.integers(x.shape[0])]
        radius = rng.uniform(0.15, 0.3) * size
        height = scale * rng.uniform(0.05, 0.15) * size * rng.choice([-1.0, 1.0])
        bump = np.exp(-((x - centre) ** 2).sum(-1) / (2 * radius * radius))
        direction = (bump[:, None] * normals).sum(axis=0)
        offset += height * np.outer(bump, direction / max(np.linalg.norm(direction), 1e-12))
    return x + offset


_NON_RIGID: Dict[str, Callable] = {"bend": _bend, "twist": _twist, "rbf": _rbf_blend, "bulge": _bulge}


def _rigid(rng, max_angle_deg: float, max_shift: float):
    r = rotation(_random_unit(rng), np.deg2rad(rng.uniform(0, max_angle_deg)))
    return r, _random_unit(rng) * rng.uniform(0, max_shift)


def deform(rng: np.random.Generator, family: str, mesh: Mesh, options: SyntheticOptions) -> np.ndarray:
    """(V, 3) rest vertices -> (V, 3) deformed vertices: the non-rigid motion of `family` about
    the centroid, then a global rigid motion (up to 8 degrees and 6 cm, times the motion
    scale). The `large` family's lateral shift is added later by `_calibrate_large`."""
    centroid = mesh.vertices.mean(axis=0)
    x = mesh.vertices - centroid
    size = float(np.linalg.norm(np.ptp(x, axis=0))) / np.sqrt(2)
    normals = vertex_normals(mesh.vertices, mesh.faces, mesh.weld)
    scale = options.motion_scale
    if family == "large":
        x = _rbf_blend(rng, x, normals, size, 0.6 * scale)
    elif family in _NON_RIGID:
        x = _NON_RIGID[family](rng, x, normals, size, scale)
    else:
        raise ValueError(f"unknown motion family {family!r}; choose from {MOTIONS}")
    r, t = _rigid(rng, 8.0 * scale, 0.06 * scale)
    deformed = _rotate(x, r) + centroid + t
    return deformed[mesh.weld] if mesh.weld is not None else deformed


def _calibrate_large(rng, rest_points, moved_points, pixels, intrinsics, width, height,
                     target_px) -> np.ndarray:
    """The lateral (image-plane) shift that makes the mean image motion of the source points
    that stay in the image equal `target_px` pixels (bisection; the mean is convex in the
    shift length, so the crossing above the start is unique)."""
    angle = rng.uniform(0, 2 * np.pi)
    direction = np.array([np.cos(angle), np.sin(angle), 0.0])
    # An evenly strided subset of 20k points gives the mean to well below a pixel.
    stride = max(1, len(pixels) // 20000)
    rest_points, moved_points, pixels = rest_points[::stride], moved_points[::stride], pixels[::stride]

    def mean_flow(length):
        uv = project(moved_points + length * direction, intrinsics)
        inside = (uv[:, 0] >= 0) & (uv[:, 0] <= width - 1) & (uv[:, 1] >= 0) & (uv[:, 1] <= height - 1)
        if inside.sum() < 0.3 * len(uv):
            return np.inf
        return float(np.linalg.norm(uv[inside] - pixels[inside], axis=1).mean())

    if mean_flow(0.0) >= target_px:
        raise SceneError("the non-rigid part alone moves more than the large-motion target")
    low, high = 0.0, 3.0 * target_px * float(rest_points[:, 2].mean()) / intrinsics["fx"]
    if mean_flow(high) < target_px:
        raise SceneError("the large-motion target is out of reach")
    for _ in range(30):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if mean_flow(middle) < target_px else (low, middle)
    return 0.5 * (low + high) * direction


# ---------------------------------------------------------------------------------------------
# Rendering and sensor model


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
        t[window], triangle[window], bary[window], normal[window] = _cast(scene, rays[window])
    is_object = (triangle >= 0) & (t < background.depth)
    corners, weights = _corner_weights(mesh.faces, triangle[is_object], bary[is_object])
    uv = _interpolate(mesh.texcoords, corners, weights)
    albedo = _bilinear(mesh.texture, uv[:, 0], uv[:, 1])
    if mesh.procedural:
        n = _interpolate(vertex_normals(vertices, mesh.faces, mesh.weld), corners, weights)
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
        albedo = albedo * (ambient + (1 - ambient) * np.abs(_dot(n, light)))[:, None]
    color = background.color.copy()
    color[is_object] = albedo
    cosine = np.abs(np.sum(normal * rays, axis=-1)) / np.linalg.norm(rays, axis=-1)
    if not mesh.procedural:
        cosine[:] = 1.0
    return Frame(np.where(is_object, t, background.depth), color,
                 np.where(is_object, cosine, background.cosine), is_object,
                 background.measured & ~is_object, np.where(is_object, triangle, -1), bary)


def noise_sigma(z: np.ndarray) -> np.ndarray:
    """Axial depth noise (metres) of a Kinect-like sensor at depth z (metres)."""
    return 0.0012 + 0.0019 * (z - 0.4) ** 2


def sensor_depth(rng: np.random.Generator, frame: Frame, options: SyntheticOptions) -> np.ndarray:
    """Rendered depth -> what a depth camera reports, (H, W) float32 metres in whole
    millimetres, 0 = missing. Real measured pixels are kept as they are."""
    height, width = frame.depth.shape
    depth = frame.depth
    valid = np.isfinite(depth) & (depth > 0)
    synthetic = valid & ~frame.measured
    noisy = depth + options.depth_noise * noise_sigma(np.where(valid, depth, 0)) * \
        rng.standard_normal(depth.shape)
    out = np.where(synthetic, noisy, np.where(valid, depth, 0.0))

    drop = synthetic & (frame.cosine < np.cos(np.deg2rad(options.grazing_angle)))
    # Depth discontinuities: sensors lose depth on both sides of a jump, raggedly.
    d = np.where(valid, depth, 0.0)
    jump = np.zeros_like(valid)
    for axis in (0, 1):
        diff = np.abs(np.diff(d, axis=axis)) > np.maximum(0.05, 0.03 * np.maximum(
            np.delete(d, -1, axis=axis), np.delete(d, 0, axis=axis)))
        pad_low = [(0, 0), (0, 0)]
        pad_low[axis] = (1, 0)
        pad_high = [(0, 0), (0, 0)]
        pad_high[axis] = (0, 1)
        jump |= np.pad(diff, pad_low) | np.pad(diff, pad_high)
    edge = rng.uniform(size=depth.shape) < 0.6 * min(options.holes, 1.0 / 0.6)
    drop |= synthetic & jump & edge
    # Random blobs of missing depth, most of them on the object.
    blobs = np.zeros((height, width), np.uint8)
    scale = width / 640.0
    object_pixels = np.flatnonzero(frame.is_object)
    for _ in range(rng.poisson(5 * options.holes)):
        if object_pixels.size and rng.uniform() < 0.7:
            y, x = divmod(int(object_pixels[rng.integers(object_pixels.size)]), width)
        else:
            x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        axes = (max(1, int(rng.uniform(1.5, 10) * scale)), max(1, int(rng.uniform(1.5, 10) * scale)))
        cv2.ellipse(blobs, (x, y), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    drop |= synthetic & (blobs > 0)

    out = np.where(drop, 0.0, out)
    out = np.round(out * 1000.0) / 1000.0
    out[(out <= 0) | (out > 65.535)] = 0
    return out.astype(np.float32)


def sensor_color(rng: np.random.Generator, color: np.ndarray, change: float) -> np.ndarray:
    """(H, W, 3) float RGB -> uint8 with a global illumination change of strength `change`
    (gain per channel, brightness, offset and a linear ramp across the image; 0 = none) and
    camera noise."""
    height, width = color.shape[:2]
    out = color.astype(np.float32)
    if change > 0:
        gain = np.exp(rng.normal(0, 0.03 * change, 3) + rng.normal(0, 0.06 * change))
        ramp_x = rng.normal(0, 0.04 * change) * (np.arange(width) / width - 0.5)
        ramp_y = rng.normal(0, 0.04 * change) * (np.arange(height) / height - 0.5)
        ramp = (1 + ramp_x[None, :] + ramp_y[:, None]).astype(np.float32)
        out = out * gain.astype(np.float32) * ramp[..., None] + np.float32(rng.normal(0, 3 * change))
    out += 1.5 * rng.standard_normal(out.shape, dtype=np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# One pair


def make_pair(rng: np.random.Generator, options: SyntheticOptions, index: int = 0,
              real_frames: Optional[Sequence[RealFrame]] = None,
              graph_options: GraphOptions = GraphOptions()) -> Dict:
    """Draws one source/target pair with exact ground truth.

    The motion family is options' motions[index % count]; everything else comes from `rng`.
    Returns a dict: intrinsics {fx, fy, cx, cy}; object_id, shape, motion, real_frame (or None);
    source_color, target_color (H, W, 3) uint8 RGB before JPEG; source_depth, target_depth
    (H, W) float32 metres in whole mm (0 = missing), as stored; source_mask (H, W) bool;
    optical_flow (2, H, W) float32 pixels and scene_flow (3, H, W) float32 metres, -inf where
    invalid; scene_flow_all (3, H, W) float32, the scene flow of every source object pixel with
    depth, visible in the target or not (NaN elsewhere); graph (dataset.graph.DeformationGraph,
    node deformations from scene_flow_all); stats {mean_flow_px, mean_motion_m,
    valid_fraction}. Raises SceneError (or GraphError) when this draw gives no usable pair.
    """
    motions = _names(options.motions, MOTIONS, "motion")
    family = motions[index % len(motions)]
    width, height = options.width, options.height

    if real_frames:
        frame = real_frames[int(rng.integers(len(real_frames)))]
        intrinsics = frame.intrinsics
        if frame.depth.shape != (height, width):
            raise ValueError(f"real frame {frame.name} is {frame.depth.shape[1]}x{frame.depth.shape[0]}, "
                             f"options ask for {width}x{height}")
        mesh, background, pixel_vertex = real_scene(frame)
        shape, object_id = "real", frame.object_id
        light, ambient = np.array([0.0, 0.0, -1.0]), 1.0
        if mesh.faces.shape[0] == 0:
            raise SceneError(f"real frame {frame.name}: the object has no mesh")
    else:
        intrinsics = make_intrinsics(width, height, options.focal)
        shape = str(rng.choice(_names(options.shapes, SHAPES, "shape")))
        object_id = shape
        mesh = procedural_mesh(rng, shape, options, intrinsics)
        margin = 0.25 + 0.25 * options.motion_scale
        background = procedural_background(rng, intrinsics, width, height,
                                           (mesh.vertices.min(0), mesh.vertices.max(0)), margin)
        light = np.array([rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6), -1.0])
        light /= np.linalg.norm(light)
        ambient = rng.uniform(0.45, 0.7)
    rays = pixel_rays(width, height, intrinsics)

    # Source frame and, for each source object pixel, the mesh point it sees.
    if real_frames:
        source_mask = frame.mask.copy()
        source_depth = frame.depth.copy()
        source_color = frame.color.copy()
        has_point = source_mask & (source_depth > 0) & (pixel_vertex >= 0)
        vid = pixel_vertex[has_point]
        corners = np.repeat(vid[:, None], 3, axis=1)
        weights = np.tile([1.0, 0.0, 0.0], (vid.size, 1))
    else:
        source = render(mesh, mesh.vertices, _scene(mesh.vertices, mesh.faces), rays, intrinsics,
                        background, light, ambient)
        source_mask = source.is_object
        source_depth = sensor_depth(rng, source, options)
        source_color = sensor_color(rng, source.color, 0.0)
        has_point = source_mask & (source_depth > 0)
        corners, weights = _corner_weights(mesh.faces, source.triangle[has_point], source.bary[has_point])
    min_pixels = 0.02 * width * height
    if has_point.sum() < min_pixels:
        raise SceneError(f"only {int(has_point.sum())} object pixels with depth in the source")

    # Motion.
    deformed = deform(rng, family, mesh, options)
    ys, xs = np.nonzero(has_point)
    pixels = np.stack((xs, ys), axis=1).astype(np.float64)
    if family == "large":
        target_px = rng.uniform(options.large_flow_min, options.large_flow_max) * width / 640.0
        deformed = deformed + _calibrate_large(
            rng, _interpolate(mesh.vertices, corners, weights), _interpolate(deformed, corners, weights),
            pixels, intrinsics, width, height, target_px)
    if deformed[:, 2].min() < 0.1:
        raise SceneError("the deformed object reaches behind the camera")

    # Target frame.
    deformed_scene = _scene(deformed, mesh.faces)
    target = render(mesh, deformed, deformed_scene, rays, intrinsics, background, light, ambient)
    target_depth = sensor_depth(rng, target, options)
    target_color = sensor_color(rng, target.color, options.illumination)

    # Ground truth.
    source_points = image_proc.backproject_depth(torch.from_numpy(source_depth), intrinsics).numpy()
    moved = _interpolate(deformed, corners, weights)
    flow3d = moved - source_points[has_point].astype(np.float64)
    uv = project(moved, intrinsics)
    z = moved[:, 2]
    inside = (uv[:, 0] >= 0) & (uv[:, 0] <= width - 1) & (uv[:, 1] >= 0) & (uv[:, 1] <= height - 1)
    t, _, _, _ = _cast(deformed_scene, moved / z[:, None])
    nearest = np.clip(np.round(uv).astype(np.int64), 0, [width - 1, height - 1])
    behind_background = background.depth[nearest[:, 1], nearest[:, 0]] < z - VISIBILITY_TOLERANCE
    visible = inside & (t >= z - VISIBILITY_TOLERANCE) & ~behind_background

    optical_flow = np.full((2, height, width), -np.inf, np.float32)
    scene_flow = np.full((3, height, width), -np.inf, np.float32)
    scene_flow_all = np.full((3, height, width), np.nan, np.float32)
    optical_flow[:, ys[visible], xs[visible]] = (uv - pixels)[visible].T
    scene_flow[:, ys[visible], xs[visible]] = flow3d[visible].T
    scene_flow_all[:, ys, xs] = flow3d.T

    valid_fraction = float(visible.mean())
    if valid_fraction < 0.4:
        raise SceneError(f"only {valid_fraction:.0%} of the source object is visible in the target")
    mean_flow = float(np.linalg.norm((uv - pixels)[visible], axis=1).mean())
    if family == "large":
        low, high = (v * width / 640.0 for v in (options.large_flow_min, options.large_flow_max))
        if not low <= mean_flow <= high:
            raise SceneError(f"large motion of {mean_flow:.1f} px is outside [{low:.1f}, {high:.1f}]")

    graph = build_graph(source_depth, intrinsics, mask=source_mask, scene_flow=scene_flow_all,
                        options=graph_options)
    return {
        "intrinsics": {k: float(v) for k, v in intrinsics.items()},
        "object_id": object_id, "shape": shape, "motion": family,
        "real_frame": frame.name if real_frames else None,
        "source_color": source_color, "target_color": target_color,
        "source_depth": source_depth, "target_depth": target_depth, "source_mask": source_mask,
        "optical_flow": optical_flow, "scene_flow": scene_flow, "scene_flow_all": scene_flow_all,
        "graph": graph,
        "stats": {"mean_flow_px": round(mean_flow, 3),
                  "mean_motion_m": round(float(np.linalg.norm(flow3d[visible], axis=1).mean()), 5),
                  "valid_fraction": round(valid_fraction, 4)},
    }


def _names(text: str, allowed: Sequence[str], what: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if not names or unknown:
        raise ValueError(f"unknown {what} families {unknown or text!r}; choose from {', '.join(allowed)}")
    return names


# ---------------------------------------------------------------------------------------------
# Files


def seq_id(index: int) -> str:
    return f"seq{index:04d}"


def graph_name(object_id: str, graph_options: GraphOptions) -> str:
    return f"{object_id}_{SOURCE_ID}_{TARGET_ID}_{graph_options.mode}_{graph_options.node_coverage:g}"


def write_pair(out: str, split: str, index: int, pair: Dict, options: SyntheticOptions,
               graph_options: GraphOptions = GraphOptions(), settings: Optional[Dict] = None) -> Dict:
    """Writes one pair made by `make_pair` under out/split/seqNNNN/ and returns its label
    (paths relative to `out`). The record pair.json ({"label", "settings"}) is written last."""
    seq = seq_id(index)
    folder = os.path.join(out, split, seq)
    rel = f"{split}/{seq}"
    obj = pair["object_id"]
    flow_name = f"{obj}_{SOURCE_ID}_{TARGET_ID}"
    name = graph_name(obj, graph_options)
    label = {
        "source_color": f"{rel}/color/{SOURCE_ID}.jpg",
        "source_depth": f"{rel}/depth/{SOURCE_ID}.png",
        "target_color": f"{rel}/color/{TARGET_ID}.jpg",
        "target_depth": f"{rel}/depth/{TARGET_ID}.png",
        **{kind: f"{rel}/{kind}/{name}.bin" for kind in (
            "graph_nodes", "graph_edges", "graph_edges_weights", "graph_node_deformations",
            "graph_clusters", "pixel_anchors", "pixel_weights")},
        "optical_flow": f"{rel}/optical_flow/{flow_name}.oflow",
        "scene_flow": f"{rel}/scene_flow/{flow_name}.sflow",
        "source_mask": f"{rel}/mask/{SOURCE_ID}_{obj}.png",
        "intrinsics": pair["intrinsics"],
        "seq_id": seq, "object_id": obj, "source_id": SOURCE_ID, "target_id": TARGET_ID,
        "motion": pair["motion"], "shape": pair["shape"],
    }
    if pair["real_frame"] is not None:
        label["real_frame"] = pair["real_frame"]
    label["stats"] = pair["stats"]

    def path(key):
        return os.path.join(out, label[key])

    io.write_color(path("source_color"), pair["source_color"], options.jpeg_quality)
    io.write_color(path("target_color"), pair["target_color"], options.jpeg_quality)
    io.write_depth(path("source_depth"), pair["source_depth"])
    io.write_depth(path("target_depth"), pair["target_depth"])
    io.write_mask(path("source_mask"), pair["source_mask"])
    io.write_flow(path("optical_flow"), pair["optical_flow"])
    io.write_flow(path("scene_flow"), pair["scene_flow"])
    pair["graph"].save(folder, name)
    io.write_intrinsics(os.path.join(folder, "intrinsics.txt"), pair["intrinsics"])
    if settings is None:
        settings = _settings(options, graph_options)
    record = {"label": label, "settings": settings}
    io.atomic_write_bytes(os.path.join(folder, PAIR_RECORD), (json.dumps(record, indent=1) + "\n").encode())
    return label


def _settings(options: SyntheticOptions, graph_options: GraphOptions) -> Dict:
    """The settings that decide a pair's content (compared on resume)."""
    values = {k: v for k, v in to_dict(options).items() if k not in _JOB_FIELDS}
    return {"generator": GENERATOR_VERSION, "synthetic": values, "graph": to_dict(graph_options)}


def _finished_label(out: str, split: str, index: int, settings: Dict) -> Optional[Dict]:
    """The label of pair `index` when its record and all its files exist and it was made with
    `settings`; otherwise None."""
    folder = os.path.join(out, split, seq_id(index))
    try:
        with open(os.path.join(folder, PAIR_RECORD), "rb") as handle:
            record = json.loads(handle.read())
        label = record["label"]
        keys = io.LABEL_PATH_KEYS + io.LABEL_GROUND_TRUTH_KEYS + ("source_mask",)
        paths = [os.path.join(out, label[k]) for k in keys] + [os.path.join(folder, "intrinsics.txt")]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if record.get("settings") != settings or not all(os.path.isfile(p) for p in paths):
        return None
    return label


def pair_rng(seed: int, split: str, index: int, attempt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(split.encode()), int(index), int(attempt)])


_REAL_FRAMES: Dict[Tuple, List[RealFrame]] = {}


def _real_frames(options: SyntheticOptions) -> Optional[List[RealFrame]]:
    """The real frames of options.real_frames, loaded once per process."""
    if not options.real_frames:
        return None
    key = (os.path.abspath(options.real_frames), options.width, options.height, options.real_depth_threshold)
    if key not in _REAL_FRAMES:
        _REAL_FRAMES[key] = load_real_frames(options.real_frames, options.width, options.height,
                                             options.real_depth_threshold)
    return _REAL_FRAMES[key]


def make_and_write(out: str, split: str, index: int, seed: int, options: SyntheticOptions,
                   graph_options: GraphOptions = GraphOptions()) -> Dict:
    """Makes pair `index` (resuming: an existing complete pair is only read back) and returns
    its label. Draws that give no usable pair are replaced by the next attempt."""
    settings = _settings(options, graph_options)
    label = _finished_label(out, split, index, settings)
    if label is not None:
        return label
    errors = []
    for attempt in range(MAX_ATTEMPTS):
        try:
            pair = make_pair(pair_rng(seed, split, index, attempt), options, index,
                             _real_frames(options), graph_options)
        except (SceneError, GraphError) as error:
            errors.append(str(error))
            continue
        return write_pair(out, split, index, pair, options, graph_options, settings)
    raise RuntimeError(f"pair {index}: no usable draw in {MAX_ATTEMPTS} attempts; the last "
                       f"reasons: {errors[-3:]}")


def _init_worker(threads: int) -> None:
    global _RAY_THREADS
    torch.set_num_threads(threads)
    _RAY_THREADS = threads


def _work(job) -> Dict:
    return make_and_write(*job)


def generate(out: str, split: str, pairs: int, seed: int, options: SyntheticOptions = SyntheticOptions(),
             graph_options: GraphOptions = GraphOptions(), progress: bool = True) -> List[Dict]:
    """Makes pairs 0..pairs-1 of `split` under `out` (skipping finished ones) with
    options.workers processes, writes out/<split>_graphs.json and returns the labels."""
    if pairs < 1:
        raise ValueError(f"pairs must be at least 1, found {pairs}")
    _names(options.motions, MOTIONS, "motion")
    if not options.real_frames:
        _names(options.shapes, SHAPES, "shape")
    jobs = [(out, split, i, seed, options, graph_options) for i in range(pairs)]
    bar = tqdm(total=pairs, desc=f"{split} pairs", unit="pair", disable=not progress)
    labels = []
    if options.workers > 1:
        threads = max(1, (os.cpu_count() or 1) // options.workers)
        with concurrent.futures.ProcessPoolExecutor(
                options.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(threads,)) as pool:
            for label in pool.map(_work, jobs):
                labels.append(label)
                bar.update()
    else:
        for job in jobs:
            labels.append(_work(job))
            bar.update()
    bar.close()
    io.write_labels(os.path.join(out, f"{split}_graphs.json"), labels)
    return labels


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    parser = ArgumentParser(
        prog="python -m dataset.synthetic",
        description="Makes synthetic training or test pairs in the DeepDeform format: a textured "
                    "surface (or the object of real RGB-D frames) under a known smooth non-rigid "
                    "motion, rendered with a z-buffer, depth noise and holes, with exact optical "
                    "flow, scene flow and graph ground truth.")
    add_options(parser, SyntheticOptions, "synthetic data")
    add_options(parser, GraphOptions, "deformation graph")
    args = parser.parse_args(argv)
    try:
        options, graph_options = from_args(args, SyntheticOptions), from_args(args, GraphOptions)
        labels = generate(options.out, options.split, options.pairs, options.seed, options, graph_options)
    except (ValueError, OSError) as error:   # OptionError, FormatError, GraphError, unwritable --out
        raise SystemExit(f"error: {error}") from None
    for motion in sorted({label["motion"] for label in labels}):
        stats = [label["stats"] for label in labels if label["motion"] == motion]
        print(f"{motion:>6}: {len(stats)} pairs, mean optical flow "
              f"{np.mean([s['mean_flow_px'] for s in stats]):.1f} px, mean 3D motion "
              f"{100 * np.mean([s['mean_motion_m'] for s in stats]):.1f} cm, valid "
              f"{100 * np.mean([s['valid_fraction'] for s in stats]):.0f} % of the object")
    print(f"wrote {len(labels)} pairs to {os.path.join(options.out, options.split + '_graphs.json')}")
    return labels


if __name__ == "__main__":
    main()
