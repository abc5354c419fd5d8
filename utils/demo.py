"""The two-frame demo (what example_viz.py runs): track a pair and show it in Open3D.

Keys (as in the reference demo):
  S  source frame            O  toggle the whole source frame / the tracked object
  T  target frame            B  target frame with the source object (before alignment)
  C  toggle correspondences  W  toggle weighted correspondences (red = lowest, green = highest
                             of the weights shown; the PNG carries the scale's legend)
  A  (after B) align the source object to the target
  R  (with --residual) the alignment refined by the hash-grid residual deformer
  ,  rotate the camera once around the scene
  ;  move the camera while showing the correspondences
  Z  reset the view
Without a display the same views are rendered offscreen to PNG files.
"""
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch

from dataset.deepdeform import DeepDeformDataset, collate, read_pair_files
from dataset.fileio import atomic_open
from model.correspondences import bilinear_sample
from model.residual import fit_residual
from options import GraphOptions, ResidualOptions
from utils.metrics import pair_errors

KEYS_HELP = __doc__.split("Keys (as in the reference demo):\n", 1)[1].split("Without a display", 1)[0]
VIEW_FILES = {"source": "source.png", "target": "target.png", "both": "both.png",
              "correspondences": "correspondences.png",
              "weighted_correspondences": "weighted_correspondences.png", "aligned": "aligned.png",
              "refined": "aligned_refined.png"}
SOURCE_TINT = np.array([1.0, 0.55, 0.1])   # orange: the source object over the target frame


@dataclass
class DemoData:
    """Everything the views need, in the source camera frame (metres), as numpy arrays."""

    source_points: np.ndarray        # (P, 3) every valid source pixel
    source_colors: np.ndarray        # (P, 3) in [0, 1]
    object_mask: np.ndarray          # (P,) bool: pixels of the tracked object (4 anchors)
    target_points: np.ndarray        # (Q, 3)
    target_colors: np.ndarray        # (Q, 3)
    warped_object: np.ndarray        # (P_object, 3) the object warped by the solved motion
    match_source: np.ndarray         # (M, 3) source points of (a subset of) the matches
    match_target: np.ndarray         # (M, 3) their target points
    match_weights: np.ndarray        # (M,) correspondence weights in [0, 1]
    refined_object: Optional[np.ndarray] = None   # (P_object, 3) with the residual deformer
    summary: List[str] = field(default_factory=list)


def _cloud(points: np.ndarray, colors: np.ndarray):
    import open3d as o3d

    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points.astype(np.float64)))
    cloud.colors = o3d.utility.Vector3dVector(np.clip(colors, 0, 1).astype(np.float64))
    return cloud


def _lines(start: np.ndarray, end: np.ndarray, colors: np.ndarray):
    import open3d as o3d

    points = np.concatenate((start, end)).astype(np.float64)
    n = len(start)
    lines = np.stack((np.arange(n), np.arange(n) + n), axis=1)
    line_set = o3d.geometry.LineSet(o3d.utility.Vector3dVector(points), o3d.utility.Vector2iVector(lines))
    line_set.colors = o3d.utility.Vector3dVector(colors.astype(np.float64))
    return line_set


# Red -> yellow -> green: a middle stop keeps mid-range weights apart from both ends.
WEIGHT_RAMP = np.array([[0.85, 0.1, 0.1], [0.95, 0.8, 0.1], [0.1, 0.7, 0.15]])


def weight_scale(weights: np.ndarray) -> Tuple[float, float]:
    """The (low, high) weights mapped to the ends of the colour ramp.

    A trained weighting head rarely spans [0, 1]: on a real pair all its weights may sit within
    a few hundredths of each other, and a fixed [0, 1] scale then paints every line one colour.
    The 2nd and 98th percentiles of the weights shown spread what was predicted; a degenerate
    spread (all weights equal) widens to a small interval around the value.
    """
    if not len(weights):
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(weights, [2, 98]))
    if high - low < 1e-6:
        low, high = float(weights.min()), float(weights.max())
    if high - low < 1e-6:
        low, high = low - 0.5e-3, high + 0.5e-3
    return low, high


def weight_colors(weights: np.ndarray, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """(M,) weights -> (M, 3) colours in [0, 1] along WEIGHT_RAMP, low red to high green."""
    u = np.clip((np.asarray(weights, dtype=np.float64) - low) / max(high - low, 1e-12), 0, 1)
    position = u * (len(WEIGHT_RAMP) - 1)
    stop = np.minimum(position.astype(np.int64), len(WEIGHT_RAMP) - 2)
    frac = (position - stop)[:, None]
    return (1 - frac) * WEIGHT_RAMP[stop] + frac * WEIGHT_RAMP[stop + 1]


def draw_weight_legend(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Draws the weight scale (a colour bar with its end values) into an RGB uint8 image."""
    height, width = image.shape[:2]
    bar_w, bar_h = max(width // 4, 60), max(height // 40, 8)
    x0, y0 = width - bar_w - 20, height - bar_h - 28
    colors = weight_colors(np.linspace(low, high, bar_w), low, high)
    image[y0:y0 + bar_h, x0:x0 + bar_w] = (255 * colors[None]).astype(np.uint8)
    cv2.rectangle(image, (x0 - 1, y0 - 1), (x0 + bar_w, y0 + bar_h), (60, 60, 60), 1)
    font, scale, ink = cv2.FONT_HERSHEY_SIMPLEX, 0.45, (30, 30, 30)
    cv2.putText(image, "correspondence weight", (x0, y0 - 6), font, scale, ink, 1, cv2.LINE_AA)
    cv2.putText(image, f"{low:.3g}", (x0, y0 + bar_h + 16), font, scale, ink, 1, cv2.LINE_AA)
    label = f"{high:.3g}"
    (text_w, _), _ = cv2.getTextSize(label, font, scale, 1)
    cv2.putText(image, label, (x0 + bar_w - text_w, y0 + bar_h + 16), font, scale, ink, 1, cv2.LINE_AA)
    return image


class DemoViewer:
    """Builds the geometry of each view and drives an Open3D VisualizerWithKeyCallback.

    Works with a window, and headless: Open3D falls back to EGL offscreen rendering when there
    is no display, so `render_all` uses exactly the views (and key handlers) a user sees.
    """

    def __init__(self, data: DemoData, width: int = 960, height: int = 720, visible: bool = True):
        import open3d as o3d

        self.data = data
        self.width, self.height = width, height
        self.show_whole_source = True
        self.view = "source"
        self.aligned_available = False
        obj = data.object_mask
        tinted = 0.35 * data.source_colors[obj] + 0.65 * SOURCE_TINT
        self.geometry = {
            "source_frame": _cloud(data.source_points, data.source_colors),
            "source_object": _cloud(data.source_points[obj], data.source_colors[obj]),
            "source_tinted": _cloud(data.source_points[obj], tinted),
            "target_frame": _cloud(data.target_points, data.target_colors),
            "warped_tinted": _cloud(data.warped_object, tinted),
        }
        if data.refined_object is not None:
            self.geometry["refined_tinted"] = _cloud(data.refined_object, tinted)
        # Correspondence views: the target frame moved sideways so the lines read as links
        # between the two frames rather than short strokes inside one.
        extent = np.ptp(data.source_points[obj], axis=0) if obj.any() else np.ones(3)
        self.offset = np.array([1.5 * max(extent[0], 0.2), 0.0, 0.0])
        # ... and cut to the region around the tracked object, whose background would else hide
        # the source object.
        low = data.warped_object.min(axis=0) - 0.1 if len(data.warped_object) else data.target_points.min(axis=0)
        high = data.warped_object.max(axis=0) + 0.1 if len(data.warped_object) else data.target_points.max(axis=0)
        near = np.all((data.target_points >= low) & (data.target_points <= high), axis=1)
        self.geometry["target_shifted"] = _cloud(data.target_points[near] + self.offset, data.target_colors[near])
        self.geometry["lines"] = _lines(data.match_source, data.match_target + self.offset,
                                        np.tile([[0.1, 0.3, 0.95]], (len(data.match_source), 1)))
        self.weight_range = weight_scale(data.match_weights)
        self.geometry["weighted_lines"] = _lines(data.match_source, data.match_target + self.offset,
                                                 weight_colors(data.match_weights, *self.weight_range))
        self.vis = o3d.visualization.VisualizerWithKeyCallback()
        self.vis.create_window("Neural non-rigid tracking", width, height, visible=visible)
        option = self.vis.get_render_option()
        option.point_size = 2.0
        option.background_color = np.array([1.0, 1.0, 1.0])
        option.line_width = 1.0
        self._register_keys()
        self.show("source")

    # ------------------------------------------------------------------------------------------

    def _view_geometry(self, view: str) -> List[str]:
        source = "source_frame" if self.show_whole_source else "source_object"
        return {
            "source": [source],
            "target": ["target_frame"],
            "both": ["target_frame", "source_tinted"],
            "correspondences": ["source_object", "target_shifted", "lines"],
            "weighted_correspondences": ["source_object", "target_shifted", "weighted_lines"],
            "aligned": ["target_frame", "warped_tinted"],
            "refined": ["target_frame", "refined_tinted"],
        }[view]

    def _camera(self, view: str) -> None:
        """A pinhole camera at the sensor's position (so nothing the sensor could not see is
        revealed), turned towards the object and zoomed so that it fills most of the window."""
        import open3d as o3d

        obj = self.data.source_points[self.data.object_mask]
        if not len(obj):
            obj = self.data.source_points
        if view in ("correspondences", "weighted_correspondences"):
            obj = np.concatenate((obj, obj + self.offset))
        centre = obj.mean(axis=0)
        forward = centre / np.linalg.norm(centre)
        right = np.cross(forward, [0.0, -1.0, 0.0])
        right /= np.linalg.norm(right)
        down = np.cross(forward, right)
        rotation = np.stack((right, down, forward))            # world -> camera
        local = obj @ rotation.T
        local = local[local[:, 2] > 1e-3]
        half_extent = max(np.abs(local[:, 0] / local[:, 2]).max(), np.abs(local[:, 1] / local[:, 2]).max()
                          * self.width / self.height, 1e-3)
        focal = 0.8 * (self.width / 2) / half_extent
        params = o3d.camera.PinholeCameraParameters()
        params.intrinsic = o3d.camera.PinholeCameraIntrinsic(self.width, self.height, focal, focal,
                                                             self.width / 2 - 0.5, self.height / 2 - 0.5)
        extrinsic = np.eye(4)
        extrinsic[:3, :3] = rotation
        params.extrinsic = extrinsic
        self.vis.get_view_control().convert_from_pinhole_camera_parameters(params, allow_arbitrary=True)

    def show(self, view: str, reset_camera: bool = True) -> bool:
        self.vis.clear_geometries()
        for name in self._view_geometry(view):
            self.vis.add_geometry(self.geometry[name], reset_bounding_box=True)
        self.view = view
        if reset_camera:
            self._camera(view)
        self.vis.poll_events()
        self.vis.update_renderer()
        return False

    def _register_keys(self) -> None:
        def toggle(view: str) -> Callable:
            def handler(_vis):
                return self.show("both" if self.view == view else view)
            return handler

        def toggle_source(_vis):
            self.show_whole_source = not self.show_whole_source
            return self.show(self.view, reset_camera=False)

        def align(_vis):
            if self.view != "both":
                print("A aligns the source object after B (target with the source object)")
                return False
            return self.show("aligned")

        def refined(_vis):
            if "refined_tinted" not in self.geometry:
                print("R needs --residual (the hash-grid residual deformer)")
                return False
            return self.show("refined")

        handlers = {"S": lambda _v: self.show("source"), "O": toggle_source,
                    "T": lambda _v: self.show("target"), "B": lambda _v: self.show("both"),
                    "C": toggle("correspondences"), "W": toggle("weighted_correspondences"),
                    "A": align, "R": refined, ",": lambda _v: self.rotate(), ";": lambda _v: self.fly(),
                    "Z": lambda _v: self.reset()}
        for key, handler in handlers.items():
            self.vis.register_key_callback(ord(key), handler)
        self.handlers = handlers

    def rotate(self, steps: int = 120) -> bool:
        """One full turn of the camera around the scene."""
        control = self.vis.get_view_control()
        # ViewControl.rotate takes pixels of mouse drag, at 0.003 rad per pixel: 2094.4 px is
        # one full turn.
        step = 2 * math.pi / 0.003 / steps
        for _ in range(steps):
            control.rotate(step, 0.0)
            self.vis.poll_events()
            self.vis.update_renderer()
        return False

    def fly(self, steps: int = 90) -> bool:
        """Swings the camera to one side and back while the correspondences are shown."""
        self.show("weighted_correspondences" if self.view == "weighted_correspondences" else "correspondences")
        control = self.vis.get_view_control()
        for i in range(steps):
            control.rotate(8.0 * math.sin(2 * math.pi * i / steps), 2.0 * math.cos(2 * math.pi * i / steps))
            self.vis.poll_events()
            self.vis.update_renderer()
        return False

    def reset(self) -> bool:
        self.show_whole_source = True
        return self.show("source")

    def press(self, key: str) -> None:
        """Acts as if `key` were pressed (tests and headless rendering use it)."""
        self.handlers[key](self.vis)

    def capture(self, path: str) -> None:
        image = (255 * np.asarray(self.vis.capture_screen_float_buffer(do_render=True))).astype(np.uint8)
        if self.view == "weighted_correspondences":
            image = draw_weight_legend(np.ascontiguousarray(image), *self.weight_range)
        ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError(f"{path}: PNG encoding failed")
        with atomic_open(path, "wb") as handle:
            handle.write(encoded.tobytes())

    def render_all(self, out_dir: str) -> Dict[str, str]:
        """Renders every view to out_dir as the keys would show it; returns view -> path."""
        os.makedirs(out_dir, exist_ok=True)
        written = {}
        sequence = [("source", ["S"]), ("target", ["T"]), ("both", ["B"]),
                    ("correspondences", ["C"]), ("weighted_correspondences", ["W"]),
                    ("aligned", ["B", "A"])]
        if "refined_tinted" in self.geometry:
            sequence.append(("refined", ["R"]))
        for view, keys in sequence:
            for key in keys:
                self.press(key)
            path = os.path.join(out_dir, VIEW_FILES[view])
            self.capture(path)
            written[view] = path
        return written

    def run(self) -> None:
        print("Keys:\n" + KEYS_HELP)
        print("W colours the weights from {:.3g} (red) to {:.3g} (green)".format(*self.weight_range))
        self.vis.run()
        self.vis.destroy_window()

    def close(self) -> None:
        self.vis.destroy_window()


def has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def demo_data(batch: Dict, out: Dict, max_lines: int = 400, refined=None, seed: int = 0) -> DemoData:
    """DemoData of sample 0 of a tracked batch (tracker outputs `out`)."""

    def np_(t):
        return t.detach().cpu().numpy() if torch.is_tensor(t) else t

    source = np_(batch["source_points"][0]).transpose(1, 2, 0)
    target = np_(batch["target_points"][0]).transpose(1, 2, 0)
    source_rgb = np_(batch["source_color"][0]).transpose(1, 2, 0)
    target_rgb = np_(batch["target_color"][0]).transpose(1, 2, 0)
    source_valid = source[..., 2] > 0
    target_valid = target[..., 2] > 0
    warp_mask = np_(out["warp_mask"][0])
    matches = out["matches"]
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.permutation(matches.sample.numel())[:max_lines])
    match_source = np_(matches.source_points)[keep]
    target_at = bilinear_sample(batch["target_points"][:1], matches.target_pixels[keep][None, None])
    match_target = np_(target_at[0, :, 0]).T
    object_mask = warp_mask[source_valid]
    warped = np_(out["warped_points"][0])[warp_mask]
    return DemoData(
        source_points=source[source_valid], source_colors=source_rgb[source_valid],
        object_mask=object_mask, target_points=target[target_valid],
        target_colors=target_rgb[target_valid], warped_object=warped,
        match_source=match_source, match_target=match_target,
        match_weights=np_(matches.weights)[keep],
        refined_object=None if refined is None else np_(refined))


# The files of a pair given on the command line (example_viz.py --source-color ...); mask optional.
PAIR_FILES = ("source_color", "source_depth", "target_color", "target_depth", "intrinsics", "mask")


def load_pair(dataset_dir: str, split: str, index: int, own: Dict[str, Optional[str]],
              graph_options: GraphOptions) -> Dict:
    """A collated one-pair batch: pair `index` of the split, or the files in `own` (PAIR_FILES
    keys) when any is given, with the deformation graph built on the fly."""
    if any(own.get(key) for key in PAIR_FILES[:5]):
        if not all(own.get(key) for key in PAIR_FILES[:5]):
            raise ValueError("your own pair needs --source-color, --source-depth, --target-color, "
                             "--target-depth and --intrinsics")
        item = read_pair_files(*(own[key] for key in PAIR_FILES[:5]), own.get("mask"), graph_options)
        print(f"graph built on the fly: {item['num_nodes']} nodes")
        return collate([item])
    dataset = DeepDeformDataset(dataset_dir, split)
    if not 0 <= index < len(dataset):
        raise ValueError(f"--index {index}: split '{split}' of {dataset_dir} has {len(dataset)} pair(s)")
    return collate([dataset[index]])


def track_pair(tracker, batch: Dict) -> Dict:
    """The tracker's outputs on a one-pair batch (ValueError when --flow gt lacks ground truth, or
    when the solve failed)."""
    if tracker.options.flow == "gt" and "optical_flow" not in batch:
        raise ValueError("--flow gt needs the pair's ground-truth optical flow")
    with torch.inference_mode():
        out = tracker.eval()(batch)
    if not bool(out["solver"].valid[0]):
        # Views of a failed solve would show a motion that was never found.
        raise ValueError(f"{batch['name'][0]}: the solve failed ({out['solver'].messages[0]}); nothing to show")
    return out


def report_and_show(batch: Dict, out: Dict, tracker, residual: Optional[ResidualOptions],
                    headless_wanted: bool, out_dir: str) -> None:
    """Prints the solve (and, with ground truth, EPE 3D and Graph Error 3D), fits the residual
    deformer when `residual` is given, then opens the viewer, or renders the views to `out_dir`
    without a display (or when `headless_wanted`)."""
    result = out["solver"]
    print(f"{batch['name'][0]}: {out['matches'].sample.numel()} correspondences, solve "
          f"{result.status[0]}{' (' + result.messages[0] + ')' if result.messages[0] else ''}, energy "
          + " -> ".join(f"{e:.4g}" for e in result.energies[0]))
    refined = refined_flow = None
    if residual is not None:
        fit = fit_residual(batch, out, residual, progress=True, max_depth=tracker.solver_options.max_depth)
        stats = fit["stats"][0]
        print(f"residual deformer: {stats['iterations']} iterations in {stats['seconds']:.2f} s, mean "
              f"residual {stats['mean_residual_mm']:.2f} mm over {stats['points']} points")
        # DemoData.refined_object: the warp_mask pixels in row-major order, like warped_object.
        refined = fit["warped_points"][0][out["warp_mask"][0]]
        refined_flow = fit["scene_flow"]
    if "scene_flow" in batch:
        n = int(batch["num_nodes"][0])

        def errors_of(scene_flow):
            return pair_errors(batch["name"][0], out["translations"][0, :n].cpu().numpy(),
                               batch["node_deformations"][0, :n].cpu().numpy(), np.nan_to_num(scene_flow[0].cpu().numpy()),
                               batch["scene_flow"][0].cpu().numpy(), batch["source_points"][0, 2].cpu().numpy(),
                               batch["pixel_anchors"][0].cpu().numpy())

        errors = errors_of(out["scene_flow"])
        refined_epe = "" if refined_flow is None else \
            f", refined by the residual deformer {errors_of(refined_flow).epe_mm:.2f} mm"
        print(f"EPE 3D: {errors.epe_mm:.2f} mm{refined_epe}; Graph Error 3D: {errors.graph_error_mm:.2f} mm "
              f"(against the pair's ground truth)")
    headless = headless_wanted or not has_display()
    viewer = DemoViewer(demo_data(batch, out, refined=refined), visible=not headless)
    if headless:
        written = viewer.render_all(out_dir)
        viewer.close()
        print(f"no display{'' if not headless_wanted else ' wanted'}: rendered {len(written)} views to "
              f"{os.path.abspath(out_dir)}/ (" + ", ".join(os.path.basename(p) for p in written.values()) + ")")
    else:
        viewer.run()
