"""Viewing a fusion run (example_viz.py --sequence OUT, fuse.py --show).

With a display: an Open3D window plays the animated mesh (OUT/frames/*.ply) beside the input
frame's point cloud; keys: space pause/play, N next frame, P previous frame, Q quit. Headless
(no display, or headless=True): OUT/viz/NNNNNN.png per frame (input | model | overlay) and
OUT/viz/fusion.mp4, rendered by ray casting the same meshes into the input camera.
"""
import json
import os
from typing import Dict, List

import numpy as np
import torch

from fusion import export
from fusion.sequence import Sequence, SequenceError
from fusion.render import render
from model import image_proc
from utils.demo import has_display


def load_run(out: str):
    """(sequence, frame ids, canonical vertices, faces, colours, per-frame vertices) of a run."""
    options_path = os.path.join(out, "fusion_options.json")
    if not os.path.isfile(options_path):
        raise SequenceError(f"{options_path}: not found (is {out} the --out folder of fuse.py?)")
    with open(options_path) as handle:
        stored = json.load(handle)
    sequence = Sequence(stored["sequence"], stored["fusion"].get("frames"))
    nodes = np.load(os.path.join(out, "nodes.npz"))
    frame_ids = [int(i) for i in nodes["frame_ids"]]
    canonical = o3d_mesh(os.path.join(out, "canonical.ply"))
    frames = []
    for frame_id in frame_ids:
        path = os.path.join(out, "frames", f"{frame_id:06d}.ply")
        if not os.path.isfile(path):
            raise SequenceError(f"{path}: missing (the run did not finish?)")
        frames.append(np.asarray(o3d_mesh(path).vertices, dtype=np.float32))
    return (sequence, frame_ids, np.asarray(canonical.vertices, np.float32),
            np.asarray(canonical.triangles, np.int64), np.asarray(canonical.vertex_colors, np.float32), frames)


def o3d_mesh(path: str):
    import open3d as o3d

    mesh = o3d.io.read_triangle_mesh(path)
    if len(mesh.triangles) == 0:
        raise SequenceError(f"{path}: not a triangle mesh")
    return mesh


def write_headless(out: str, sequence, frame_ids: List[int], vertices, faces, colors, frames) -> Dict[str, str]:
    """PNG per frame and an MP4 under OUT/viz/; returns what was written."""
    import cv2

    folder = os.path.join(out, "viz")
    os.makedirs(folder, exist_ok=True)
    H, W = sequence.height, sequence.width
    video_tmp = os.path.join(folder, ".fusion.tmp.mp4")  # OpenCV picks the container by the suffix
    writer = cv2.VideoWriter(video_tmp, cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (3 * W, H))
    try:
        for frame_id, live in zip(frame_ids, frames):
            color = sequence.read(sequence.frame_ids.index(frame_id)).color
            panel = export.panels(color, render(live, vertices, faces, colors, sequence.intrinsics, H, W), H, W)
            ok, png = cv2.imencode(".png", cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
            if ok:
                export.write_bytes(os.path.join(folder, f"{frame_id:06d}.png"), png.tobytes())
            writer.write(cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    os.replace(video_tmp, os.path.join(folder, "fusion.mp4"))
    return {"pngs": folder, "video": os.path.join(folder, "fusion.mp4")}


def show_sequence(out: str, headless: bool = False) -> Dict[str, str]:
    sequence, frame_ids, vertices, faces, colors, frames = load_run(out)
    if headless or not has_display():
        written = write_headless(out, sequence, frame_ids, vertices, faces, colors, frames)
        print(f"no display: wrote {len(frame_ids)} PNG(s) and fusion.mp4 to {written['pngs']}")
        return written
    import open3d as o3d

    mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(frames[0].astype(np.float64)),
                                     o3d.utility.Vector3iVector(faces.astype(np.int32)))
    mesh.vertex_colors = o3d.utility.Vector3dVector(colors.astype(np.float64))
    mesh.compute_vertex_normals()
    cloud = o3d.geometry.PointCloud()
    # The input frame stands beside the mesh, shifted by the object's width plus a margin.
    shift = np.array([float(np.ptp(vertices[:, 0])) + 0.1, 0.0, 0.0])
    state = {"i": 0, "play": True}

    def show_frame(vis, i):
        frame = sequence.read(sequence.frame_ids.index(frame_ids[i]))
        points = image_proc.backproject_depth(torch.from_numpy(frame.depth), sequence.intrinsics).numpy()
        valid = points[..., 2] > 0
        cloud.points = o3d.utility.Vector3dVector(points[valid].astype(np.float64) + shift)
        cloud.colors = o3d.utility.Vector3dVector(frame.color[valid].astype(np.float64) / 255)
        mesh.vertices = o3d.utility.Vector3dVector(frames[i].astype(np.float64))
        mesh.compute_vertex_normals()
        vis.update_geometry(mesh)
        vis.update_geometry(cloud)

    def step(vis, delta):
        state["i"] = (state["i"] + delta) % len(frames)
        show_frame(vis, state["i"])
        return True

    vis = o3d.visualization.VisualizerWithKeyCallback()
    vis.create_window("fusion: animated mesh | input frame", 1280, 720)
    show_frame(vis, 0)
    vis.add_geometry(mesh)
    vis.add_geometry(cloud)
    vis.register_key_callback(ord(" "), lambda v: state.update(play=not state["play"]) or True)
    vis.register_key_callback(ord("N"), lambda v: step(v, 1))
    vis.register_key_callback(ord("P"), lambda v: step(v, -1))
    print("keys: space play/pause, N next frame, P previous frame, Q quit")
    ticks = 0
    while vis.poll_events():
        ticks += 1
        if state["play"] and ticks % 6 == 0:
            step(vis, 1)
        vis.update_renderer()
    vis.destroy_window()
    return {}

