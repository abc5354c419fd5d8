"""Times our Gauss-Newton solve against the dense-Jacobian reference on the real seq258 pair.

Correspondences are the ground-truth optical flow (source pixel -> target pixel), the target
depth sampled bilinearly at the flowed pixel, and the graph made by our graph builder (as
create_graph_data.py does). For 10k, 50k and all matches it times one 3-iteration solve forward,
and forward + backward (gradients to the correspondence weights, target pixels and target
depths), for ours and for tests/reference/dense_solver.py, in the same run. Prints a table, the
EPE 3D / Graph Error 3D of the solved warp, and last `speedup_vs_dense=X` (forward + backward at
10k matches).

    python benchmarks/bench_solver.py [--repeats 5] [--threads 2]
"""
import argparse
import dataclasses
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
from dataset.graph import build_graph
from model.image_proc import backproject_depth

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ258 = os.path.join(os.path.dirname(REPO), "shared", "deepdeform_samples", "train", "seq258")


def load_pair():
    depth = io.read_depth(os.path.join(SEQ258, "depth", "000000.png"))
    target_depth = io.read_depth(os.path.join(SEQ258, "depth", "000110.png"))
    mask = io.read_mask(os.path.join(SEQ258, "mask", "000000_shirt.png"))
    intr = io.read_intrinsics(os.path.join(SEQ258, "intrinsics.txt"))
    flow = io.read_optical_flow(os.path.join(SEQ258, "optical_flow", "shirt_000000_000110.oflow"))
    scene_flow = io.read_scene_flow(os.path.join(SEQ258, "scene_flow", "shirt_000000_000110.sflow"))
    graph = build_graph(depth, intr, mask=mask, scene_flow=scene_flow, options=GraphOptions())
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--dense-repeats", type=int, default=2, help="timed runs of the dense reference")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--iterations", type=int, default=3, help="Gauss-Newton iterations per solve")
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

        t = [time_it(ours_fwd, args.repeats), time_it(ours_fwd_bwd, args.repeats),
             time_it(dense_fwd, args.dense_repeats), time_it(dense_fwd_bwd, args.dense_repeats)]
        rows = 3 * size + 3 * int((data["graph"].edges >= 0).sum())
        dense_mb = rows * 6 * data["graph"].num_nodes * 4 / 2 ** 20
        print(f"{size:>8} | {t[0]:>8.4f}s | {t[1]:>8.4f}s | {t[2]:>8.3f}s | {t[3]:>8.3f}s | "
              f"{dense_mb:>6.0f}MB | {t[2] / t[0]:>5.0f}x | {t[3] / t[1]:>5.0f}x")
        if speedup_10k is None:
            speedup_10k = t[3] / t[1]

    # Accuracy of the solved warp with all matches (and with more iterations, as generate.py uses).
    g = data["graph"]
    anchors = torch.from_numpy(g.pixel_anchors).long()
    sflow = torch.from_numpy(data["scene_flow"]).permute(1, 2, 0)
    evaluable = (anchors >= 0).all(-1) & torch.isfinite(sflow).all(-1) & (data["points"][..., 2] > 0)
    gt_nodes = torch.from_numpy(g.node_deformations)
    for iterations in sorted({args.iterations, 10}):
        out = gn.solve(ours_problem(data, all_matches), dataclasses.replace(options, iterations=iterations))
        warped = warp_points(data["points"][evaluable], anchors[evaluable],
                             torch.from_numpy(g.pixel_weights)[evaluable], torch.from_numpy(g.nodes),
                             out.rotations[0], out.translations[0])
        epe = (warped - data["points"][evaluable] - sflow[evaluable]).norm(dim=1).mean() * 1000
        graph_error = (out.translations[0] - gt_nodes).norm(dim=1).mean() * 1000
        print(f"all {total} matches, {iterations} iterations: EPE 3D {epe:.2f} mm over "
              f"{int(evaluable.sum())} pixels, Graph Error 3D {graph_error:.2f} mm, status {out.status[0]}")
    gt_warp = warp_points(data["points"][evaluable], anchors[evaluable],
                          torch.from_numpy(g.pixel_weights)[evaluable], torch.from_numpy(g.nodes),
                          torch.eye(3).expand(g.num_nodes, 3, 3), gt_nodes)
    print(f"warp with the true node translations: EPE 3D "
          f"{(gt_warp - data['points'][evaluable] - sflow[evaluable]).norm(dim=1).mean() * 1000:.2f} mm")
    print(f"speedup_vs_dense={speedup_10k:.1f}")


if __name__ == "__main__":
    main()
