"""A small analytic RGB-D sequence for the sequence residual tests: a textured sheet that
bends and drifts (motion a 5 cm graph expresses) with travelling wrinkles of 3.5 cm wavelength
(motion it does not), ray cast with Open3D, written in the sequence layout with gt/gt.npz.
Self-contained so that the tests do not depend on the sequence generator's defaults."""
import os

import numpy as np
import open3d as o3d

from dataset import io
from dataset.synthetic.geometry import raycasting_scene


def sheet_vertices(frames: int, cells: int = 80, wrinkle: float = 0.004):
    """(T, V, 3) vertices and (F, 3) faces of the sheet, 50 x 40 cm at about 1 m."""
    u, v = np.meshgrid(np.linspace(-0.25, 0.25, cells + 1), np.linspace(-0.2, 0.2, cells + 1), indexing="xy")
    i, j = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
    a = i * (cells + 1) + j
    b, c = a + 1, a + cells + 1
    faces = np.concatenate((np.stack((a, c, b), -1).reshape(-1, 3), np.stack((b, c, c + 1), -1).reshape(-1, 3)))
    vertices = []
    for t in range(frames):
        s = t / max(frames - 1, 1)
        z = 1.0 + 0.08 * np.sin(np.pi * (u / 0.5 + 0.5)) * np.sin(np.pi * s)
        z = z + wrinkle * np.sin(2 * np.pi * (u / 0.035 - 0.5 * s)) * np.cos(2 * np.pi * v / 0.15)
        vertices.append(np.stack((u + 0.03 * s, v + 0.01 * np.sin(2 * np.pi * s), z), -1).reshape(-1, 3))
    return np.array(vertices, np.float32), faces.astype(np.int32), u.ravel(), v.ravel()


def write_sheet_sequence(out: str, frames: int = 6, width: int = 160, height: int = 120, seed: int = 0,
                         noise: float = 0.0005) -> str:
    rng = np.random.default_rng(seed)
    focal = 0.9 * width
    intrinsics = {"fx": focal, "fy": focal, "cx": (width - 1) / 2, "cy": (height - 1) / 2}
    vertices, faces, u, v = sheet_vertices(frames)
    texture = rng.random((32, 32, 3))
    ys, xs = np.mgrid[0:height, 0:width]
    directions = np.stack(((xs - intrinsics["cx"]) / focal, (ys - intrinsics["cy"]) / focal,
                           np.ones((height, width))), -1)
    rays = np.concatenate((np.zeros_like(directions), directions), -1).astype(np.float32)
    for sub in ("depth", "color", "gt"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    visible = []
    for t in range(frames):
        scene = raycasting_scene(vertices[t], faces)
        hit = scene.cast_rays(o3d.core.Tensor(rays))
        distance = hit["t_hit"].numpy()
        on = np.isfinite(distance)
        corners = faces[np.where(on, hit["primitive_ids"].numpy().astype(np.int64), 0)]
        uv = hit["primitive_uvs"].numpy()
        weights = np.stack((1 - uv[..., 0] - uv[..., 1], uv[..., 0], uv[..., 1]), -1)
        tu, tv = (u[corners] * weights).sum(-1), (v[corners] * weights).sum(-1)
        color = texture[((tv + 0.2) / 0.4 * 31).clip(0, 31).astype(int), ((tu + 0.25) / 0.5 * 31).clip(0, 31).astype(int)]
        depth = np.where(on, distance, 1.6) + rng.normal(0, noise, distance.shape)
        io.write_depth(os.path.join(out, "depth", f"{t:06d}.png"), depth)
        io.write_color(os.path.join(out, "color", f"{t:06d}.jpg"),
                       (np.where(on[..., None], color, 0.5) * 255).astype(np.uint8))
        p = vertices[t]
        px = np.clip(np.round(focal * p[:, 0] / p[:, 2] + intrinsics["cx"]).astype(int), 0, width - 1)
        py = np.clip(np.round(focal * p[:, 1] / p[:, 2] + intrinsics["cy"]).astype(int), 0, height - 1)
        visible.append(np.abs(depth[py, px] - p[:, 2]) < 0.01)
    io.write_intrinsics(os.path.join(out, "intrinsics.txt"), intrinsics)
    np.savez(os.path.join(out, "gt", "gt.npz"), faces=faces, vertices=vertices, visible=np.array(visible))
    return out


def accuracy_mm(out: str, sequence: str, folder: str) -> np.ndarray:
    """Per frame, the mean distance (mm) of the reconstruction's vertices in OUT/folder to the
    true surface (exact point-to-triangle distance)."""
    with np.load(os.path.join(sequence, "gt", "gt.npz")) as gt:
        vertices, faces = gt["vertices"], gt["faces"].astype(np.uint32)
    names = sorted(os.listdir(os.path.join(out, folder)))
    errors = []
    for t, name in enumerate(names):
        mesh = io.read_ply(os.path.join(out, folder, name))[0]
        scene = raycasting_scene(vertices[t], faces)
        errors.append(1000 * scene.compute_distance(o3d.core.Tensor(mesh)).numpy().mean())
    return np.array(errors)
