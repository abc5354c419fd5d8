"""Times the ARAP extension of hidden nodes (fusion/hidden.py) against the dense reference.

    python benchmarks/bench_hidden.py [--nodes 150,1000,4000] [--reference-max 1000] [--repeats 3] [--threads 1]

A flat random graph (nodes uniform in 1 x 1 x 0.1 m, 8 nearest neighbours, Gaussian edge weights)
with the nodes beyond x = 0.6 hidden, 10 iterations; for each size the median seconds of ours
and, up to --reference-max nodes (its (H, N, 3, 3) tensors grow with N^2), of
tests/reference/hidden_reference.py, interleaved, and their ratio; the last line is
`speedup_vs_reference=X` at the largest size both ran.
"""
import argparse
import statistics
import time

import torch

from fusion.graph import knn
from fusion.hidden import arap_extension
from tests.reference.hidden_reference import arap_extension_reference


def graph(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    positions = torch.rand(n, 3, generator=gen) * torch.tensor([1.0, 1.0, 0.1])
    ids, distances = knn(positions, positions, 9)
    weights = torch.exp(-distances[:, 1:] ** 2 / (2 * 0.05 ** 2))
    dR = torch.eye(3).repeat(n, 1, 1)
    dt = torch.randn(n, 3, generator=gen) * 0.01
    return positions, ids[:, 1:].long(), weights, dR, dt, positions[:, 0] > 0.6


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="150,1000,4000", help="graph sizes, comma-separated")
    parser.add_argument("--reference-max", type=int, default=1000, help="largest graph the reference runs on")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per size (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ratio = None
    for n in (int(v) for v in args.nodes.split(",")):
        inputs = graph(n)
        runs = {"ours": (arap_extension, [])}
        if n <= args.reference_max:
            runs["reference"] = (arap_extension_reference, [])
        for name, (fn, _) in runs.items():
            fn(*inputs, iterations=10)           # warm-up
        for _ in range(args.repeats):
            for name, (fn, times) in runs.items():
                tick = time.perf_counter()
                fn(*inputs, iterations=10)
                times.append(time.perf_counter() - tick)
        ours = statistics.median(runs["ours"][1])
        line = f"nodes={n} hidden={int(inputs[-1].sum())} ours_s={ours:.4f}"
        if "reference" in runs:
            reference = statistics.median(runs["reference"][1])
            ratio = reference / ours
            line += f" reference_s={reference:.4f} ratio={ratio:.1f}"
        print(line, flush=True)
    if ratio is not None:
        print(f"speedup_vs_reference={ratio:.1f}")


if __name__ == "__main__":
    main()
