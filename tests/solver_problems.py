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



def make_grid_problem(nodes_side: int, num_points: int, rotation: float = 0.03,
                      translation: float = 0.01, dtype=torch.float32, seed: int = 0) -> SolverProblem:
    """A one-sample problem of any size, built without all-pairs distances: nodes_side^2 nodes
    on a regular grid over a wavy 1 m x 1 m surface 1.5 m away, num_points random points, each
    anchored to the 4 nodes of its grid cell (bilinear weights), 8-neighbour edges, a smooth
    random motion (low-frequency waves) and exact targets. For benchmarks of 100 to 4096+ nodes."""
    gen = torch.Generator().manual_seed(seed)
    s = nodes_side
    lin = torch.linspace(-0.5, 0.5, s, dtype=torch.float64)

    def surface(x, y):
        return 1.5 + 0.05 * torch.sin(4 * x) * torch.cos(3 * y)

    ny, nx = torch.meshgrid(lin, lin, indexing="ij")
    nodes = torch.stack((nx, ny, surface(nx, ny)), -1).reshape(-1, 3)
    uv = torch.rand(num_points, 2, generator=gen, dtype=torch.float64) * (s - 1)
    cell = uv.floor().clamp(max=s - 2).long()
    f = uv - cell
    ix, iy = cell[:, 0], cell[:, 1]
    anchors = torch.stack((iy * s + ix, iy * s + ix + 1, (iy + 1) * s + ix, (iy + 1) * s + ix + 1), 1)
    fx, fy = f[:, 0], f[:, 1]
    anchor_weights = torch.stack(((1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy), 1)
    px, py = -0.5 + uv[:, 0] / (s - 1), -0.5 + uv[:, 1] / (s - 1)
    points = torch.stack((px, py, surface(px, py)), 1)
    phase = torch.rand(6, generator=gen, dtype=torch.float64) * 6.28
    waves = torch.stack([torch.sin(2 * nodes[:, k % 2] + phase[k]) for k in range(6)], 1)
    R_gt = so3_exp(rotation * waves[:, :3])
    t_gt = translation * waves[:, 3:]
    warped = warp_points(points, anchors, anchor_weights, nodes, R_gt, t_gt)
    fx_, fy_, cx, cy = 500.0, 500.0, 320.0, 240.0
    target_pixels = torch.stack((fx_ * warped[:, 0] / warped[:, 2] + cx, fy_ * warped[:, 1] / warped[:, 2] + cy), 1)
    idx = torch.arange(s * s).reshape(s, s)
    edges = torch.full((s, s, 8), -1, dtype=torch.int64)
    k = 0
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dx == dy == 0:
                continue
            shifted = torch.full((s, s), -1, dtype=torch.int64)
            ys = slice(max(0, -dy), s - max(0, dy))
            xs = slice(max(0, -dx), s - max(0, dx))
            shifted[ys, xs] = idx[max(0, dy):s + min(0, dy), max(0, dx):s + min(0, dx)]
            edges[..., k] = shifted
            k += 1
    N = s * s
    return SolverProblem(
        nodes=nodes.to(dtype)[None], num_nodes=torch.tensor([N]), edges=edges.reshape(1, N, 8),
        edge_weights=torch.full((1, N, 8), 1.0 / 8, dtype=dtype), clusters=torch.zeros(1, N, dtype=torch.int64),
        intrinsics=torch.tensor([[fx_, fy_, cx, cy]], dtype=dtype),
        match_sample=torch.zeros(num_points, dtype=torch.int64), source_points=points.to(dtype),
        anchors=anchors, anchor_weights=anchor_weights.to(dtype), target_pixels=target_pixels.to(dtype),
        target_depth=warped[:, 2].to(dtype), weights=torch.ones(num_points, dtype=dtype))
