"""Scoring a reconstruction of a synthetic sequence against its exact ground truth.

    python evaluate.py --sequence DIR --reconstruction OUT

reads DIR/gt/gt.npz (faces, vertices (T, V, 3), visible (T, V)) and OUT/frames/NNNNNN.ply for
every frame t (the reconstruction's triangle mesh in frame t, one topology for all frames), or
for the frames of --frames START:END[:STEP] (by default those a fuse.py run recorded in
OUT/fusion_options.json; "frame 0" below is then the first of them), and measures, in
millimetres unless said:

deformation error  every true vertex visible in frame 0 is matched to the nearest reconstructed
                   vertex of frame 0, if within 1 cm; in frame t, the distance between that
                   reconstructed vertex and the true vertex's position; mean over the matches,
                   then over frames (and the last frame's alone); per frame also split into
                   the matches visible in frame t (seen) and those hidden there (turned away or
                   occluded: their motion is only inferred)
drift              slope of the least-squares line through the per-frame deformation error,
                   mm per (input) frame
accuracy           mean distance from every reconstructed vertex to the true surface of frame t
                   (point to triangle, the whole surface, seen or not)
completeness       share of the true vertices visible in frame t within 1 cm of a reconstructed
                   vertex
Chamfer            mean of accuracy and the mean distance from those visible true vertices to
                   the nearest reconstructed vertex

Per-frame figures go to OUT/evaluation_sequence.csv, a plot of them against the frame index to
OUT/evaluation_sequence.png. Nearest neighbours come from Open3D's nearest-neighbour search and
point-to-triangle distances from its RaycastingScene (both exact, no approximation).
"""
import csv
import io as text_io
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import open3d as o3d

from dataset import io
from dataset.fileio import atomic_write_bytes
from dataset.synthetic.geometry import raycasting_scene
from dataset.synthetic_sequence import frame_name, read_ground_truth
from fusion.sequence import SequenceError, parse_frames

MATCH_DISTANCE = 0.01   # metres: "within 1 cm"
CSV_NAME, PLOT_NAME = "evaluation_sequence.csv", "evaluation_sequence.png"
CSV_COLUMNS = ("frame", "deformation_error_mm", "accuracy_mm", "completeness", "chamfer_mm",
               "visible_vertices", "matched_vertices", "deformation_error_seen_mm",
               "deformation_error_hidden_mm", "hidden_matched_vertices")
RUN_RECORD = "fusion_options.json"    # fuse.py's record of its options (its --frames)


class SequenceEvaluationError(ValueError):
    """The reconstruction cannot be scored (missing frame, another topology, non-finite vertex)."""


@dataclass
class SequenceScores:
    per_frame: Dict[str, np.ndarray]   # CSV_COLUMNS[1:] -> (T,) values
    deformation_error: float           # metres, mean over frames
    deformation_error_last: float      # metres
    drift: float                       # metres per frame
    accuracy: float                    # metres
    completeness: float                # share
    chamfer: float                     # metres
    matched: int                       # true vertices matched in frame 0
    frame_ids: np.ndarray              # (T,) the scored frames' numbers


def frame_mesh_path(reconstruction: str, index: int, frames_dir: str = "frames") -> str:
    return os.path.join(reconstruction, frames_dir, frame_name(index) + ".ply")


def output_names(frames_dir: str = "frames") -> Tuple[str, str]:
    """The CSV and plot names for the meshes of OUT/frames_dir (the refined meshes of
    OUT/frames_refined get their own, beside the graph-only ones)."""
    if frames_dir == "frames":
        return CSV_NAME, PLOT_NAME
    tag = frames_dir.strip("/").replace("/", "_")
    return f"evaluation_sequence_{tag}.csv", f"evaluation_sequence_{tag}.png"


def scored_frames(reconstruction: str, frames: int, spec: Optional[str] = None) -> List[int]:
    """The frame numbers to score of a sequence of `frames` frames: `spec` (START:END[:STEP], as
    fuse.py's --frames), else the --frames a fuse.py run recorded in OUT/fusion_options.json,
    else every frame. SequenceEvaluationError on a bad spec or an unreadable record."""
    if spec is None:
        path = os.path.join(reconstruction, RUN_RECORD)
        if os.path.isfile(path):
            try:
                with open(path) as handle:
                    spec = (json.load(handle).get("fusion") or {}).get("frames")
            except (OSError, ValueError, AttributeError) as error:
                raise SequenceEvaluationError(f"{path}: unreadable ({error})") from None
    try:
        return parse_frames(spec, list(range(frames)), "the sequence")
    except SequenceError as error:
        raise SequenceEvaluationError(str(error)) from None


def read_reconstruction(reconstruction: str, frame_ids: Sequence[int], frames_dir: str = "frames"
                        ) -> Tuple[np.ndarray, np.ndarray]:
    """(vertices (T, M, 3) float64, faces (F, 3)) of OUT/frames_dir/NNNNNN.ply for the frames
    `frame_ids`; SequenceEvaluationError naming the file on a missing frame, another topology
    than the first frame's or a non-finite vertex."""
    vertices, faces = [], None
    for index in frame_ids:
        path = frame_mesh_path(reconstruction, index, frames_dir)
        if not os.path.isfile(path):
            raise SequenceEvaluationError(f"{path}: reconstruction of frame {index} not found (each scored frame "
                                          f"needs OUT/{frames_dir}/NNNNNN.ply)")
        try:
            points, triangles = io.read_ply(path)
        except io.FormatError as error:
            raise SequenceEvaluationError(str(error)) from error
        if faces is None:
            faces = triangles
            if points.shape[0] == 0:
                raise SequenceEvaluationError(f"{path}: the reconstruction has no vertices")
        elif points.shape[0] != vertices[0].shape[0] or not np.array_equal(triangles, faces):
            raise SequenceEvaluationError(
                f"{path}: another topology than frame {frame_ids[0]}'s ({points.shape[0]} vertices, "
                f"{triangles.shape[0]} faces; frame {frame_ids[0]} has {vertices[0].shape[0]} vertices, "
                f"{faces.shape[0]} faces, and the faces must be the same)")
        bad = ~np.isfinite(points).all(axis=1)
        if bad.any():
            raise SequenceEvaluationError(f"{path}: {int(bad.sum())} non-finite vertices (the first is vertex "
                                          f"{int(np.flatnonzero(bad)[0])})")
        vertices.append(points.astype(np.float64))
    return np.stack(vertices), faces


def nearest(points: np.ndarray, queries: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """For each of the (Q, 3) queries, the distance to the nearest of the (N, 3) points and its
    index: ((Q,) float64, (Q,) int64). Exact (Open3D's nearest-neighbour search, in float64)."""
    if queries.shape[0] == 0:
        return np.zeros(0), np.zeros(0, np.int64)
    search = o3d.core.nns.NearestNeighborSearch(o3d.core.Tensor(np.ascontiguousarray(points, np.float64)))
    search.knn_index()
    index, squared = search.knn_search(o3d.core.Tensor(np.ascontiguousarray(queries, np.float64)), 1)
    return np.sqrt(np.maximum(squared.numpy()[:, 0], 0.0)), index.numpy()[:, 0].astype(np.int64)


def surface_distance(vertices: np.ndarray, faces: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """(Q,) distance from each (Q, 3) query to the triangle mesh (vertices, faces): to its
    nearest point on any triangle."""
    scene = raycasting_scene(vertices, faces)
    # The distance is computed in float32 about the nearest surface point: exact to ~1e-7 m at
    # a metre, far below the millimetres reported.
    closest = scene.compute_closest_points(o3d.core.Tensor(np.ascontiguousarray(queries, np.float32)))
    return np.linalg.norm(closest["points"].numpy().astype(np.float64) - queries, axis=1)


def score(faces: np.ndarray, truth: np.ndarray, visible: np.ndarray, reconstruction: np.ndarray,
          frame_ids: Optional[Sequence[int]] = None) -> SequenceScores:
    """The scores of `reconstruction` (T, M, 3) against `truth` (T, V, 3) with `faces` (F, 3) and
    `visible` (T, V), all in metres (module docstring); `frame_ids` (T,) the frames' numbers
    (default 0..T-1; the drift is per unit of them)."""
    frames = truth.shape[0]
    frame_ids = np.arange(frames) if frame_ids is None else np.asarray(frame_ids)
    if frame_ids.shape != (frames,) or reconstruction.shape[0] != frames:
        raise ValueError(f"expected {frames} frames of reconstruction and frame numbers, found "
                         f"{reconstruction.shape[0]} and {frame_ids.shape}")
    seen = np.flatnonzero(visible[0])
    distance, match = nearest(reconstruction[0], truth[0, seen])
    keep = distance <= MATCH_DISTANCE
    true_ids, recon_ids = seen[keep], match[keep]
    columns = {name: np.full(frames, np.nan) for name in CSV_COLUMNS[1:]}
    for t in range(frames):
        now = visible[t, true_ids]
        columns["hidden_matched_vertices"][t] = int((~now).sum())
        if true_ids.size:
            error = np.linalg.norm(reconstruction[t, recon_ids] - truth[t, true_ids], axis=1) * 1000
            columns["deformation_error_mm"][t] = error.mean()
            columns["deformation_error_seen_mm"][t] = error[now].mean() if now.any() else np.nan
            columns["deformation_error_hidden_mm"][t] = error[~now].mean() if (~now).any() else np.nan
        accuracy = surface_distance(truth[t], faces, reconstruction[t]).mean()
        columns["accuracy_mm"][t] = accuracy * 1000
        targets = truth[t, visible[t]]
        to_reconstruction, _ = nearest(reconstruction[t], targets)
        if targets.shape[0]:
            columns["completeness"][t] = np.mean(to_reconstruction <= MATCH_DISTANCE)
            columns["chamfer_mm"][t] = 0.5 * (accuracy + to_reconstruction.mean()) * 1000
        columns["visible_vertices"][t] = targets.shape[0]
        columns["matched_vertices"][t] = true_ids.size
    error = columns["deformation_error_mm"]
    drift = np.nan
    if frames >= 2 and np.isfinite(error).all():
        drift = float(np.polyfit(frame_ids.astype(np.float64), error, 1)[0])

    def mean(values):
        finite = values[np.isfinite(values)]
        return float(finite.mean()) if finite.size else float("nan")
    return SequenceScores(columns, mean(error) / 1000, float(error[-1]) / 1000, drift / 1000,
                          mean(columns["accuracy_mm"]) / 1000, mean(columns["completeness"]),
                          mean(columns["chamfer_mm"]) / 1000, int(true_ids.size), frame_ids)


def evaluate_sequence(sequence: str, reconstruction: str, frames_dir: str = "frames",
                      frames: Optional[str] = None) -> SequenceScores:
    """Scores OUT/frames_dir against the sequence's ground truth on the frames `scored_frames`
    picks (`frames`: START:END[:STEP])."""
    faces, truth, visible = read_ground_truth(sequence)
    frame_ids = scored_frames(reconstruction, truth.shape[0], frames)
    recon, _ = read_reconstruction(reconstruction, frame_ids, frames_dir)
    return score(faces, truth[frame_ids].astype(np.float64), visible[frame_ids], recon, frame_ids)


def summary_lines(scores: SequenceScores) -> List[str]:
    """The lines evaluate.py ends its output with."""
    return [f"Deformation error (mm): {scores.deformation_error * 1000:.3f}",
            f"Deformation error, last frame (mm): {scores.deformation_error_last * 1000:.3f}",
            f"Deformation error, last frame, seen / hidden there (mm): "
            f"{scores.per_frame['deformation_error_seen_mm'][-1]:.3f} / "
            f"{scores.per_frame['deformation_error_hidden_mm'][-1]:.3f}",
            f"Drift (mm/frame): {scores.drift * 1000:.4f}",
            f"Accuracy (mm): {scores.accuracy * 1000:.3f}",
            f"Completeness: {scores.completeness:.4f}",
            f"Chamfer (mm): {scores.chamfer * 1000:.3f}"]


def write_csv(path: str, scores: SequenceScores) -> None:
    out = text_io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    frames = len(scores.per_frame["accuracy_mm"])
    for t in range(frames):
        row = [int(scores.frame_ids[t])]
        for name in CSV_COLUMNS[1:]:
            value = scores.per_frame[name][t]
            row.append(int(value) if name.endswith("vertices") else f"{value:.6g}")
        writer.writerow(row)
    atomic_write_bytes(path, out.getvalue().encode())


_PLOT_SERIES = (("deformation_error_mm", "deformation", (200, 60, 30)),
                ("deformation_error_seen_mm", "seen", (235, 160, 60)),
                ("deformation_error_hidden_mm", "hidden", (150, 150, 150)),
                ("accuracy_mm", "accuracy", (40, 120, 220)),
                ("chamfer_mm", "Chamfer", (40, 160, 60)))


def plot(scores: SequenceScores, title: str = "") -> np.ndarray:
    """(H, W, 3) uint8 RGB: the errors in mm against the frame index (top) and completeness
    (bottom)."""
    width, height, left, right = 900, 620, 70, 20
    image = np.full((height, width, 3), 255, np.uint8)
    frames = len(scores.per_frame["accuracy_mm"])
    panels = ((40, 360, [s for s in _PLOT_SERIES], "mm"),
              (420, 580, [("completeness", "completeness", (120, 60, 160))], "share"))
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(image, title[:100], (left, 25), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    for top, bottom, series, unit in panels:
        values = np.concatenate([scores.per_frame[key] for key, _, _ in series])
        values = values[np.isfinite(values)]
        high = 1.0 if unit == "share" else max(float(values.max()) if values.size else 0.0, 1e-3) * 1.1
        cv2.rectangle(image, (left, top), (width - right, bottom), (0, 0, 0), 1)

        def to_pixel(t, v):
            x = left + (t / max(frames - 1, 1)) * (width - right - left)
            return int(round(x)), int(round(bottom - (v / high) * (bottom - top)))
        for k in range(5):
            value = high * k / 4
            _, y = to_pixel(0, value)
            cv2.line(image, (left - 4, y), (left, y), (0, 0, 0), 1)
            cv2.putText(image, f"{value:.3g}", (2, y + 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        for k in range(min(frames, 10)):
            t = round(k * (frames - 1) / max(min(frames, 10) - 1, 1))
            x, _ = to_pixel(t, 0)
            cv2.line(image, (x, bottom), (x, bottom + 4), (0, 0, 0), 1)
            cv2.putText(image, str(int(scores.frame_ids[t])), (x - 6, bottom + 16), font, 0.4, (0, 0, 0), 1,
                        cv2.LINE_AA)
        for n, (key, label, colour) in enumerate(series):
            values = scores.per_frame[key]
            points = [to_pixel(t, v) for t, v in enumerate(values) if np.isfinite(v)]
            for a, b in zip(points[:-1], points[1:]):
                cv2.line(image, a, b, colour, 2, cv2.LINE_AA)
            for p in points if len(points) == 1 else ():
                cv2.circle(image, p, 3, colour, -1)
            cv2.putText(image, f"{label} ({unit})", (left + 10 + 160 * n, top + 18), font, 0.5, colour, 1,
                        cv2.LINE_AA)
    cv2.putText(image, "frame", (width // 2, height - 8), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return image


def write_plot(path: str, scores: SequenceScores, title: str = "") -> None:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(plot(scores, title), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"{path}: PNG encoding failed")
    atomic_write_bytes(path, encoded.tobytes())


def write_sequence_evaluation(scores: SequenceScores, sequence: str, reconstruction: str,
                              header: Optional[str] = None, frames_dir: str = "frames") -> str:
    """Writes the CSV and the plot into the reconstruction folder and returns the text to print."""
    csv_name, plot_name = output_names(frames_dir)
    write_csv(os.path.join(reconstruction, csv_name), scores)
    write_plot(os.path.join(reconstruction, plot_name), scores,
               f"{sequence} <- {os.path.join(reconstruction, frames_dir)}")
    ids = scores.frame_ids
    frames = f"{len(ids)} frames" + (f" ({ids[0]}..{ids[-1]} every {ids[1] - ids[0]})" if len(ids) > 1 and (
        ids[0] != 0 or ids[1] - ids[0] != 1) else "")
    lines = [header or f"Sequence {sequence}: {frames}, {scores.matched} true vertices visible in frame {ids[0]} "
                       f"matched within {MATCH_DISTANCE * 100:g} cm",
             f"Per-frame figures: {os.path.join(reconstruction, csv_name)}, plot: "
             f"{os.path.join(reconstruction, plot_name)}"]
    if scores.matched == 0:
        lines.append("No true vertex visible in frame 0 has a reconstructed vertex within 1 cm: the "
                     "deformation error and drift are undefined (nan)")
    return "\n".join(lines + summary_lines(scores)) + "\n"
