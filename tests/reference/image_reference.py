"""Obviously right, slow references of the csrc/image ops (loops over pixels)."""
import numpy as np


def backproject(depth, fx, fy, cx, cy, max_depth):
    h, w = depth.shape
    out = np.zeros((h, w, 3), dtype=np.float64)
    for y in range(h):
        for x in range(w):
            z = depth[y, x]
            if np.isfinite(z) and 0 < z <= max_depth:
                out[y, x] = (z * (x - cx) / fx, z * (y - cy) / fy, z)
    return out


def mesh(points, max_edge):
    """Vertices (pixel order of first use is not needed: sorted row-major), faces as pixel triples."""
    h, w, _ = points.shape
    valid = points[..., 2] > 0
    faces = []
    for y in range(h - 1):
        for x in range(w - 1):
            p00, p01, p10, p11 = (y, x), (y + 1, x), (y, x + 1), (y + 1, x + 1)
            for tri in ((p00, p01, p10), (p11, p10, p01)):
                if all(valid[p] for p in tri):
                    a, b, c = (points[p] for p in tri)
                    if max(np.linalg.norm(a - b), np.linalg.norm(a - c), np.linalg.norm(b - c)) <= max_edge:
                        faces.append(tri)
    used = sorted({p for tri in faces for p in tri})
    index = {p: i for i, p in enumerate(used)}
    vertices = np.array([points[p] for p in used]).reshape(-1, 3)
    pixels = np.array([(p[1], p[0]) for p in used]).reshape(-1, 2)
    return vertices, pixels, np.array([[index[p] for p in tri] for tri in faces]).reshape(-1, 3)


def boundary(points, radius, max_distance):
    h, w, _ = points.shape
    out = np.zeros((h, w), dtype=bool)
    for y in range(h):
        for x in range(w):
            if not points[y, x, 2] > 0:
                continue
            for dy in range(-radius, radius + 1):
                for dx in range(-radius, radius + 1):
                    yy, xx = y + dy, x + dx
                    if not (0 <= yy < h and 0 <= xx < w) or not points[yy, xx, 2] > 0 or \
                            np.linalg.norm(points[y, x] - points[yy, xx]) > max_distance:
                        out[y, x] = True
    return out
