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
With --hidden-rest seen the canonical positions come with a store of rest vectors per directed
edge i -> j, R_i^T (p_j - p_i) from the last frame that saw both nodes well (node i's canonical
frame: q_j - q_i while the edge has moved rigidly), which replace q_j - q_i in both steps: a
hidden region keeps bending or twisting as it was last observed to, instead of springing back
to the canonical shape, and never takes an estimate made while it was hidden as its rest.
With --rest-smoothing below 1 each well-seen frame moves an edge's stored vector only part of
the way to its shape then: an average over the frames that saw it, so one frame's tracking
error weighs less.
With --rest-half-life the store's vectors fade toward q_j - q_i with the frames since they were
seen (fade_edge_rest): the deformation goes on out of view (the bends and twists of a moving
body turn back), so the shape last seen says less the longer a part stays hidden.
"""
from typing import Optional, Tuple

import torch


def _rotation(C: torch.Tensor) -> torch.Tensor:
    """The rotations (H, 3, 3) maximising tr(R C) for (H, 3, 3) covariances C (Kabsch)."""
    U, _, Vh = torch.linalg.svd(C)
    V = Vh.transpose(1, 2)
    sign = torch.det(V @ U.transpose(1, 2))
    D = torch.diag_embed(torch.stack((torch.ones_like(sign), torch.ones_like(sign), sign), dim=1))
    return V @ D @ U.transpose(1, 2)


EDGE_KEY = 1 << 32     # directed edge i -> j as the key i * EDGE_KEY + j


def lookup_edge_rest(rest: Optional[Tuple[torch.Tensor, ...]], i: torch.Tensor, j: torch.Tensor,
                     default: torch.Tensor) -> torch.Tensor:
    """The stored rest vectors (E, 3) of the directed edges i -> j, `default` where none is."""
    if rest is None or rest[0].numel() == 0:
        return default
    keys, vectors = rest[0], rest[1]
    wanted = i * EDGE_KEY + j
    at = torch.searchsorted(keys, wanted).clamp(max=keys.numel() - 1)
    found = keys[at] == wanted
    return torch.where(found[:, None], vectors[at].to(default.dtype), default)


def update_edge_rest(rest: Optional[Tuple[torch.Tensor, ...]], i: torch.Tensor, j: torch.Tensor,
                     vectors: torch.Tensor, frame: int = 0, blend: float = 1.0
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The store with the directed edges i -> j set to `vectors` (E, 3), seen at `frame`: (keys
    (M,) sorted, vectors (M, 3), frames (M,) int64). With `blend` < 1 an edge already stored
    moves only that fraction of the way from its stored vector to the new one (an exponential
    average over the frames that saw it)."""
    new_keys, inverse = torch.unique(i * EDGE_KEY + j, return_inverse=True)
    # A pair listed twice carries the same vector twice (both directions of a symmetric edge).
    vectors = torch.zeros(new_keys.numel(), 3, dtype=vectors.dtype).index_copy_(0, inverse, vectors)
    if blend < 1:
        stored = lookup_edge_rest(rest, new_keys // EDGE_KEY, new_keys % EDGE_KEY, vectors)
        vectors = blend * vectors + (1 - blend) * stored
    if rest is None:
        keys, old, frames = torch.zeros(0, dtype=torch.int64), torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64)
    else:
        keys, old, frames = rest
    stay = ~torch.isin(keys, new_keys)
    keys = torch.cat((keys[stay], new_keys))
    values = torch.cat((old[stay], vectors.to(old.dtype)))
    frames = torch.cat((frames[stay], torch.full((new_keys.numel(),), frame, dtype=torch.int64)))
    order = torch.argsort(keys)
    return keys[order], values[order], frames[order]


def fade_edge_rest(rest: Optional[Tuple[torch.Tensor, ...]], positions: torch.Tensor, frame: int,
                   half_life: float) -> Optional[Tuple[torch.Tensor, ...]]:
    """The store with each vector blended toward the canonical q_j - q_i of positions (N, 3), the
    stored shape's weight halving every `half_life` frames since `frame` saw it (0: kept
    whole). The shape a hidden part was last seen in says less the longer it stays hidden: the
    motion goes on out of view, and the canonical shape is where an unseen deformation is
    expected to be on average."""
    if rest is None or rest[0].numel() == 0 or half_life <= 0:
        return rest
    keys, vectors, frames = rest
    i, j = keys // EDGE_KEY, keys % EDGE_KEY
    weight = torch.pow(0.5, (frame - frames).clamp(min=0).to(vectors.dtype) / half_life)[:, None]
    canonical = (positions[j] - positions[i]).to(vectors.dtype)
    return keys, weight * vectors + (1 - weight) * canonical, frames


def arap_extension(positions: torch.Tensor, edges: torch.Tensor, edge_weights: torch.Tensor, dR: torch.Tensor,
                   dt: torch.Tensor, hidden: torch.Tensor, iterations: int = 10,
                   anchor: float = 1e-6, rest: Optional[Tuple[torch.Tensor, ...]] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Motions of the hidden nodes by ARAP with the others fixed.

    positions (N, 3) the rest shape; edges (N, K) int64 (-1: none) and edge_weights (N, K);
    dR (N, 3, 3), dt (N, 3) every node's motion from that shape (the hidden nodes' are the
    start); hidden (N,) bool. An edge counts in both directions (weight: the larger of
    the two, 0 for an absent one). `anchor` ties each hidden position weakly to its start, so a
    hidden part without an edge path to a seen node keeps that start. `rest`: the store of
    update_edge_rest (keys, vectors, frames; fade_edge_rest's for a faded one), the rest vector
    of a directed edge in its first node's frame (q_j - q_i for an edge not in it). Returns
    (dR, dt) with the hidden nodes' rows replaced; the seen nodes' rows unchanged.
    """
    N = positions.shape[0]
    ids = torch.nonzero(hidden).squeeze(1)
    if ids.numel() == 0 or iterations <= 0 or bool(hidden.all()):
        return dR, dt
    dtype = torch.float64
    q = positions.to(dtype)
    p = q + dt.to(dtype)
    R = dR.to(dtype).clone()
    # The symmetric edge list (i, j, w_ij) of the edges from the hidden nodes: O(edges) memory
    # and work in the iterations, so graphs of thousands of nodes cost no N x N matrix.
    i, j, w = _symmetric_edges(edges, edge_weights, N)
    row = torch.full((N,), -1, dtype=torch.int64)
    row[ids] = torch.arange(ids.numel())
    from_hidden = row[i] >= 0
    i, j, w = row[i[from_hidden]], j[from_hidden], w[from_hidden].to(dtype)   # i: hidden row
    H = ids.numel()
    degree = torch.zeros(H, dtype=dtype).index_add_(0, i, w)
    scale = anchor * degree.clamp(min=1e-6)
    start = p[ids].clone()
    # The global step's matrix, the Laplacian rows of the hidden nodes over the hidden unknowns
    # (the seen ones move to the right-hand side) plus the anchor: symmetric, strictly
    # diagonally dominant, so positive definite; it does not change between iterations, so it
    # is factored once (dense H x H: the one cost that grows faster than the edges).
    to_hidden = row[j] >= 0
    A = torch.diag(degree + scale)
    A.index_put_((i[to_hidden], row[j[to_hidden]]), -w[to_hidden], accumulate=True)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise RuntimeError(f"arap_extension: the hidden nodes' system is not positive definite (info {int(info)})")
    to_seen = ~to_hidden
    dq = q[j] - q[ids][i]                                             # (E, 3) q_j - q_i
    # Per directed edge, the rest vector in each end's own frame (the deformation last seen),
    # q_j - q_i where none is stored.
    dq_from_i = lookup_edge_rest(rest, ids[i], j, dq)
    dq_from_j = -lookup_edge_rest(rest, j, ids[i], -dq)
    for _ in range(iterations):
        # Local step: C_i = sum_j w_ij (q_j - q_i)(p_j - p_i)^T (q_j - q_i: or the stored rest
        # vector), then the nearest rotation.
        dp = p[j] - p[ids][i]
        C = torch.zeros(H, 3, 3, dtype=dtype).index_add_(0, i, w[:, None, None] * dq_from_i[:, :, None]
                                                         * dp[:, None, :])
        R[ids] = _rotation(C)
        # Global step: sum_j w_ij (p_i - p_j) = sum_j w_ij (R_i + R_j)/2 (q_i - q_j) for the hidden i
        # (each end's rotation on its own rest vector).
        predicted = 0.5 * (torch.einsum("eab,eb->ea", R[ids][i], dq_from_i)
                           + torch.einsum("eab,eb->ea", R[j], dq_from_j))
        rhs = torch.zeros(H, 3, dtype=dtype).index_add_(0, i, -w[:, None] * predicted)
        rhs.index_add_(0, i[to_seen], w[to_seen, None] * p[j[to_seen]])
        rhs += scale[:, None] * start
        p[ids] = torch.cholesky_solve(rhs, L)
    dR, dt = dR.clone(), dt.clone()
    dR[ids] = R[ids].to(dR.dtype)
    dt[ids] = (p[ids] - q[ids]).to(dt.dtype)
    return dR, dt


def _symmetric_edges(edges: torch.Tensor, edge_weights: torch.Tensor, N: int
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both directions (i, j, w_ij) of every edge of (N, K) edges (-1: none), w_ij the larger of
    the two directions' weights (negative ones 0), without self-loops or repeats."""
    valid = (edges >= 0) & (edges != torch.arange(N)[:, None])
    a = torch.arange(N)[:, None].expand_as(edges)[valid]
    b = edges[valid].long()
    w = edge_weights[valid].double().clamp(min=0)
    keys = torch.cat((a * N + b, b * N + a))
    keys, inverse = torch.unique(keys, return_inverse=True)
    weights = torch.zeros(keys.numel(), dtype=torch.float64).scatter_reduce_(
        0, inverse, torch.cat((w, w)), reduce="amax", include_self=False)
    return keys // N, keys % N, weights
