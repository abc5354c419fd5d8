"""The hybrid front-end's learned head: DIS and PWC-Net flows blended per pixel, and weighted.

Two front-ends fail in different places: DIS (model/dis_flow.py) is sharp where motion is small
and texture is fine, PWC-Net (model/pwcnet.py) is coarse (it runs at 256 px) but survives large
motion. The hybrid runs both, in both directions, and a small convolutional head that sees how
each flow behaves at every pixel (forward-backward, photometric and depth consistency, how far
the two flows disagree, texture strength) predicts

  * a blend logit: flow = a * DIS + (1 - a) * PWC, a = sigmoid(prior_a + head_a);
  * a weight logit: weight = sigmoid(logit(prior_w) + head_w).

The priors are a fixed hand-made rule, close to the plain DIS front-end: take DIS where its
forward-backward check passes, else PWC-Net where its own passes, weight by the photometric
Gaussian of the chosen flow and nearly drop a match neither check accepts. The head's last
layer starts at zero, so an untrained head is exactly that rule; training (options.STAGES
"4_hybrid") learns corrections end to end through the solver. The features are inputs (no
gradient flows into DIS, which is not differentiable, or into a frozen PWC-Net); the gradient
reaches the head through the blended flow (target pixel and depth of every match) and the
weights.

    head = HybridHead()
    features, prior_a, prior_w = hybrid_features(source_rgb, target_rgb, source_depth,
                                                 target_depth, dis_fw, dis_bw, pwc_fw, pwc_bw, anchored)
    a_logit, w_logit = head(features)      # add the priors (see blend)
"""
from typing import Dict, Tuple

import torch
import torch.nn as nn

from model.correspondences import bilinear_sample, pixel_grid

# Pixels of forward-backward disagreement a consistent match may have (the DIS front-end's
# --dis-consistency default).
CONSISTENCY_PX = 2.0
# Photometric weight: Gaussian of the mean colour difference, sigma 0.1 of the colour range
# (as the DIS front-end's photometric weights).
PHOTO_SIGMA = 0.1
# Depth difference between a source pixel and its match, in metres, beyond which the feature
# saturates (a match on the wrong surface).
DEPTH_RANGE = 0.2
# A check that passes on fewer than this fraction of a sample's anchored pixels failed as a whole
# (the DIS front-end's --dis-min-consistent default): it is not used to drop matches there.
MIN_CONSISTENT = 0.05
# Prior logits: how firmly the rule picks a flow, and the weight factor of a match neither
# forward-backward check accepts.
PRIOR_LOGIT = 4.0
INCONSISTENT_FACTOR = 0.02
FEATURE_CHANNELS = 18
WIDTH = 24


def _fb_error(forward: torch.Tensor, backward: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """|f(u) + b(u + f(u))| (B, H, W) for flows (B, 2, H, W) and match pixels (B, H, W, 2)."""
    back = bilinear_sample(backward, pixels)
    return torch.linalg.vector_norm(forward + back, dim=1)


def _inside(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return ((pixels[..., 0] >= 0) & (pixels[..., 0] <= width - 1)
            & (pixels[..., 1] >= 0) & (pixels[..., 1] <= height - 1))


def flow_features(forward: torch.Tensor, backward: torch.Tensor, source_rgb: torch.Tensor,
                  target_rgb: torch.Tensor, source_depth: torch.Tensor,
                  target_depth: torch.Tensor) -> Dict[str, torch.Tensor]:
    """What one flow looks like at every pixel: forward-backward error (px), photometric error
    (mean absolute colour difference in [0, 1]), photometric weight, depth difference (m,
    saturated at DEPTH_RANGE), whether the match lies inside the image with valid target depth.
    forward/backward (B, 2, H, W) pixels (finite); colours (B, 3, H, W) in [0, 1]; depths (B, H, W)
    metres, 0 = none. All (B, H, W)."""
    B, _, H, W = forward.shape
    pixels = pixel_grid(H, W, forward.device, forward.dtype)[None] + forward.permute(0, 2, 3, 1)
    inside = _inside(pixels, H, W)
    fb = torch.where(inside, _fb_error(forward, backward, pixels), torch.full_like(forward[:, 0], 1e3))
    difference = bilinear_sample(target_rgb, pixels) - source_rgb
    photo = difference.abs().mean(dim=1)
    photo_weight = torch.exp(-(difference ** 2).mean(dim=1) / (2 * PHOTO_SIGMA ** 2))
    good = (target_depth > 0).to(forward.dtype)[:, None]
    depth_valid = (bilinear_sample(good, pixels)[:, 0] >= 0.999) & inside & (source_depth > 0)
    target_z = bilinear_sample(target_depth[:, None], pixels)[:, 0]
    depth = torch.where(depth_valid, (target_z - source_depth).abs().clamp(max=DEPTH_RANGE),
                        torch.full_like(target_z, DEPTH_RANGE))
    return {"fb": fb, "photo": photo, "photo_weight": photo_weight, "depth": depth,
            "valid": depth_valid.to(forward.dtype), "inside": inside}


def _usable(consistent: torch.Tensor, anchored: torch.Tensor) -> torch.Tensor:
    """consistent (B, H, W) bool, or all True for a sample where the check passes on fewer than
    MIN_CONSISTENT of its anchored pixels (the check failed, not the matches)."""
    count = anchored.flatten(1).sum(dim=1).clamp(min=1)
    fraction = (consistent & anchored).flatten(1).sum(dim=1) / count
    failed = (fraction < MIN_CONSISTENT) & anchored.flatten(1).any(dim=1)
    return consistent | failed[:, None, None]


def hybrid_features(source_rgb: torch.Tensor, target_rgb: torch.Tensor, source_depth: torch.Tensor,
                    target_depth: torch.Tensor, dis_forward: torch.Tensor, dis_backward: torch.Tensor,
                    pwc_forward: torch.Tensor, pwc_backward: torch.Tensor,
                    anchored: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The head's input and the priors.

    Colours (B, 3, H, W) in [0, 1]; depths (B, H, W) metres (0 = none); flows (B, 2, H, W)
    pixels, finite; anchored (B, H, W) bool, the pixels the solver can use.
    Returns features (B, FEATURE_CHANNELS, H, W), prior blend logit (B, H, W) and prior weight
    (B, H, W) in (0, 1). No gradient flows through any of them.
    """
    with torch.no_grad():
        dis = flow_features(dis_forward, dis_backward, source_rgb, target_rgb, source_depth, target_depth)
        pwc = flow_features(pwc_forward, pwc_backward, source_rgb, target_rgb, source_depth, target_depth)
        dis_ok = _usable(dis["fb"] <= CONSISTENCY_PX, anchored)
        pwc_ok = _usable(pwc["fb"] <= CONSISTENCY_PX, anchored)
        # DIS where its check passes; else PWC-Net where its check passes; else undecided.
        prior_a = PRIOR_LOGIT * (dis_ok.to(source_rgb.dtype) - (~dis_ok & pwc_ok).to(source_rgb.dtype))
        a = torch.sigmoid(prior_a)
        prior_w = a * dis["photo_weight"] + (1 - a) * pwc["photo_weight"]
        prior_w = prior_w * torch.where(dis_ok | pwc_ok, 1.0, INCONSISTENT_FACTOR)
        gray = source_rgb.mean(dim=1, keepdim=True)
        gradient = ((gray[..., :, 1:] - gray[..., :, :-1]).abs()[..., :-1, :]
                    + (gray[..., 1:, :] - gray[..., :-1, :]).abs()[..., :, :-1])
        texture = torch.nn.functional.pad(gradient, (0, 1, 0, 1), mode="replicate")[:, 0]
        disagreement = torch.linalg.vector_norm(dis_forward - pwc_forward, dim=1)
        channels = [source_rgb[:, c] for c in range(3)] + [
            torch.log1p(dis["fb"].clamp(max=1e3)), torch.log1p(pwc["fb"].clamp(max=1e3)),
            10 * dis["photo"], 10 * pwc["photo"],
            dis["depth"] / DEPTH_RANGE, pwc["depth"] / DEPTH_RANGE,
            dis["valid"], pwc["valid"],
            dis_ok.to(source_rgb.dtype), pwc_ok.to(source_rgb.dtype),
            torch.log1p(disagreement),
            torch.log1p(torch.linalg.vector_norm(dis_forward, dim=1)) / 4,
            torch.log1p(torch.linalg.vector_norm(pwc_forward, dim=1)) / 4,
            10 * texture, prior_a / PRIOR_LOGIT]
        features = torch.stack(channels, dim=1)
    return features, prior_a, prior_w.clamp(1e-3, 1 - 1e-3)


class HybridHead(nn.Module):
    """Four convs (3x3, 3x3 dilated 2, 3x3 dilated 4, 1x1) with ReLUs between: 18 feature
    channels -> 2 logits (blend, weight), a receptive field of 15 px. The last conv starts at
    zero, so the untrained head adds nothing to the priors."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(FEATURE_CHANNELS, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=4, dilation=4), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2, 1))
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """features (B, FEATURE_CHANNELS, H, W) -> (blend logit, weight logit), each (B, H, W)."""
        out = self.layers(features)
        return out[:, 0], out[:, 1]


def blend(head: HybridHead, features: torch.Tensor, prior_a: torch.Tensor, prior_w: torch.Tensor,
          dis_forward: torch.Tensor, pwc_forward: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs the head: flow (B, 2, H, W), weights (B, H, W) in (0, 1) and the blend a (B, H, W)."""
    a_logit, w_logit = head(features)
    a = torch.sigmoid(prior_a + a_logit)
    flow = a[:, None] * dis_forward + (1 - a[:, None]) * pwc_forward
    weights = torch.sigmoid(torch.logit(prior_w) + w_logit)
    return flow, weights, a
