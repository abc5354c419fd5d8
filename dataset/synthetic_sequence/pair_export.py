"""A frame pair of a synthetic sequence as a DeepDeform-format pair, so that the two-frame tools
(generate.py, evaluate.py, training) run on sequence data too.

    python -m dataset.synthetic_sequence.export_pair --sequence DIR --source 0 --target 10 --out PAIRDIR

writes PAIRDIR/<split>/seqNNNN/ (colour, depth, mask, optical and scene flow, the seven graph
files, intrinsics.txt, pair.json) with the pair generator's writer and adds the pair to
PAIRDIR/<split>_graphs.json. Colour and depth are the sequence's files (the JPEG bytes copied,
not re-encoded). The ground truth is exact: the sequence's scene is rebuilt from gt/motion.json
(the generator is deterministic, and the rebuilt mesh is checked against gt/gt.npz), each source
object pixel with depth is traced to its point on the mesh, and that point is carried to the
target frame by the known motion; flow is valid where the target camera sees it, the graph is
built from the source depth by dataset/graph.py (what create_graph_data.py runs) with the node
deformations from the scene flow of every source object pixel.
"""
import json
import os
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from dataset import io
from dataset.fileio import atomic_write_bytes
from dataset.graph import build_graph
from dataset.synthetic.geometry import cast_rays, corner_weights, interpolate, pixel_rays, raycasting_scene
from dataset.synthetic.render import flow_images, visible_points
from dataset.synthetic.writer import seq_id, write_pair
from dataset.synthetic_sequence.sequence import (GENERATOR_VERSION, SequenceError, build_scene, frame_paths,
                                                 read_ground_truth)
from model import image_proc
from options import (ArgumentParser, GraphOptions, PairExportOptions, SequenceOptions, SyntheticOptions,
                     add_options, from_args, from_dict, to_dict)


def _sequence_options(folder: str, frames: int) -> SequenceOptions:
    path = os.path.join(folder, "gt", "motion.json")
    try:
        with open(path) as handle:
            settings = json.load(handle)["settings"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SequenceError(f"{path}: cannot read the sequence's settings ({error})") from error
    if settings.get("generator") != GENERATOR_VERSION:
        raise SequenceError(f"{path}: made by sequence generator version {settings.get('generator')}, this is "
                            f"version {GENERATOR_VERSION}: its scene cannot be rebuilt exactly")
    return from_dict(SequenceOptions, {**settings["sequence"], "out": folder, "frames": frames}, source=path)


def make_sequence_pair(folder: str, source: int, target: int,
                       graph_options: GraphOptions = GraphOptions()) -> Dict:
    """The pair (source, target) of sequence `folder` as the dict `write_pair` takes (see
    dataset.synthetic.pair.make_pair), with the source and target JPEG bytes under
    "source_jpeg" and "target_jpeg"."""
    faces, truth, _ = read_ground_truth(folder)
    frames = truth.shape[0]
    for name, index in (("--source", source), ("--target", target)):
        if not 0 <= index < frames:
            raise SequenceError(f"{folder}: {name} {index} is not a frame of the sequence (0..{frames - 1})")
    options = _sequence_options(folder, frames)
    scene = build_scene(options)
    moved_vertices = scene.vertices(target)
    source_vertices = scene.vertices(source)
    for index, vertices in ((source, source_vertices), (target, moved_vertices)):
        if not np.allclose(vertices[scene.gt_ids], truth[index], atol=1e-5):
            raise SequenceError(f"{os.path.join(folder, 'gt', 'gt.npz')}: the rebuilt scene does not match frame "
                                f"{index} of the ground truth (made by other code?)")

    paths = {k: frame_paths(folder, i, options.object) for k, i in (("source", source), ("target", target))}
    source_depth = io.read_depth(paths["source"]["depth"])
    target_depth = io.read_depth(paths["target"]["depth"])
    source_mask = io.read_mask(paths["source"]["mask"])
    intrinsics = scene.intrinsics
    height, width = source_depth.shape

    # Each source object pixel with depth sees the mesh point its camera ray hits (the render's
    # own rays, so the same triangle and barycentrics the frame was drawn with).
    rays = pixel_rays(width, height, intrinsics)
    has_point = source_mask & (source_depth > 0)
    _, triangle, bary, _ = cast_rays(raycasting_scene(source_vertices, scene.mesh.faces), rays[has_point])
    hit = triangle >= 0
    has_point[has_point] = hit
    corners, weights = corner_weights(scene.mesh.faces, triangle[hit], bary[hit])
    ys, xs = np.nonzero(has_point)
    pixels = np.stack((xs, ys), axis=1).astype(np.float64)

    source_points = image_proc.backproject_depth(torch.from_numpy(source_depth), intrinsics).numpy()
    moved = interpolate(moved_vertices, corners, weights)
    flow3d = moved - source_points[has_point].astype(np.float64)
    visible, uv = visible_points(raycasting_scene(moved_vertices, scene.mesh.faces), moved, intrinsics,
                                 scene.background)
    optical_flow, scene_flow, scene_flow_all = flow_images(height, width, ys, xs, visible, uv - pixels, flow3d)
    graph = build_graph(source_depth, intrinsics, mask=source_mask, scene_flow=scene_flow_all, options=graph_options)

    jpeg = {}
    for key in ("source", "target"):
        with open(paths[key]["color"], "rb") as handle:
            jpeg[key] = handle.read()
    return {
        "intrinsics": {k: float(v) for k, v in intrinsics.items()},
        "object_id": options.object, "shape": options.object, "motion": "sequence", "real_frame": None,
        "source_color": io.read_color(paths["source"]["color"]), "target_color": io.read_color(paths["target"]["color"]),
        "source_jpeg": jpeg["source"], "target_jpeg": jpeg["target"],
        "source_depth": source_depth, "target_depth": target_depth, "source_mask": source_mask,
        "optical_flow": optical_flow, "scene_flow": scene_flow, "scene_flow_all": scene_flow_all, "graph": graph,
        "stats": {"sequence": os.path.abspath(folder), "source_frame": source, "target_frame": target,
                  "mean_flow_px": round(float(np.linalg.norm((uv - pixels)[visible], axis=1).mean()), 3)
                  if visible.any() else 0.0,
                  "mean_motion_m": round(float(np.linalg.norm(flow3d[visible], axis=1).mean()), 5)
                  if visible.any() else 0.0,
                  "valid_fraction": round(float(visible.mean()), 4) if visible.size else 0.0},
    }


def export_pair(options: PairExportOptions, graph_options: GraphOptions = GraphOptions()) -> Dict:
    """Writes the pair of `options` and adds it to OUT/<split>_graphs.json; returns its label."""
    pair = make_sequence_pair(options.sequence, options.source, options.target, graph_options)
    record = {"export": to_dict(options), "graph": to_dict(graph_options)}
    label = write_pair(options.out, options.split, options.index, pair, SyntheticOptions(), graph_options,
                       settings=record)
    # The sequence's JPEG files as they are: decoding and encoding again would change them.
    atomic_write_bytes(os.path.join(options.out, label["source_color"]), pair["source_jpeg"])
    atomic_write_bytes(os.path.join(options.out, label["target_color"]), pair["target_jpeg"])
    labels_path = io.labels_path(options.out, options.split)
    labels = io.read_labels(labels_path) if os.path.isfile(labels_path) else []
    labels = [other for other in labels if other.get("seq_id") != seq_id(options.index)] + [label]
    io.write_labels(labels_path, sorted(labels, key=lambda other: other["seq_id"]))
    return label


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = ArgumentParser(
        prog="python -m dataset.synthetic_sequence.export_pair",
        description="Writes frames SOURCE and TARGET of a synthetic sequence as a DeepDeform-format pair "
                    "with exact optical flow, scene flow and graph ground truth.")
    add_options(parser, PairExportOptions, "pair export")
    add_options(parser, GraphOptions, "deformation graph")
    args = parser.parse_args(argv)
    try:
        options, graph_options = from_args(args, PairExportOptions), from_args(args, GraphOptions)
        label = export_pair(options, graph_options)
    except (ValueError, OSError) as error:   # SequenceError, GraphError, FormatError, OptionError
        raise SystemExit(f"error: {error}") from None
    stats = label["stats"]
    print(f"frames {options.source} -> {options.target}: mean optical flow {stats['mean_flow_px']:.1f} px, mean 3D "
          f"motion {100 * stats['mean_motion_m']:.1f} cm, valid {100 * stats['valid_fraction']:.0f} % of the object")
    print(f"wrote {os.path.join(options.out, options.split, label['seq_id'])} and "
          f"{io.labels_path(options.out, options.split)}")
    return label

