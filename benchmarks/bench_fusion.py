"""Times the fusion: the per-frame loop at 640x480 split by step, for each front-end asked for,
and the warped TSDF integration of our kernel against the plain-PyTorch reference.

    python benchmarks/bench_fusion.py [--sequence DIR] [--frames 8] [--flows dis,gt] [--threads 2]

Without --sequence, a 640x480 synthetic cloth sequence is generated (python -m
dataset.synthetic_sequence, seed 0) into a temporary folder. For each front-end the loop
(fusion.loop.Fusion) runs over the first --frames frames and the mean seconds per frame of every
step (render, flow, solve, integrate, grow, extract) after the first frame are printed. Then the
integration of one frame into the model's blocks, with the last motion, is timed for ours and
the reference (interleaved, median of --repeats, both on the same copies of the state) and the
last line is `speedup_vs_reference=X`.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from fusion.gt import GroundTruth
from fusion.loop import STEPS, Fusion
from fusion.sequence import Sequence
from model.ext import C
from model.tracker import Tracker
from options import FusionOptions, SolverOptions, TrackerOptions
from tests.reference.fusion_reference import integrate_warped_reference
from utils.checkpoints import default_checkpoint, load_tracker
from utils.fusion_run import SOLVER_DEFAULTS, TRACKER_DEFAULTS


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequence", default=None, help="sequence folder (default: generate one)")
    parser.add_argument("--frames", type=int, default=8, help="frames of the loop per front-end")
    parser.add_argument("--flows", default="dis,gt", help="front-ends to time, comma-separated "
                                                          "(network, dis, gt)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint for the network front-end")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of the integration")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads value")
    parser.add_argument("--refine-border", type=int, default=FusionOptions.refine_border,
                        help="fuse.py's --refine-border for the loop (0: the flow unrefined)")
    parser.add_argument("--texture-keyframes", type=int, default=FusionOptions.texture_keyframes,
                        help="fuse.py's --texture-keyframes for the loop (0: the model's own colours)")
    parser.add_argument("--hidden-arap-iterations", type=int, default=FusionOptions.hidden_arap_iterations,
                        help="fuse.py's --hidden-arap-iterations for the loop (0: the blend alone)")
    parser.add_argument("--icp-reassociate", type=int, default=FusionOptions.icp_reassociate,
                        help="fuse.py's --icp-reassociate for the loop (default: fuse.py's, by front-end; 0: one solve)")
    parser.add_argument("--dis-normalize", type=float, default=TRACKER_DEFAULTS["dis_normalize"],
                        help="fuse.py's --dis-normalize for --flows dis (0: plain grey)")
    parser.add_argument("--dis-passes", type=int, default=TRACKER_DEFAULTS["dis_passes"],
                        help="fuse.py's --dis-passes for --flows dis (1: one DIS run)")
    return parser.parse_args()


def tracker_for(flow, checkpoint, dis=None):
    """The loop's front-end: `dis` the TrackerOptions fields of the dis front-end (fuse.py's
    TRACKER_DEFAULTS when None)."""
    solver = SolverOptions(**SOLVER_DEFAULTS)
    if flow == "network":
        return load_tracker(checkpoint or default_checkpoint(), TrackerOptions(flow="network"), solver,
                            log=lambda *_: None).eval()
    return Tracker(TrackerOptions(flow=flow, **(TRACKER_DEFAULTS if dis is None else dis)), solver)


def run_loop(root, flow, frames, checkpoint, refine_border=FusionOptions.refine_border, dis=None,
             **fusion_options):
    options = FusionOptions(sequence=root, out="unused", frames=f"0:{frames}", video=False,
                            refine_border=refine_border, **fusion_options)
    sequence = Sequence(root, options.frames)
    mask, _ = sequence.first_mask()
    gt = GroundTruth(root, 0) if flow == "gt" else None
    fusion = Fusion(sequence, options, SolverOptions(**SOLVER_DEFAULTS), tracker_for(flow, checkpoint, dis), gt)
    fusion.first_frame(sequence.read(0), mask)
    for i in range(1, len(sequence)):
        fusion.step(sequence.read(i))
    return fusion


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    root = args.sequence
    if root is None:
        root = os.path.join(tempfile.mkdtemp(prefix="bench_fusion."), "cloth")
        subprocess.run([sys.executable, "-m", "dataset.synthetic_sequence", "--out", root, "--frames",
                        str(args.frames), "--seed", "0", "--object", "cloth"], check=True)
    fusion = None
    print(f"loop per frame at {Sequence(root).width}x{Sequence(root).height}, frames 1..{args.frames - 1} "
          f"(mean seconds)")
    print(f"{'flow':8s} " + " ".join(f"{s:>9s}" for s in STEPS) + f" {'total':>9s} {'nodes':>6s} {'blocks':>7s}")
    for flow in args.flows.split(","):
        fusion = run_loop(root, flow, args.frames, args.checkpoint, args.refine_border,
                          {"dis_normalize": args.dis_normalize, "dis_passes": args.dis_passes},
                          texture_keyframes=args.texture_keyframes,
                          hidden_arap_iterations=args.hidden_arap_iterations,
                          icp_reassociate=args.icp_reassociate)
        logs = fusion.log[1:]
        means = [statistics.mean(e.steps.get(s, 0.0) for e in logs) for s in STEPS]
        total = statistics.mean(e.seconds for e in logs)
        print(f"{flow:8s} " + " ".join(f"{m:9.3f}" for m in means) + f" {total:9.3f} {fusion.graph.num_nodes:6d} "
              f"{fusion.volume.num_blocks:7d}")

    # Warped integration of the last frame into the model's blocks, ours vs the reference.
    volume = fusion.volume
    frame = fusion.sequence.read(len(fusion.sequence) - 1)
    o = fusion.options
    depth = torch.from_numpy(frame.depth)
    image = torch.from_numpy(frame.color.astype(np.float32))
    mask = depth > 0
    i = fusion.intrinsics
    n = volume.num_blocks
    candidates = volume.candidates(fusion.graph.positions, o.anchor_candidates)
    state = (volume.tsdf[:n].clone(), volume.weight[:n].clone(), volume.color[:n].clone())
    args_common = (volume.keys, torch.arange(n), candidates, fusion.graph.positions.contiguous(),
                   fusion.rotations.contiguous(), fusion.translations.contiguous(), depth, image, mask,
                   o.voxel_size, o.truncation, o.weight_cap, i["fx"], i["fy"], i["cx"], i["cy"], o.node_coverage,
                   o.max_anchor_distance * o.node_coverage, 4, False)
    times = {"ours": [], "reference": []}
    results = {}
    for repeat in range(args.repeats + 1):
        for name, fn in (("ours", C.integrate_warped), ("reference", integrate_warped_reference)):
            copies = [t.clone() for t in state]
            start = time.perf_counter()
            fn(*copies, *args_common)
            seconds = time.perf_counter() - start
            if repeat:
                times[name].append(seconds)
            results[name] = copies
    difference = max(float((a - b).abs().max()) for a, b in zip(results["ours"], results["reference"]))
    ours, ref = statistics.median(times["ours"]), statistics.median(times["reference"])
    print(f"warped integration of one {depth.shape[1]}x{depth.shape[0]} frame into {n} blocks ({n * 512} voxels), "
          f"{fusion.graph.num_nodes} nodes, {args.threads} threads, median of {args.repeats}:")
    print(f"  ours {ours:.4f} s, reference {ref:.4f} s, largest difference {difference:.2g}")
    print(f"speedup_vs_reference={ref / ours:.1f}")


if __name__ == "__main__":
    main()
