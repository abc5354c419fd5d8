"""Track a source RGB-D frame to a target frame and show it in Open3D.

    python example_viz.py                                   # the pair in example_data/
    python example_viz.py --source-color S.jpg --source-depth S.png --target-color T.jpg \\
        --target-depth T.png --intrinsics I.txt [--mask M.png]          # your own pair
    python example_viz.py --headless --out DIR              # render the views to PNG files
    python example_viz.py --residual                        # + the hash-grid residual refinement
    python example_viz.py --sequence OUT [--headless]       # play a fuse.py run (animated mesh)

Uses the shipped checkpoint's flow network by default (--flow dis when none is shipped). Without
a display (or with --headless) it renders source.png, target.png, both.png, correspondences.png,
weighted_correspondences.png and aligned.png. With --residual, a 4D hash-grid residual deformer
is fitted to the pair after tracking (model/residual.py): its refined alignment is the R key's
view (aligned_refined.png headless), and with ground truth its EPE 3D is printed beside the
graph warp's. Keys of the interactive window: see utils/demo.py (they are printed at start).
"""
import argparse
import os
import sys

from dataset import io
from dataset.deepdeform import DatasetError
from dataset.graph import GraphError
from options import (ArgumentParser, GraphOptions, ResidualOptions, RunOptions, SolverOptions, TrackerOptions,
                     add_options, check_flag, from_args)
from utils.checkpoints import (CheckpointError, build_tracker, default_checkpoint, default_checkpoint_for,
                               parse_with_checkpoint, pick_front_end, setup_run)
from utils.fusion_viz import show_sequence
from utils.demo import PAIR_FILES, load_pair, report_and_show, track_pair

REPO = os.path.dirname(os.path.abspath(__file__))


def build_parser(first=None, stored_tracker=None, stored_solver=None) -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The demo runs on the CPU: no --device.
    add_options(parser, RunOptions, "run", defaults={"dataset_dir": os.path.join(REPO, "example_data")},
                only=("dataset_dir", "threads"))
    data = parser.add_argument_group("the pair")
    data.add_argument("--split", default="demo", help="split of the dataset (default: demo)")
    data.add_argument("--index", type=int, default=0, help="pair of the split (default: 0)")
    for key in PAIR_FILES:
        data.add_argument(f"--{key.replace('_', '-')}", help=f"your own pair: {key.replace('_', ' ')} file"
                          + (" (optional; default: all valid depth)" if key == "mask" else ""))
    parser.add_argument("--checkpoint", default=None,
                        help=f"tracker checkpoint for --flow network (default: {default_checkpoint() or 'none shipped'})")
    parser.add_argument("--headless", action="store_true", help="render the views to PNG instead of a window "
                                                                "(automatic without a display)")
    parser.add_argument("--out", default="demo_output", help="folder of the PNG files (headless)")
    parser.add_argument("--sequence", default=None,
                        help="play the --out folder of a fuse.py run instead: the animated mesh beside "
                             "the input frames (headless: OUT/viz/*.png and OUT/viz/fusion.mp4)")
    parser.add_argument("--residual", action="store_true",
                        help="refine the alignment with a 4D hash-grid residual deformer fitted to "
                             "the pair (the --residual-* flags; the R key, aligned_refined.png)")
    add_options(parser, TrackerOptions, "tracker", defaults={"flow": None, **(stored_tracker or {})})
    add_options(parser, SolverOptions, "solver", defaults=stored_solver)
    add_options(parser, GraphOptions, "graph (your own pair)", prefix="graph_")
    add_options(parser, ResidualOptions, "residual deformer (with --residual)", prefix="residual_")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, checkpoint = parse_with_checkpoint(build_parser, argv, default_checkpoint_for)
        if args.sequence is not None:
            check_flag("--sequence", args.sequence, str, path="dir")
            show_sequence(args.sequence, args.headless)
            return 0
        setup_run(from_args(args, RunOptions))
        check_flag("--out", args.out, str, path="out_dir")
        if pick_front_end(args, checkpoint):
            print(f"flow: {'the network of ' + checkpoint if checkpoint else 'DIS (no checkpoint shipped or given)'}")
        tracker = build_tracker(args, checkpoint)
        own = {key: getattr(args, key) for key in PAIR_FILES}
        batch = load_pair(args.dataset_dir, args.split, args.index, own,
                          from_args(args, GraphOptions, prefix="graph_"))
        out = track_pair(tracker, batch)
    except (CheckpointError, DatasetError, GraphError, io.FormatError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    residual = from_args(args, ResidualOptions, prefix="residual_") if args.residual else None
    report_and_show(batch, out, tracker, residual, args.headless, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
