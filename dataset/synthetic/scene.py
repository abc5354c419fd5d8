"""Procedural scenes: the textured object meshes (cloth, bump, cylinder, blob) and the static
background box behind them."""
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from options import SyntheticOptions
from dataset.synthetic.geometry import (cast_rays, corner_weights, dot, interpolate, pixel_rays,
                                        random_rotation, random_unit, raycasting_scene, rotate, rotation,
                                        weld_groups)
from dataset.synthetic.textures import object_texture, procedural_texture
from model import image_proc

SHAPES = ("cloth", "bump", "cylinder", "blob")

class SceneError(ValueError):
    """This draw cannot give a usable pair; the next attempt is drawn instead."""


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


def grid_faces(rows: int, cols: int, keep: Optional[np.ndarray] = None) -> np.ndarray:
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


def compact(faces: np.ndarray, count: int):
    """Ids of the vertices that faces use, and the faces renumbered to them."""
    used = np.flatnonzero(np.bincount(faces.reshape(-1), minlength=count))
    new_id = np.full(count, -1, dtype=np.int64)
    new_id[used] = np.arange(used.size)
    return used, new_id[faces]


def waves(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, size: float, count: int,
           amplitude: Tuple[float, float]) -> np.ndarray:
    """Sum of `count` plane waves of random direction, wavelength 0.15-0.5 x size."""
    z = np.zeros_like(x)
    for _ in range(count):
        angle = rng.uniform(0, 2 * np.pi)
        k = 2 * np.pi / (rng.uniform(0.15, 0.5) * size)
        z += rng.uniform(*amplitude) * size * np.sin(
            k * (np.cos(angle) * x + np.sin(angle) * y) + rng.uniform(0, 2 * np.pi))
    return z


def outline(rng: np.random.Generator, rows: int, cols: int, min_power: float) -> np.ndarray:
    """(rows-1, cols-1) bool cells inside a random superellipse with a wavy rim."""
    t, s = np.meshgrid((np.arange(rows - 1) + 0.5) / (rows - 1) * 2 - 1,
                       (np.arange(cols - 1) + 0.5) / (cols - 1) * 2 - 1, indexing="ij")
    power = rng.uniform(min_power, 8.0)
    radius = (np.abs(s) ** power + np.abs(t) ** power) ** (1.0 / power)
    phi = np.arctan2(t, s)
    rim = 1.0 + sum(rng.uniform(-0.05, 0.05) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
                    for k in range(2, 6))
    return radius <= rim


def cube_sphere(cells: int, tile: int):
    """A unit sphere made of a cube's six faces, `cells` x `cells` quads each, pushed onto the
    sphere (unlike a latitude-longitude sphere it has no poles where the texture pinches). Each
    face has its own `tile` x `tile` texel tile of a 2 x 3 tile texture; vertices along the cube's
    edges are duplicated (one per face) with identical positions.
    Returns directions (V, 3) unit vectors, texcoords (V, 2) texels, faces (F, 3) int64 and keys
    (V, 3) int64 integer lattice points that duplicates share (for `weld_groups`)."""
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
        faces.append(grid_faces(cells + 1, cells + 1) + index * (cells + 1) ** 2)
    directions = np.concatenate(positions)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return directions, np.concatenate(texcoords), np.concatenate(faces), np.concatenate(keys)


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
            z = waves(rng, x, y, size, int(rng.integers(3, 7)), (0.01, 0.04))
            keep = outline(rng, rows, cols, 2.0)
        elif shape == "bump":
            z = waves(rng, x, y, size, int(rng.integers(1, 4)), (0.003, 0.012))
            for _ in range(rng.integers(1, 4)):
                cx, cy = rng.uniform(-0.3, 0.3, 2) * size
                r = rng.uniform(0.1, 0.25) * size
                z -= rng.uniform(0.08, 0.25) * size * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
            keep = outline(rng, rows, cols, 3.0)
        else:
            arc = np.deg2rad(rng.uniform(100, 220))
            radius = width_m / arc
            phi = (s - 0.5) * arc
            z = rng.choice([-1.0, 1.0]) * radius * (1 - np.cos(phi))
            x = radius * np.sin(phi)
            z = z + waves(rng, x, y, size, 2, (0.003, 0.01))
            keep = outline(rng, rows, cols, 6.0)
        positions = np.stack((x, y, z - z.mean()), axis=-1).reshape(-1, 3)
        tilt = rotation([1, 0, 0], np.deg2rad(rng.uniform(-25, 25))) @ \
            rotation([0, 1, 0], np.deg2rad(rng.uniform(-25, 25)))
        orientation = tilt @ rotation([0, 0, 1], rng.uniform(0, 2 * np.pi))
        tex_h, tex_w = (int(np.clip(pixels * height_m / size * 1.2, 32, 2048)),
                        int(np.clip(pixels * width_m / size * 1.2, 32, 2048)))
        texcoords = np.stack((s.reshape(-1) * (tex_w - 1), t.reshape(-1) * (tex_h - 1)), axis=1)
        faces = grid_faces(rows, cols, keep)
        keys = None
    elif shape == "blob":
        # A cube sphere pushed onto a lumpy ellipsoid, its edge vertices welded so that the
        # surface stays closed under every motion.
        cells = int(np.clip(round(np.pi * pixels / 4 / 3), 6, 128))
        tile = int(np.clip(np.pi * pixels / 4 * 1.2, 16, 1024))
        directions, texcoords, faces, keys = cube_sphere(cells, tile)
        radius = np.ones(directions.shape[0])
        for _ in range(rng.integers(3, 8)):
            c = random_unit(rng)
            radius += rng.uniform(-0.2, 0.3) * np.exp((dot(directions, c) - 1) / rng.uniform(0.05, 0.3))
        axes = np.array([1.0, rng.uniform(0.7, 1.3), rng.uniform(0.7, 1.2)]) * size / 2
        positions = directions * radius[:, None] * axes
        orientation = random_rotation(rng)
        tex_h, tex_w = 2 * tile, 3 * tile
    else:
        raise ValueError(f"unknown shape family {shape!r}; choose from {SHAPES}")

    center = np.array([rng.uniform(-0.12, 0.12) * options.width / fx * distance,
                       rng.uniform(-0.12, 0.12) * options.height / fx * distance, distance])
    used, faces = compact(faces, positions.shape[0])
    vertices = rotate(positions[used], orientation) + center
    weld = weld_groups(keys[used]) if keys is not None else None
    if weld is not None:
        vertices = vertices[weld]
    texture = object_texture(rng, tex_h, tex_w, feature_scale, options.textures)
    return Mesh(vertices, faces, texcoords[used], texture, procedural=True, weld=weld)


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
    t, triangle, bary, normal = cast_rays(raycasting_scene(vertices, faces), rays)
    hit = triangle >= 0
    corners, weights = corner_weights(faces, triangle[hit], bary[hit])
    uv = interpolate(texcoords, corners, weights)
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
        values[sel] = brightness * image_proc.sample_points(texture, uv[sel, 0] * (tex_w - 1), uv[sel, 1] * (tex_h - 1))
    color[hit] = values
    cosine = np.abs(np.sum(normal * rays, axis=-1)) / np.linalg.norm(rays, axis=-1)
    return Background(np.where(hit, t, np.inf), color, np.where(hit, cosine, 1.0),
                      np.zeros((height, width), bool))
