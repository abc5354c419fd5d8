"""Warp of points by the motion of an embedded deformation graph (docs/DESIGN.md 5.2).

A point x anchored to nodes a_1..a_4 with skinning weights w_1..w_4 moves to
    x' = sum_k w_k (R_{a_k} (x - g_{a_k}) + g_{a_k} + t_{a_k}).
Everything is differentiable with respect to the points, rotations and translations.
"""
from typing import Tuple

import torch

from model.ext import C


def anchor_terms(points: torch.Tensor, anchors: torch.Tensor, weights: torch.Tensor,
                 nodes: torch.Tensor, rotations: torch.Tensor, translations: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotated offsets and warped points.

    points (P, 3); anchors (P, A) int64 indices into the node arrays (all valid);
    weights (P, A); nodes (N, 3); rotations (N, 3, 3); translations (N, 3).
    Returns q (P, A, 3) with q_k = R_{a_k} (x - g_{a_k}), and the warped points (P, 3).
    """
    anchored_nodes = nodes[anchors]                                        # (P, A, 3)
    q = torch.einsum("paij,paj->pai", rotations[anchors], points[:, None, :] - anchored_nodes)
    warped = (weights[..., None] * (q + anchored_nodes + translations[anchors])).sum(dim=1)
    return q, warped


def warp_points(points: torch.Tensor, anchors: torch.Tensor, weights: torch.Tensor,
                nodes: torch.Tensor, rotations: torch.Tensor, translations: torch.Tensor
                ) -> torch.Tensor:
    """Warps (P, 3) points; anchors (P, A) int64 (-1 = none); returns (P, 3).

    Points with a missing anchor (-1) are warped by their valid anchors only, with the weights
    renormalised; points without any anchor are returned unchanged.
    """
    valid = anchors >= 0
    if bool(valid.all()):
        return anchor_terms(points, anchors, weights, nodes, rotations, translations)[1]
    w = torch.where(valid, weights, torch.zeros_like(weights))
    total = w.sum(dim=1, keepdim=True)
    w = torch.where(total > 0, w / total.clamp(min=1e-12), w)
    _, warped = anchor_terms(points, anchors.clamp(min=0), w, nodes, rotations, translations)
    return torch.where(total > 0, warped, points)


def so3_exp(omega: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula: (..., 3) axis-angle -> (..., 3, 3) rotation, differentiable at 0."""
    theta2 = (omega * omega).sum(dim=-1)
    small = theta2 < 1e-8
    safe2 = torch.where(small, torch.ones_like(theta2), theta2)
    theta = safe2.sqrt()
    # Taylor expansions near 0 keep values and gradients finite.
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / safe2)
    k = skew(omega)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device).expand(k.shape)
    return eye + a[..., None, None] * k + b[..., None, None] * (k @ k)


class _LeftRotate(torch.autograd.Function):
    """exp(omega) R with the analytic backward (the left Jacobian of SO(3)), one fused op each
    way (csrc/solver/solver.h LeftRotateBody / LeftRotateBackwardBody, where the derivation
    is): the solver's rotation update, once per Gauss-Newton iteration, which as tensor code is
    some twenty small ops forward and forty through autograd."""

    @staticmethod
    def forward(ctx, omega, R):
        ctx.save_for_backward(omega, R)
        return C.left_rotate(omega, R)

    @staticmethod
    def backward(ctx, grad):
        omega, R = ctx.saved_tensors
        grad_omega, grad_R = C.left_rotate_backward(omega, R, grad)
        return grad_omega, grad_R


def left_rotate(omega: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """exp(omega) @ R for omega (..., 3) and R (..., 3, 3), differentiable in both (analytic
    backward, the same values and gradients as so3_exp(omega) @ R)."""
    if omega.shape[-1] != 3 or R.shape[-2:] != (3, 3) or omega.shape[:-1] != R.shape[:-2]:
        raise ValueError(f"expected omega (..., 3) and R (..., 3, 3), found {tuple(omega.shape)}, "
                         f"{tuple(R.shape)}")
    shape = R.shape
    return _LeftRotate.apply(omega.reshape(-1, 3), R.reshape(-1, 3, 3)).reshape(shape)


def skew(v: torch.Tensor) -> torch.Tensor:
    """(..., 3) -> (..., 3, 3) with skew(v) @ u = v x u."""
    x, y, z = v.unbind(dim=-1)
    zero = torch.zeros_like(x)
    return torch.stack((zero, -z, y, z, zero, -x, -y, x, zero), dim=-1).reshape(v.shape + (3,))
