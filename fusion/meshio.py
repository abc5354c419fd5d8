"""Triangle-mesh PLY files for the sequence tools, through Open3D (any PLY variant in, binary out).

Interim: the sequence scorer's branch brings dataset/io.py read_ply / write_ply; when it lands,
these two become thin calls to it.
"""
import os
from typing import Optional, Tuple

import numpy as np
import open3d as o3d

from dataset.fileio import PathLike, atomic_write_bytes
from dataset.io import FormatError


def read_ply(path: PathLike) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """PLY triangle mesh -> vertices (V, 3) float32, faces (F, 3) int64, colours (V, 3) float32
    in [0, 1] or None. A missing file or one without triangles is a FormatError naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FormatError(f"{path}: mesh file not found")
    mesh = o3d.io.read_triangle_mesh(path)
    vertices = np.asarray(mesh.vertices, dtype=np.float32)
    faces = np.asarray(mesh.triangles, dtype=np.int64)
    if vertices.shape[0] == 0 or faces.shape[0] == 0:
        raise FormatError(f"{path}: not a PLY triangle mesh (found {vertices.shape[0]} vertices, "
                          f"{faces.shape[0]} triangles)")
    colors = np.asarray(mesh.vertex_colors, dtype=np.float32) if mesh.has_vertex_colors() else None
    return vertices, faces, colors


def write_ply(path: PathLike, vertices: np.ndarray, faces: np.ndarray,
              colors: Optional[np.ndarray] = None) -> None:
    """Writes a binary little-endian PLY (float32 x y z, uchar red green blue when colours are
    given in [0, 1], int32 triangle indices) atomically."""
    vertices = np.asarray(vertices, dtype="<f4")
    faces = np.asarray(faces)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if colors is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    table = np.empty(vertices.shape[0], dtype=fields)
    for k, axis in enumerate("xyz"):
        table[axis] = vertices[:, k]
    if colors is not None:
        rgb = np.clip(np.round(np.asarray(colors, np.float64) * 255), 0, 255).astype(np.uint8)
        for k, channel in enumerate(("red", "green", "blue")):
            table[channel] = rgb[:, k]
    triangles = np.empty(faces.shape[0], dtype=[("n", "u1"), ("v", "<i4", (3,))])
    triangles["n"] = 3
    triangles["v"] = faces
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {vertices.shape[0]}"]
    header += [f"property {'float' if kind == '<f4' else 'uchar'} {name}" for name, kind in fields]
    header += [f"element face {faces.shape[0]}", "property list uchar int vertex_indices", "end_header"]
    atomic_write_bytes(path, ("\n".join(header) + "\n").encode() + table.tobytes() + triangles.tobytes())
