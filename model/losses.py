"""Training losses (docs/DESIGN.md 5.5), as the reference defines them.

  flow:  robust L1 of PWC-Net fine-tuning, (|du| + |dv| + 0.01)^0.4 per pixel, on each pyramid
         level against the ground-truth flow downscaled by nearest sampling and divided by 20,
         averaged over valid pixels per sample, then over samples, summed over levels (or, to
         train from scratch, PWC-Net's multiscale end-point error);
  graph: squared L2 between predicted and ground-truth node translations, averaged over the
         solved nodes of each sample, then over samples with a valid solve;
  warp:  L2 between warped source points and source points plus ground-truth scene flow,
         averaged over valid pixels per sample, then over samples with a valid solve;
  mask:  (a baseline) weighted BCE of the correspondence weights against labels: positive when
         the flowed source point lies within 10 cm of its true position, negative beyond 30 cm.
Every function returns a 0-dim tensor (0 when nothing is valid) and the number of samples used.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from model.pwcnet import FLOW_SCALE


def _mean_over_samples(per_pixel: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """per_pixel, mask (B, ...): mean over valid elements of each sample, then over samples."""
    B = per_pixel.shape[0]
    mask = mask.reshape(B, -1).to(per_pixel.dtype)
    count = mask.sum(dim=1)
    total = (torch.nan_to_num(per_pixel.reshape(B, -1)) * mask).sum(dim=1)
    used = count > 0
    if not bool(used.any()):
        return per_pixel.new_zeros(()), 0
    return (total[used] / count[used]).mean(), int(used.sum())


# PWC-Net's weights of levels 2..6 for training from scratch, with per-pixel sums: the level
# means are weighted by alpha_l * (pixels of level l / pixels of level 2).
MULTISCALE_EPE_WEIGHTS = tuple(a / 4 ** i for i, a in enumerate((0.005, 0.01, 0.02, 0.08, 0.32)))


def flow_loss(flow_pyramid: Sequence[torch.Tensor], gt_flow: torch.Tensor, frame,
              kind: str = "robust", epsilon: float = 0.01, q: float = 0.4) -> Tuple[torch.Tensor, int]:
    """Flow loss over the pyramid (flow2 .. flow6). gt_flow (B, 2, H, W) pixels, NaN where
    unknown, in the frame; frame: the tracker's NetworkFrame (how the frame maps to the network
    input). kind "robust": the reference's fine-tuning loss, summed over levels; "epe": PWC-Net's
    multiscale end-point error for training from scratch (its gradient does not fade for large
    errors as the robust one's does), scaled by 100 to be of the robust loss's size."""
    gt = frame.flow_in(gt_flow)
    valid = torch.isfinite(gt).all(dim=1, keepdim=True).to(gt.dtype)
    gt = torch.nan_to_num(gt) / FLOW_SCALE
    total, used = gt.new_zeros(()), 0
    for level, prediction in enumerate(flow_pyramid):
        size = prediction.shape[-2:]
        gt_level = F.interpolate(gt, size=size, mode="nearest")
        valid_level = F.interpolate(valid, size=size, mode="nearest")[:, 0] > 0.5
        if kind == "epe":
            per_pixel = torch.sqrt(((prediction - gt_level) ** 2).sum(dim=1) + 1e-12)
            weight = 100.0 * MULTISCALE_EPE_WEIGHTS[level]
        else:
            per_pixel = ((prediction - gt_level).abs().sum(dim=1) + epsilon) ** q
            weight = 1.0
        value, n = _mean_over_samples(per_pixel, valid_level)
        total = total + weight * value
        used = max(used, n)
    return total, used


def graph_loss(translations: torch.Tensor, gt_deformations: torch.Tensor, node_valid: torch.Tensor,
               sample_valid: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """translations, gt (B, N, 3); node_valid (B, N) solved nodes; sample_valid (B,)."""
    ok = node_valid & sample_valid[:, None] & torch.isfinite(gt_deformations).all(dim=-1)
    per_node = ((translations - torch.nan_to_num(gt_deformations)) ** 2).sum(dim=-1)
    return _mean_over_samples(per_node, ok)


def warp_loss(warped_points: torch.Tensor, source_points: torch.Tensor, gt_scene_flow: torch.Tensor,
              warp_mask: torch.Tensor, sample_valid: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """warped_points (B, H, W, 3) (NaN outside warp_mask); source_points (B, 3, H, W);
    gt_scene_flow (B, 3, H, W), NaN where unknown; warp_mask (B, H, W); sample_valid (B,)."""
    gt = (source_points + gt_scene_flow).permute(0, 2, 3, 1)
    ok = warp_mask & torch.isfinite(gt).all(dim=-1) & sample_valid[:, None, None]
    diff = torch.where(ok[..., None], warped_points - torch.nan_to_num(gt), torch.zeros_like(gt))
    per_pixel = torch.sqrt((diff ** 2).sum(dim=-1) + 1e-12)
    return _mean_over_samples(per_pixel, ok)


def mask_labels(flowed_points: torch.Tensor, true_points: torch.Tensor, positive: float = 0.1,
                negative: float = 0.3) -> Tuple[torch.Tensor, torch.Tensor]:
    """(labels, labelled) for the BCE baseline from (B, H, W, 3) flowed and true positions."""
    distance = (flowed_points - true_points).norm(dim=-1)
    finite = torch.isfinite(distance)
    labels = (distance <= positive) & finite
    labelled = finite & ((distance <= positive) | (distance > negative))
    return labels, labelled


def mask_loss(weights: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor,
              negative_to_positive: Optional[float] = 0.05) -> Tuple[torch.Tensor, int]:
    """Weighted BCE (B, H, W): positives weighted by `negative_to_positive`, as the reference."""
    bce = F.binary_cross_entropy(weights.clamp(1e-6, 1 - 1e-6), labels.to(weights.dtype), reduction="none")
    scale = torch.where(labels, torch.full_like(bce, negative_to_positive), torch.ones_like(bce))
    return _mean_over_samples(scale * bce, labelled)


def sum_losses(terms: List[Tuple[float, torch.Tensor]]) -> torch.Tensor:
    """sum of weight * loss over the enabled terms."""
    total = None
    for weight, value in terms:
        total = weight * value if total is None else total + weight * value
    return total
