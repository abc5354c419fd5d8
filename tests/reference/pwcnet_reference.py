"""Literal functional PWC-Net + MaskNet forward of the reference tracker, in plain PyTorch.

Written straight from the facts in ``../shared/fixtures/nnrt_reference/README.md`` with no
optimisation: the cost volume is a loop over the 81 displacements, the warp builds its grid with
``linspace`` exactly as the reference does, the dense blocks concatenate with ``torch.cat``. It
takes plain state dicts with bare keys (the ``flow_net.``/``mask_net.`` prefixes removed) and is
what the optimised ``model.pwcnet`` / ``model.masknet`` are tested and benchmarked against.
"""
from typing import Dict, Optional

import torch
import torch.nn.functional as F

LEVEL_NAMES = {1: "One", 2: "Two", 3: "Thr", 4: "Fou", 5: "Fiv", 6: "Six"}
SEARCH_RADIUS = 4
SLOPE = 0.1


def correlation_reference(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Cost volume, one displacement at a time.

    Args:
        first: (B, C, H, W) source features.
        second: (B, C, H, W) target features.
    Returns:
        (B, 81, H, W): ``out[:, (dy+4)*9 + (dx+4), y, x] = mean_c first[:, c, y, x] *
        second[:, c, y+dy, x+dx]``, with zeros outside ``second``.
    """
    r = SEARCH_RADIUS
    height, width = first.shape[-2:]
    padded = F.pad(second, (r, r, r, r))
    planes = []
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            shifted = padded[:, :, r + dy:r + dy + height, r + dx:r + dx + width]
            planes.append((first * shifted).sum(dim=1))
    return torch.stack(planes, dim=1) / first.shape[1]


def warp_reference(features: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Warps target features by a flow in pixels of their level, as the reference does.

    Args:
        features: (B, C, h, w) target features.
        flow: (B, 2, h, w) displacement in pixels (channel 0 = x, channel 1 = y).
    Returns:
        (B, C, h, w) warped features times the 0/1 validity mask.
    """
    batch, _, height, width = features.shape
    gx = torch.linspace(-1.0, 1.0, width).view(1, 1, 1, width).expand(batch, -1, height, -1)
    gy = torch.linspace(-1.0, 1.0, height).view(1, 1, height, 1).expand(batch, -1, -1, width)
    grid = torch.cat([gx, gy], dim=1)
    flow = torch.cat([flow[:, 0:1] / ((width - 1.0) / 2.0), flow[:, 1:2] / ((height - 1.0) / 2.0)], dim=1)
    grid = (grid + flow).permute(0, 2, 3, 1)
    ones = features.new_ones(batch, 1, height, width)
    sampled = F.grid_sample(torch.cat([features, ones], dim=1), grid, mode="bilinear",
                            padding_mode="zeros", align_corners=False)
    mask = (sampled[:, -1:] > 0.999).to(features.dtype)
    return sampled[:, :-1] * mask


def _conv(state, name, x, stride=1, padding=1, dilation=1):
    return F.conv2d(x, state[name + ".weight"], state[name + ".bias"], stride=stride,
                    padding=padding, dilation=dilation)


def _upconv(state, name, x):
    return F.conv_transpose2d(x, state[name + ".weight"], state[name + ".bias"], stride=2, padding=1)


def _lrelu(x):
    return F.leaky_relu(x, SLOPE)


def extractor_reference(state, image):
    """(B, 3, H, W) image -> list of the 6 pyramid levels, (B, C_l, H/2^l, W/2^l)."""
    levels, x = [], image
    for level in range(1, 7):
        prefix = f"moduleExtractor.module{LEVEL_NAMES[level]}"
        x = _lrelu(_conv(state, prefix + ".0", x, stride=2))
        x = _lrelu(_conv(state, prefix + ".2", x))
        x = _lrelu(_conv(state, prefix + ".4", x))
        levels.append(x)
    return levels


def pwcnet_reference(state: Dict[str, torch.Tensor], source: torch.Tensor, target: torch.Tensor,
                     intermediates: Optional[dict] = None):
    """PWC-Net forward.

    Args:
        state: flow-net state dict with bare keys (``moduleExtractor...``, ``moduleTwo...``).
        source, target: (B, 3, H, W) RGB in [0, 1], H and W multiples of 64.
        intermediates: optional dict filled with named intermediate tensors (names as in
            ``pwc_intermediates.npz``: ``ext_src_L6``, ``cv_raw_L5``, ``warped_tgt_L5``...).
    Returns:
        (flow2, flow3, flow4, flow5, flow6, features2): raw flows (B, 2, H/2^l, W/2^l) and the
        (B, 565, H/4, W/4) level-2 dense feature stack.
    """
    record = intermediates if intermediates is not None else {}
    src = extractor_reference(state, source)
    tgt = extractor_reference(state, target)
    for level in range(1, 7):
        record[f"ext_src_L{level}"] = src[level - 1]
        record[f"ext_tgt_L{level}"] = tgt[level - 1]
    flows = {}
    flow = stack = None
    for level in range(6, 1, -1):
        prefix = f"module{LEVEL_NAMES[level]}"
        first, second = src[level - 1], tgt[level - 1]
        if level == 6:
            cv = correlation_reference(first, second)
            record["cv_raw_L6"] = cv
            stack = _lrelu(cv)
        else:
            upflow = _upconv(state, prefix + ".moduleUpflow", flow)
            upfeat = _upconv(state, prefix + ".moduleUpfeat", stack)
            warped = warp_reference(second, upflow * (20.0 / 2 ** level))
            cv = correlation_reference(first, warped)
            record[f"upflow_L{level}"], record[f"upfeat_L{level}"] = upflow, upfeat
            record[f"warped_tgt_L{level}"], record[f"cv_raw_L{level}"] = warped, cv
            stack = torch.cat([_lrelu(cv), first, upflow, upfeat], dim=1)
        for block in ("One", "Two", "Thr", "Fou", "Fiv"):
            stack = torch.cat([_lrelu(_conv(state, f"{prefix}.module{block}.0", stack)), stack], dim=1)
        flow = _conv(state, f"{prefix}.moduleSix.0", stack)
        record[f"dec_features_L{level}"] = stack
        flows[level] = flow
    record["dec_flow_L2_before_refiner"] = flows[2]
    x = stack
    for index, dilation in zip(range(0, 14, 2), (1, 2, 4, 8, 16, 1, 1)):
        x = _conv(state, f"moduleRefiner.moduleMain.{index}", x, padding=dilation, dilation=dilation)
        if index < 12:
            x = _lrelu(x)
    return flows[2] + x, flows[3], flows[4], flows[5], flows[6], stack


def masknet_reference(state: Dict[str, torch.Tensor], features2: torch.Tensor, x: torch.Tensor,
                      intermediates: Optional[dict] = None) -> torch.Tensor:
    """MaskNet forward (batch norm = identity).

    Args:
        state: mask-net state dict with bare keys (``upconv1...``, ``model.0.0.0...``).
        features2: (B, 565, h, w) level-2 PWC-Net features.
        x: (B, 12, 4h, 4w) auxiliary input.
        intermediates: optional dict filled with ``mask_upconv1`` and ``mask_upconv2``.
    Returns:
        (B, 1, 4h, 4w) sigmoid weights.
    """
    record = intermediates if intermediates is not None else {}
    up1 = _upconv(state, "upconv1", features2)
    up2 = _upconv(state, "upconv2", up1)
    record["mask_upconv1"], record["mask_upconv2"] = up1, up2
    h = F.relu(_conv(state, "model.0.0.0", torch.cat([up2, x], dim=1)))
    for block in (1, 2, 3):
        inner = F.relu(_conv(state, f"model.{block}.block0.0", h))
        h = F.relu(h + _conv(state, f"model.{block}.block1.0", inner))
    return torch.sigmoid(_conv(state, "model.4", h))
