"""One source/target pair with exact ground truth (steps 1-5 of the package docstring)."""
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from options import GraphOptions, SyntheticOptions
from model import image_proc
from dataset.graph import build_graph
from dataset.synthetic.geometry import (corner_weights, interpolate, make_intrinsics, pixel_rays,
                                        raycasting_scene)
from dataset.synthetic.motion import MOTIONS, calibrate_large, deform
from dataset.synthetic.real import RealFrame, real_scene
from dataset.synthetic.render import flow_images, render, visible_points
from dataset.synthetic.scene import SHAPES, SceneError, procedural_background, procedural_mesh
from dataset.synthetic.sensor import sensor_color, sensor_depth


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
    motions = family_names(options.motions, MOTIONS, "motion")
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
        shape = str(rng.choice(family_names(options.shapes, SHAPES, "shape")))
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
        source = render(mesh, mesh.vertices, raycasting_scene(mesh.vertices, mesh.faces), rays, intrinsics,
                        background, light, ambient)
        source_mask = source.is_object
        source_depth = sensor_depth(rng, source, options)
        source_color = sensor_color(rng, source.color, 0.0)
        has_point = source_mask & (source_depth > 0)
        corners, weights = corner_weights(mesh.faces, source.triangle[has_point], source.bary[has_point])
    min_pixels = 0.02 * width * height
    if has_point.sum() < min_pixels:
        raise SceneError(f"only {int(has_point.sum())} object pixels with depth in the source")

    # Motion.
    deformed = deform(rng, family, mesh, options)
    ys, xs = np.nonzero(has_point)
    pixels = np.stack((xs, ys), axis=1).astype(np.float64)
    if family == "large":
        target_px = rng.uniform(options.large_flow_min, options.large_flow_max) * width / 640.0
        deformed = deformed + calibrate_large(
            rng, interpolate(mesh.vertices, corners, weights), interpolate(deformed, corners, weights),
            pixels, intrinsics, width, height, target_px)
    if deformed[:, 2].min() < 0.1:
        raise SceneError("the deformed object reaches behind the camera")

    # Target frame.
    deformed_scene = raycasting_scene(deformed, mesh.faces)
    target = render(mesh, deformed, deformed_scene, rays, intrinsics, background, light, ambient)
    target_depth = sensor_depth(rng, target, options)
    target_color = sensor_color(rng, target.color, options.illumination)

    # Ground truth.
    source_points = image_proc.backproject_depth(torch.from_numpy(source_depth), intrinsics).numpy()
    moved = interpolate(deformed, corners, weights)
    flow3d = moved - source_points[has_point].astype(np.float64)
    visible, uv = visible_points(deformed_scene, moved, intrinsics, background)

    optical_flow, scene_flow, scene_flow_all = flow_images(height, width, ys, xs, visible, uv - pixels, flow3d)

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


def family_names(text: str, allowed: Sequence[str], what: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if not names or unknown:
        raise ValueError(f"unknown {what} families {unknown or text!r}; choose from {', '.join(allowed)}")
    return names
