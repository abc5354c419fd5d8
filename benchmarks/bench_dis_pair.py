"""The dis front-end's flow on a real pair with ground-truth optical flow, for each way of
feeding DIS (plain grey, contrast-normalised grey: --dis-normalize, a second pass:
--dis-passes): end-point error against the ground truth, where the ground truth is defined.

    python benchmarks/bench_dis_pair.py [--pair ../shared/deepdeform_samples/train/seq258] \
        [--source 000000 --target 000110 --object shirt]

The default is the DeepDeform training pair of ../shared/deepdeform_samples (103 px of mean
motion): a large displacement, where DIS's coarse pyramid levels have to find the motion first.
No consistency check (every pixel's flow is scored). Printed per variant: mean and median
end-point error (px), the share of pixels within 3 px, and the front-end's time on the pair
(forward and backward flow with fuse.py's consistency check, the median of --repeats runs, the
variants interleaved). Then, for --shifts, the source image
moved rigidly by (s, 0.4 s) px against itself: median error and share within 1 px of the inner
image, plain grey against normalised (two passes each): how large a displacement each finds.
"""
import argparse
import os
import statistics
import sys
import time

import cv2
import numpy as np

from dataset import io
from model.dis_flow import dis_flow
from options import TrackerOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ((0.0, 1), (0.0, 2), (5.0, 1), (5.0, 2))   # (dis_normalize, dis_passes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", default=os.path.join(REPO, "..", "shared", "deepdeform_samples", "train", "seq258"),
                        help="DeepDeform-layout folder with color/ and optical_flow/")
    parser.add_argument("--source", default="000000", help="source frame id")
    parser.add_argument("--target", default="000110", help="target frame id")
    parser.add_argument("--object", default="shirt", help="object name of the optical-flow file")
    parser.add_argument("--preset", default="medium", help="DIS preset (--dis-preset)")
    parser.add_argument("--repeats", type=int, default=8, help="timed runs per variant")
    parser.add_argument("--shifts", default="5,10,20,30,45,60",
                        help="rigid shifts (px along x; 0.4 of it along y) of the source against itself")
    args = parser.parse_args()
    try:
        images = [cv2.imread(os.path.join(args.pair, "color", f"{frame}.jpg"))
                  for frame in (args.source, args.target)]
        if any(image is None for image in images):
            raise io.FormatError(f"{args.pair}/color: frame {args.source} or {args.target} missing or unreadable")
        truth = io.read_optical_flow(os.path.join(args.pair, "optical_flow",
                                                  f"{args.object}_{args.source}_{args.target}.oflow"))
    except io.FormatError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    source, target = (cv2.cvtColor(image, cv2.COLOR_BGR2RGB) for image in images)
    truth = truth if truth.shape[0] == 2 else truth.transpose(2, 0, 1)
    known = np.isfinite(truth).all(axis=0)
    print(f"{args.pair}: {args.source} -> {args.target}, {int(known.sum())} pixels with ground truth, mean motion "
          f"{np.linalg.norm(truth[:, known], axis=0).mean():.1f} px, preset {args.preset}")
    seconds = {variant: [] for variant in VARIANTS}
    for _ in range(args.repeats):
        for normalize, passes in VARIANTS:
            start = time.perf_counter()
            dis_flow(source, target, TrackerOptions(flow="dis", dis_preset=args.preset, dis_normalize=normalize,
                                                    dis_passes=passes))
            seconds[(normalize, passes)].append(time.perf_counter() - start)
    for normalize, passes in VARIANTS:
        options = TrackerOptions(flow="dis", dis_preset=args.preset, dis_normalize=normalize, dis_passes=passes,
                                 dis_consistency=0)
        flow, _ = dis_flow(source, target, options)
        error = np.linalg.norm(flow - truth, axis=0)[known]
        print(f"--dis-normalize {normalize:g} --dis-passes {passes}: end-point error mean {error.mean():.2f} px, "
              f"median {np.median(error):.2f} px, within 3 px {np.mean(error < 3):.3f}; "
              f"{statistics.median(seconds[(normalize, passes)]):.3f} s")
    height, width = source.shape[:2]
    for shift in (float(s) for s in args.shifts.split(",") if s.strip()):
        motion = np.float32([shift, 0.4 * shift])
        moved = cv2.warpAffine(source, np.float32([[1, 0, motion[0]], [0, 1, motion[1]]]), (width, height),
                               borderMode=cv2.BORDER_REFLECT)
        row = []
        for normalize in (0.0, 5.0):
            flow, _ = dis_flow(source, moved, TrackerOptions(flow="dis", dis_preset=args.preset, dis_normalize=normalize,
                                                             dis_passes=2, dis_consistency=0))
            error = np.linalg.norm(flow[:, 60:-60, 80:-80] - motion[:, None, None], axis=0)
            row.append(f"--dis-normalize {normalize:g}: median {np.median(error):.2f} px, within 1 px "
                       f"{np.mean(error < 1):.2f}")
        print(f"shift ({motion[0]:g}, {motion[1]:g}) px: " + " | ".join(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
