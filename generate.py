"""Predictions on a DeepDeform-format split: node translations and dense scene flow per pair.

    python generate.py --dataset-dir D --split S --out P [--flow network|dis|gt] [--checkpoint C]
                       [--shard i --num-shards n] [--residual] [solver, tracker, residual flags]

Writes P/<name>_node_translations.bin and P/<name>_sceneflow.sflow per pair (docs/DESIGN.md 4),
atomically; pairs already done are skipped, so an interrupted run resumes. Works on splits
without ground truth (except --flow gt, which needs the optical flow). Without --flow, the
network front-end is used when a checkpoint is given or shipped (checkpoints/), DIS otherwise.
With --residual, each pair's graph warp is refined by a 4D hash-grid residual deformer fitted
to the pair (a few seconds per pair on a CPU): the scene flow includes the residual, the node
translations stay the graph's.
"""
import argparse
import os
import sys

from dataset.deepdeform import DatasetError, DeepDeformDataset
from dataset.io import FormatError
from options import (ArgumentParser, ResidualOptions, RunOptions, SolverOptions, TrackerOptions, add_options,
                     check_flag, from_args)
from utils.checkpoints import (CheckpointError, MissingCheckpointError, build_tracker, default_checkpoint,
                               default_checkpoint_for, parse_with_checkpoint, pick_front_end, setup_run)
from utils.generation import generate


def build_parser(first=None, defaults_tracker=None, defaults_solver=None) -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, RunOptions, "run", required=("dataset_dir",))
    parser.add_argument("--split", required=True, help="split to run on (train, val, test, ...)")
    parser.add_argument("--out", required=True, help="folder for the predictions")
    parser.add_argument("--checkpoint", default=None,
                        help="tracker checkpoint (ours or the reference's) for --flow network "
                             f"(default: {default_checkpoint() or 'none shipped'})")
    parser.add_argument("--shard", type=int, default=0, help="which shard of the split to run (0-based)")
    parser.add_argument("--num-shards", type=int, default=1, help="split the pairs into this many shards")
    parser.add_argument("--limit", type=int, default=None, help="run at most this many pairs of the shard")
    parser.add_argument("--overwrite", action="store_true", help="recompute pairs that already have predictions")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--residual", action="store_true",
                        help="refine each pair's graph warp with a fitted 4D hash-grid residual "
                             "deformer (the --residual-* flags); node translations stay the graph's")
    add_options(parser, TrackerOptions, "tracker", defaults={"flow": None, **(defaults_tracker or {})})
    add_options(parser, SolverOptions, "solver", defaults=defaults_solver)
    add_options(parser, ResidualOptions, "residual deformer (with --residual)", prefix="residual_")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, checkpoint = parse_with_checkpoint(build_parser, argv, default_checkpoint_for)
        if pick_front_end(args, checkpoint) and not checkpoint:
            print("no checkpoint given or shipped: using --flow dis")
        device = setup_run(from_args(args, RunOptions))
        check_flag("--out", args.out, str, path="out_dir")
        check_flag("--num-shards", args.num_shards, int, ge=1)
        check_flag("--shard", args.shard, int, ge=0, lt=args.num_shards)
        check_flag("--limit", args.limit, int, ge=1)
        try:
            tracker = build_tracker(args, checkpoint)
        except MissingCheckpointError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        if args.flow == "network":
            print(f"flow network from {checkpoint}")
        dataset = DeepDeformDataset(args.dataset_dir, args.split)
        if args.flow == "gt":
            missing = [dataset.name(i) for i in range(len(dataset)) if "optical_flow" not in dataset.labels[i]]
            if missing:
                print(f"error: --flow gt needs ground-truth optical flow; {len(missing)} pair(s) of split "
                      f"'{args.split}' have none (first: {missing[0]})", file=sys.stderr)
                return 2
        residual = from_args(args, ResidualOptions, prefix="residual_") if args.residual else None
        summary = generate(dataset, tracker, args.out, args.shard, args.num_shards, args.overwrite,
                           device, args.limit, progress=not args.quiet, residual=residual)
    except (CheckpointError, DatasetError, FormatError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{len(summary.written)} pair(s) written, {len(summary.skipped)} already done, "
          f"{len(summary.failed_solves)} failed solve(s), {summary.seconds:.1f} s -> {os.path.abspath(args.out)}")
    if summary.residual_seconds:
        seconds = list(summary.residual_seconds.values())
        print(f"residual deformer: {len(seconds)} pair(s) refined, fit {sum(seconds) / len(seconds):.2f} s "
              f"per pair (at most {max(seconds):.2f} s)")
    for name, reason in summary.failed_solves.items():
        print(f"  failed: {name}: {reason}")
    if summary.bad_pairs:
        print(f"error: {len(summary.bad_pairs)} pair(s) could not be read (the others were written): "
              + "; ".join(summary.bad_pairs.values()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
