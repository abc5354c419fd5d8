"""Times our Gauss-Newton solve against the dense-Jacobian reference, and its scaling in nodes.

1. The real seq258 pair (104 nodes). Correspondences are the ground-truth optical flow (source
   pixel -> target pixel), the target depth sampled bilinearly at the flowed pixel, and the
   graph made by our graph builder (as create_graph_data.py does). For 10k, 50k and all matches
   it times one 3-iteration solve forward, and forward + backward (gradients to the
   correspondence weights, target pixels and target depths), for ours (the default, auto linear
   solver: dense Cholesky at this size) and for tests/reference/dense_solver.py, in the same
   run; then the EPE 3D / Graph Error 3D of the solved warp, dense and sparse.
2. Scaling: ours with the dense Cholesky and with the block-sparse CG solve, forward and
   forward + backward, on synthetic grid graphs of 100 / 500 / 2000 / 4096 nodes with 50k
   matches (tests/solver_problems.make_grid_problem) and on seq258 with finer node coverage
   (about 500 and 2000 nodes, all matches); dense only up to --dense-max-nodes. Memory columns
   are the linear solve's working-memory estimates (model.solver.memory_estimate_gb, which
   --max-memory-gb checks; for sparse an upper bound), and the blocks the sparse pattern has.
Prints `speedup_vs_dense=X` (forward + backward at 10k matches on seq258, ours against the
dense-Jacobian reference), `scaling_4096_nodes_s=X` (the sparse forward solve of the 4096-node
graph, 3 iterations, 50k matches) and `scaling_exponent_500_4096=X` (log of the time ratio over
log of the node ratio).

    python benchmarks/bench_solver.py [--repeats 5] [--threads 2] [--skip-scaling] [--profile]
"""
import argparse
import dataclasses
import math
import os
import statistics
import time

import torch

from dataset import io
from model import solver as gn
from model.correspondences import build_matches
from model.warp import warp_points
from options import GraphOptions, SolverOptions
from tests.reference import dense_solver
from tests.solver_problems import make_grid_problem
from dataset.graph import build_graph
from model.image_proc import backproject_depth

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ258 = os.path.join(os.path.dirname(REPO), "shared", "deepdeform_samples", "train", "seq258")


def load_pair(node_coverage: float = GraphOptions.node_coverage):
    depth = io.read_depth(os.path.join(SEQ258, "depth", "000000.png"))
    target_depth = io.read_depth(os.path.join(SEQ258, "depth", "000110.png"))
    mask = io.read_mask(os.path.join(SEQ258, "mask", "000000_shirt.png"))
    intr = io.read_intrinsics(os.path.join(SEQ258, "intrinsics.txt"))
    flow = io.read_optical_flow(os.path.join(SEQ258, "optical_flow", "shirt_000000_000110.oflow"))
    scene_flow = io.read_scene_flow(os.path.join(SEQ258, "scene_flow", "shirt_000000_000110.sflow"))
    graph = build_graph(depth, intr, mask=mask, scene_flow=scene_flow,
                        options=GraphOptions(node_coverage=node_coverage))
    points = backproject_depth(torch.from_numpy(depth), intr)
    flow_t = torch.from_numpy(flow)
    flow_valid = torch.isfinite(flow_t).all(0)
    matches = build_matches(points[None], torch.nan_to_num(flow_t)[None],
                            torch.from_numpy(target_depth)[None],
                            torch.from_numpy(graph.pixel_anchors)[None].long(),
                            torch.from_numpy(graph.pixel_weights)[None], flow_valid=flow_valid[None])
    return dict(points=points, intr=intr, graph=graph, matches=matches, scene_flow=scene_flow)


def subset(matches, index):
    return dataclasses.replace(matches, **{k: getattr(matches, k)[index] for k in (
        "sample", "pixel", "source_points", "anchors", "anchor_weights", "target_pixels",
        "target_depth", "weights")})


def ours_problem(data, matches):
    g = data["graph"]
    i = data["intr"]
    return gn.SolverProblem.from_matches(
        matches, torch.from_numpy(g.nodes)[None], torch.tensor([g.num_nodes]),
        torch.from_numpy(g.edges)[None], torch.from_numpy(g.edges_weights)[None],
        torch.from_numpy(g.clusters)[None],
        torch.tensor([[i["fx"], i["fy"], i["cx"], i["cy"]]], dtype=torch.float32))


def dense_problem(data, matches):
    g = data["graph"]
    i = data["intr"]
    edges = torch.from_numpy(g.edges).long()
    src = torch.arange(g.num_nodes)[:, None].expand_as(edges)
    keep = edges >= 0
    return {"points": matches.source_points, "anchors": matches.anchors,
            "anchor_weights": matches.anchor_weights, "nodes": torch.from_numpy(g.nodes),
            "edges": torch.stack((src[keep], edges[keep]), 1),
            "edge_weights": torch.ones(int(keep.sum())), "target_pixels": matches.target_pixels,
            "target_depth": matches.target_depth, "weights": matches.weights,
            "intrinsics": torch.tensor([i["fx"], i["fy"], i["cx"], i["cy"]])}


def with_grad(matches):
    leaves = {k: getattr(matches, k).detach().clone().requires_grad_(True)
              for k in ("weights", "target_pixels", "target_depth")}
    return dataclasses.replace(matches, **leaves), list(leaves.values())


def time_it(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_solves(problem_fn, options, repeats):
    """Median forward and forward + backward times of one solve (gradients to the weights and
    target depths), and the result of the last forward."""
    result = {}

    def fwd():
        with torch.no_grad():
            result["out"] = gn.solve(problem_fn(), options)

    def fwd_bwd():
        problem = problem_fn()
        leaves = {k: getattr(problem, k).detach().clone().requires_grad_(True)
                  for k in ("weights", "target_depth")}
        out = gn.solve(dataclasses.replace(problem, **leaves), options)
        (out.translations.sum() + out.rotations.sum()).backward()

    return time_it(fwd, repeats), time_it(fwd_bwd, repeats), result["out"]


def memory_gb(solver, problem, dtype=torch.float32):
    n = int(problem.num_nodes.max())
    edges = int((problem.edges >= 0).sum())
    return gn.memory_estimate_gb(solver, n, [(problem.match_sample.numel(), 4), (edges, 2)], dtype)


def scaling(args, options):
    """Table of dense and sparse solve times over graph sizes; returns {(kind, nodes): seconds}."""
    print(f"\nscaling: {args.iterations} Gauss-Newton iterations, CG tolerance {options.cg_tolerance:g}, "
          f"median of {args.scaling_repeats}")
    header = (f"{'graph':>22} | {'nodes':>5} | {'matches':>7} | {'sparse fwd':>10} | {'sparse f+b':>10} | "
              f"{'dense fwd':>9} | {'dense f+b':>9} | {'CG its':>10} | {'blocks':>7} | {'mem sparse':>10} | {'mem dense':>9}")
    print(header)
    print("-" * len(header))
    cases = [("synthetic grid", side, None) for side in (10, 22, 45, 64)]
    if not args.skip_real_scaling:
        cases += [("seq258, coverage", None, coverage) for coverage in (0.022, 0.011)]
    times = {}
    for name, side, coverage in cases:
        if side is not None:
            grid = make_grid_problem(side, args.scaling_matches, seed=side)
            problem_fn = lambda grid=grid: grid  # noqa: E731
            label = name
        else:
            data = load_pair(coverage)
            problem_fn = lambda data=data: ours_problem(data, data["matches"])  # noqa: E731
            label = f"{name} {coverage * 100:.1f} cm"
        problem = problem_fn()
        n = int(problem.num_nodes[0])
        sparse = dataclasses.replace(options, linear_solver="sparse")
        s_fwd, s_fb, out = time_solves(problem_fn, sparse, args.scaling_repeats)
        cg = "/".join(str(c) for c in out.cg_iterations[0]) or out.status[0]
        if n <= args.dense_max_nodes:
            d_fwd, d_fb, dense_out = time_solves(problem_fn, dataclasses.replace(options, linear_solver="dense"),
                                                 args.scaling_repeats)
            gap = float((dense_out.translations - out.translations).abs().max()) * 1000
            dense_cols = f"{d_fwd:>8.3f}s | {d_fb:>8.3f}s"
        else:
            gap, dense_cols = None, f"{'-':>9} | {'-':>9}"
        edges = problem.edges[0, :n]
        edge_nodes = torch.stack((torch.arange(n)[:, None].expand_as(edges)[edges >= 0], edges[edges >= 0]), 1)
        blocks = gn.build_block_pattern([problem.anchors, edge_nodes], 1, n).num_blocks
        print(f"{label:>22} | {n:>5} | {problem.match_sample.numel():>7} | {s_fwd:>9.3f}s | {s_fb:>9.3f}s | "
              f"{dense_cols} | {cg:>10} | {blocks:>7} | {memory_gb('sparse', problem) * 1024:>8.1f}MB | "
              f"{memory_gb('dense', problem) * 1024:>7.0f}MB"
              + (f"  (sparse - dense: {gap:.2e} mm)" if gap is not None else ""))
        if side is not None:
            times[n] = s_fwd
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--dense-repeats", type=int, default=2, help="timed runs of the dense reference")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--iterations", type=int, default=3, help="Gauss-Newton iterations per solve")
    parser.add_argument("--scaling-repeats", type=int, default=3, help="timed runs per scaling measurement")
    parser.add_argument("--scaling-matches", type=int, default=50000, help="matches of the synthetic graphs")
    parser.add_argument("--dense-max-nodes", type=int, default=1000,
                        help="largest graph the scaling table also solves densely")
    parser.add_argument("--skip-scaling", action="store_true", help="only the 104-node seq258 part")
    parser.add_argument("--skip-real-scaling", action="store_true",
                        help="scaling on the synthetic graphs only (no finer seq258 graphs)")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's table (top ops by self time) of 10 of "
                             "our forward + backward solves at 10k matches")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_pair()
    all_matches = data["matches"]
    total = all_matches.sample.numel()
    options = SolverOptions(iterations=args.iterations, remove_clusters=False, convergence_tolerance=0.0)
    weights = {"flow": options.flow_weight, "depth": options.depth_weight, "arap": options.arap_weight}
    order = torch.randperm(total, generator=torch.Generator().manual_seed(0))
    print(f"seq258: {total} valid ground-truth matches, {data['graph'].num_nodes} nodes, "
          f"{args.threads} threads, {args.iterations} Gauss-Newton iterations")
    header = f"{'matches':>8} | {'ours fwd':>9} | {'ours f+b':>9} | {'dense fwd':>9} | {'dense f+b':>9} | {'dense J':>8} | {'x fwd':>6} | {'x f+b':>6}"
    print(header)
    print("-" * len(header))
    speedup_10k = None
    sizes = sorted({min(s, total) for s in (10000, 50000, total)})
    for size in sizes:
        matches = subset(all_matches, order[:size].sort().values)

        def ours_fwd():
            with torch.no_grad():
                gn.solve(ours_problem(data, matches), options)

        def ours_fwd_bwd():
            m, leaves = with_grad(matches)
            out = gn.solve(ours_problem(data, m), options)
            (out.translations.sum() + out.rotations.sum()).backward()

        def dense_fwd():
            with torch.no_grad():
                dense_solver.gauss_newton(dense_problem(data, matches), args.iterations, weights,
                                          options.lm_damping)

        def dense_fwd_bwd():
            m, leaves = with_grad(matches)
            out = dense_solver.gauss_newton(dense_problem(data, m), args.iterations, weights,
                                            options.lm_damping)
            (out["translations"].sum() + out["rotations"].sum()).backward()

        # Ours and the reference alternate, so that a change of machine load hits both alike.
        t = [[], [], [], []]
        for fn in (ours_fwd, ours_fwd_bwd, dense_fwd, dense_fwd_bwd):
            fn()  # warm-up
        for repeat in range(args.repeats):
            for k, (fn, runs) in enumerate(((ours_fwd, args.repeats), (ours_fwd_bwd, args.repeats),
                                            (dense_fwd, args.dense_repeats), (dense_fwd_bwd, args.dense_repeats))):
                if repeat < runs:
                    start = time.perf_counter()
                    fn()
                    t[k].append(time.perf_counter() - start)
        t = [statistics.median(x) for x in t]
        rows = 3 * size + 3 * int((data["graph"].edges >= 0).sum())
        dense_mb = rows * 6 * data["graph"].num_nodes * 4 / 2 ** 20
        print(f"{size:>8} | {t[0]:>8.4f}s | {t[1]:>8.4f}s | {t[2]:>8.3f}s | {t[3]:>8.3f}s | "
              f"{dense_mb:>6.0f}MB | {t[2] / t[0]:>5.0f}x | {t[3] / t[1]:>5.0f}x")
        if speedup_10k is None:
            speedup_10k = t[3] / t[1]
            if args.profile:
                with torch.profiler.profile() as profiler:
                    for _ in range(10):
                        ours_fwd_bwd()
                print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))

    # Accuracy of the solved warp with all matches (and with more iterations, as generate.py uses),
    # with the dense and the sparse linear solve.
    g = data["graph"]
    anchors = torch.from_numpy(g.pixel_anchors).long()
    sflow = torch.from_numpy(data["scene_flow"]).permute(1, 2, 0)
    evaluable = (anchors >= 0).all(-1) & torch.isfinite(sflow).all(-1) & (data["points"][..., 2] > 0)
    gt_nodes = torch.from_numpy(g.node_deformations)
    for iterations in sorted({args.iterations, 10}):
        for solver in ("dense", "sparse"):
            out = gn.solve(ours_problem(data, all_matches),
                           dataclasses.replace(options, iterations=iterations, linear_solver=solver))
            warped = warp_points(data["points"][evaluable], anchors[evaluable],
                                 torch.from_numpy(g.pixel_weights)[evaluable], torch.from_numpy(g.nodes),
                                 out.rotations[0], out.translations[0])
            epe = (warped - data["points"][evaluable] - sflow[evaluable]).norm(dim=1).mean() * 1000
            graph_error = (out.translations[0] - gt_nodes).norm(dim=1).mean() * 1000
            print(f"all {total} matches, {iterations} iterations, {solver}: EPE 3D {epe:.4f} mm over "
                  f"{int(evaluable.sum())} pixels, Graph Error 3D {graph_error:.4f} mm, status {out.status[0]}")
    gt_warp = warp_points(data["points"][evaluable], anchors[evaluable],
                          torch.from_numpy(g.pixel_weights)[evaluable], torch.from_numpy(g.nodes),
                          torch.eye(3).expand(g.num_nodes, 3, 3), gt_nodes)
    print(f"warp with the true node translations: EPE 3D "
          f"{(gt_warp - data['points'][evaluable] - sflow[evaluable]).norm(dim=1).mean() * 1000:.2f} mm")
    times = {} if args.skip_scaling else scaling(args, options)
    print(f"speedup_vs_dense={speedup_10k:.1f}")
    if 4096 in times:
        print(f"scaling_4096_nodes_s={times[4096]:.3f}")
        if 484 in times:
            print(f"scaling_exponent_500_4096={math.log(times[4096] / times[484]) / math.log(4096 / 484):.2f}")


if __name__ == "__main__":
    main()
