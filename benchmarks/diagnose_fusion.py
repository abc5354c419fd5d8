"""What limits the fusion loop on a synthetic sequence: fuse.py's loop with one part replaced by
the generator's truth, or its true flow perturbed, then scored as `evaluate.py --sequence` does.

    python benchmarks/diagnose_fusion.py --sequence DIR --out OUT [fuse.py's flags]
        [--oracle-nodes seen|hidden] [--oracle-filter PX] [--flow gt --flow-scale S --flow-noise PX]
        [--node-errors K]

DIR must hold the generator's gt/ (python -m dataset.synthetic_sequence). Each diagnosis changes
one thing and keeps everything else as fuse.py runs it:

--oracle-nodes seen    after each solve, the nodes of the first frame's graph that the frame's
                       matches support (--hidden-support) take the generator's node motions, and
                       the hidden ones are extended from them as usual: how good the extension is
                       given a correct seen motion;
--oracle-nodes hidden  the same for the nodes the frame does not support: how good the tracking of
                       what is seen is, given a correct hidden motion;
--oracle-filter PX     the flow's matches more than PX pixels from where the true flow puts their
                       source pixel are dropped (what a perfect outlier filter would leave); the
                       share dropped is printed every 5 frames;
--flow-scale S, --flow-noise PX
                       with --flow gt: the true flow times S (S < 1: a flow that measures motion
                       short) plus Gaussian noise of PX pixels per pixel (seeded by the frame id).
--node-errors K        changes nothing: every K frames, prints how far the nodes' live positions
                       are from the generator's, by the frame's match support of each node
                       (bands SUPPORT_BANDS; under --hidden-support a node is hidden, extended
                       from the others), and how far they were after the solve, before the
                       extension of the hidden ones: where on the object the tracking goes wrong.
Nodes inserted later are left alone: the generator's motion of a node is taken at its canonical
position, which for a later node carries the model's error when it was inserted.
"""
import argparse
import sys
from typing import List

import numpy as np
import torch

from fusion.gt import GroundTruth
from fusion.loop import Fusion, node_support
from options import FusionOptions, RunOptions, SolverOptions, from_args
from utils.checkpoints import build_tracker, default_checkpoint_for, parse_with_checkpoint, pick_front_end, setup_run
from utils.fusion_run import build_parser, run_fusion
from utils.sequence_metrics import SequenceEvaluationError, evaluate_sequence, summary_lines

SUPPORT_BANDS = (0.0, 20.0, 80.0, 400.0, float("inf"))


def add_diagnosis_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("diagnosis")
    group.add_argument("--oracle-nodes", choices=("seen", "hidden"), default=None,
                       help="give these nodes of the first frame's graph the generator's motions")
    group.add_argument("--oracle-filter", type=float, default=0.0,
                       help="drop matches more than this many pixels off the true flow (0 = off)")
    group.add_argument("--flow-scale", type=float, default=1.0, help="--flow gt: scale of the true flow")
    group.add_argument("--flow-noise", type=float, default=0.0,
                       help="--flow gt: standard deviation (pixels) of noise added to the true flow")
    group.add_argument("--node-errors", type=int, default=0,
                       help="every this many frames print the node position errors by match support (0 = off)")
    return parser


class DiagnosticFusion(Fusion):
    """The loop with the diagnoses of the module docstring (`diagnosis`: the parsed flags)."""

    diagnosis: argparse.Namespace = None

    def __init__(self, sequence, options, solver_options, tracker=None, ground_truth=None, device="cpu"):
        super().__init__(sequence, options, solver_options, tracker, ground_truth, device)
        if self.gt is None:
            self.gt = GroundTruth(sequence.root, sequence.frame_ids[0])
        self.dropped: List[float] = []
        self._frame, self._rendering = None, None
        d = self.diagnosis
        if d.flow_scale != 1.0 or d.flow_noise > 0:
            true_flow = self.gt.flow

            def perturbed(canonical, valid, frame_id, intrinsics, depth):
                flow = true_flow(canonical, valid, frame_id, intrinsics, depth) * d.flow_scale
                noise = np.random.default_rng(frame_id).normal(0.0, d.flow_noise, flow.shape)
                return (flow + noise).astype(np.float32)
            self.gt.flow = perturbed

    def _track(self, frame, rendering, timings, rotations, translations, later=False):
        self._frame, self._rendering = frame, rendering
        return super()._track(frame, rendering, timings, rotations, translations, later)

    def _filter_matches(self, matches, source_normals, target_points, normals):
        keep = super()._filter_matches(matches, source_normals, target_points, normals)
        limit = self.diagnosis.oracle_filter
        if limit <= 0:
            return keep
        true_flow = self.gt.flow(self._rendering.canonical, self._rendering.mask, self._frame.frame_id,
                                 self.intrinsics, self._frame.depth)
        W = true_flow.shape[2]
        true_at = torch.from_numpy(true_flow).reshape(2, -1)[:, matches.pixel].T
        source = torch.stack((matches.pixel % W, matches.pixel // W), dim=1).float()
        error = (matches.target_pixels.float() - source - true_at).norm(dim=1)
        good = torch.isfinite(error) & (error <= limit)
        self.dropped.append(float((keep & ~good).sum()) / max(int(keep.sum()), 1))
        if len(self.dropped) % 5 == 1:
            print(f"frame {self._frame.frame_id}: the oracle filter drops {100 * self.dropped[-1]:.1f}% "
                  "of the matches", flush=True)
        return keep & good

    def _node_errors(self, translations, dt_solved, dt_final, support) -> None:
        """--node-errors: the first frame's nodes' live position errors (mm) by support band."""
        first = self.graph.created == 0
        nodes = self.graph.positions[first]
        _, t = self.gt.node_motions(nodes, self._frame.frame_id, self.options.node_coverage)
        solved = (translations + dt_solved)[first] - t
        final = (translations + dt_final)[first] - t
        row = [f"frame {self._frame.frame_id}: node error (mm) by match support"]
        for low, high in zip(SUPPORT_BANDS[:-1], SUPPORT_BANDS[1:]):
            band = (support[first] >= low) & (support[first] < high)
            if band.any():
                row.append(f"{low:g}-{high:g}: {int(band.sum())} nodes {1000 * float(final[band].norm(dim=1).mean()):.1f} "
                           f"(solve {1000 * float(solved[band].norm(dim=1).mean()):.1f})")
        print("; ".join(row), flush=True)

    def _follow_visible(self, dR, dt, rotations, translations, matches):
        dR_final, dt_final = self._diagnosed_follow_visible(dR, dt, rotations, translations, matches)
        every = self.diagnosis.node_errors
        if every > 0 and self._frame.frame_id % every == 0:
            self._node_errors(translations, dt, dt_final, node_support(matches, rotations.shape[0]))
        return dR_final, dt_final

    def _diagnosed_follow_visible(self, dR, dt, rotations, translations, matches):
        mode = self.diagnosis.oracle_nodes
        if mode is None:
            return super()._follow_visible(dR, dt, rotations, translations, matches)
        seen = node_support(matches, rotations.shape[0]) >= self.hidden_support
        pick = (seen if mode == "seen" else ~seen) & (self.graph.created == 0)
        R, t = self.gt.node_motions(self.graph.positions, self._frame.frame_id, self.options.node_coverage)

        def oracle(dR, dt):
            dR, dt = dR.clone(), dt.clone()
            # Increments on top of the previous motion, by its inverse (see Fusion._follow_visible).
            dR[pick] = R[pick] @ torch.linalg.inv(rotations[pick])
            dt[pick] = t[pick] - translations[pick]
            return dR, dt
        if mode == "seen":   # before the extension, which then starts from them
            return super()._follow_visible(*oracle(dR, dt), rotations, translations, matches)
        return oracle(*super()._follow_visible(dR, dt, rotations, translations, matches))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, checkpoint = parse_with_checkpoint(lambda *a: add_diagnosis_flags(build_parser(*a)), argv,
                                             default_checkpoint_for)
    if (args.flow_scale != 1.0 or args.flow_noise > 0) and args.flow != "gt":
        print("error: --flow-scale and --flow-noise perturb the true flow: use them with --flow gt", file=sys.stderr)
        return 2
    pick_front_end(args, checkpoint)
    options = from_args(args, FusionOptions)
    device = setup_run(RunOptions(dataset_dir=".", device=args.device, threads=args.threads))
    tracker = build_tracker(args, checkpoint).to(device).eval()
    DiagnosticFusion.diagnosis = args
    fusion = run_fusion(options, from_args(args, SolverOptions), tracker, device, progress=not args.quiet,
                        fusion_class=DiagnosticFusion)
    if fusion.dropped:
        print(f"the oracle filter dropped {100 * float(np.mean(fusion.dropped)):.1f}% of the matches on average")
    try:
        scores = evaluate_sequence(options.sequence, options.out)
    except SequenceEvaluationError as error:   # e.g. --frames short of the whole sequence
        print(f"error: {error}", file=sys.stderr)
        return 1
    for line in summary_lines(scores):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
