"""Times each step of the graph construction on the real seq258 source frame (with its mask).

    python benchmarks/bench_graph.py [--repeats 20] [--threads 2] [--write]

Prints a table of the median time of each step of dataset.graph.build_graph (with 2 threads and
with 1), the graph's size and anchoring, and last `speedup_vs_reference=X` against the reference
implementation's 0.62 s on this kind of machine (the figure of issue 2: the reference code is
not run here). --write puts the table into BENCHMARKS.md.
"""
import argparse
import os
import platform
import re
import statistics

import torch

from dataset import io
from options import GraphOptions
from dataset.graph import build_graph

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ258 = os.path.join(os.path.dirname(REPO), "shared", "deepdeform_samples", "train", "seq258")
REFERENCE_SECONDS = 0.62   # issue 2: the reference implementation on the same frame, 2 cores
STEPS = ("backproject", "mesh", "erode", "sample", "edges", "cleanup", "anchors", "reindex", "total")


def measure(depth, mask, intr, threads, repeats):
    torch.set_num_threads(threads)
    build_graph(depth, intr, mask=mask)   # warm-up
    runs = [build_graph(depth, intr, mask=mask) for _ in range(repeats)]
    return runs[-1], {s: statistics.median(r.timings[s] for r in runs) for s in STEPS}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per configuration (median)")
    parser.add_argument("--threads", type=int, default=2, help="threads of the parallel run")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()
    depth = io.read_depth(os.path.join(SEQ258, "depth", "000000.png"))
    mask = io.read_mask(os.path.join(SEQ258, "mask", "000000_shirt.png"))
    intr = io.read_intrinsics(os.path.join(SEQ258, "intrinsics.txt"))
    graph, parallel = measure(depth, mask, intr, args.threads, args.repeats)
    _, serial = measure(depth, mask, intr, 1, args.repeats)
    object_pixels = int((mask & (depth > 0) & (depth <= GraphOptions().max_depth)).sum())
    anchored = int((graph.pixel_anchors >= 0).all(axis=2).sum())
    lines = [f"| step | {args.threads} threads (ms) | 1 thread (ms) |", "| --- | ---: | ---: |"]
    lines += [f"| {s} | {1000 * parallel[s]:.1f} | {1000 * serial[s]:.1f} |" for s in STEPS]
    summary = (f"seq258 source frame with its mask: {graph.num_nodes} nodes (reference: 104), "
               f"{int((graph.edges >= 0).sum())} edges, {anchored} of {object_pixels} object pixels with "
               f"4 anchors ({100 * anchored / object_pixels:.1f}%; reference: 92.3%)")
    speedup = REFERENCE_SECONDS / parallel["total"]
    table = "\n".join(lines)
    print(table)
    print(summary)
    print(f"speedup_vs_reference={speedup:.1f}")
    if args.write:
        path = os.path.join(REPO, "BENCHMARKS.md")
        text = open(path).read()
        block = (f"<!-- bench_graph:start -->\n{table}\n\n{summary}. End to end "
                 f"{1000 * parallel['total']:.1f} ms with {args.threads} threads: "
                 f"{speedup:.1f}x faster than the reference's {REFERENCE_SECONDS} s. Machine: "
                 f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                 f"{args.repeats} repeats (median).\n<!-- bench_graph:end -->")
        text = re.sub(r"<!-- bench_graph:start -->.*?<!-- bench_graph:end -->", block, text, flags=re.S)
        with open(path, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
