"""Linearisation (docs/DESIGN.md 5.3): residuals and Jacobian blocks of the data and ARAP terms.

The data terms (one per match: warp, residuals, robust reweighting and the 3 x 6A Jacobian block)
are one fused C++ op with its own backward (csrc/solver/solver.h MatchTermForward/Backward), so
that a linearisation is one pass over the matches instead of some fifty tensor ops and their
autograd graph; autograd still follows the chain through the linearisation point (the node
motions), the correspondences and their weights. tests/reference/terms_reference.py is the
plain-PyTorch version it is tested against. The ARAP terms (one per edge) are a fused op alike;
the optional point-to-plane terms (icp_terms) are still tensor code over model.warp.anchor_terms.
"""
import torch

from model.ext import C
from model.warp import anchor_terms

ROBUST_LOSSES = {"none": 0, "cauchy": 1, "huber": 2}


class _MatchTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, source_points, target_pixels, target_depth, weights, rotations, translations, anchors,
                anchor_weights, nodes, intrinsics, params, jacobian):
        residuals, J, root, structure = C.match_terms(source_points, anchors, anchor_weights, nodes,
                                                      target_pixels, target_depth, weights, intrinsics,
                                                      rotations, translations, *params, jacobian)
        ctx.save_for_backward(source_points, target_pixels, target_depth, weights, rotations, translations,
                              anchors, anchor_weights, nodes, intrinsics, root)
        ctx.params = params
        ctx.set_materialize_grads(False)  # an unused J or structure costs the backward nothing
        if not jacobian:
            ctx.mark_non_differentiable(J)
        return residuals, J, structure

    @staticmethod
    def backward(ctx, grad_residuals, grad_J, grad_structure):
        (source_points, target_pixels, target_depth, weights, rotations, translations, anchors,
         anchor_weights, nodes, intrinsics, root) = ctx.saved_tensors
        empty = source_points.new_zeros(0)
        if grad_residuals is None:
            grad_residuals = source_points.new_zeros(source_points.shape[0], 3)
        g_x, g_tp, g_td, g_c, g_nodes = C.match_terms_backward(
            source_points, anchors, anchor_weights, nodes, target_pixels, target_depth, weights, intrinsics,
            rotations, translations, *ctx.params, root, grad_residuals, empty if grad_J is None else grad_J,
            empty if grad_structure is None else grad_structure)
        g_R = g_nodes[:, :9].reshape(-1, 3, 3) if ctx.needs_input_grad[4] else None
        g_t = g_nodes[:, 9:] if ctx.needs_input_grad[5] else None
        return g_x, g_tp, g_td, g_c, g_R, g_t, None, None, None, None, None, None


def match_terms(source_points, anchors, anchor_weights, nodes, target_pixels, target_depth, weights,
                intrinsics, rotations, translations, flow_weight, depth_weight,
                robust_loss: str = "none", robust_scale: float = 1.0, structure: bool = False,
                jacobian: bool = True):
    """Residuals (M, 3) and Jacobian blocks (M, 3, 6A) of the data terms, and with structure
    the (M, 5 + 3A) numbers that with the skinning weights define the blocks (the derivative
    of the residuals w.r.t. the warped point, 5 values, and the rotated offsets q_k; also
    differentiable): what the dense solve reads instead of J (normal_equations.assemble_dense,
    the step's backward). Without jacobian the blocks are not formed (J is empty, (0, 3, 6A)).

    source_points (M, 3); anchors (M, A) int64 flat node indices; anchor_weights (M, A);
    nodes (T, 3) node positions; target_pixels (M, 2); target_depth (M,); weights (M,)
    correspondence weights c; intrinsics (M, 4) fx, fy, cx, cy of each match; rotations
    (T, 3, 3); translations (T, 3). The warped point is x' = sum_k w_k (R_k (x - g_k) + g_k + t_k).
    Block column 6k + p: unknown p (rotation 0-2, translation 3-5) of anchor k. Rows: flow x,
    flow y, depth, each scaled by sqrt(term weight) * c * rho, where rho is the root of the
    iteratively-reweighted-least-squares weight of the match's reprojection error e in pixels
    (robust_loss none: 1; cauchy: 1 / (1 + (e/s)^2); huber: min(1, s / e); s = robust_scale),
    a constant of the linearisation (no gradient). Differentiable w.r.t. source_points,
    target_pixels, target_depth, weights, rotations and translations; the skinning weights, node
    positions and intrinsics must not require gradients.
    """
    if robust_loss not in ROBUST_LOSSES:
        raise ValueError(f"robust_loss must be one of {sorted(ROBUST_LOSSES)}, found {robust_loss!r}")
    if anchor_weights.requires_grad or nodes.requires_grad or intrinsics.requires_grad:
        raise ValueError("match_terms: anchor_weights, nodes and intrinsics get no gradient; detach them")
    params = (float(flow_weight), float(depth_weight), ROBUST_LOSSES[robust_loss], float(robust_scale))
    residuals, J, blocks_structure = _MatchTerms.apply(source_points, target_pixels, target_depth, weights,
                                                       rotations, translations, anchors, anchor_weights, nodes,
                                                       intrinsics, params, bool(jacobian))
    return (residuals, J, blocks_structure) if structure else (residuals, J)


def icp_terms(source_points, anchors, anchor_weights, nodes, target_points, target_normals, weights,
              rotations, translations, icp_weight, jacobians: bool = True):
    """Residuals (M, 1) and Jacobian blocks (M, 1, 24) of the dense point-to-plane terms
    (DynamicFusion's depth data term): r = sqrt(icp_weight) c n . (x' - y).

    source_points, anchors, anchor_weights, nodes, rotations, translations as for match_terms
    (x' the warped source point); target_points (M, 3) the live point y associated with each
    source point; target_normals (M, 3) its unit normal n; weights (M,) c. Only the motion
    along n is constrained: the point may slide on the live surface's tangent plane. Block
    columns of anchor k: w_k c (q_k x n) (rotation), w_k c n (translation).
    """
    q, warped = anchor_terms(source_points, anchors, anchor_weights, nodes, rotations, translations)
    cn = ((icp_weight ** 0.5) * weights)[:, None] * target_normals           # (M, 3)
    residuals = ((warped - target_points) * cn).sum(dim=1, keepdim=True)
    if not jacobians:
        return residuals, None
    n = cn[:, None, :].expand_as(q)
    w = anchor_weights[..., None]
    blocks = torch.cat((w * torch.cross(q, n, dim=-1), w * n), dim=-1)        # (M, A, 6)
    return residuals, blocks.reshape(q.shape[0], 1, 6 * q.shape[1])


def robust_icp_weights(residuals: torch.Tensor, weights: torch.Tensor, icp_weight: float, loss: str,
                       scale: float) -> torch.Tensor:
    """Square roots (M,) of the iteratively-reweighted-least-squares weights of point-to-plane
    terms from their distance in metres (no gradient), with match_terms' robust losses."""
    with torch.no_grad():
        c = (icp_weight ** 0.5) * weights.detach()
        error = residuals.detach()[:, 0].abs() / c.clamp(min=1e-12)
        if loss == "cauchy":
            robust = 1.0 / (1.0 + (error / scale) ** 2)
        else:  # huber
            robust = torch.clamp(scale / error.clamp(min=1e-12), max=1.0)
        return robust.sqrt()


class _EdgeTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights, rotations, translations, edges, nodes):
        residuals, J = C.edge_terms(edges, weights, nodes, rotations, translations)
        ctx.save_for_backward(weights, rotations, translations, edges, nodes)
        return residuals, J

    @staticmethod
    def backward(ctx, grad_residuals, grad_J):
        weights, rotations, translations, edges, nodes = ctx.saved_tensors
        g_nodes, g_w = C.edge_terms_backward(edges, weights, nodes, rotations, translations, grad_residuals,
                                             grad_J)
        g_R = g_nodes[:, :9].reshape(-1, 3, 3) if ctx.needs_input_grad[1] else None
        g_t = g_nodes[:, 9:] if ctx.needs_input_grad[2] else None
        return g_w, g_R, g_t, None, None


def edge_terms(sources, targets, edge_weights, nodes, rotations, translations, arap_weight):
    """Residuals (E, 3) and Jacobian blocks (E, 3, 12) of the ARAP terms of edges i -> j, one
    fused C++ op (csrc/solver/solver.h EdgeTermForward/Backward).

    sources, targets (E,) int64 flat node indices; edge_weights (E,); nodes (T, 3) node
    positions; rotations (T, 3, 3); translations (T, 3). Slot 0 is node i, slot 1 node j:
    r = w (R_i (g_j - g_i) + g_i + t_i - g_j - t_j), w = sqrt(arap_weight) * edge weight.
    Differentiable w.r.t. edge_weights, rotations and translations; node positions must not
    require gradients.
    """
    if nodes.requires_grad:
        raise ValueError("edge_terms: node positions get no gradient; detach them")
    w = (arap_weight ** 0.5) * edge_weights
    return _EdgeTerms.apply(w, rotations, translations, torch.stack((sources, targets), dim=1), nodes)
