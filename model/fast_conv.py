"""CPU fast paths for the convolutions of PWC-Net and the weighting head (MaskNet).

Each helper computes exactly what a plain ``nn.Conv2d`` (+ activation) computes, up to float
rounding, and was kept because it measured faster on CPU (``benchmarks/bench_network.py``):

* ``conv_act``: a conv and its activation (and an optional residual addition) as one oneDNN
  kernel when no autograd graph is recorded on CPU float32 (``fused_available``); elsewhere the
  plain conv and in-place activations, which autograd handles.
* ``narrow_conv3x3``: a 3x3 conv with very few outputs as a matrix product plus shifted additions
  (oneDNN computes outputs in blocks of 16).
* ``cat_channels``: channel concatenation that keeps the channels-last memory format.
* ``transposed_as_phases``: a k4 s2 p1 transposed conv rewritten as a 3x3 conv with one output
  per 2x2 output phase (followed by a pixel shuffle).
"""
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

SLOPE = 0.1  # the leaky ReLU slope of PWC-Net (the reference's)
# Convs with at most this many outputs run as a matrix product (``narrow_conv3x3``) when fused.
NARROW_OUTPUTS = 2

try:
    CONV_POINTWISE = torch.ops.mkldnn._convolution_pointwise if torch.backends.mkldnn.is_available() else None
except (AttributeError, RuntimeError):
    CONV_POINTWISE = None


def fused_available(x: torch.Tensor, *parameters: torch.Tensor) -> bool:
    """True where the fused oneDNN conv + activation kernel applies: CPU float32 and no autograd
    graph to record (the kernel has no backward)."""
    if CONV_POINTWISE is None or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    return not (torch.is_grad_enabled()
                and (x.requires_grad or any(p is not None and p.requires_grad for p in parameters)))


def conv_act(conv: nn.Conv2d, x: torch.Tensor, activation: str = "none",
             residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``activation(conv(x) [+ residual])`` for a Conv2d.

    Args:
        conv: the convolution (its weight, bias, padding, stride and dilation are used).
        x: (B, C_in, H, W) input.
        activation: "none", "leaky_relu" (slope 0.1), "relu" or "sigmoid".
        residual: optional (B, C_out, H', W') tensor added before the activation.
    Returns:
        (B, C_out, H', W'), channels-last when ``x`` is. One fused oneDNN kernel where
        ``fused_available``; otherwise ``conv(x)`` followed by in-place ops, which autograd
        handles. Both agree to float rounding (the same oneDNN convolution; sigmoid within 3e-6).
    """
    if fused_available(x, conv.weight, conv.bias):
        if conv.out_channels <= NARROW_OUTPUTS and activation == "none" and residual is None \
                and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1) \
                and conv.dilation == (1, 1) and conv.groups == 1:
            return narrow_conv3x3(x, conv.weight, conv.bias)
        args = (conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups)
        if residual is None:
            scalars = [SLOPE] if activation == "leaky_relu" else []
            return CONV_POINTWISE(x, *args, activation, scalars, None)
        return CONV_POINTWISE.binary(x, residual, *args, "add", None, activation, [], None)
    y = conv(x)
    if residual is not None:
        y = y.add_(residual)
    if activation == "leaky_relu":
        return F.leaky_relu(y, SLOPE, inplace=True)
    if activation == "relu":
        return F.relu(y, inplace=True)
    if activation == "sigmoid":
        return y.sigmoid_()
    return y


def narrow_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """3x3 convolution (padding 1) with very few outputs, as one matrix product plus shifts.

    oneDNN computes outputs in blocks of 16, so a conv to 2 channels costs as much as one to 16
    (the level-2 flow predictor, 565 -> 2, took 14 ms on one core). Here every pixel's 9 * O tap
    values come from one (H*W, C) x (C, 9*O) product, and the taps are summed with 8 shifted
    additions: about 5 ms, and closer to the float64 result.

    Args:
        x: (B, C, H, W) input, ideally channels-last (then the product reads it in place).
        weight: (O, C, 3, 3); bias: (O,).
    Returns:
        (B, O, H, W), channels-last in memory.
    """
    batch, channels, height, width = x.shape
    outputs = weight.shape[0]
    taps = torch.matmul(x.permute(0, 2, 3, 1), weight.permute(1, 2, 3, 0).reshape(channels, 9 * outputs))
    taps = taps.view(batch, height, width, 3, 3, outputs)
    out = taps[:, :, :, 1, 1] + bias
    for ky in range(3):
        for kx in range(3):
            dy, dx = ky - 1, kx - 1
            if dy or dx:
                # out[y, x] += taps[y+dy, x+dx, ky, kx] where y+dy, x+dx lie inside the map.
                out[:, max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)] += \
                    taps[:, max(0, dy):height + min(0, dy), max(0, dx):width + min(0, dx), ky, kx]
    return out.permute(0, 3, 1, 2)


def cat_channels(tensors: List[torch.Tensor]) -> torch.Tensor:
    """Concatenates (B, C_i, H, W) tensors along channels into one channels-last tensor.

    ``torch.cat`` returns NCHW as soon as one input is NCHW (here the pixel-shuffled upfeat or
    the weighting head's auxiliary input), which would push every later conv off the fast path.
    """
    return torch.cat([t.contiguous(memory_format=torch.channels_last) for t in tensors], dim=1)


# Kernel row (or column) of a k4 s2 p1 transposed conv feeding output phase r from input offset
# t - 1 (t = 0, 1, 2): output 2m+r receives input m-1+t through kernel index 2(1-t)+r+1 when that
# lies in 0..3. Index 4 points at a zero row padded onto the kernel ("no tap").
_PHASE_TAPS = ((3, 1, 4), (4, 2, 0))


def transposed_as_phases(weight: torch.Tensor) -> torch.Tensor:
    """Rewrites a ConvTranspose2d(k=4, s=2, p=1) weight as a 3x3 conv weight (padding 1).

    Args:
        weight: (C_in, C_out, 4, 4) transposed-conv weight.
    Returns:
        (4 * C_out, C_in, 3, 3): output channel ``o*4 + r*2 + s`` computes output phase (r, s) of
        channel o, so ``F.pixel_shuffle(F.conv2d(x, w, bias.repeat_interleave(4), padding=1), 2)``
        equals the transposed conv (up to float rounding).
    """
    c_in, c_out = weight.shape[:2]
    # One gather from the zero-padded 5x5 kernel: flat index 5*row + column, ordered
    # (r, s, t_y, t_x), so that the result reshapes to (C_in, C_out, 4 phases, 3, 3).
    index = [5 * _PHASE_TAPS[r][ty] + _PHASE_TAPS[s][tx]
             for r in (0, 1) for s in (0, 1) for ty in range(3) for tx in range(3)]
    padded = F.pad(weight, (0, 1, 0, 1)).reshape(c_in, c_out, 25)
    phases = padded[:, :, torch.tensor(index, device=weight.device)]
    return phases.reshape(c_in, 4 * c_out, 3, 3).transpose(0, 1)
