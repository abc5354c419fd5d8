"""Smooth non-rigid motion families of a pair (bend, twist, rbf, bulge, large) and the global
rigid motion that follows each."""
from typing import Callable, Dict

import numpy as np

from options import SyntheticOptions
from dataset.synthetic.geometry import dot, project, random_unit, rotate, rotation, vertex_normals
from dataset.synthetic.scene import Mesh, SceneError

MOTIONS = ("bend", "twist", "rbf", "bulge", "large")

def _in_plane_axes(rng: np.random.Generator):
    angle = rng.uniform(0, 2 * np.pi)
    return (np.array([np.cos(angle), np.sin(angle), 0.0]),
            np.array([-np.sin(angle), np.cos(angle), 0.0]), np.array([0.0, 0.0, 1.0]))


def _bend(rng, x, normals, size, scale):
    """Bends the object about an in-plane axis, towards or away from the camera: the coordinate
    a along e1 is wrapped onto a circle of radius R (total angle 40-110 degrees); as a fold,
    only the side a > a0 bends."""
    e1, e2, e3 = _in_plane_axes(rng)
    a = dot(x, e1)
    a0 = rng.uniform(-0.2, 0.2) * size
    angle = scale * np.deg2rad(rng.uniform(40, 110)) * rng.choice([-1.0, 1.0])
    radius = (np.ptp(a) if np.ptp(a) > 0 else size) / angle
    along = a - a0
    if rng.uniform() < 0.4:
        along = np.maximum(along, 0.0)
        radius = radius / 2
    h = dot(x, e3)
    theta = along / radius
    new_along = (radius - h) * np.sin(theta)
    new_h = radius - (radius - h) * np.cos(theta)
    return x + (new_along - along)[:, None] * e1 + (new_h - h)[:, None] * e3


def _twist(rng, x, normals, size, scale):
    """Rotates about an in-plane axis through the centroid by an angle growing linearly along
    it (30-90 degrees end to end)."""
    e1, _, _ = _in_plane_axes(rng)
    a = dot(x, e1)
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
        r = rotation(random_unit(rng), scale * np.deg2rad(rng.uniform(5, 25)))
        t = random_unit(rng) * scale * rng.uniform(0.03, 0.15) * size
        out += weights[:, k:k + 1] * (rotate(x - centres[k], r) + centres[k] + t)
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
    r = rotation(random_unit(rng), np.deg2rad(rng.uniform(0, max_angle_deg)))
    return r, random_unit(rng) * rng.uniform(0, max_shift)


def deform(rng: np.random.Generator, family: str, mesh: Mesh, options: SyntheticOptions) -> np.ndarray:
    """(V, 3) rest vertices -> (V, 3) deformed vertices: the non-rigid motion of `family` about
    the centroid, then a global rigid motion (up to 8 degrees and 6 cm, times the motion
    scale). The `large` family's lateral shift is added later by `calibrate_large`."""
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
    deformed = rotate(x, r) + centroid + t
    return deformed[mesh.weld] if mesh.weld is not None else deformed


def calibrate_large(rng, rest_points, moved_points, pixels, intrinsics, width, height,
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
