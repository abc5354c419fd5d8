"""Times the hash encoding (forward, and backward to the table and the input) of our CPU kernel
against the plain-PyTorch reference, in one run, on the same inputs.

    python benchmarks/bench_hashgrid.py [--points 100000] [--repeats 5] [--threads 2]

Default configuration: 4D inputs, 16 levels, 2 features per level, 2^19 rows per level,
resolutions 16 to 2048. Ours and the reference take turns in each repeat (after one warm-up
round); prints a table of medians and, as the last line, `speedup_vs_reference=X` for forward +
backward.

Before that last line, unless --no-residual-fit, it times what the encoder is for: fitting the
4D hash-grid residual deformer (model/residual.py, default ResidualOptions) to one pair, the
pair of example_data/ tracked with --flow dis, and prints the fitting seconds (with the pair's
EPE 3D before and after, from its ground truth).
"""
import argparse
import os
import statistics
import time

import torch

from model.hashgrid import hash_encode, level_resolutions
from tests.reference.hashgrid_reference import hash_encode_reference


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=100_000, help="number of encoded points N")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed repeats per implementation (the median is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads value")
    parser.add_argument("--dim", type=int, default=4, choices=(3, 4), help="input dimension D")
    parser.add_argument("--levels", type=int, default=16, help="number of levels L")
    parser.add_argument("--features", type=int, default=2, choices=(1, 2, 4, 8),
                        help="features per level F")
    parser.add_argument("--log2-table-size", type=int, default=19, help="T, 2^T rows per level")
    parser.add_argument("--base-resolution", type=int, default=16, help="N_min")
    parser.add_argument("--max-resolution", type=int, default=2048, help="N_max")
    parser.add_argument("--seed", type=int, default=0, help="random seed of inputs and table")
    parser.add_argument("--residual-fit", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the residual deformer's fit on example_data's pair")
    parser.add_argument("--flow", default="dis", choices=("dis", "gt"),
                        help="front-end tracking the pair before the residual fit")
    return parser.parse_args()


def run_once(encode, x, table, grad_out):
    """Forward and backward seconds of encode(x, table) with both gradients, and the results."""
    x.grad = None
    table.grad = None
    start = time.perf_counter()
    out = encode(x, table)
    middle = time.perf_counter()
    out.backward(grad_out)
    end = time.perf_counter()
    return middle - start, end - middle, (out.detach(), x.grad.clone(), table.grad.clone())


def time_interleaved(encoders, x, table, grad_out, repeats):
    """{name: (median forward s, median backward s, results)}. The encoders take turns within
    each repeat, so that a change of load on a shared machine hits all of them alike; round 0
    warms up caches and allocations and is not timed."""
    times = {name: ([], []) for name in encoders}
    results = {}
    for round_ in range(repeats + 1):
        for name, encode in encoders.items():
            fwd, bwd, results[name] = run_once(encode, x, table, grad_out)
            if round_ > 0:
                times[name][0].append(fwd)
                times[name][1].append(bwd)
    return {name: (statistics.median(f), statistics.median(b), results[name])
            for name, (f, b) in times.items()}


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    resolutions = level_resolutions(args.levels, args.base_resolution, args.max_resolution)
    x = torch.rand(args.points, args.dim, generator=generator).requires_grad_()
    table = (torch.rand(args.levels, 2 ** args.log2_table_size, args.features,
                        generator=generator) * 2e-4 - 1e-4).requires_grad_()
    grad_out = torch.randn(args.points, args.levels * args.features, generator=generator)

    timed = time_interleaved({
        "ours (cpu)": lambda p, t: hash_encode(p, t, args.base_resolution, args.max_resolution),
        "reference": lambda p, t: hash_encode_reference(p, t, resolutions),
    }, x, table, grad_out, args.repeats)
    ours, reference = timed["ours (cpu)"], timed["reference"]

    def max_diff(i):
        return float((ours[2][i].double() - reference[2][i].double()).abs().max())

    print(f"hash encoding: N={args.points} D={args.dim} L={args.levels} F={args.features} "
          f"T={args.log2_table_size} resolutions {resolutions[0]}..{resolutions[-1]} "
          f"threads={torch.get_num_threads()} median of {args.repeats}")
    print(f"max |ours - reference|: out {max_diff(0):.2e}, grad x {max_diff(1):.2e}, "
          f"grad table {max_diff(2):.2e}")
    print(f"{'':<12}{'forward s':>12}{'backward s':>12}{'total s':>12}")
    for name, (fwd, bwd, _) in timed.items():
        print(f"{name:<12}{fwd:>12.4f}{bwd:>12.4f}{fwd + bwd:>12.4f}")
    print(f"{'speedup':<12}{reference[0] / ours[0]:>11.1f}x{reference[1] / ours[1]:>11.1f}x"
          f"{(reference[0] + reference[1]) / (ours[0] + ours[1]):>11.1f}x")
    if args.residual_fit:
        print(time_residual_fit(args.flow))
    print(f"speedup_vs_reference={(reference[0] + reference[1]) / (ours[0] + ours[1]):.1f}")


def time_residual_fit(flow: str) -> str:
    """One line: seconds of the residual deformer's fit on example_data's pair (its tracking
    not included), with the pair's EPE 3D of the graph warp and of the refinement."""
    from dataset.deepdeform import DeepDeformDataset, collate
    from model.residual import fit_residual
    from model.tracker import Tracker
    from options import ResidualOptions, SolverOptions, TrackerOptions
    from utils.metrics import evaluation_mask

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_data")
    dataset = DeepDeformDataset(root, "demo")
    batch = collate([dataset[0]])
    solver_options = SolverOptions()
    with torch.inference_mode():
        out = Tracker(TrackerOptions(flow=flow), solver_options).eval()(batch)
    options = ResidualOptions()
    fit = fit_residual(batch, out, options, max_depth=solver_options.max_depth)
    stats = fit["stats"][0]
    mask = torch.from_numpy(evaluation_mask(batch["scene_flow"][0].numpy(), batch["source_points"][0, 2].numpy(),
                                            batch["pixel_anchors"][0].numpy()))

    def epe_mm(scene_flow):
        return 1000 * float((scene_flow[0] - batch["scene_flow"][0]).permute(1, 2, 0)[mask].norm(dim=1).mean())

    return (f"residual fit ({dataset.name(0)}, --flow {flow}, {stats['points']} points, "
            f"{stats['iterations']} of {options.iterations} iterations, "
            f"fit threads={options.threads or torch.get_num_threads()}): {stats['seconds']:.2f} s; EPE 3D "
            f"{epe_mm(out['scene_flow']):.2f} mm -> {epe_mm(fit['scene_flow']):.2f} mm")


if __name__ == "__main__":
    main()
