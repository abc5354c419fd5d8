"""Plain-PyTorch reference of the ARAP extension of hidden nodes (fusion/hidden.py).

Dense and obviously right: the symmetric N x N edge-weight matrix, and per iteration the
local step as an explicit sum over every node pair (H, N, 3, 3) and the global step as one
dense linear solve of the hidden nodes' normal equations.
"""
import torch


def _rotation(C):
    U, _, Vh = torch.linalg.svd(C)
    V = Vh.transpose(1, 2)
    sign = torch.det(V @ U.transpose(1, 2))
    D = torch.diag_embed(torch.stack((torch.ones_like(sign), torch.ones_like(sign), sign), dim=1))
    return V @ D @ U.transpose(1, 2)


def arap_extension_reference(positions, edges, edge_weights, dR, dt, hidden, iterations=10, anchor=1e-6):
    N = positions.shape[0]
    ids = torch.nonzero(hidden).squeeze(1)
    if ids.numel() == 0 or iterations <= 0 or bool(hidden.all()):
        return dR, dt
    q = positions.double()
    p = q + dt.double()
    R = dR.double().clone()
    W = torch.zeros(N, N, dtype=torch.float64)
    for i in range(N):
        for k in range(edges.shape[1]):
            j = int(edges[i, k])
            if j >= 0 and j != i:
                w = max(float(edge_weights[i, k]), 0.0)
                W[i, j] = max(W[i, j], w)
                W[j, i] = max(W[j, i], w)
    start = p[ids].clone()
    degree = W[ids].sum(dim=1)
    scale = anchor * degree.clamp(min=1e-6)
    seen = torch.ones(N, dtype=torch.bool)
    seen[ids] = False
    for _ in range(iterations):
        dq = q[None, :, :] - q[ids][:, None, :]                       # (H, N, 3) q_j - q_i
        dp = p[None, :, :] - p[ids][:, None, :]
        C = (W[ids][:, :, None, None] * dq[..., :, None] * dp[..., None, :]).sum(dim=1)
        R[ids] = _rotation(C)
        # sum_j w_ij (p_i - p_j) = sum_j w_ij (R_i + R_j) / 2 (q_i - q_j) (+ the anchor to the start)
        Rsum = 0.5 * (R[ids][:, None] + R[None, :])                   # (H, N, 3, 3)
        rhs = (W[ids][:, :, None] * torch.einsum("hnab,hnb->hna", Rsum, -dq)).sum(dim=1)
        rhs = rhs + W[ids][:, seen] @ p[seen] + scale[:, None] * start
        A = torch.diag(degree + scale) - W[ids][:, ids]
        p[ids] = torch.linalg.solve(A, rhs)
    dR, dt = dR.clone(), dt.clone()
    dR[ids] = R[ids].to(dR.dtype)
    dt[ids] = (p[ids] - q[ids]).to(dt.dtype)
    return dR, dt
