"""Differentiable Gauss-Newton solver for the motion of an embedded deformation graph.

DESIGN.md 5.3. Three pieces, kept apart:
  * linearisation: per-match and per-edge residuals and Jacobian blocks, batched tensor code
    (`match_terms`, `edge_terms`), so autograd follows the chain through the linearisation
    point, the correspondences and their weights;
  * the normal equations A = J^T J, b = J^T r, assembled from those blocks by the C++ op
    (`assemble_normal_equations`, never forming J), and the damped solve by Cholesky whose
    backward reuses the factorisation (`cholesky_solve`);
  * the outer loop (`solve`) with per-sample status (converged / max_iterations / failed) and
    the energy at every iteration.

Energy of one sample (c = correspondence weight, u' = target pixel, z' = target depth):
    sum_m  flow_weight  * c^2 * |pi(x'_m) - u'_m|^2          (2 rows per match)
         + depth_weight * c^2 * (x'_m.z - z'_m)^2            (1 row per match)
  + sum_(i,j) arap_weight * w_ij^2 * |R_i (g_j - g_i) + g_i + t_i - (g_j + t_j)|^2   (3 rows)
Unknowns per node: an axis-angle rotation increment composed on the left, R <- exp(dw) R, and a
translation increment, t <- t + dt. Each iteration solves (J^T J + damping I) dx = -J^T r.

Batches: nodes are padded to N per sample; matches are packed over the batch (a sample id per
match). Nodes that are padding or removed with their cluster are not unknowns: their rows of the
system get an identity diagonal (so their increment is 0) and they keep R = I, t = 0, so no
re-indexing is needed.
"""
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from model.warp import so3_exp, skew
from options import SolverOptions
from model.ext import C

STATUS_CONVERGED = "converged"
STATUS_MAX_ITERATIONS = "max_iterations"
STATUS_FAILED = "failed"


# ----------------------------------------------------------------------------------------------
# Normal equations and the solve


class _AssembleNormalEquations(torch.autograd.Function):
    @staticmethod
    def forward(ctx, J, r, nodes, num_samples, num_nodes):
        A, b = C.assemble_normal_equations(J, r, nodes, num_samples, num_nodes)
        ctx.save_for_backward(J, r, nodes)
        ctx.num_nodes = num_nodes
        return A, b

    @staticmethod
    def backward(ctx, grad_A, grad_b):
        J, r, nodes = ctx.saved_tensors
        if grad_A is None:
            grad_A = torch.zeros((grad_b.shape[0], grad_b.shape[1], grad_b.shape[1]),
                                 dtype=J.dtype, device=J.device)
        if grad_b is None:
            grad_b = torch.zeros(grad_A.shape[:2], dtype=J.dtype, device=J.device)
        grad_J, grad_r = C.assemble_normal_equations_backward(grad_A, grad_b, J, r, nodes,
                                                              ctx.num_nodes)
        return grad_J, grad_r, None, None, None


def assemble_normal_equations(J: torch.Tensor, r: torch.Tensor, nodes: torch.Tensor,
                              num_samples: int, num_nodes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A = sum_m P_m^T J_m^T J_m P_m and b = sum_m P_m^T J_m^T r_m, differentiable.

    J (M, R, 6S) float; r (M, R); nodes (M, S) int64, node of each slot flattened over the batch
    (sample * num_nodes + node), -1 = unused. Returns A (B, 6N, 6N), b (B, 6N).
    """
    if J.dim() != 3 or r.dim() != 2 or nodes.dim() != 2:
        raise ValueError(f"expected J (M, R, 6S), r (M, R), nodes (M, S); found {tuple(J.shape)}, "
                         f"{tuple(r.shape)}, {tuple(nodes.shape)}")
    if J.shape[2] != 6 * nodes.shape[1] or J.shape[:2] != r.shape or J.shape[0] != nodes.shape[0]:
        raise ValueError(f"inconsistent shapes J {tuple(J.shape)}, r {tuple(r.shape)}, "
                         f"nodes {tuple(nodes.shape)}")
    if nodes.dtype != torch.int64:
        raise ValueError(f"nodes must be int64, found {nodes.dtype}")
    return _AssembleNormalEquations.apply(J, r, nodes, int(num_samples), int(num_nodes))


class _MatchJacobian(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, w, dv):
        ctx.save_for_backward(q, w, dv)
        return C.match_jacobian(q, w, dv)[0]

    @staticmethod
    def backward(ctx, grad_J):
        grad_q, grad_w, grad_dv = C.match_jacobian_backward(grad_J, *ctx.saved_tensors)
        return grad_q, grad_w, grad_dv


def match_jacobian(q: torch.Tensor, w: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """Jacobian blocks (M, 3, 6A) of the data terms: row i of anchor k is w_k [q_k x D_i, D_i]
    with D = [[a, 0, b], [0, c, d], [0, 0, e]] the derivative of the residuals (flow x, flow y,
    depth) w.r.t. the warped point. q (M, A, 3) rotated offsets; w (M, A) skinning weights;
    dv (M, 5) = (a, b, c, d, e). Differentiable w.r.t. all three."""
    return _MatchJacobian.apply(q, w, dv)


def _factor_and_solve(A: torch.Tensor, b: torch.Tensor):
    """Cholesky factor L of A (B, D, D) and x = A^-1 b (B, D), with failed (B,) bool.

    A sample whose factorisation fails (not positive definite) or whose solution is not finite
    (a non-finite A or b ends here too) gets x = 0 and L = I, so that nothing downstream, the
    backward included, sees garbage from it.
    """
    L, info = torch.linalg.cholesky_ex(A)
    failed = info != 0
    if bool(failed.any()):
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)
        L = torch.where(failed[:, None, None], eye, L)
    x = torch.cholesky_solve(torch.where(failed[:, None], torch.zeros_like(b), b).unsqueeze(-1), L).squeeze(-1)
    bad = failed | ~torch.isfinite(x).all(dim=1)
    if bool((bad & ~failed).any()):
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)
        L = torch.where(bad[:, None, None], eye, L)
    x = torch.where(bad[:, None], torch.zeros_like(x), x)
    return x, bad, L


class _CholeskySolve(torch.autograd.Function):
    """x = A^-1 b for a batch of symmetric positive definite A, reusing the factor in backward.

    Implicit differentiation of A x = b: dA x + A dx = db, so for an upstream gradient g = dL/dx
        dL/db = A^-T g = A^-1 g        (one more solve with the same Cholesky factor)
        dL/dA = -(dL/db) x^T.
    A sample whose factorisation fails or whose solution is not finite is flagged in `failed`,
    and gets x = 0 (and zero gradients) instead of garbage.
    """

    @staticmethod
    def forward(ctx, A, b):
        x, failed, L = _factor_and_solve(A, b)
        ctx.save_for_backward(L, x, failed)
        ctx.mark_non_differentiable(failed)
        return x, failed

    @staticmethod
    def backward(ctx, grad_x, _grad_failed):
        L, x, failed = ctx.saved_tensors
        grad_x = torch.where(failed[:, None], torch.zeros_like(grad_x), grad_x)
        grad_b = torch.cholesky_solve(grad_x.unsqueeze(-1), L).squeeze(-1)
        grad_A = -grad_b.unsqueeze(-1) * x.unsqueeze(-2)
        return grad_A, grad_b


class _GaussNewtonStep(torch.autograd.Function):
    """The damped Gauss-Newton step x = -(A + diag(d))^-1 b of a batch, where A and b are
    assembled (by the C++ op) from groups of terms (J, r, nodes).

    Backward: with u = (A + diag(d))^-1 grad_x (one solve with the saved Cholesky factor),
    dL/dA = -u x^T and dL/db = -u are rank one per sample, so instead of materialising them the
    term gradients are formed directly (csrc/solver StepTermBackward):
        grad_J = -[(J u_m) x_m^T + (J x_m + r) u_m^T],   grad_r = -J u_m.
    Equivalent to assemble_normal_equations + cholesky_solve composed by autograd (a test checks
    this), but with no dense (B, 6N, 6N) gradient and four small products per term.
    """

    @staticmethod
    def forward(ctx, diagonal, num_samples, num_nodes, *groups):
        A = b = None
        for J, r, nodes in zip(groups[0::3], groups[1::3], groups[2::3]):
            A_g, b_g = C.assemble_normal_equations(J, r, nodes, num_samples, num_nodes)
            A, b = (A_g, b_g) if A is None else (A.add_(A_g), b.add_(b_g))
        A.diagonal(dim1=-2, dim2=-1).add_(diagonal)
        x, failed, L = _factor_and_solve(A, -b)
        ctx.save_for_backward(L, x, failed, *groups)
        ctx.mark_non_differentiable(failed)
        return x, failed

    @staticmethod
    def backward(ctx, grad_x, _grad_failed):
        L, x, failed, *groups = ctx.saved_tensors
        grad_x = torch.where(failed[:, None], torch.zeros_like(grad_x), grad_x)
        u = torch.cholesky_solve(grad_x.unsqueeze(-1), L).squeeze(-1)
        grads = []
        for J, r, nodes in zip(groups[0::3], groups[1::3], groups[2::3]):
            if ctx.needs_input_grad[3 + len(grads)] or ctx.needs_input_grad[4 + len(grads)]:
                grad_J, grad_r = C.solve_step_backward(J, r, nodes, u, x)
            else:
                grad_J = grad_r = None
            grads += [grad_J, grad_r, None]
        return (None, None, None, *grads)


def gauss_newton_step(diagonal: torch.Tensor, num_samples: int, num_nodes: int, *groups):
    """x (B, 6N) = -(sum_g J_g^T J_g + diag(diagonal))^-1 sum_g J_g^T r_g and failed (B,) bool.

    diagonal (B, 6N); groups: (J, r, nodes) triples as for assemble_normal_equations.
    """
    if len(groups) % 3 or not groups:
        raise ValueError("groups must be (J, r, nodes) triples")
    return _GaussNewtonStep.apply(diagonal, int(num_samples), int(num_nodes), *groups)


def cholesky_solve(A: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Solves A x = b for A (B, D, D) SPD and b (B, D). Returns x (B, D) and failed (B,) bool."""
    if A.dim() != 3 or b.dim() != 2 or A.shape[:2] != b.shape or A.shape[1] != A.shape[2]:
        raise ValueError(f"expected A (B, D, D) and b (B, D), found {tuple(A.shape)}, {tuple(b.shape)}")
    return _CholeskySolve.apply(A, b)


# ----------------------------------------------------------------------------------------------
# Linearisation


def match_terms(offsets, anchors, anchor_weights, anchored_base, target_pixels, target_depth,
                weights, intrinsics, rotations, translations, flow_weight, depth_weight,
                jacobians: bool = True):
    """Residuals (M, 3) and Jacobian blocks (M, 3, 24) of the data terms.

    offsets (M, A, 3) = x - g_{a_k}, the source point relative to each anchor; anchors (M, A)
    int64 flat node indices; anchor_weights (M, A); anchored_base (M, 3) = sum_k w_k g_{a_k};
    target_pixels (M, 2); target_depth (M,); weights (M,) correspondence weights c;
    intrinsics (M, 4) fx, fy, cx, cy of each match; rotations (BN, 3, 3); translations (BN, 3).
    The warped point is x' = sum_k w_k (R_k offsets_k + g_k + t_k). Block column 6k + p: unknown
    p (rotation 0-2, translation 3-5) of anchor k. Rows: flow x, flow y, depth.
    With jacobians=False only the residuals are computed (and None is returned for J).
    """
    R = rotations[anchors]                                                   # (M, A, 3, 3)
    # q_k = R_k offsets_k, written out: batched 3x3 products are slow through bmm.
    q = (R[..., 0] * offsets[..., 0:1] + R[..., 1] * offsets[..., 1:2]
         + R[..., 2] * offsets[..., 2:3])                                    # (M, A, 3)
    warped = anchored_base + (anchor_weights[..., None] * (q + translations[anchors])).sum(dim=1)
    x, y, z = warped.unbind(dim=-1)
    fx, fy, cx, cy = intrinsics.unbind(dim=-1)
    inv_z = 1.0 / z
    cf = (flow_weight ** 0.5) * weights
    cd = (depth_weight ** 0.5) * weights
    residuals = torch.stack((cf * (fx * x * inv_z + cx - target_pixels[:, 0]),
                             cf * (fy * y * inv_z + cy - target_pixels[:, 1]),
                             cd * (z - target_depth)), dim=-1)
    if not jacobians:
        return residuals, None
    # D = d residuals / d warped point = [[a, 0, b], [0, c, d], [0, 0, e]] per match; the blocks
    # w_k [q_k x D_i, D_i] are formed (and differentiated) by one C++ op.
    dv = torch.stack((cf * fx * inv_z, -cf * fx * x * inv_z * inv_z, cf * fy * inv_z,
                      -cf * fy * y * inv_z * inv_z, cd), dim=1)
    return residuals, match_jacobian(q, anchor_weights, dv)


def edge_terms(sources, targets, edge_weights, nodes, rotations, translations, arap_weight):
    """Residuals (E, 3) and Jacobian blocks (E, 3, 12) of the ARAP terms of edges i -> j.

    sources, targets (E,) int64 flat node indices; edge_weights (E,). Slot 0 is node i, slot 1
    node j: r = w (R_i (g_j - g_i) + g_i + t_i - g_j - t_j).
    """
    w = (arap_weight ** 0.5) * edge_weights
    d = torch.einsum("eij,ej->ei", rotations[sources], nodes[targets] - nodes[sources])
    residuals = w[:, None] * (d + nodes[sources] + translations[sources]
                              - nodes[targets] - translations[targets])
    eye = torch.eye(3, dtype=d.dtype, device=d.device).expand(d.shape[0], 3, 3)
    wi = w[:, None, None]
    blocks = torch.cat((wi * -skew(d), wi * eye, torch.zeros_like(eye), -wi * eye), dim=-1)
    return residuals, blocks


# ----------------------------------------------------------------------------------------------
# The outer loop


@dataclass
class SolverProblem:
    """A batch of problems. B samples, nodes padded to N, M matches packed over the batch."""

    nodes: torch.Tensor            # (B, N, 3) node positions
    num_nodes: torch.Tensor        # (B,) int64 real nodes per sample (the rest is padding)
    edges: torch.Tensor            # (B, N, K) int64 neighbour ids, -1 = none
    edge_weights: torch.Tensor     # (B, N, K) graph edge weights (used with edge_weighting)
    clusters: torch.Tensor         # (B, N) int64 cluster id of each node
    intrinsics: torch.Tensor       # (B, 4) fx, fy, cx, cy
    match_sample: torch.Tensor     # (M,) int64 sample of each match
    source_points: torch.Tensor    # (M, 3)
    anchors: torch.Tensor          # (M, 4) int64 node ids within the sample, -1 = none
    anchor_weights: torch.Tensor   # (M, 4) skinning weights
    target_pixels: torch.Tensor    # (M, 2) target pixel (x, y) of each match
    target_depth: torch.Tensor     # (M,) depth of the target point at that pixel
    weights: torch.Tensor          # (M,) correspondence weights in [0, 1]


    @classmethod
    def from_matches(cls, matches, nodes, num_nodes, edges, edge_weights, clusters, intrinsics):
        """Builds a problem from packed `model.correspondences.Matches` and a padded batch of
        graphs: nodes (B, N, 3), num_nodes (B,), edges (B, N, K), edge_weights (B, N, K),
        clusters (B, N) or (B, N, 1), intrinsics (B, 4)."""
        return cls(nodes=nodes, num_nodes=num_nodes.long(), edges=edges.long(),
                   edge_weights=edge_weights, clusters=clusters.reshape(clusters.shape[:2]).long(),
                   intrinsics=intrinsics, match_sample=matches.sample,
                   source_points=matches.source_points, anchors=matches.anchors,
                   anchor_weights=matches.anchor_weights, target_pixels=matches.target_pixels,
                   target_depth=matches.target_depth, weights=matches.weights)


@dataclass
class SolverResult:
    rotations: torch.Tensor        # (B, N, 3, 3), identity for unsolved nodes
    translations: torch.Tensor     # (B, N, 3), zero for unsolved nodes
    node_valid: torch.Tensor       # (B, N) bool: node was solved in a successful sample
    valid: torch.Tensor            # (B,) bool: status is not failed
    status: List[str]              # per sample: converged / max_iterations / failed
    messages: List[str]            # per sample: why it failed ("" otherwise)
    energies: List[List[float]]    # per sample: total energy at each linearisation, then final
    data_energies: List[List[float]]
    arap_energies: List[List[float]]
    num_matches: torch.Tensor      # (B,) matches used by the solve
    iterations: List[int] = field(default_factory=list)  # per sample: iterations applied


def _subsample(sample: torch.Tensor, B: int, max_matches: int,
               generator: Optional[torch.Generator]) -> torch.Tensor:
    """Indices of at most max_matches random matches per sample (all when max_matches <= 0)."""
    if max_matches <= 0:
        return torch.arange(sample.numel(), device=sample.device)
    keep = []
    for b in range(B):
        index = torch.nonzero(sample == b).squeeze(1)
        if index.numel() > max_matches:
            perm = torch.randperm(index.numel(), generator=generator, device="cpu")[:max_matches]
            index = index[perm.to(index.device)].sort().values
        keep.append(index)
    return torch.cat(keep) if keep else sample.new_zeros(0)


def solve(problem: SolverProblem, options: SolverOptions = SolverOptions(),
          generator: Optional[torch.Generator] = None) -> SolverResult:
    """Runs the damped Gauss-Newton solve for every sample of the batch.

    Never raises for a bad sample: too few or too many nodes, no valid match, a non-finite or
    singular system mark that sample failed (identity motion) and the others are solved.
    Gradients flow to weights, target_pixels, target_depth and source_points.
    """
    p = problem
    B, N = p.nodes.shape[:2]
    device, dtype = p.nodes.device, p.nodes.dtype
    status = [STATUS_MAX_ITERATIONS] * B
    messages = [""] * B

    def fail(b: int, message: str) -> None:
        if status[b] != STATUS_FAILED:
            status[b], messages[b] = STATUS_FAILED, message

    node_exists = torch.arange(N, device=device)[None, :] < p.num_nodes[:, None]

    # Matches: finite inputs, points in range, four anchors among the sample's nodes.
    M = p.source_points.shape[0]
    ok = (torch.isfinite(p.source_points).all(dim=1) & torch.isfinite(p.target_pixels).all(dim=1)
          & torch.isfinite(p.target_depth) & torch.isfinite(p.weights)
          & (p.source_points[:, 2] > 0) & (p.source_points[:, 2] <= options.max_depth)
          & (p.target_depth > 0) & (p.target_depth <= options.max_depth))
    anchor_ok = (p.anchors >= 0) & (p.anchors < p.num_nodes[p.match_sample][:, None])
    ok &= anchor_ok.all(dim=1)
    index = torch.nonzero(ok).squeeze(1)
    index = index[_subsample(p.match_sample[index], B, options.max_matches, generator)]
    sample = p.match_sample[index]
    flat_anchors = sample[:, None] * N + p.anchors[index]
    anchor_weights = p.anchor_weights[index]
    weights = p.weights[index]

    # Clusters with too little match weight are not solved (nor are their matches and edges).
    node_active = node_exists.clone()
    if options.remove_clusters:
        with torch.no_grad():
            node_weight = torch.zeros(B * N, dtype=torch.float64, device=device)
            node_weight.index_add_(0, flat_anchors.reshape(-1),
                                   (anchor_weights * weights[:, None]).reshape(-1).double())
            clusters = torch.where(node_exists, p.clusters, torch.zeros_like(p.clusters))
            num_clusters = int(clusters.max()) + 1 if clusters.numel() else 1
            flat_cluster = (torch.arange(B, device=device)[:, None] * num_clusters + clusters).reshape(-1)
            cluster_weight = torch.zeros(B * num_clusters, dtype=torch.float64, device=device)
            cluster_weight.index_add_(0, flat_cluster, node_weight)
            node_active &= (cluster_weight[flat_cluster] >= options.min_cluster_weight).reshape(B, N)
    active_flat = node_active.reshape(-1)
    keep = active_flat[flat_anchors].all(dim=1)
    index, sample, flat_anchors = index[keep], sample[keep], flat_anchors[keep]
    anchor_weights, weights = anchor_weights[keep], weights[keep]
    num_matches = torch.bincount(sample, minlength=B)

    active_count = node_active.sum(dim=1)
    for b in range(B):
        n_active, n_exist = int(active_count[b]), int(p.num_nodes[b])
        if n_exist > options.max_nodes:
            fail(b, f"too many nodes: {n_exist} > max_nodes {options.max_nodes}")
        elif n_active < options.min_nodes:
            fail(b, f"too few nodes to solve: {n_active} of {n_exist} left after removing "
                    f"clusters with match weight < {options.min_cluster_weight} "
                    f"(min_nodes {options.min_nodes})")
        elif int(num_matches[b]) == 0:
            fail(b, "no valid matches")

    running = torch.tensor([s != STATUS_FAILED for s in status], device=device)
    keep = running[sample]
    index, sample, flat_anchors = index[keep], sample[keep], flat_anchors[keep]
    anchor_weights, weights = anchor_weights[keep], weights[keep]
    points = p.source_points[index]
    anchored_nodes = p.nodes.reshape(B * N, 3)[flat_anchors]                 # (M, 4, 3)
    offsets = points[:, None, :] - anchored_nodes
    anchored_base = (anchor_weights[..., None] * anchored_nodes).sum(dim=1)
    target_pixels = p.target_pixels[index]
    target_depth = p.target_depth[index]
    intrinsics = p.intrinsics[sample]

    # Edges i -> j between active nodes of running samples.
    K = p.edges.shape[2]
    edge_b, edge_i, edge_k = torch.nonzero(p.edges >= 0, as_tuple=True)
    edge_j = p.edges[edge_b, edge_i, edge_k]
    sources, targets = edge_b * N + edge_i, edge_b * N + edge_j.clamp(max=N - 1)
    edge_ok = ((edge_j < p.num_nodes[edge_b]) & active_flat[sources] & active_flat[targets]
               & running[edge_b])
    sources, targets = sources[edge_ok], targets[edge_ok]
    if options.edge_weighting:
        edge_w = K * p.edge_weights[edge_b[edge_ok], edge_i[edge_ok], edge_k[edge_ok]].to(dtype)
    else:
        edge_w = torch.ones(sources.shape[0], dtype=dtype, device=device)
    edge_sample = sources // N

    nodes_flat = p.nodes.reshape(B * N, 3)
    rotations = torch.eye(3, dtype=dtype, device=device).repeat(B * N, 1, 1)
    translations = torch.zeros(B * N, 3, dtype=dtype, device=device)
    energies = [[] for _ in range(B)]
    data_energies = [[] for _ in range(B)]
    arap_energies = [[] for _ in range(B)]
    iterations = [0] * B
    # Damping on the diagonal; rows of nodes that are not unknowns (padding, removed clusters)
    # get 1 so that the system stays regular even without damping.
    diagonal = torch.where(node_active.repeat_interleave(6, dim=1),
                           torch.full((), options.lm_damping, dtype=dtype, device=device),
                           torch.ones((), dtype=dtype, device=device))
    edge_nodes = torch.stack((sources, targets), dim=1)

    def linearise(jacobians: bool, iteration: int):
        r_m, J_m = match_terms(offsets, flat_anchors, anchor_weights, anchored_base,
                               target_pixels, target_depth, weights, intrinsics, rotations,
                               translations, options.flow_weight, options.depth_weight, jacobians)
        if options.robust_loss != "none" and iteration >= 1:
            # Iteratively reweighted least squares on the reprojection error (in pixels) of each
            # match. Not at the first linearisation: at the identity motion every residual is
            # as large as the motion itself, and no match is an outlier yet.
            with torch.no_grad():
                cf = (options.flow_weight ** 0.5) * weights.detach()
                error = r_m.detach()[:, :2].norm(dim=1) / cf.clamp(min=1e-12)
                scale = options.robust_scale
                if options.robust_loss == "cauchy":
                    robust = 1.0 / (1.0 + (error / scale) ** 2)
                else:  # huber
                    robust = torch.clamp(scale / error.clamp(min=1e-12), max=1.0)
                root = robust.sqrt()
            r_m = r_m * root[:, None]
            if J_m is not None:
                J_m = J_m * root[:, None, None]
        r_e, J_e = edge_terms(sources, targets, edge_w, nodes_flat, rotations, translations,
                              options.arap_weight)
        with torch.no_grad():
            data = torch.zeros(B, dtype=torch.float64, device=device)
            data.index_add_(0, sample, (r_m.detach().double() ** 2).sum(dim=1))
            arap = torch.zeros(B, dtype=torch.float64, device=device)
            arap.index_add_(0, edge_sample, (r_e.detach().double() ** 2).sum(dim=1))
            for b in range(B):
                if status[b] != STATUS_FAILED:
                    data_energies[b].append(float(data[b]))
                    arap_energies[b].append(float(arap[b]))
                    energies[b].append(float(data[b] + arap[b]))
        return (r_m, J_m, r_e, J_e) if jacobians else None

    updating = running.clone()
    for iteration in range(options.iterations):
        if not bool(updating.any()):
            break
        r_m, J_m, r_e, J_e = linearise(True, iteration)
        delta, failed = gauss_newton_step(diagonal, B, N, J_m, r_m, flat_anchors, J_e, r_e, edge_nodes)
        for b in torch.nonzero(failed & updating).squeeze(1).tolist():
            fail(b, "singular or non-finite Gauss-Newton system")
        # Out of place: torch.where below saves `updating` for its backward.
        updating = updating & ~failed
        running = running & ~failed
        delta = torch.where(updating[:, None], delta, torch.zeros_like(delta))
        delta = delta.reshape(B * N, 6)
        rotations = so3_exp(delta[:, :3]) @ rotations
        translations = translations + delta[:, 3:]
        with torch.no_grad():
            step = delta.detach().abs().reshape(B, N * 6).amax(dim=1)
            for b in torch.nonzero(updating).squeeze(1).tolist():
                iterations[b] += 1
                if float(step[b]) < options.convergence_tolerance:
                    status[b] = STATUS_CONVERGED
            updating = updating & (step >= options.convergence_tolerance)
    linearise(False, options.iterations)

    valid = running
    solved = (node_active & valid[:, None]).reshape(B * N)
    eye3 = torch.eye(3, dtype=dtype, device=device).expand(B * N, 3, 3)
    rotations = torch.where(solved[:, None, None], rotations, eye3)
    translations = torch.where(solved[:, None], translations, torch.zeros_like(translations))
    for b in range(B):
        if status[b] == STATUS_FAILED:
            energies[b], data_energies[b], arap_energies[b] = [], [], []
    return SolverResult(
        rotations=rotations.reshape(B, N, 3, 3), translations=translations.reshape(B, N, 3),
        node_valid=solved.reshape(B, N), valid=valid.clone(), status=status, messages=messages,
        energies=energies, data_energies=data_energies, arap_energies=arap_energies,
        num_matches=torch.where(valid, num_matches, torch.zeros_like(num_matches)),
        iterations=iterations)

