"""Motion of the graph nodes a frame does not see: as-rigid-as-possible extension.

A node without match support (fusion/loop.py, --hidden-support) is held only by the solver's
ARAP edges and its damping, which keeps its rotation near the previous one, so a hidden region
lags behind a turn. The loop first gives each hidden node the rigid extrapolation of its nearest
seen nodes' increments; that is local (four neighbours) and carries the error of their own
rotations, weakly determined, over the lever arm to the hidden node. Here the hidden nodes'
increments are then found by the as-rigid-as-possible energy alone, with the seen nodes' motions
fixed: sum over edges w_ij |(p_i - p_j) - dR_i (q_i - q_j)|^2, q the rest shape, p the nodes'
positions after the frame; alternately each hidden node's rotation (weighted Kabsch of its
edges) and all hidden positions (one linear solve), the standard local-global ARAP iteration. A
rigid motion of the seen nodes extends to the hidden ones exactly; otherwise the hidden region
takes the smoothest motion the seen boundary allows, over its whole extent.

The rest shape q is the caller's: the loop passes the canonical node positions with the whole
motions (--hidden-rest canonical, what a hidden region's shape got wrong before is undone), or
the live positions before the frame with the frame's increments (--hidden-rest previous).
"""
from typing import Tuple

import torch


def _rotation(C: torch.Tensor) -> torch.Tensor:
    """The rotations (H, 3, 3) maximising tr(R C) for (H, 3, 3) covariances C (Kabsch)."""
    U, _, Vh = torch.linalg.svd(C)
    V = Vh.transpose(1, 2)
    sign = torch.det(V @ U.transpose(1, 2))
    D = torch.diag_embed(torch.stack((torch.ones_like(sign), torch.ones_like(sign), sign), dim=1))
    return V @ D @ U.transpose(1, 2)


def arap_extension(positions: torch.Tensor, edges: torch.Tensor, edge_weights: torch.Tensor, dR: torch.Tensor,
                   dt: torch.Tensor, hidden: torch.Tensor, iterations: int = 10,
                   anchor: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """Motions of the hidden nodes by ARAP with the others fixed.

    positions (N, 3) the rest shape; edges (N, K) int64 (-1: none) and edge_weights (N, K);
    dR (N, 3, 3), dt (N, 3) every node's motion from that shape (the hidden nodes' are the
    start); hidden (N,) bool. An edge counts in both directions (weight: the larger of
    the two, 0 for an absent one). `anchor` ties each hidden position weakly to its start, so a
    hidden part without an edge path to a seen node keeps that start. Returns (dR, dt) with the
    hidden nodes' rows replaced; the seen nodes' rows unchanged.
    """
    N = positions.shape[0]
    ids = torch.nonzero(hidden).squeeze(1)
    if ids.numel() == 0 or iterations <= 0 or bool(hidden.all()):
        return dR, dt
    dtype = torch.float64
    q = positions.to(dtype)
    p = (q + dt.to(dtype)).clone()
    R = dR.to(dtype).clone()
    W = torch.zeros(N, N, dtype=dtype)
    valid = edges >= 0
    rows = torch.arange(N)[:, None].expand_as(edges)[valid]
    cols = edges[valid]
    w = edge_weights[valid].to(dtype).clamp(min=0)
    W[rows, cols] = torch.maximum(W[rows, cols], w)
    W = torch.maximum(W, W.T)
    W.fill_diagonal_(0)
    Wh = W[ids]                                                       # (H, N)
    start = p[ids].clone()
    degree = Wh.sum(dim=1)
    scale = anchor * degree.clamp(min=1e-6)
    # The Laplacian rows of the hidden nodes over the hidden unknowns (the seen ones move to the
    # right-hand side).
    A = torch.diag(degree + scale) - Wh[:, ids]
    seen = torch.ones(N, dtype=torch.bool)
    seen[ids] = False
    qh = q[ids]
    Wq = Wh @ q                                                       # (H, 3) sum_j w_ij q_j
    for _ in range(iterations):
        # Local step: C_i = sum_j w_ij (q_j - q_i)(p_j - p_i)^T, expanded into products with W
        # (no (H, N, 3, 3) tensor: graphs grow to thousands of nodes).
        ph = p[ids]
        Wp = Wh @ p
        Wqp = (Wh @ (q[:, :, None] * p[:, None, :]).reshape(N, 9)).reshape(-1, 3, 3)
        C = (Wqp - qh[:, :, None] * Wp[:, None, :] - Wq[:, :, None] * ph[:, None, :]
             + degree[:, None, None] * qh[:, :, None] * ph[:, None, :])
        R[ids] = _rotation(C)
        # Global step: sum_j w_ij (p_i - p_j) = sum_j w_ij (R_i + R_j)/2 (q_i - q_j) for the hidden i.
        WR = (Wh @ R.reshape(N, 9)).reshape(-1, 3, 3)                 # sum_j w_ij R_j
        WRq = Wh @ torch.einsum("nij,nj->ni", R, q)                   # sum_j w_ij R_j q_j
        Rh = R[ids]
        rhs = 0.5 * (torch.einsum("hij,hj->hi", Rh, degree[:, None] * qh - Wq)
                     + torch.einsum("hij,hj->hi", WR, qh) - WRq)
        rhs = rhs + Wh[:, seen] @ p[seen] + scale[:, None] * start
        p[ids] = torch.linalg.solve(A, rhs)
    dR, dt = dR.clone(), dt.clone()
    dR[ids] = R[ids].to(dR.dtype)
    dt[ids] = (p[ids] - q[ids]).to(dt.dtype)
    return dR, dt
