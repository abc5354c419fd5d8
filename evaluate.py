"""Graph Error 3D and EPE 3D of predictions on a DeepDeform-format split (docs/DESIGN.md 5.6).

    python evaluate.py --dataset-dir D --split S --predictions P

Prints `Graph Error 3D (mm): X` and `EPE 3D (mm): Y`, writes a per-pair table
P/evaluation_<split>.csv and the results P/evaluation_<split>.txt. Accepts predictions of
generate.py (full frame size) and of the reference code (448 of 480 rows). Every missing or
malformed prediction is listed before it fails (exit code 1).
"""
import argparse
import csv
import io as text_io
import os
import sys

from dataset.io import FormatError
from dataset.fileio import atomic_write_bytes
from utils.metrics import EvaluationError, evaluate_split, pooled


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-dir", required=True, help="dataset root holding <split>_graphs.json")
    parser.add_argument("--split", required=True, help="split to evaluate (needs ground truth)")
    parser.add_argument("--predictions", required=True, help="folder of <name>_node_translations.bin "
                                                             "and <name>_sceneflow.sflow files")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        results = evaluate_split(args.dataset_dir, args.split, args.predictions, progress=not args.quiet)
    except EvaluationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except FormatError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    graph_error, epe = pooled(results)
    table = text_io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["pair", "num_nodes", "graph_error_3d_mm", "num_pixels", "epe_3d_mm"])
    for r in results:
        writer.writerow([r.name, r.num_nodes, f"{r.graph_error_mm:.4f}", r.num_pixels, f"{r.epe_mm:.4f}"])
    atomic_write_bytes(os.path.join(args.predictions, f"evaluation_{args.split}.csv"), table.getvalue().encode())
    summary = (f"Graph Error 3D (mm): {graph_error:.3f}\nEPE 3D (mm): {epe:.3f}\n")
    atomic_write_bytes(os.path.join(args.predictions, f"evaluation_{args.split}.txt"),
                       (summary + f"pairs: {len(results)}\nnodes: {sum(r.num_nodes for r in results)}\n"
                        f"pixels: {sum(r.num_pixels for r in results)}\n"
                        f"dataset: {os.path.abspath(args.dataset_dir)} split {args.split}\n").encode())
    print(summary, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
