"""Linearisation (docs/DESIGN.md 5.3): residuals and Jacobian blocks of the data and ARAP terms,
batched tensor code, so that autograd follows the chain through the linearisation point, the
correspondences and their weights. Only the 3 x 24 data blocks are formed by a C++ op.
"""
import torch

from model.ext import C
from model.warp import skew


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


def icp_terms(offsets, anchors, anchor_weights, anchored_base, target_points, target_normals, weights,
              rotations, translations, icp_weight, jacobians: bool = True):
    """Residuals (M, 1) and Jacobian blocks (M, 1, 24) of the dense point-to-plane terms
    (DynamicFusion's depth data term): r = sqrt(icp_weight) c n . (x' - y).

    offsets, anchors, anchor_weights, anchored_base as for match_terms (x' the warped source
    point); target_points (M, 3) the live point y associated with each source point;
    target_normals (M, 3) its unit normal n; weights (M,) c. Only the motion along n is
    constrained: the point may slide on the live surface's tangent plane. Block columns of
    anchor k: w_k c (q_k x n) (rotation), w_k c n (translation).
    """
    R = rotations[anchors]                                                   # (M, A, 3, 3)
    q = (R[..., 0] * offsets[..., 0:1] + R[..., 1] * offsets[..., 1:2]
         + R[..., 2] * offsets[..., 2:3])                                    # (M, A, 3)
    warped = anchored_base + (anchor_weights[..., None] * (q + translations[anchors])).sum(dim=1)
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
    terms from their distance in metres (no gradient), as robust_weights."""
    with torch.no_grad():
        c = (icp_weight ** 0.5) * weights.detach()
        error = residuals.detach()[:, 0].abs() / c.clamp(min=1e-12)
        if loss == "cauchy":
            robust = 1.0 / (1.0 + (error / scale) ** 2)
        else:  # huber
            robust = torch.clamp(scale / error.clamp(min=1e-12), max=1.0)
        return robust.sqrt()


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


def robust_weights(residuals: torch.Tensor, weights: torch.Tensor, flow_weight: float, loss: str,
                   scale: float) -> torch.Tensor:
    """Square roots (M,) of the iteratively-reweighted-least-squares weights of matches from
    their reprojection error in pixels (no gradient): Cauchy 1 / (1 + (e/s)^2), Huber
    min(1, s / e)."""
    with torch.no_grad():
        cf = (flow_weight ** 0.5) * weights.detach()
        error = residuals.detach()[:, :2].norm(dim=1) / cf.clamp(min=1e-12)
        if loss == "cauchy":
            robust = 1.0 / (1.0 + (error / scale) ** 2)
        else:  # huber
            robust = torch.clamp(scale / error.clamp(min=1e-12), max=1.0)
        return robust.sqrt()
