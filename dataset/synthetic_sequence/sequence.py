"""Making one sequence: the scene, then frame after frame rendered, sensed and written; the
ground truth last. A re-run with the same settings skips the frames whose files exist (each is
written atomically), so an interrupted run resumes; a longer run extends the sequence.
"""
import json
import os
import re
import zlib
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from dataset import io
from dataset.fileio import atomic_open, atomic_write_bytes
from dataset.synthetic.geometry import make_intrinsics, pixel_rays, raycasting_scene, rotate, rotation, vertex_normals
from dataset.synthetic.pair import family_names
from dataset.synthetic.real import load_real_frames
from dataset.synthetic.render import render, visible_points
from dataset.synthetic.scene import Background, Mesh, procedural_background
from dataset.synthetic.sensor import sensor_color, sensor_depth
from dataset.synthetic_sequence.motion import COMPONENTS, deform, draw_motion
from dataset.synthetic_sequence.objects import ground_truth_topology, object_mesh, texture_images
from options import ArgumentParser, SequenceOptions, SyntheticOptions, add_options, from_args, to_dict

# Stored in gt/motion.json and compared on resume: raise it whenever a change of this package
# changes what a sequence looks like, so that old frames are never mixed with new ones.
GENERATOR_VERSION = 1
# The background is made once for every frame a sequence could have: the motion is bounded in
# time, and this many frames cover each of its terms' cycles.
HORIZON_FRAMES = 240
# Settings that do not change a sequence's content, left out of the record compared on resume.
_JOB_FIELDS = ("out", "frames")
_SCENE_STREAM, _SENSOR_STREAM = zlib.crc32(b"sequence scene"), zlib.crc32(b"sequence sensor")


class SequenceError(ValueError):
    """The sequence folder or its settings do not allow the run."""


@dataclass
class SequenceScene:
    """Everything a frame is made from; a function of the options alone."""
    options: SequenceOptions
    intrinsics: Dict[str, float]
    mesh: Mesh                  # textured render mesh, vertices in the object frame (rest)
    normals: np.ndarray         # (V, 3) rest vertex normals, object frame
    orientation: np.ndarray     # (3, 3) rest placement R0
    centre: np.ndarray          # (3,) rest placement c0, metres
    motion: Dict                # parameters (motion.py)
    background: Background
    light: np.ndarray
    ambient: float
    gt_ids: np.ndarray          # (G,) render vertices that are ground-truth vertices
    gt_faces: np.ndarray        # (F, 3) int32 over the ground-truth vertices
    sources: Dict[str, str]     # where the texture and the background came from

    def vertices(self, t: float) -> np.ndarray:
        """(V, 3) float64 render vertices of frame t in camera coordinates."""
        x = deform(self.motion, self.mesh.vertices, self.normals, t)
        camera = rotate(x, self.orientation) + self.centre
        return camera[self.mesh.weld] if self.mesh.weld is not None else camera


def frame_name(index: int) -> str:
    return f"{index:06d}"


def frame_paths(folder: str, index: int, object_id: str) -> Dict[str, str]:
    name = frame_name(index)
    return {"color": os.path.join(folder, "color", name + ".jpg"),
            "depth": os.path.join(folder, "depth", name + ".png"),
            "mask": os.path.join(folder, "mask", f"{name}_{object_id}.png")}


def _real_background(options: SequenceOptions):
    """(Background, intrinsics, name) of the --background frame, resized to the image size."""
    frames = load_real_frames(options.background, options.width, options.height)
    if options.background_frame is not None:
        frames = [f for f in frames if f.name == options.background_frame]
        if not frames:
            raise SequenceError(f"{options.background}: no frame {options.background_frame!r} in color/")
    frame = frames[0]
    valid = frame.depth > 0
    if not valid.any():
        raise SequenceError(f"{options.background}: frame {frame.name} has no valid depth")
    depth = np.where(valid, frame.depth.astype(np.float64), np.inf)
    height, width = depth.shape
    background = Background(depth, frame.color.astype(np.float32), np.ones((height, width)), valid)
    return background, frame.intrinsics, f"{options.background}:{frame.name}"


def build_scene(options: SequenceOptions) -> SequenceScene:
    """The object, its placement, motion, background and lighting for `options` (deterministic)."""
    components = family_names(options.motion, COMPONENTS, "motion")
    rng = np.random.default_rng([options.seed, _SCENE_STREAM])
    mesh, texture_source = object_mesh(rng, options.object, options.size, options.spacing,
                                       texture_images(options.textures, options.photos))
    normals = vertex_normals(mesh.vertices, mesh.faces, mesh.weld)
    motion = draw_motion(rng, components, options.object, options.size, options.motion_scale, options.speed,
                         options.detail, mesh.vertices)
    real = _real_background(options) if options.background else None
    intrinsics = real[1] if real else make_intrinsics(options.width, options.height, options.focal)
    distance = options.distance
    if real:
        # In front of what the real frame shows in the middle half of the image (where the
        # object goes), with room for the object's own depth and motion.
        h, w = real[0].depth.shape
        middle = real[0].depth[h // 4:3 * h // 4, w // 4:3 * w // 4]
        middle = middle[np.isfinite(middle)]
        if middle.size:
            distance = min(distance, 0.75 * float(np.percentile(middle, 5)))
    if options.object == "cloth":
        orientation = rotation([1, 0, 0], np.deg2rad(rng.uniform(-20, 20))) @ \
            rotation([0, 1, 0], np.deg2rad(rng.uniform(-20, 20))) @ rotation([0, 0, 1], rng.uniform(0, 2 * np.pi))
    else:   # a body stands about upright, so that its turn shows its sides and back
        orientation = rotation([1, 0, 0], np.deg2rad(rng.uniform(-10, 10))) @ \
            rotation([0, 0, 1], np.deg2rad(rng.uniform(-10, 10))) @ rotation([0, 1, 0], rng.uniform(0, 2 * np.pi))
    centre = np.array([rng.uniform(-0.05, 0.05) * options.width / intrinsics["fx"] * distance,
                       rng.uniform(-0.05, 0.05) * options.height / intrinsics["fy"] * distance, distance])
    gt_ids, gt_faces = ground_truth_topology(mesh)
    scene = SequenceScene(options, intrinsics, mesh, normals, orientation, centre, motion, None,
                          np.zeros(3), 1.0, gt_ids, gt_faces, {"texture": texture_source})
    if real:
        scene.background = real[0]
        scene.sources["background"] = real[2]
    else:
        sample = np.arange(0, mesh.vertices.shape[0], 7)
        points = np.concatenate([scene.vertices(t)[sample] for t in range(0, HORIZON_FRAMES, 4)])
        if points[:, 2].min() < 0.1:
            raise SequenceError("the object's motion reaches behind the camera; use a larger --distance "
                                "or a smaller --motion-scale")
        scene.background = procedural_background(rng, intrinsics, options.width, options.height,
                                                 (points.min(axis=0), points.max(axis=0)), 0.1)
        scene.sources["background"] = "procedural"
    light = np.array([rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6), -1.0])
    scene.light = light / np.linalg.norm(light)
    scene.ambient = float(rng.uniform(0.45, 0.7))
    return scene


def sensor_options(options: SequenceOptions) -> SyntheticOptions:
    """The pair generator's sensor settings for the sequence's."""
    return SyntheticOptions(width=options.width, height=options.height, depth_noise=options.depth_noise,
                            holes=options.holes, grazing_angle=options.grazing_angle)


def render_frame(scene: SequenceScene, index: int, vertices: np.ndarray, raycaster, rays: np.ndarray):
    """(colour (H, W, 3) uint8 RGB before JPEG, depth (H, W) float32 metres in whole mm, mask
    (H, W) bool) of frame `index` whose render vertices are `vertices`."""
    options = scene.options
    frame = render(scene.mesh, vertices, raycaster, rays, scene.intrinsics, scene.background, scene.light,
                   scene.ambient)
    rng = np.random.default_rng([options.seed, _SENSOR_STREAM, index])
    depth = sensor_depth(rng, frame, sensor_options(options))
    color = sensor_color(rng, frame.color, options.illumination)
    return color, depth, frame.is_object


def settings(options: SequenceOptions) -> Dict:
    return {"generator": GENERATOR_VERSION,
            "sequence": {k: v for k, v in to_dict(options).items() if k not in _JOB_FIELDS}}


def _check_record(folder: str, record: Dict) -> None:
    path = os.path.join(folder, "gt", "motion.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path) as handle:
            stored = json.load(handle).get("settings")
    except (OSError, ValueError, AttributeError) as error:
        raise SequenceError(f"{path}: unreadable record of an earlier run ({error}); remove the folder "
                            "or choose another --out") from error
    if stored != record:
        changed = sorted(k for k in set(stored.get("sequence", {})) | set(record["sequence"])
                         if stored.get("sequence", {}).get(k) != record["sequence"].get(k)) \
            if isinstance(stored, dict) else []
        raise SequenceError(f"{folder}: holds a sequence made with other settings ({', '.join(changed) or 'generator'}"
                            f" differ, see gt/motion.json); choose another --out or remove it")


def _remove_stale_frames(folder: str, frames: int) -> None:
    """Frames at and after `frames`, left by a longer run of the same sequence."""
    pattern = re.compile(r"^(\d{6})(_.*)?\.(jpg|png)$")
    for sub in ("color", "depth", "mask"):
        directory = os.path.join(folder, sub)
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            match = pattern.match(name)
            if match and int(match.group(1)) >= frames:
                os.remove(os.path.join(directory, name))


def generate_sequence(options: SequenceOptions, progress: bool = True) -> Dict:
    """Writes the sequence of `options` into options.out (resuming) and returns a summary:
    frames written and skipped, vertices, faces, the mean share of vertices visible."""
    folder = options.out
    record = settings(options)
    _check_record(folder, record)
    scene = build_scene(options)
    os.makedirs(os.path.join(folder, "gt"), exist_ok=True)
    motion_record = {"settings": record, "object": options.object, "intrinsics": scene.intrinsics,
                     "placement": {"orientation": scene.orientation.tolist(), "centre_m": scene.centre.tolist()},
                     "motion": scene.motion, "sources": scene.sources,
                     "frame_time": "the motion is a function of the frame index t (frame NNNNNN is t = NNNNNN)"}
    atomic_write_bytes(os.path.join(folder, "gt", "motion.json"),
                       (json.dumps(motion_record, indent=1) + "\n").encode())
    io.write_intrinsics(os.path.join(folder, "intrinsics.txt"), scene.intrinsics)
    _remove_stale_frames(folder, options.frames)

    rays = pixel_rays(options.width, options.height, scene.intrinsics)
    vertices = np.zeros((options.frames, scene.gt_ids.size, 3), np.float32)
    visible = np.zeros((options.frames, scene.gt_ids.size), bool)
    written = 0
    for index in tqdm(range(options.frames), desc="frames", unit="frame", disable=not progress):
        render_vertices = scene.vertices(index)
        raycaster = raycasting_scene(render_vertices, scene.mesh.faces)
        points = render_vertices[scene.gt_ids]
        vertices[index] = points
        visible[index] = visible_points(raycaster, points, scene.intrinsics, scene.background)[0]
        paths = frame_paths(folder, index, options.object)
        if all(os.path.isfile(p) for p in paths.values()):
            continue
        color, depth, mask = render_frame(scene, index, render_vertices, raycaster, rays)
        io.write_color(paths["color"], color, options.jpeg_quality)
        io.write_depth(paths["depth"], depth)
        io.write_mask(paths["mask"], mask)
        written += 1

    with atomic_open(os.path.join(folder, "gt", "gt.npz"), "wb") as handle:
        np.savez(handle, faces=scene.gt_faces, vertices=vertices, visible=visible)
    io.write_ply(os.path.join(folder, "gt", "mesh.ply"), vertices[0], scene.gt_faces)
    return {"frames": options.frames, "written": written, "skipped": options.frames - written,
            "vertices": int(scene.gt_ids.size), "faces": int(scene.gt_faces.shape[0]),
            "visible_share": float(visible.mean()), "sources": scene.sources}


def read_ground_truth(folder: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(faces (F, 3) int32, vertices (T, V, 3) float32, visible (T, V) bool) of a sequence's
    gt/gt.npz; FormatError naming the file when it is missing or malformed."""
    path = os.path.join(folder, "gt", "gt.npz")
    if not os.path.isfile(path):
        raise io.FormatError(f"{path}: ground-truth file not found (is {folder} a synthetic sequence?)")
    try:
        with np.load(path) as data:
            faces, vertices, visible = data["faces"], data["vertices"], data["visible"]
    except (OSError, ValueError, KeyError) as error:
        raise io.FormatError(f"{path}: not a ground-truth archive with faces, vertices, visible ({error})") from error
    if faces.ndim != 2 or faces.shape[1] != 3 or vertices.ndim != 3 or vertices.shape[2] != 3 or \
            visible.shape != vertices.shape[:2]:
        raise io.FormatError(f"{path}: expected faces (F, 3), vertices (T, V, 3), visible (T, V); found "
                             f"{faces.shape}, {vertices.shape}, {visible.shape}")
    return faces, vertices, visible.astype(bool)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = ArgumentParser(
        prog="python -m dataset.synthetic_sequence",
        description="Makes one synthetic RGB-D sequence in DeepDeform's sequence layout: a textured "
                    "deforming object (cloth or body-like blob) before a static background, ray cast "
                    "and passed through a depth-sensor model, with its exact ground-truth mesh in every "
                    "frame in OUT/gt/.")
    add_options(parser, SequenceOptions, "synthetic sequence")
    args = parser.parse_args(argv)
    try:
        options = from_args(args, SequenceOptions)
        summary = generate_sequence(options)
    except (ValueError, OSError) as error:   # SequenceError, OptionError, FormatError, unwritable --out
        raise SystemExit(f"error: {error}") from None
    print(f"{options.object}: {summary['vertices']} vertices, {summary['faces']} faces, "
          f"{100 * summary['visible_share']:.0f} % of the vertices visible per frame on average; "
          f"texture {summary['sources']['texture']}, background {summary['sources']['background']}")
    print(f"wrote {summary['written']} frames ({summary['skipped']} already there) to {options.out}")
    return summary
