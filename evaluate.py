"""Graph Error 3D and EPE 3D of predictions on a DeepDeform-format split (docs/DESIGN.md 5.6).

    python evaluate.py --dataset-dir D --split S --predictions P

Prints `Graph Error 3D (mm): X` and `EPE 3D (mm): Y`, writes a per-pair table
P/evaluation_<split>.csv and the results P/evaluation_<split>.txt. Accepts predictions of
generate.py (full frame size) and of the reference code (448 of 480 rows). Every missing or
malformed prediction is listed before it fails (exit code 1).
"""
import argparse
import sys

from dataset.io import FormatError
from options import ArgumentParser, OptionError, RunOptions, add_options, check_flag, from_args
from utils.metrics import EvaluationError, evaluate_split, write_evaluation


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, RunOptions, "run", only=("dataset_dir",), required=("dataset_dir",))
    parser.add_argument("--split", required=True, help="split to evaluate (needs ground truth)")
    parser.add_argument("--predictions", required=True, help="folder of <name>_node_translations.bin "
                                                             "and <name>_sceneflow.sflow files")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        from_args(args, RunOptions)   # checks --dataset-dir
        check_flag("--predictions", args.predictions, str, path="dir")
        check_flag("--predictions", args.predictions, str, path="out_dir")   # the results go there
        results = evaluate_split(args.dataset_dir, args.split, args.predictions, progress=not args.quiet)
    except EvaluationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (FormatError, OptionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(write_evaluation(results, args.dataset_dir, args.split, args.predictions), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
