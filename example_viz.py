"""Track a source RGB-D frame to a target frame and show it in Open3D.

    python example_viz.py                                   # the pair in example_data/
    python example_viz.py --source-color S.jpg --source-depth S.png --target-color T.jpg \\
        --target-depth T.png --intrinsics I.txt [--mask M.png]          # your own pair
    python example_viz.py --headless --out DIR              # render the views to PNG files
    python example_viz.py --residual                        # + the hash-grid residual refinement

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

import numpy as np
import torch

from dataset import io
from dataset.deepdeform import DatasetError, DeepDeformDataset, collate, read_pair_files
from dataset.graph import GraphError
from model.residual import fit_residual
from options import GraphOptions, ResidualOptions, RunOptions, SolverOptions, TrackerOptions, add_options, from_args
from utils.checkpoints import (CheckpointError, build_tracker, default_checkpoint, default_checkpoint_for,
                               parse_with_checkpoint, pick_front_end, setup_run)
from utils.demo import DemoViewer, demo_data, has_display
from utils.metrics import pair_errors

REPO = os.path.dirname(os.path.abspath(__file__))


def build_parser(first=None, stored_tracker=None, stored_solver=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The demo runs on the CPU: no --device.
    add_options(parser, RunOptions, "run", defaults={"dataset_dir": os.path.join(REPO, "example_data")},
                only=("dataset_dir", "threads"))
    data = parser.add_argument_group("the pair")
    data.add_argument("--split", default="demo", help="split of the dataset (default: demo)")
    data.add_argument("--index", type=int, default=0, help="pair of the split (default: 0)")
    for key in ("source-color", "source-depth", "target-color", "target-depth", "intrinsics", "mask"):
        data.add_argument(f"--{key}", help=f"your own pair: {key.replace('-', ' ')} file"
                          + (" (optional; default: all valid depth)" if key == "mask" else ""))
    parser.add_argument("--checkpoint", default=None,
                        help=f"tracker checkpoint for --flow network (default: {default_checkpoint() or 'none shipped'})")
    parser.add_argument("--headless", action="store_true", help="render the views to PNG instead of a window "
                                                                "(automatic without a display)")
    parser.add_argument("--out", default="demo_output", help="folder of the PNG files (headless)")
    parser.add_argument("--residual", action="store_true",
                        help="refine the alignment with a 4D hash-grid residual deformer fitted to "
                             "the pair (the --residual-* flags; the R key, aligned_refined.png)")
    add_options(parser, TrackerOptions, "tracker", defaults={"flow": None, **(stored_tracker or {})})
    add_options(parser, SolverOptions, "solver", defaults=stored_solver)
    add_options(parser, GraphOptions, "graph (your own pair)", prefix="graph_")
    add_options(parser, ResidualOptions, "residual deformer (with --residual)", prefix="residual_")
    return parser


def load_pair(args):
    """A collated one-pair batch, from the dataset or from the files given."""
    own = [args.source_color, args.source_depth, args.target_color, args.target_depth, args.intrinsics]
    if any(own):
        if not all(own):
            raise ValueError("your own pair needs --source-color, --source-depth, --target-color, "
                             "--target-depth and --intrinsics")
        item = read_pair_files(args.source_color, args.source_depth, args.target_color, args.target_depth,
                               args.intrinsics, args.mask, from_args(args, GraphOptions, prefix="graph_"))
        print(f"graph built on the fly: {item['num_nodes']} nodes")
        return collate([item])
    dataset = DeepDeformDataset(args.dataset_dir, args.split)
    if not 0 <= args.index < len(dataset):
        raise ValueError(f"--index {args.index}: split '{args.split}' of {args.dataset_dir} has {len(dataset)} pair(s)")
    return collate([dataset[args.index]])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, checkpoint = parse_with_checkpoint(build_parser, argv, default_checkpoint_for)
        setup_run(from_args(args, RunOptions))
        if pick_front_end(args, checkpoint):
            print(f"flow: {'the network of ' + checkpoint if checkpoint else 'DIS (no checkpoint shipped or given)'}")
        tracker = build_tracker(args, checkpoint)
        batch = load_pair(args)
        if args.flow == "gt" and "optical_flow" not in batch:
            raise ValueError("--flow gt needs the pair's ground-truth optical flow")
        with torch.inference_mode():
            out = tracker.eval()(batch)
    except (CheckpointError, DatasetError, GraphError, io.FormatError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    result = out["solver"]
    print(f"{batch['name'][0]}: {out['matches'].sample.numel()} correspondences, solve "
          f"{result.status[0]}{' (' + result.messages[0] + ')' if result.messages[0] else ''}, energy "
          + " -> ".join(f"{e:.4g}" for e in result.energies[0]))
    refined = refined_flow = None
    if args.residual:
        fit = fit_residual(batch, out, from_args(args, ResidualOptions, prefix="residual_"), progress=True,
                           max_depth=tracker.solver_options.max_depth)
        stats = fit["stats"][0]
        print(f"residual deformer: {stats['iterations']} iterations in {stats['seconds']:.2f} s, mean "
              f"residual {stats['mean_residual_mm']:.2f} mm over {stats['points']} points")
        # DemoData.refined_object: the warp_mask pixels in row-major order, like warped_object.
        refined = fit["warped_points"][0][out["warp_mask"][0]]
        refined_flow = fit["scene_flow"]
    if "scene_flow" in batch:
        n = int(batch["num_nodes"][0])

        def errors_of(scene_flow):
            return pair_errors(batch["name"][0], out["translations"][0, :n].numpy(),
                               batch["node_deformations"][0, :n].numpy(), np.nan_to_num(scene_flow[0].numpy()),
                               batch["scene_flow"][0].numpy(), batch["source_points"][0, 2].numpy(),
                               batch["pixel_anchors"][0].numpy())

        errors = errors_of(out["scene_flow"])
        refined_epe = "" if refined_flow is None else \
            f", refined by the residual deformer {errors_of(refined_flow).epe_mm:.2f} mm"
        print(f"EPE 3D: {errors.epe_mm:.2f} mm{refined_epe}; Graph Error 3D: {errors.graph_error_mm:.2f} mm "
              f"(against the pair's ground truth)")
    headless = args.headless or not has_display()
    viewer = DemoViewer(demo_data(batch, out, refined=refined), visible=not headless)
    if headless:
        written = viewer.render_all(args.out)
        viewer.close()
        print(f"no display{'' if not args.headless else ' wanted'}: rendered {len(written)} views to "
              f"{os.path.abspath(args.out)}/ (" + ", ".join(os.path.basename(p) for p in written.values()) + ")")
    else:
        viewer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
