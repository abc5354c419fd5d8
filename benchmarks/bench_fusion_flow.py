"""How well the fusion loop's flow measures the motion left between the rendered model and the
live frame, against a synthetic sequence's ground truth (the diagnostic behind BENCHMARKS.md's
"Non-rigid fusion of sequences": why `--flow dis` drifts on the blobs).

    python benchmarks/bench_fusion_flow.py --sequence DIR [--frames 16] [--threads 1] [--lk-windows 15,21,31]
        [--dis-normalize 5] [--dis-passes 2]

DIR is a synthetic sequence (python -m dataset.synthetic_sequence) with its gt/. The loop
(fusion.loop.Fusion, fuse.py's defaults, `--flow dis`) runs over the first --frames frames; for
every tracked frame the front-end's flow from the rendered model to the live frame is compared
with the true flow of the same rendered pixels (where each pixel's canonical point truly is in
that frame: fusion.gt.GroundTruth.flow). Printed per frame, medians over the matched pixels:
  |g|       the true flow (the motion the frame has to recover, the model's lag included);
  flow      the flow's error along the true flow (negative: short), by distance to the rendered
            silhouette (within 5 px, 5-10 px, beyond 10 px), and its error norm;
  lk W      the same for the flow refined by pyramidal Lucas-Kanade (OpenCV, window W, the flow
            as initial guess, grey images) at every matched pixel: does an iterative sub-pixel
            search recover what the flow leaves?
  applied   the error along the true flow of the motion the solve applied (the canonical point
            of each pixel warped by the solved node motions, projected);
  3D        median and mean distance (mm) between the solved and the true position of the
            rendered canonical points.
The last line averages each column over the frames.
"""
import argparse
import sys
from typing import Dict, List

import cv2
import numpy as np
import torch

from fusion.graph import warp_with_anchors
from fusion.gt import GroundTruth
from fusion.loop import Fusion
from fusion.sequence import Sequence
from model import image_proc
from model.tracker import Tracker
from options import FusionOptions, SolverOptions, TrackerOptions
from utils.fusion_run import SOLVER_DEFAULTS, TRACKER_DEFAULTS

BANDS = ((0, 5), (5, 10), (10, 10 ** 6))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequence", required=True, help="synthetic sequence folder with gt/")
    parser.add_argument("--frames", type=int, default=16, help="frames of the loop (the first included)")
    parser.add_argument("--lk-windows", default="15,21,31",
                        help="Lucas-Kanade window sizes to compare, comma-separated (empty: none)")
    parser.add_argument("--refine-border", type=int, default=FusionOptions.refine_border,
                        help="fuse.py's --refine-border for the loop (the flow columns then show the refined flow)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--dis-normalize", type=float, default=TRACKER_DEFAULTS["dis_normalize"],
                        help="fuse.py's --dis-normalize (0: plain grey)")
    parser.add_argument("--dis-passes", type=int, default=TRACKER_DEFAULTS["dis_passes"],
                        help="fuse.py's --dis-passes (1: one DIS run)")
    return parser.parse_args()


def along_errors(flow: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per pixel error of (2, H, W) `flow` along (2, H, W) `truth`: (flow - truth) . truth / |truth|."""
    norm = np.linalg.norm(truth, axis=0)
    return ((flow - truth) * truth).sum(axis=0) / np.maximum(norm, 1e-9)


def band_medians(flow: np.ndarray, truth: np.ndarray, pixels: np.ndarray, silhouette: np.ndarray) -> List[float]:
    """Median error along the truth in each of BANDS of distance to the silhouette, then the median
    error norm, over `pixels` (H, W) bool where both flows are finite."""
    ok = pixels & np.isfinite(flow).all(axis=0) & np.isfinite(truth).all(axis=0)
    along = along_errors(flow, truth)
    out = []
    for low, high in BANDS:
        band = ok & (silhouette >= low) & (silhouette < high)
        out.append(float(np.median(along[band])) if band.any() else float("nan"))
    out.append(float(np.median(np.linalg.norm(flow - truth, axis=0)[ok])) if ok.any() else float("nan"))
    return out


def lucas_kanade(source_rgb: np.ndarray, target_rgb: np.ndarray, flow: np.ndarray, pixels: np.ndarray,
                 window: int) -> np.ndarray:
    """(2, H, W) flow refined at `pixels` by OpenCV's pyramidal Lucas-Kanade (one level, `flow` as
    the initial guess, up to 30 iterations to 1e-3 px); NaN where it fails or moves over 2 px."""
    ys, xs = np.nonzero(pixels & np.isfinite(flow).all(axis=0))
    start = np.stack((xs, ys), axis=1).astype(np.float32)
    guess = start + flow[:, ys, xs].T
    source = cv2.cvtColor(source_rgb, cv2.COLOR_RGB2GRAY)
    target = cv2.cvtColor(target_rgb, cv2.COLOR_RGB2GRAY)
    found, status, _ = cv2.calcOpticalFlowPyrLK(
        source, target, start.reshape(-1, 1, 2), guess.reshape(-1, 1, 2).copy(), winSize=(window, window),
        maxLevel=0, criteria=(cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 30, 1e-3),
        flags=cv2.OPTFLOW_USE_INITIAL_FLOW)
    moved = found.reshape(-1, 2) - start
    good = (status.reshape(-1) == 1) & (np.linalg.norm(moved - flow[:, ys, xs].T, axis=1) <= 2.0)
    refined = np.full_like(flow, np.nan)
    refined[:, ys[good], xs[good]] = moved[good].T
    return refined


class _Probe:
    """Wraps the tracker: keeps the batch's images and the front-end's flow of the last call."""

    def __init__(self, tracker: Tracker):
        self.tracker, self.options, self.last = tracker, tracker.options, {}

    def __call__(self, batch, run_solver=False):
        out = self.tracker(batch, run_solver=run_solver)
        self.last = {"source": image_proc.to_u8(batch["source_color"][0]), "target": image_proc.to_u8(batch["target_color"][0]),
                     "flow": out["flow"][0].cpu().numpy(), "matched": out["match_mask"][0].cpu().numpy()}
        return out


class _Diagnosed(Fusion):
    """Fusion whose every tracking pass is scored against the ground truth (rows appended)."""

    def __init__(self, *args, windows=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.windows, self.rows = windows, []

    def _refine_border(self, batch, out, rendered):
        """With --refine-border: the flow columns show the refined flow the matches carry."""
        matches = super()._refine_border(batch, out, rendered)
        H, W = rendered.shape
        pixel = matches.pixel.numpy()
        ys, xs = pixel // W, pixel % W
        flow = np.full((2, H, W), np.nan, np.float32)
        flow[:, ys, xs] = (matches.target_pixels.numpy() - np.stack((xs, ys), axis=1)).T
        self.tracker.last.update(flow=flow, matched=matches.valid_mask[0].cpu().numpy())
        return matches

    def _track(self, frame, rendering, timings, rotations, translations, later=False):
        result = super()._track(frame, rendering, timings, rotations, translations, later)
        last = self.tracker.last
        truth = self.gt.flow(rendering.canonical, rendering.mask, frame.frame_id, self.intrinsics, frame.depth)
        silhouette = cv2.distanceTransform(rendering.mask.astype(np.uint8), cv2.DIST_L2, 5)
        pixels = last["matched"] & np.isfinite(truth).all(axis=0)
        row: Dict[str, object] = {"frame": frame.frame_id,
                                  "|g|": float(np.median(np.linalg.norm(truth[:, pixels], axis=0))),
                                  "flow": band_medians(last["flow"], truth, pixels, silhouette)}
        for window in self.windows:
            refined = lucas_kanade(last["source"], last["target"], last["flow"], pixels, window)
            row[f"lk {window}"] = band_medians(refined, truth, pixels, silhouette)
        ys, xs = np.nonzero(rendering.mask)
        canonical = torch.from_numpy(rendering.canonical[ys, xs])
        anchors, weights = self.graph.anchors(canonical)
        solved = warp_with_anchors(canonical, anchors, weights, self.graph.positions, result[0], result[1]).numpy()
        i = self.intrinsics
        applied = np.full_like(truth, np.nan)
        applied[0, ys, xs] = i["fx"] * solved[:, 0] / solved[:, 2] + i["cx"] - xs
        applied[1, ys, xs] = i["fy"] * solved[:, 1] / solved[:, 2] + i["cy"] - ys
        row["applied"] = band_medians(applied, truth, pixels, silhouette)
        error = np.linalg.norm(solved - self.gt.move(canonical, frame.frame_id).numpy(), axis=1) * 1000
        row["3D"] = [float(np.median(error)), float(error.mean())]
        self.rows.append(row)
        return result


def _format(row: Dict[str, object]) -> str:
    parts = [f"{row['frame']!s:>5}", f"|g| {row['|g|']:.2f}"]
    for key, value in row.items():
        if key in ("flow", "applied") or key.startswith("lk"):
            parts.append(f"{key} " + "/".join(f"{v:+.2f}" for v in value[:3]) + f" e{value[3]:.2f}")
    parts.append(f"3D {row['3D'][0]:.2f}/{row['3D'][1]:.2f} mm")
    return " | ".join(parts)


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    sequence = Sequence(args.sequence, f"0:{args.frames}")
    mask, _ = sequence.first_mask(None, None)
    solver_options = SolverOptions(**SOLVER_DEFAULTS)
    windows = tuple(int(w) for w in args.lk_windows.split(",") if w.strip())
    fusion = _Diagnosed(sequence, FusionOptions(sequence=args.sequence, refine_border=args.refine_border), solver_options,
                        _Probe(Tracker(TrackerOptions(flow="dis", dis_normalize=args.dis_normalize,
                                                     dis_passes=args.dis_passes), solver_options)),
                        GroundTruth(sequence.root, sequence.frame_ids[0]), windows=windows)
    print("columns: along-error medians within 5 / 5-10 / beyond 10 px of the silhouette (px), "
          "e = median error norm (px)")
    for index in range(len(sequence.frame_ids)):
        frame = sequence.read(index)
        if index == 0:
            fusion.first_frame(frame, mask)
            continue
        fusion.step(frame)
        print(_format(fusion.rows[-1]), flush=True)
    mean = {"frame": "mean", "|g|": float(np.mean([r["|g|"] for r in fusion.rows]))}
    for key in fusion.rows[0]:
        if key not in mean:
            mean[key] = list(np.nanmean(np.array([r[key] for r in fusion.rows], dtype=float), axis=0))
    print(_format(mean))
    return 0


if __name__ == "__main__":
    sys.exit(main())
