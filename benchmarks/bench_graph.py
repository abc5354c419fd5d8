"""Times graph construction on the real seq258 source frame (with its mask): ours against the
plain single-threaded reference of tests/reference/graph_reference.py, both measured in this run.

    python benchmarks/bench_graph.py [--repeats 20] [--threads 2] [--reference-repeats 1]
                                     [--write [--note TEXT]]

Prints a table of the median time of each step of dataset.graph.build_graph (with --threads
threads and with 1), the end-to-end times of ours and of the reference (Python, numpy and heapq,
one thread: tens of seconds per run, hence one run by default), whether the two graphs agree, and
last `speedup_vs_reference=X`: the reference's median time over ours with --threads threads.
--write puts the figures into BENCHMARKS.md.
"""
import argparse
import os
import platform
import re
import statistics
import time

import numpy as np
import torch

from dataset import io
from dataset.fileio import atomic_open
from dataset.graph import build_graph
from options import GraphOptions
from tests.reference.graph_reference import build_graph_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ258 = os.path.join(os.path.dirname(REPO), "shared", "deepdeform_samples", "train", "seq258")
STEPS = ("backproject", "mesh", "erode", "sample", "edges", "cleanup", "anchors", "reindex")


def measure(depth, mask, intr, threads, repeats):
    """The last graph, the median seconds of each step and the median wall time of the call."""
    torch.set_num_threads(threads)
    build_graph(depth, intr, mask=mask)   # warm-up
    runs, walls = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        runs.append(build_graph(depth, intr, mask=mask))
        walls.append(time.perf_counter() - start)
    return runs[-1], {s: statistics.median(r.timings[s] for r in runs) for s in STEPS}, \
        statistics.median(walls)


def measure_reference(depth, mask, intr, repeats):
    """The reference's graph and its median wall time."""
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        graph = build_graph_reference(depth, intr, mask=mask)
        walls.append(time.perf_counter() - start)
    return graph, statistics.median(walls)


def agreement(ours, reference) -> str:
    """One line: which outputs are identical, and the largest weight difference."""
    names = ("nodes", "edges", "edges_distances", "clusters", "pixel_anchors")
    differ = [name for name in names if getattr(ours, name).shape != getattr(reference, name).shape
              or not np.array_equal(getattr(ours, name), getattr(reference, name))]
    if differ:
        return f"against the reference: DIFFERENT {', '.join(differ)}"
    weights = max(float(np.abs(ours.pixel_weights - reference.pixel_weights).max()),
                  float(np.abs(ours.edges_weights - reference.edges_weights).max()))
    return (f"against the reference: identical {', '.join(names)}; largest weight difference "
            f"{weights:.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20,
                        help="timed runs of ours per configuration (median)")
    parser.add_argument("--threads", type=int, default=2, help="threads of our parallel run")
    parser.add_argument("--reference-repeats", type=int, default=1,
                        help="timed runs of the single-threaded reference (median; each takes seconds)")
    parser.add_argument("--write", action="store_true", help="write the figures into BENCHMARKS.md")
    parser.add_argument("--note", default="",
                        help="with --write: a sentence put after the figures (e.g. the machine's load)")
    args = parser.parse_args()
    for flag in ("repeats", "threads", "reference_repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, found {getattr(args, flag)}")
    depth = io.read_depth(os.path.join(SEQ258, "depth", "000000.png"))
    mask = io.read_mask(os.path.join(SEQ258, "mask", "000000_shirt.png"))
    intr = io.read_intrinsics(os.path.join(SEQ258, "intrinsics.txt"))

    graph, parallel, parallel_total = measure(depth, mask, intr, args.threads, args.repeats)
    _, serial, serial_total = measure(depth, mask, intr, 1, args.repeats)
    reference, reference_total = measure_reference(depth, mask, intr, args.reference_repeats)

    object_pixels = int((mask & (depth > 0) & (depth <= GraphOptions().max_depth)).sum())
    anchored = int((graph.pixel_anchors >= 0).all(axis=2).sum())
    lines = [(f"| step | ours, {args.threads} threads (ms) | ours, 1 thread (ms) | "
              "reference, 1 thread (ms) |"),
             "| --- | ---: | ---: | ---: |"]
    lines += [f"| {s} | {1000 * parallel[s]:.1f} | {1000 * serial[s]:.1f} | - |" for s in STEPS]
    lines.append(f"| total (wall) | {1000 * parallel_total:.1f} | {1000 * serial_total:.1f} | "
                 f"{1000 * reference_total:.0f} |")
    summary = (f"seq258 source frame with its mask: {graph.num_nodes} nodes, "
               f"{int((graph.edges >= 0).sum())} edges, {anchored} of {object_pixels} object pixels "
               f"with 4 anchors ({100 * anchored / object_pixels:.2f}%); {agreement(graph, reference)}")
    speedup = reference_total / parallel_total
    table = "\n".join(lines)
    print(table)
    print(summary)
    print(f"ours with 1 thread: {reference_total / serial_total:.1f}x faster than the reference")
    print(f"speedup_vs_reference={speedup:.1f}")
    if args.write:
        path = os.path.join(REPO, "BENCHMARKS.md")
        with open(path) as handle:
            text = handle.read()
        block = (f"<!-- bench_graph:start -->\n{table}\n\n{summary}. End to end ours takes "
                 f"{1000 * parallel_total:.1f} ms with {args.threads} threads, the reference "
                 f"{reference_total:.1f} s: speedup_vs_reference={speedup:.1f} "
                 f"({reference_total / serial_total:.1f} against ours on 1 thread). Machine: "
                 f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                 f"{torch.__version__}; ours {args.repeats} repeats, the reference "
                 f"{args.reference_repeats} (medians); {time.strftime('%Y-%m-%d')}."
                 + (f" {args.note}" if args.note else "") + "\n<!-- bench_graph:end -->")
        text, count = re.subn(r"<!-- bench_graph:start -->.*?<!-- bench_graph:end -->", block, text,
                              flags=re.S)
        if count != 1:
            raise SystemExit(f"{path}: expected one <!-- bench_graph:start/end --> block, "
                             f"found {count}")
        with atomic_open(path, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
