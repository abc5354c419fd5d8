"""Dense-Jacobian Gauss-Newton reference (the formulation of the original code, done right).

One sample, everything in plain PyTorch with autograd all the way: the full Jacobian J of size
(3 M + 3 E) x 6 N is filled column block by column block with index_put, then A = J^T J + damping
I, b = J^T r, and the increment comes from torch.linalg.solve. It is slow and memory hungry, as
the original was; model/solver/ must reproduce its numbers, and the benchmark times it.
`residuals` writes the energy directly (no Jacobian), so tests check `dense_jacobian` against
torch.autograd.functional.jacobian.

Unknown layout: node n owns columns 6n..6n+5 = (rotation increment (3), translation increment (3));
rotations are updated on the left, R <- exp(dw) R.
"""
from typing import Dict, List

import torch


def exp_so3(w: torch.Tensor) -> torch.Tensor:
    """(N, 3) axis-angle -> (N, 3, 3) through the matrix exponential (obviously right)."""
    x, y, z = w.unbind(-1)
    o = torch.zeros_like(x)
    k = torch.stack((o, -z, y, z, o, -x, -y, x, o), dim=-1).reshape(-1, 3, 3)
    return torch.linalg.matrix_exp(k)


def warp(points, anchors, anchor_weights, nodes, R, t):
    """x' = sum_k w_k (R_k (x - g_k) + g_k + t_k) for (M, 3) points and (M, 4) local anchors."""
    out = torch.zeros_like(points)
    for k in range(anchors.shape[1]):
        a = anchors[:, k]
        out = out + anchor_weights[:, k:k + 1] * (
            torch.einsum("mij,mj->mi", R[a], points - nodes[a]) + nodes[a] + t[a])
    return out


def residuals(problem: Dict[str, torch.Tensor], R, t, weights: Dict[str, float]) -> torch.Tensor:
    """All residuals, (3 M + 3 E,): per match flow x, flow y, depth; then per edge x, y, z."""
    p = problem
    fx, fy, cx, cy = p["intrinsics"]
    warped = warp(p["points"], p["anchors"], p["anchor_weights"], p["nodes"], R, t)
    c = p["weights"]
    sf, sd, sa = (weights["flow"] ** 0.5, weights["depth"] ** 0.5, weights["arap"] ** 0.5)
    data = torch.stack((
        sf * c * (fx * warped[:, 0] / warped[:, 2] + cx - p["target_pixels"][:, 0]),
        sf * c * (fy * warped[:, 1] / warped[:, 2] + cy - p["target_pixels"][:, 1]),
        sd * c * (warped[:, 2] - p["target_depth"])), dim=1).reshape(-1)
    i, j = p["edges"][:, 0], p["edges"][:, 1]
    g = p["nodes"]
    arap = sa * p["edge_weights"][:, None] * (
        torch.einsum("eab,eb->ea", R[i], g[j] - g[i]) + g[i] + t[i] - g[j] - t[j])
    return torch.cat((data, arap.reshape(-1)))


def dense_jacobian(problem: Dict[str, torch.Tensor], R, t, weights: Dict[str, float]) -> torch.Tensor:
    """d residuals / d (rotation and translation increments), dense (3 M + 3 E, 6 N)."""
    p = problem
    fx, fy, _, _ = p["intrinsics"]
    points, anchors, aw, g = p["points"], p["anchors"], p["anchor_weights"], p["nodes"]
    M, N, E = points.shape[0], g.shape[0], p["edges"].shape[0]
    sf, sd, sa = (weights["flow"] ** 0.5, weights["depth"] ** 0.5, weights["arap"] ** 0.5)
    warped = warp(points, anchors, aw, g, R, t)
    x, y, z = warped.unbind(1)
    c = p["weights"]
    # Filled in place, as the original did (autograd records each accumulation).
    J = torch.zeros(3 * M + 3 * E, 6 * N, dtype=points.dtype, device=points.device)
    rows = torch.arange(M, device=points.device) * 3
    # d(flow x)/d warped = sf c (fx / z, 0, -fx x / z^2); d(flow y) likewise; d(depth) = sd c e_z.
    d_res = [torch.stack((sf * c * fx / z, torch.zeros_like(z), -sf * c * fx * x / z ** 2), 1),
             torch.stack((torch.zeros_like(z), sf * c * fy / z, -sf * c * fy * y / z ** 2), 1),
             torch.stack((torch.zeros_like(z), torch.zeros_like(z), sd * c), 1)]
    for k in range(anchors.shape[1]):
        a = anchors[:, k]
        q = torch.einsum("mij,mj->mi", R[a], points - g[a])
        w = aw[:, k:k + 1]
        for row in range(3):
            d = d_res[row]
            # d warped / d dw_k = -w_k [q]_x  =>  d res / d dw_k = w_k (q x d)
            rot = w * torch.cross(q, d, dim=1)
            trans = w * d
            for col in range(3):
                J.index_put_((rows + row, 6 * a + col), rot[:, col], accumulate=True)
                J.index_put_((rows + row, 6 * a + 3 + col), trans[:, col], accumulate=True)
    if E:
        i, j = p["edges"][:, 0], p["edges"][:, 1]
        w = sa * p["edge_weights"]
        d = torch.einsum("eab,eb->ea", R[i], g[j] - g[i])
        erow = 3 * M + torch.arange(E, device=points.device) * 3
        for row in range(3):
            # d/d dw_i of R_i (g_j - g_i): -[d]_x, row `row` = (d x e_row)
            e_row = torch.zeros(3, dtype=points.dtype, device=points.device)
            e_row[row] = 1
            rot = torch.cross(d, e_row.expand_as(d), dim=1)
            for col in range(3):
                J.index_put_((erow + row, 6 * i + col), w * rot[:, col], accumulate=True)
            J.index_put_((erow + row, 6 * i + 3 + row), w, accumulate=True)
            J.index_put_((erow + row, 6 * j + 3 + row), -w, accumulate=True)
    return J


def gauss_newton(problem: Dict[str, torch.Tensor], iterations: int, weights: Dict[str, float],
                 damping: float) -> Dict[str, object]:
    """Runs the dense solve; returns rotations (N, 3, 3), translations (N, 3), energies."""
    g = problem["nodes"]
    N = g.shape[0]
    R = torch.eye(3, dtype=g.dtype, device=g.device).repeat(N, 1, 1)
    t = torch.zeros(N, 3, dtype=g.dtype, device=g.device)
    energies: List[float] = []
    for _ in range(iterations):
        r = residuals(problem, R, t, weights)
        J = dense_jacobian(problem, R, t, weights)
        energies.append(float((r.detach() ** 2).sum()))
        A = J.T @ J + damping * torch.eye(6 * N, dtype=g.dtype, device=g.device)
        b = J.T @ r
        delta = torch.linalg.solve(A, -b).reshape(N, 6)
        R = exp_so3(delta[:, :3]) @ R
        t = t + delta[:, 3:]
    energies.append(float((residuals(problem, R, t, weights).detach() ** 2).sum()))
    return {"rotations": R, "translations": t, "energies": energies}
