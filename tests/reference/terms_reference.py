"""Plain-PyTorch data and ARAP terms of the Gauss-Newton solver: the reference of the fused C++
ops (model/solver/terms.py match_terms, edge_terms). Written for clarity, differentiated by
autograd."""
import torch

from model.warp import anchor_terms, skew


def robust_root(pixel_error: torch.Tensor, loss: str, scale: float) -> torch.Tensor:
    """Root of the iteratively-reweighted-least-squares weight of reprojection errors e (pixels),
    without gradient: Cauchy 1 / (1 + (e/s)^2), Huber min(1, s / e)."""
    e = pixel_error.detach()
    if loss == "none":
        return torch.ones_like(e)
    if loss == "cauchy":
        return (1.0 / (1.0 + (e / scale) ** 2)).sqrt()
    return torch.clamp(scale / e.clamp(min=1e-12), max=1.0).sqrt()


def match_terms(source_points, anchors, anchor_weights, nodes, target_pixels, target_depth, weights,
                intrinsics, rotations, translations, flow_weight, depth_weight, robust_loss="none",
                robust_scale=1.0):
    """Residuals (M, 3) and Jacobian blocks (M, 3, 6A); arguments as model.solver.match_terms."""
    q, warped = anchor_terms(source_points, anchors, anchor_weights, nodes, rotations, translations)
    x, y, z = warped.unbind(dim=-1)
    fx, fy, cx, cy = intrinsics.unbind(dim=-1)
    pixel = torch.stack((fx * x / z + cx - target_pixels[:, 0], fy * y / z + cy - target_pixels[:, 1]), -1)
    c = weights * robust_root(pixel.norm(dim=1), robust_loss, robust_scale)
    cf, cd = flow_weight ** 0.5 * c, depth_weight ** 0.5 * c
    residuals = torch.stack((cf * pixel[:, 0], cf * pixel[:, 1], cd * (z - target_depth)), dim=-1)
    # D = d residuals / d warped point; a left rotation increment w moves q_k by w x q_k, so the
    # block of anchor k is w_k [D (-[q_k]_x), D] = w_k [q_k x D_i, D_i] row by row.
    zero = torch.zeros_like(z)
    D = torch.stack((torch.stack((cf * fx / z, zero, -cf * fx * x / z ** 2), -1),
                     torch.stack((zero, cf * fy / z, -cf * fy * y / z ** 2), -1),
                     torch.stack((zero, zero, cd), -1)), dim=1)          # (M, 3, 3)
    rows = []
    for k in range(anchors.shape[1]):
        rot = torch.cross(q[:, k, None, :].expand_as(D), D, dim=-1)     # (M, 3, 3): q_k x D_i
        rows.append(anchor_weights[:, k, None, None] * torch.cat((rot, D), dim=-1))
    return residuals, torch.cat(rows, dim=-1)


def edge_terms(sources, targets, edge_weights, nodes, rotations, translations, arap_weight):
    """Residuals (E, 3) and Jacobian blocks (E, 3, 12); arguments as model.solver.edge_terms."""
    w = (arap_weight ** 0.5) * edge_weights
    d = torch.einsum("eij,ej->ei", rotations[sources], nodes[targets] - nodes[sources])
    residuals = w[:, None] * (d + nodes[sources] + translations[sources]
                              - nodes[targets] - translations[targets])
    eye = torch.eye(3, dtype=d.dtype, device=d.device).expand(d.shape[0], 3, 3)
    wi = w[:, None, None]
    blocks = torch.cat((wi * -skew(d), wi * eye, torch.zeros_like(eye), -wi * eye), dim=-1)
    return residuals, blocks
