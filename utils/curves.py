"""Training curves as PNGs: a scalar of an experiment's TensorBoard log against steps.

    python -m utils.curves experiments/hybrid_4_hybrid --out docs/curve_4_hybrid.png
           [--tag val/epe_3d_mm] [--start 9.23] [--baseline 12.49 --baseline-label "--flow dis"]

Reads WORKSPACE/EXPERIMENT/tensorboard (every events file: a resumed run appends a new one; the
later value of a step wins) and draws the curve with OpenCV (no plotting library needed), with an
optional horizontal reference line. Writes atomically.
"""
import argparse
import glob
import os
import sys
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from dataset.fileio import atomic_open


def read_scalars(experiment: str, tag: str) -> List[Tuple[int, float]]:
    """(step, value) of `tag` in EXPERIMENT/tensorboard, sorted by step (ValueError if none)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = os.path.join(experiment, "tensorboard")
    files = sorted(glob.glob(os.path.join(folder, "events.*")), key=os.path.getmtime)
    if not files:
        raise ValueError(f"{folder}: no TensorBoard events file (expected events.out.tfevents.*)")
    values: Dict[int, float] = {}
    for path in files:
        accumulator = EventAccumulator(path, size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            for event in accumulator.Scalars(tag):
                values[int(event.step)] = float(event.value)
    if not values:
        raise ValueError(f"{folder}: no scalar {tag!r} in {len(files)} events file(s)")
    return sorted(values.items())


def draw_curve(points: List[Tuple[int, float]], title: str, ylabel: str,
               baseline: Optional[float] = None, baseline_label: str = "",
               size: Tuple[int, int] = (720, 420)) -> np.ndarray:
    """(H, W, 3) uint8 BGR plot of the points (step, value), with axes, ticks and labels."""
    width, height = size
    left, right, top, bottom = 70, 20, 40, 50
    image = np.full((height, width, 3), 255, np.uint8)
    steps = np.array([p[0] for p in points], np.float64)
    values = np.array([p[1] for p in points], np.float64)
    finite = np.isfinite(values)
    low = [values[finite].min()] if finite.any() else [0.0]
    high = [values[finite].max()] if finite.any() else [1.0]
    if baseline is not None:
        low.append(baseline)
        high.append(baseline)
    y0, y1 = min(low), max(high)
    pad = 0.08 * (y1 - y0) if y1 > y0 else 1.0
    y0, y1 = y0 - pad, y1 + pad
    x0, x1 = float(steps.min()), float(steps.max()) if steps.max() > steps.min() else float(steps.min()) + 1

    def to_px(x, y):
        return (int(left + (x - x0) / (x1 - x0) * (width - left - right)),
                int(top + (y1 - y) / (y1 - y0) * (height - top - bottom)))

    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.rectangle(image, (left, top), (width - right, height - bottom), (0, 0, 0), 1)
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        px = to_px(x0, y)
        cv2.line(image, (left - 4, px[1]), (left, px[1]), (0, 0, 0), 1)
        cv2.putText(image, f"{y:.2f}", (4, px[1] + 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        x = x0 + (x1 - x0) * i / 4
        px = to_px(x, y0)
        cv2.line(image, (px[0], height - bottom), (px[0], height - bottom + 4), (0, 0, 0), 1)
        cv2.putText(image, f"{x:.0f}", (px[0] - 12, height - bottom + 18), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(image, "steps", (width // 2 - 20, height - 10), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(image, f"{title}  ({ylabel})", (left, 25), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    if baseline is not None:
        a, b = to_px(x0, baseline), to_px(x1, baseline)
        cv2.line(image, a, b, (0, 0, 200), 1, cv2.LINE_AA)
        cv2.putText(image, f"{baseline_label} {baseline:.2f}", (a[0] + 6, a[1] - 6), font, 0.45,
                    (0, 0, 200), 1, cv2.LINE_AA)
    pixels = [to_px(x, y) for x, y, ok in zip(steps, values, finite) if ok]
    for a, b in zip(pixels[:-1], pixels[1:]):
        cv2.line(image, a, b, (200, 80, 0), 2, cv2.LINE_AA)
    for p in pixels:
        cv2.circle(image, p, 3, (200, 80, 0), -1, cv2.LINE_AA)
    return image


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="an experiment folder (WORKSPACE/EXPERIMENT) with tensorboard/")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--tag", default="val/epe_3d_mm", help="the scalar to draw (default: %(default)s)")
    parser.add_argument("--title", default=None, help="title (default: the experiment's name)")
    parser.add_argument("--baseline", type=float, default=None, help="draw a horizontal line at this value")
    parser.add_argument("--baseline-label", default="", help="label of the --baseline line")
    parser.add_argument("--start", type=float, default=None,
                        help="the value at step 0, measured separately (training validates only "
                             "after its first steps), e.g. the untrained model's")
    args = parser.parse_args(argv)
    try:
        points = read_scalars(args.experiment, args.tag)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.start is not None:
        points = [(0, args.start)] + [p for p in points if p[0] != 0]
    image = draw_curve(points, args.title or os.path.basename(os.path.normpath(args.experiment)),
                       args.tag, args.baseline, args.baseline_label)
    ok, data = cv2.imencode(".png", image)
    with atomic_open(args.out, "wb") as handle:
        handle.write(data.tobytes())
    print(f"wrote {args.out} ({len(points)} points of {args.tag})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
