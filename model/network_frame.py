"""The network frame: how an RGB-D frame of any size maps to PWC-Net's input and back.

Network input size: PWC-Net needs sides that are multiples of 64. With network_input="crop" the
frames are centre-cropped to the largest multiple of 64 (640x480 -> 640x448, rows 16..463, as
the reference did), and pixels outside the crop get no flow (hence no match; they are still
warped). With "pad" the frames are padded by replicating their border to the next multiple of
64 and the flow is cut back to the frame. With network_width > 0 the frames are first resized
to that width (a network trained at 320 px then runs on 640 px frames at its own scale, and
faster), and the flow is resized back and rescaled. Outputs are always at the full input size.
"""
from typing import Tuple

import torch
import torch.nn.functional as F


def network_window(height: int, width: int, mode: str) -> Tuple[int, int, int, int]:
    """(top, left, net_height, net_width) of the network input within (crop) or around (pad)
    a frame of height x width; sides become multiples of 64."""
    if mode == "crop" and height >= 64 and width >= 64:
        net_h, net_w = 64 * (height // 64), 64 * (width // 64)
        return (height - net_h) // 2, (width - net_w) // 2, net_h, net_w
    net_h, net_w = 64 * -(-height // 64), 64 * -(-width // 64)
    return (net_h - height) // 2, (net_w - width) // 2, net_h, net_w


def to_network_frame(image: torch.Tensor, window, mode: str) -> torch.Tensor:
    """(B, C, H, W) frame -> (B, C, net_h, net_w) network input (crop, or replicate padding)."""
    top, left, net_h, net_w = window
    height, width = image.shape[-2:]
    if net_h <= height and net_w <= width:
        return image[..., top:top + net_h, left:left + net_w]
    return F.pad(image, (left, net_w - width - left, top, net_h - height - top), mode="replicate")


def from_network_frame(image: torch.Tensor, window, height: int, width: int, fill: float) -> torch.Tensor:
    """(B, C, net_h, net_w) network output -> (B, C, H, W) frame, `fill` outside a crop."""
    top, left, net_h, net_w = window
    if net_h <= height and net_w <= width:
        out = image.new_full(image.shape[:2] + (height, width), fill)
        out[..., top:top + net_h, left:left + net_w] = image
        return out
    return image[..., top:top + height, left:left + width]


class NetworkFrame:
    """How a (H, W) frame maps to the network input: an optional resize to `network_width`
    (aspect kept), then the crop or pad of `network_window`."""

    def __init__(self, height: int, width: int, network_width: int, mode: str):
        self.height, self.width, self.mode = height, width, mode
        self.scale = network_width / width if network_width and network_width != width else 1.0
        self.size = (max(1, round(height * self.scale)), max(1, round(width * self.scale)))
        self.window = network_window(*self.size, mode)

    def _resize(self, image: torch.Tensor, size, mode: str) -> torch.Tensor:
        if tuple(image.shape[-2:]) == tuple(size):
            return image
        if mode == "nearest":
            return F.interpolate(image, size=size, mode="nearest")
        return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)

    def image_in(self, image: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """(B, C, H, W) frame -> (B, C, net_h, net_w)."""
        return to_network_frame(self._resize(image, self.size, mode), self.window, self.mode)

    def flow_in(self, flow: torch.Tensor) -> torch.Tensor:
        """(B, 2, H, W) flow in frame pixels (NaN = unknown) -> network-frame pixels (nearest)."""
        return to_network_frame(self._resize(flow, self.size, "nearest") * self.scale, self.window, self.mode)

    def map_out(self, image: torch.Tensor, fill: float) -> torch.Tensor:
        """(B, C, net_h, net_w) -> (B, C, H, W), `fill` where the network saw nothing."""
        out = from_network_frame(image, self.window, *self.size, fill)
        if self.scale == 1.0:
            return out
        known = torch.isfinite(out).all(dim=1, keepdim=True)
        values = F.interpolate(torch.nan_to_num(out), size=(self.height, self.width), mode="bilinear",
                               align_corners=False)
        known = F.interpolate(known.to(out.dtype), size=(self.height, self.width), mode="nearest") > 0.5
        return torch.where(known, values, torch.full_like(values, fill))

    def flow_out(self, flow: torch.Tensor) -> torch.Tensor:
        """(B, 2, net_h, net_w) network-frame pixels -> (B, 2, H, W) frame pixels, NaN outside."""
        return self.map_out(flow, float("nan")) / self.scale
