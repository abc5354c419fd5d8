"""The deforming objects of a sequence and their textures.

Both are meshed finer than the pair generator's (a vertex every `spacing` metres, 5 mm by
default, rather than every 3 pixels): the mesh is also the ground truth a reconstruction is
scored against with 1 cm thresholds, whatever the image size.
"""
import glob
import os
from typing import Optional

import cv2
import numpy as np

from dataset import io
from dataset.synthetic.geometry import dot, random_unit, weld_groups
from dataset.synthetic.scene import Mesh, compact, cube_sphere, grid_faces, outline, waves
from dataset.synthetic.textures import photo_texture, procedural_texture

OBJECTS = ("cloth", "blob")
# The texture source that asks for crops of the photographs bundled with scikit-image
# (dataset.synthetic.textures.photo_texture) instead of image files.
PHOTOS = "photos"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def texture_images(folder: Optional[str], photos: bool = False):
    """The texture source: paths of the images in `folder` (sorted); else PHOTOS when `photos`;
    else [] (procedural prints). An empty or missing folder is an error naming it. Never
    decided by what is installed: a seed makes the same sequence on every machine."""
    if folder is None:
        return PHOTOS if photos else []
    paths = sorted(p for p in glob.glob(os.path.join(folder, "*")) if p.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise FileNotFoundError(f"{folder}: no texture images (*{', *'.join(IMAGE_SUFFIXES)}) in the folder")
    return paths


def make_texture(rng: np.random.Generator, height: int, width: int, images) -> tuple:
    """(height, width, 3) float32 RGB albedo in [0, 255] and where it came from: one of
    `images` (paths, resized to fill the texture), a crop of a scikit-image photograph (PHOTOS),
    or a procedural print ([])."""
    if images == PHOTOS:
        return photo_texture(rng, height, width), "scikit-image photograph"
    if not images:
        return procedural_texture(rng, height, width, max(width / 512.0, 0.25)), "procedural"
    path = images[int(rng.integers(len(images)))]
    image = io.read_color(path)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    image = image[..., :3].astype(np.uint8)
    return (cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA).astype(np.float32),
            os.path.basename(path))


def cloth_mesh(rng: np.random.Generator, size: float, spacing: float, images) -> tuple:
    """A gently wavy sheet about `size` metres across with an irregular rounded outline,
    centred at the origin in the x-y plane (z towards the back)."""
    width_m = size
    height_m = size * rng.uniform(0.8, 1.15)
    cols = max(8, int(round(width_m / spacing)) + 1)
    rows = max(8, int(round(height_m / spacing)) + 1)
    t, s = np.meshgrid(np.linspace(0, 1, rows), np.linspace(0, 1, cols), indexing="ij")
    x, y = (s - 0.5) * width_m, (t - 0.5) * height_m
    z = waves(rng, x, y, size, int(rng.integers(2, 5)), (0.005, 0.02))
    keep = outline(rng, rows, cols, 3.0)
    positions = np.stack((x, y, z - z.mean()), axis=-1).reshape(-1, 3)
    texels = int(np.clip(size / 0.001, 64, 1024))      # about 1 mm per texel
    tex_h, tex_w = int(texels * height_m / size), texels
    texcoords = np.stack((s.reshape(-1) * (tex_w - 1), t.reshape(-1) * (tex_h - 1)), axis=1)
    used, faces = compact(grid_faces(rows, cols, keep), positions.shape[0])
    texture, source = make_texture(rng, tex_h, tex_w, images)
    return Mesh(positions[used], faces, texcoords[used], texture, procedural=True), source


def blob_mesh(rng: np.random.Generator, size: float, spacing: float, images) -> tuple:
    """A closed, lumpy, body-like shape `size` metres tall (an upright ellipsoid, narrower
    across and flatter in depth, with a few broad lumps), as a welded cube sphere."""
    axes = np.array([rng.uniform(0.55, 0.7), 1.0, rng.uniform(0.4, 0.5)]) * size / 2
    # A cube face spans a quarter of the great circle of the mean radius.
    cells = int(np.clip(round(np.pi / 2 * axes.mean() / spacing), 6, 160))
    tile = int(np.clip(np.pi / 2 * axes.mean() / 0.001, 32, 512))
    directions, texcoords, faces, keys = cube_sphere(cells, tile)
    radius = np.ones(directions.shape[0])
    for _ in range(rng.integers(3, 7)):
        c = random_unit(rng)
        radius += rng.uniform(-0.1, 0.15) * np.exp((dot(directions, c) - 1) / rng.uniform(0.1, 0.3))
    positions = directions * radius[:, None] * axes
    used, faces = compact(faces, positions.shape[0])
    weld = weld_groups(keys[used])
    positions = positions[used][weld]
    texture, source = make_texture(rng, 2 * tile, 3 * tile, images)
    return Mesh(positions, faces, texcoords[used], texture, procedural=True, weld=weld), source


def object_mesh(rng: np.random.Generator, shape: str, size: float, spacing: float, images) -> tuple:
    """(Mesh in the object frame, texture source) of `shape` (one of OBJECTS)."""
    if shape == "cloth":
        return cloth_mesh(rng, size, spacing, images)
    if shape == "blob":
        return blob_mesh(rng, size, spacing, images)
    raise ValueError(f"unknown object {shape!r}; choose from {', '.join(OBJECTS)}")


def ground_truth_topology(mesh: Mesh):
    """The ground-truth mesh drops the duplicates the texture seams need: (ids (G,) of the
    render vertices kept, faces (F, 3) int32 over them). Without seams, every vertex is kept."""
    if mesh.weld is None:
        return np.arange(mesh.vertices.shape[0]), mesh.faces.astype(np.int32)
    kept, inverse = np.unique(mesh.weld, return_inverse=True)
    return kept, inverse.reshape(-1)[mesh.faces].astype(np.int32)
