"""Deformation graph files for your own RGB-D frames, or for a whole DeepDeform-format split.

One frame (the most common use: custom data, no mask or scene flow needed):
    python create_graph_data.py --depth D.png --intrinsics I.txt [--mask M.png]
        [--scene-flow S.sflow] --out DIR --name NAME [--node-coverage 0.05] [--max-depth 6]
writes DIR/<kind>/NAME.bin for graph_nodes, graph_edges, graph_edges_weights, graph_clusters,
pixel_anchors, pixel_weights, and graph_node_deformations when a scene flow is given.

A split (every pair whose graph files are missing, with a progress bar):
    python create_graph_data.py --dataset-dir D --split S [--overwrite]
writes to the graph paths of each label; the source mask is the label's "source_mask" or
<sequence>/mask/<source_id>_<object_id>.png when present, and the scene flow the label's.

Bad input (a missing file, no valid depth, depth in another unit than --depth-scale says, an
object too small for 4 nodes, an option out of range) exits with status 1 (2 for a flag argparse
refuses) and one line saying what is wrong, before anything is written; the graph files of a
frame are moved into place together or not at all. In split mode, existing graph files are
re-checked (truncated or unusable ones are remade), a pair that fails is reported and the others
still run, and the run exits with status 1 listing the failed pairs.
"""
import argparse
import os
import sys

from dataset import io
from dataset.graph import GraphError, graph_for_files, graph_output_problem, run_split
from options import ArgumentParser, GraphOptions, OptionError, RunOptions, add_options, check_flag, from_args


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    single = parser.add_argument_group("one frame")
    single.add_argument("--depth", help="source depth PNG (uint16, --depth-scale units per metre)")
    single.add_argument("--intrinsics", help="4x4 intrinsics.txt (fx [0,0], fy [1,1], cx [0,2], cy [1,2])")
    single.add_argument("--mask", help="object mask PNG (non-zero = object); default: all valid depth")
    single.add_argument("--scene-flow", help=".sflow ground truth, for graph_node_deformations")
    single.add_argument("--out", help="output folder (DIR/<kind>/NAME.bin)")
    single.add_argument("--name", help="file name stem, e.g. shirt_000000_000110_geodesic_0.05")
    batch = add_options(parser, RunOptions, "a DeepDeform-format split", defaults={"dataset_dir": None},
                        only=("dataset_dir",))
    batch.add_argument("--split", help="split whose missing graph files to make")
    batch.add_argument("--overwrite", action="store_true", help="remake graph files that exist")
    add_options(parser, GraphOptions, "graph")
    args = parser.parse_args(argv)
    try:
        options = from_args(args, GraphOptions)
        if args.dataset_dir or args.split:
            if not (args.dataset_dir and args.split):
                parser.error("batch mode needs both --dataset-dir and --split")
            from_args(args, RunOptions)   # checks --dataset-dir
            built, failed = run_split(args.dataset_dir, args.split, options, args.overwrite)
            print(f"made the graphs of {built} pair(s) of split '{args.split}'")
            if failed:
                print(f"error: {len(failed)} pair(s) failed (the others were made): "
                      + "; ".join(failed.values()), file=sys.stderr)
                return 1
            return 0
        missing = [f for f in ("depth", "intrinsics", "out", "name") if getattr(args, f) is None]
        if missing:
            parser.error("one-frame mode needs " + ", ".join("--" + f.replace("_", "-") for f in missing))
        if not args.name or os.sep in args.name or args.name in (".", ".."):
            parser.error(f"--name {args.name!r}: expected a file name stem without '{os.sep}'")
        check_flag("--out", args.out, str, path="out_dir")
        problem = graph_output_problem(args.out)
        if problem:
            raise GraphError(f"--out {args.out}: {problem}")
        graph = graph_for_files(args.depth, io.read_intrinsics(args.intrinsics), args.mask,
                                args.scene_flow, options)
        paths = graph.save(args.out, args.name)
    except (GraphError, io.FormatError, OptionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    anchored = graph.stats["anchored_pixels"] / max(graph.stats["valid_depth_pixels"], 1)
    print(f"{graph.num_nodes} nodes, {int((graph.edges >= 0).sum())} edges, "
          f"{100 * anchored:.1f}% of valid-depth pixels with {options.num_anchors} anchors, "
          f"{1000 * graph.timings['total']:.0f} ms; wrote {len(paths)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
