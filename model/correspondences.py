"""Dense correspondences from a flow field, packed as solver matches (docs/DESIGN.md 5.3).

Source pixel u with back-projected point x and flow f(u) matches target pixel u' = u + f(u) and the
target point sampled bilinearly there. Pixel centres are at integer coordinates (docs/DESIGN.md 3), so
sampling uses align_corners=True with the (W - 1) normalisation: zero flow samples each pixel
exactly (the reference's grid was stretched by W / (W - 1) and shifted by half a pixel).
A match is valid when the source depth is valid and at most max_depth, all its anchors exist, u'
lies inside the image and the 4 target pixels around u' all have valid depth that does not jump
by more than max_depth_jump between them.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def pixel_grid(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(H, W, 2) pixel coordinates (x, y) of every pixel centre."""
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=dtype),
                            torch.arange(width, device=device, dtype=dtype), indexing="ij")
    return torch.stack((xs, ys), dim=-1)


def bilinear_sample(image: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Samples (B, C, H, W) at (B, H', W', 2) pixel coordinates (x, y) -> (B, C, H', W').

    Bilinear, pixel centres at integers, zero outside the image. Differentiable w.r.t. both.
    """
    height, width = image.shape[-2:]
    scale = torch.tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)],
                         dtype=pixels.dtype, device=pixels.device)
    grid = pixels * scale - 1.0
    return F.grid_sample(image, grid.to(image.dtype), mode="bilinear", padding_mode="zeros",
                         align_corners=True)


def sample_target_depth(depth: torch.Tensor, pixels: torch.Tensor, max_depth: float,
                        max_depth_jump: float = 0.05) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bilinear target depth at (B, H', W', 2) pixels from (B, H, W) depth -> depth, valid.

    valid: the position is inside the image, every one of the (up to) 4 pixels with a non-zero
    bilinear weight has a depth in (0, max_depth], and the 4 pixels around the position differ
    in depth by at most max_depth_jump: interpolating across a depth edge (foreground against
    background) gives a depth that is on neither surface, and such samples were the largest
    outliers of the depth term on real data.
    """
    good = ((depth > 0) & (depth <= max_depth)).to(depth.dtype)[:, None]
    valid = bilinear_sample(good, pixels)[:, 0] >= 0.999
    sampled = bilinear_sample(torch.where(good > 0, depth[:, None], torch.zeros_like(depth[:, None])),
                              pixels)[:, 0]
    with torch.no_grad():
        B, H, W = depth.shape
        x0 = pixels[..., 0].floor().clamp(0, max(W - 2, 0)).long()
        y0 = pixels[..., 1].floor().clamp(0, max(H - 2, 0)).long()
        flat = depth.reshape(B, -1)
        corners = torch.stack([flat.gather(1, ((y0 + dy) * W + x0 + dx).reshape(B, -1))
                               for dy in (0, 1) for dx in (0, 1)], dim=-1)
        spread = corners.amax(dim=-1) - corners.amin(dim=-1)
        valid &= (spread <= max_depth_jump).reshape(valid.shape)
    return sampled, valid


@dataclass
class Matches:
    """Valid correspondences of a batch, packed (M matches), with where they came from."""

    sample: torch.Tensor           # (M,) int64 sample index
    pixel: torch.Tensor            # (M,) int64 flat source pixel index y * W + x
    source_points: torch.Tensor    # (M, 3)
    anchors: torch.Tensor          # (M, A) int64 node ids within the sample
    anchor_weights: torch.Tensor   # (M, A)
    target_pixels: torch.Tensor    # (M, 2) (x, y)
    target_depth: torch.Tensor     # (M,)
    weights: torch.Tensor          # (M,)
    valid_mask: torch.Tensor       # (B, H, W) bool, the dense validity of every source pixel


def build_matches(source_points: torch.Tensor, flow: torch.Tensor, target_depth: torch.Tensor,
                  pixel_anchors: torch.Tensor, pixel_weights: torch.Tensor,
                  weights: Optional[torch.Tensor] = None, max_depth: float = 6.0,
                  flow_valid: Optional[torch.Tensor] = None, max_depth_jump: float = 0.05) -> Matches:
    """Packs the valid correspondences of a batch.

    source_points (B, H, W, 3); flow (B, 2, H, W) in pixels; target_depth (B, H, W) metres;
    pixel_anchors (B, H, W, A) int (-1 = none); pixel_weights (B, H, W, A); weights (B, H, W)
    correspondence weights (default 1); flow_valid (B, H, W) bool (e.g. ground-truth flow).
    Differentiable w.r.t. flow (through the target pixels and target depth), weights and points.
    """
    B, H, W, _ = source_points.shape
    target_pixels = pixel_grid(H, W, source_points.device, flow.dtype)[None] + flow.permute(0, 2, 3, 1)
    sampled_depth, target_valid = sample_target_depth(target_depth, target_pixels, max_depth,
                                                       max_depth_jump)
    z = source_points[..., 2]
    finite_flow = torch.isfinite(flow).all(dim=1)
    valid = ((z > 0) & (z <= max_depth) & (pixel_anchors >= 0).all(dim=-1) & target_valid
             & finite_flow)
    if flow_valid is not None:
        valid &= flow_valid
    sample, ys, xs = torch.nonzero(valid, as_tuple=True)
    if weights is None:
        weights = torch.ones(B, H, W, dtype=source_points.dtype, device=source_points.device)
    return Matches(
        sample=sample, pixel=ys * W + xs, source_points=source_points[sample, ys, xs],
        anchors=pixel_anchors[sample, ys, xs].long(), anchor_weights=pixel_weights[sample, ys, xs],
        target_pixels=target_pixels[sample, ys, xs], target_depth=sampled_depth[sample, ys, xs],
        weights=weights[sample, ys, xs], valid_mask=valid)
