"""Synthetic Gauss-Newton problems with a known deformation, shared by solver tests and benchmarks."""
from typing import Dict, Optional

import torch

from model.solver import SolverProblem
from model.warp import so3_exp, warp_points

INTRINSICS = (500.0, 500.0, 160.0, 120.0)


def make_problem(num_nodes_side: int = 3, points_side: int = 12, rotation: float = 0.05,
                 translation: float = 0.02, rigid: bool = False, dtype=torch.float64,
                 seed: int = 0) -> Dict[str, torch.Tensor]:
    """A wavy surface ~1 m in front of the camera, a grid of nodes on it, 4 Euclidean anchors per
    point, 8-neighbour edges, and a ground-truth node motion (smooth, or one rigid motion).
    Targets are exact: the projection and depth of the points warped by the true motion."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linspace(-0.25, 0.25, points_side, dtype=dtype)
    yy, xx = torch.meshgrid(u, u, indexing="ij")
    zz = 1.0 + 0.05 * torch.sin(6 * xx) * torch.cos(5 * yy)
    points = torch.stack((xx, yy, zz), -1).reshape(-1, 3)
    nu = torch.linspace(-0.2, 0.2, num_nodes_side, dtype=dtype)
    ny, nx = torch.meshgrid(nu, nu, indexing="ij")
    nodes = torch.stack((nx, ny, 1.0 + 0.05 * torch.sin(6 * nx) * torch.cos(5 * ny)), -1).reshape(-1, 3)
    N = nodes.shape[0]
    d = torch.cdist(points, nodes)
    dist, anchors = d.topk(4, largest=False)
    anchor_weights = torch.softmax(-dist ** 2 / (2 * 0.15 ** 2), dim=1)
    nd = torch.cdist(nodes, nodes) + torch.eye(N, dtype=dtype) * 1e9
    k = min(8, N - 1)
    neighbours = nd.topk(k, largest=False).indices
    edges = torch.stack((torch.arange(N).repeat_interleave(k), neighbours.reshape(-1)), 1)
    if rigid:
        w = torch.tensor([rotation, -rotation, 0.5 * rotation], dtype=dtype)
        R_gt = so3_exp(w).expand(N, 3, 3).clone()
        t_rigid = torch.tensor([translation, -translation, translation], dtype=dtype)
        centre = nodes.mean(0)
        # One rigid motion about `centre`: node i moves by R (g_i - c) + c + t - g_i.
        t_gt = (R_gt @ (nodes - centre)[..., None]).squeeze(-1) + centre + t_rigid - nodes
    else:
        w = rotation * torch.randn(N, 3, generator=gen, dtype=dtype)
        R_gt = so3_exp(w)
        t_gt = translation * torch.randn(N, 3, generator=gen, dtype=dtype)
    warped = warp_points(points, anchors, anchor_weights, nodes, R_gt, t_gt)
    fx, fy, cx, cy = INTRINSICS
    target_pixels = torch.stack((fx * warped[:, 0] / warped[:, 2] + cx,
                                 fy * warped[:, 1] / warped[:, 2] + cy), 1)
    weights = 0.5 + 0.5 * torch.rand(points.shape[0], generator=gen, dtype=dtype)
    return {"points": points, "anchors": anchors, "anchor_weights": anchor_weights, "nodes": nodes,
            "edges": edges, "edge_weights": torch.ones(edges.shape[0], dtype=dtype),
            "target_pixels": target_pixels, "target_depth": warped[:, 2].clone(),
            "weights": weights, "intrinsics": torch.tensor(INTRINSICS, dtype=dtype),
            "rotations_gt": R_gt, "translations_gt": t_gt, "warped_gt": warped}


def to_solver_problem(problems, pad_nodes: Optional[int] = None) -> SolverProblem:
    """Packs single-sample problems (make_problem dicts) into one batched SolverProblem."""
    B = len(problems)
    N = pad_nodes or max(p["nodes"].shape[0] for p in problems)
    dtype = problems[0]["points"].dtype
    nodes = torch.zeros(B, N, 3, dtype=dtype)
    edges = torch.full((B, N, 8), -1, dtype=torch.int64)
    edge_weights = torch.zeros(B, N, 8, dtype=dtype)
    clusters = torch.zeros(B, N, dtype=torch.int64)
    for b, p in enumerate(problems):
        n = p["nodes"].shape[0]
        nodes[b, :n] = p["nodes"]
        slot = torch.zeros(n, dtype=torch.int64)
        for i, j in p["edges"].tolist():
            edges[b, i, slot[i]] = j
            edge_weights[b, i, slot[i]] = 1.0 / 8
            slot[i] += 1
    cat = lambda key: torch.cat([p[key] for p in problems])  # noqa: E731
    return SolverProblem(
        nodes=nodes, num_nodes=torch.tensor([p["nodes"].shape[0] for p in problems]),
        edges=edges, edge_weights=edge_weights, clusters=clusters,
        intrinsics=torch.stack([p["intrinsics"] for p in problems]),
        match_sample=torch.cat([torch.full((p["points"].shape[0],), b, dtype=torch.int64)
                                for b, p in enumerate(problems)]),
        source_points=cat("points"), anchors=cat("anchors"), anchor_weights=cat("anchor_weights"),
        target_pixels=cat("target_pixels"), target_depth=cat("target_depth"), weights=cat("weights"))


def angle_error(R: torch.Tensor, R_gt: torch.Tensor) -> torch.Tensor:
    """Rotation angle of R^T R_gt, radians, per node."""
    cos = ((R.transpose(-1, -2) @ R_gt).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    return torch.arccos(cos.clamp(-1, 1)) if cos.numel() else cos

