"""Correspondence-weighting head (the reference tracker's ``mask_net``, batch norm disabled).

Two transposed convs bring the 565-channel level-2 PWC-Net features to full resolution (32 then
16 channels, no activation between or after them); they are concatenated, features first, with
the 12 auxiliary channels (source RGB, source XYZ, warped target RGB, target XYZ at the flow
target) and pass a conv + ReLU, three residual blocks ``ReLU(h + conv_b(ReLU(conv_a(h))))`` and a
1-channel conv + sigmoid, as in the reference tracker (tests/test_networks.py checks it against
the reference's outputs).

``state_dict()`` keys match the reference (``upconv1``, ``upconv2``, ``model.0.0.0``,
``model.{1,2,3}.block0.0`` / ``.block1.0``, ``model.4``); the reference's batch-norm layers are
the identity with ``use_batch_norm = False`` and hold no tensors, so they are left out here.

For CPU speed the full-resolution maps are kept in channels-last memory format: oneDNN runs the
16-channel 3x3 convs at 448x640 about four times faster than in NCHW, where each call spends most
of its time reordering to and from its blocked layout. Without autograd recording, each conv runs
fused with its ReLU, residual addition or sigmoid (``model.fast_conv.conv_act``); with autograd,
plain convs and in-place ops run.
"""
import torch
import torch.nn as nn

from model.fast_conv import cat_channels, conv_act

FEATURE_CHANNELS = 565
AUX_CHANNELS = 12
WIDTH = 16


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class ResidualBlock(nn.Module):
    """``y = ReLU(h + conv_b(ReLU(conv_a(h))))`` with 16-channel 3x3 convs (``block0.0``, ``block1.0``)."""

    def __init__(self, channels: int = WIDTH):
        super().__init__()
        self.block0 = nn.Sequential(_conv3x3(channels, channels))
        self.block1 = nn.Sequential(_conv3x3(channels, channels))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, 16, H, W) -> (B, 16, H, W)."""
        inner = conv_act(self.block0[0], h, "relu")
        return conv_act(self.block1[0], inner, "relu", residual=h)


class MaskNet(nn.Module):
    """Per-pixel correspondence weights from PWC-Net features and 12 auxiliary channels."""

    def __init__(self):
        super().__init__()
        self.upconv1 = nn.ConvTranspose2d(FEATURE_CHANNELS, 32, 4, stride=2, padding=1)
        self.upconv2 = nn.ConvTranspose2d(32, WIDTH, 4, stride=2, padding=1)
        self.model = nn.Sequential(
            nn.Sequential(nn.Sequential(_conv3x3(WIDTH + AUX_CHANNELS, WIDTH)), nn.ReLU(inplace=True)),
            ResidualBlock(), ResidualBlock(), ResidualBlock(),
            _conv3x3(WIDTH, 1))

    def forward(self, features2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Weights in (0, 1).

        Args:
            features2: (B, 565, h, w) level-2 PWC-Net feature stack.
            x: (B, 12, 4h, 4w) auxiliary channels.
        Returns:
            (B, 1, 4h, 4w) sigmoid weights (channels-last memory format).
        """
        if features2.dim() != 4 or features2.shape[1] != FEATURE_CHANNELS:
            raise ValueError(f"MaskNet expects (B, {FEATURE_CHANNELS}, h, w) features, got {tuple(features2.shape)}")
        expected = (features2.shape[0], AUX_CHANNELS, 4 * features2.shape[2], 4 * features2.shape[3])
        if tuple(x.shape) != expected:
            raise ValueError(f"MaskNet expects x of shape {expected}, got {tuple(x.shape)}")
        features2 = features2.contiguous(memory_format=torch.channels_last)
        up = self.upconv2(self.upconv1(features2))
        h = conv_act(self.model[0][0][0], cat_channels([up, x]), "relu")
        for block in self.model[1:4]:
            h = block(h)
        return conv_act(self.model[4], h, "sigmoid")
