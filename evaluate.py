"""Graph Error 3D and EPE 3D of predictions on a DeepDeform-format split (docs/DESIGN.md 5.6),
or the scores of a sequence reconstruction against a synthetic sequence's ground truth.

    python evaluate.py --dataset-dir D --split S --predictions P
    python evaluate.py --sequence DIR --reconstruction OUT

Pairs: prints `Graph Error 3D (mm): X` and `EPE 3D (mm): Y`, writes a per-pair table
P/evaluation_<split>.csv and the results P/evaluation_<split>.txt. Accepts predictions of
generate.py (full frame size) and of the reference code (448 of 480 rows). Every missing or
malformed prediction is listed before it fails (exit code 1).

Sequences (made by `python -m dataset.synthetic_sequence`): reads DIR/gt/gt.npz and
OUT/frames/NNNNNN.ply for every frame (or those of --frames START:END[:STEP], by default the
ones a `fuse.py --frames` run recorded), ends its output with the deformation error (mean, last
frame, and the last frame's seen and hidden parts), drift, accuracy, completeness and Chamfer
lines (utils/sequence_metrics.py has the definitions), writes OUT/evaluation_sequence.csv (one row per frame) and
OUT/evaluation_sequence.png (the errors against the frame index).
"""
import argparse
import sys

from dataset.io import FormatError
from options import ArgumentParser, OptionError, RunOptions, add_options, check_flag, from_args
from utils.metrics import EvaluationError, evaluate_split, write_evaluation
from utils.sequence_metrics import SequenceEvaluationError, evaluate_sequence, write_sequence_evaluation


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, RunOptions, "run", only=("dataset_dir",), defaults={"dataset_dir": None})
    parser.add_argument("--split", help="split to evaluate (needs ground truth)")
    parser.add_argument("--predictions", help="folder of <name>_node_translations.bin "
                                              "and <name>_sceneflow.sflow files")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    sequence = parser.add_argument_group("sequence")
    sequence.add_argument("--sequence", help="a synthetic sequence folder (with gt/gt.npz): score "
                                             "--reconstruction against it instead of pairs")
    sequence.add_argument("--reconstruction", help="with --sequence: folder with frames/NNNNNN.ply, the "
                                                   "reconstructed mesh of every frame (results go there)")
    sequence.add_argument("--frames-dir", default="frames",
                          help="with --sequence: the folder of OUT holding the per-frame meshes, e.g. "
                               "frames_refined (the residual field's); its CSV and plot are named after "
                               "it (default: frames)")
    sequence.add_argument("--frames", default=None,
                          help="with --sequence: score these frames only, START:END[:STEP] as fuse.py's "
                               "--frames, the first one as the reference (default: the --frames a fuse.py "
                               "run recorded in OUT/fusion_options.json, else every frame)")
    args = parser.parse_args(argv)
    if args.sequence is not None or args.reconstruction is not None:
        if args.sequence is None or args.reconstruction is None:
            parser.error("--sequence and --reconstruction go together")
    else:
        missing = [flag for flag, value in (("--dataset-dir", args.dataset_dir), ("--split", args.split),
                                            ("--predictions", args.predictions)) if value is None]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)} (or --sequence "
                         f"with --reconstruction)")
    try:
        if args.sequence is not None:
            check_flag("--sequence", args.sequence, str, path="dir")
            check_flag("--reconstruction", args.reconstruction, str, path="dir")
            check_flag("--reconstruction", args.reconstruction, str, path="out_dir")   # the results go there
            scores = evaluate_sequence(args.sequence, args.reconstruction, args.frames_dir, args.frames)
            print(write_sequence_evaluation(scores, args.sequence, args.reconstruction,
                                            frames_dir=args.frames_dir), end="")
            return 0
        from_args(args, RunOptions)   # checks --dataset-dir
        check_flag("--predictions", args.predictions, str, path="dir")
        check_flag("--predictions", args.predictions, str, path="out_dir")   # the results go there
        results = evaluate_split(args.dataset_dir, args.split, args.predictions, progress=not args.quiet)
    except (EvaluationError, SequenceEvaluationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (FormatError, OptionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(write_evaluation(results, args.dataset_dir, args.split, args.predictions), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
