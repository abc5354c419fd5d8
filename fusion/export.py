"""Outputs of a fusion run (docs/DESIGN.md 5.9), every file written atomically:

    OUT/canonical.ply          triangle mesh in canonical space, vertex colours
    OUT/frames/NNNNNN.ply      the canonical mesh warped into every processed frame (numbered
                               like the input frames; same vertices count and faces in all)
    OUT/nodes.npz              positions (N, 3), rotations (T, N, 3, 3), translations (T, N, 3),
                               frame_ids (T,), node_coverage, created (N,), vertex_anchors (V, A),
                               vertex_weights (V, A), status (T,)
    OUT/frames.csv             per frame: time, matches, solver status, energy, nodes, step times
    OUT/deepdeform/<seq>_<segmentEnd>_<frame>.ply   with deepdeform_names
    OUT/preview.png, OUT/fusion.mp4   input / model / overlay
"""
import csv
import io as pyio
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from dataset.fileio import atomic_open
from fusion.graph import warp_with_anchors
from fusion.render import render

FRAME_COLUMNS = ("frame", "seconds", "matches", "status", "energy", "nodes", "new_nodes", "message")


def write_mesh_ply(path: str, vertices: np.ndarray, faces: np.ndarray,
                   colors: Optional[np.ndarray] = None) -> None:
    """Binary little-endian PLY: float32 x, y, z (and uint8 red, green, blue from colours in
    [0, 1]), triangles as uchar-counted int32 lists. Refuses non-finite vertices."""
    vertices = np.asarray(vertices, dtype=np.float32)
    faces = np.asarray(faces)
    if not np.isfinite(vertices).all():
        raise ValueError(f"{path}: refusing to write non-finite vertices")
    props = "property float x\nproperty float y\nproperty float z\n"
    fields = [("xyz", "<f4", (3,))]
    if colors is not None:
        props += "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        fields.append(("rgb", "u1", (3,)))
    header = (f"ply\nformat binary_little_endian 1.0\nelement vertex {vertices.shape[0]}\n{props}"
              f"element face {faces.shape[0]}\nproperty list uchar int vertex_indices\nend_header\n")
    rows = np.empty(vertices.shape[0], dtype=fields)
    rows["xyz"] = vertices
    if colors is not None:
        rows["rgb"] = np.clip(np.round(np.asarray(colors) * 255), 0, 255).astype(np.uint8)
    tri = np.empty(faces.shape[0], dtype=[("n", "u1"), ("ids", "<i4", (3,))])
    tri["n"] = 3
    tri["ids"] = faces
    with atomic_open(path, "wb") as handle:
        handle.write(header.encode("ascii"))
        handle.write(rows.tobytes())
        handle.write(tri.tobytes())


def write_bytes(path: str, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def frames_csv(log: Sequence, steps: Sequence[str]) -> str:
    out = pyio.StringIO()
    writer = csv.writer(out)
    writer.writerow(FRAME_COLUMNS + tuple(f"{s}_seconds" for s in steps))
    for e in log:
        writer.writerow([e.frame_id, f"{e.seconds:.4f}", e.matches, e.status, f"{e.energy:.6g}", e.nodes,
                         e.new_nodes, e.message] + [f"{e.steps.get(s, 0.0):.4f}" for s in steps])
    return out.getvalue()


def deepdeform_name(sequence_name: str, frame_id: int) -> str:
    """DeepDeform's reconstruction benchmark naming: frames fall in 100-frame segments, named by
    the segment's end frame."""
    segment_end = (frame_id // 100 + 1) * 100
    return f"{sequence_name}_{segment_end:06d}_{frame_id:06d}.ply"


def export_meshes(out: str, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray,
                  anchors: torch.Tensor, weights: torch.Tensor, nodes: torch.Tensor,
                  rotations: torch.Tensor, translations: torch.Tensor, frame_ids: List[int],
                  deepdeform_sequence: Optional[str] = None, log=None) -> List[np.ndarray]:
    """Writes canonical.ply and frames/NNNNNN.ply (and the DeepDeform-named copies); returns the
    warped vertices of every frame."""
    write_mesh_ply(os.path.join(out, "canonical.ply"), vertices, faces, colors)
    warped_all = []
    points = torch.from_numpy(vertices)
    for i, frame_id in enumerate(frame_ids):
        warped = warp_with_anchors(points, anchors, weights, nodes, rotations[i], translations[i]).numpy() \
            if vertices.shape[0] else vertices
        warped_all.append(warped)
        write_mesh_ply(os.path.join(out, "frames", f"{frame_id:06d}.ply"), warped, faces, colors)
        if deepdeform_sequence is not None:
            write_mesh_ply(os.path.join(out, "deepdeform", deepdeform_name(deepdeform_sequence, frame_id)),
                           warped, faces, colors)
    return warped_all


def write_nodes(path: str, nodes: torch.Tensor, rotations: torch.Tensor, translations: torch.Tensor,
                frame_ids: List[int], coverage: float, created: torch.Tensor, anchors: torch.Tensor,
                weights: torch.Tensor, status: List[str]) -> None:
    with atomic_open(path, "wb") as handle:
        np.savez(handle, positions=nodes.numpy().astype(np.float32),
                 rotations=rotations.numpy().astype(np.float32),
                 translations=translations.numpy().astype(np.float32),
                 frame_ids=np.asarray(frame_ids, dtype=np.int64), node_coverage=np.float32(coverage),
                 created=created.numpy().astype(np.int64), vertex_anchors=anchors.numpy().astype(np.int64),
                 vertex_weights=weights.numpy().astype(np.float32), status=np.asarray(status, dtype=str))


def write_json(path: str, data: Dict) -> None:
    write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def shade(rendering, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 picture of a rendering: its colour, lit by its normal (so the shape
    shows even where the colour is flat), black where nothing is seen."""
    light = np.clip(np.abs(rendering.normals[..., 2]), 0, 1)[..., None]
    rgb = rendering.color * (0.35 + 0.65 * light)
    return np.where(rendering.mask[..., None], np.clip(rgb * 255, 0, 255), 0).astype(np.uint8)


def panels(color: np.ndarray, rendering, height: int, width: int) -> np.ndarray:
    """input | model | overlay, side by side (H, 3W, 3) uint8."""
    model = shade(rendering, height, width)
    overlay = np.where(rendering.mask[..., None], (0.5 * color + 0.5 * model).astype(np.uint8), color)
    return np.concatenate((color, model, overlay), axis=1)


def pictures(out: str, sequence, frame_ids: List[int], warped: List[np.ndarray], vertices: np.ndarray,
             faces: np.ndarray, colors: np.ndarray, preview_frames: int, video: bool,
             suffix: str = "") -> None:
    """preview<suffix>.png (a few frames, one row each) and fusion<suffix>.mp4 (every frame);
    the residual field's refined meshes use suffix "_refined"."""
    import cv2

    H, W = sequence.height, sequence.width
    chosen = sorted(set(np.linspace(0, len(frame_ids) - 1, min(preview_frames, len(frame_ids))).round().astype(int)))
    rows, writer, tmp = [], None, None
    if video:
        tmp = os.path.join(out, f".fusion{suffix}.tmp.mp4")  # OpenCV picks the container by the suffix
        writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (3 * W, H))
    try:
        for i, frame_id in enumerate(frame_ids):
            if i not in chosen and writer is None:
                continue
            color = sequence.read(sequence.frame_ids.index(frame_id)).color
            rendering = render(warped[i], vertices, faces, colors, sequence.intrinsics, H, W)
            panel = panels(color, rendering, H, W)
            if i in chosen:
                rows.append(panel)
            if writer is not None:
                writer.write(cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
    finally:
        if writer is not None:
            writer.release()
    if writer is not None:
        os.replace(tmp, os.path.join(out, f"fusion{suffix}.mp4"))
    ok, png = cv2.imencode(".png", cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR))
    if ok:
        write_bytes(os.path.join(out, f"preview{suffix}.png"), png.tobytes())
