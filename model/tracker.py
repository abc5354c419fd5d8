"""The tracker: source and target RGB-D in, node motions and a dense warp out (DESIGN.md 5.3-5.4).

    tracker = Tracker(TrackerOptions(flow="dis"), SolverOptions())
    out = tracker(batch)          # batch from dataset.deepdeform.collate (or make_batch)

Correspondence front-ends (TrackerOptions.flow):
  * network: the PWC-Net flow backbone and the weighting head (MaskNet), end to end trainable;
  * dis: OpenCV's DIS optical flow with uniform or photometric weights and a forward-backward
    consistency check; needs no checkpoint;
  * gt: the ground-truth optical flow of the batch (oracle studies).
The correspondences feed the differentiable Gauss-Newton solver (model/solver.py); its node
motions warp every source pixel that has 4 anchors and valid depth.

Network input size: PWC-Net needs sides that are multiples of 64. With network_input="crop" the
frames are centre-cropped to the largest multiple of 64 (640x480 -> 640x448, rows 16..463, as
the reference did), and pixels outside the crop get no flow (hence no match; they are still
warped). With "pad" the frames are padded by replicating their border to the next multiple of
64 and the flow is cut back to the frame. With network_width > 0 the frames are first resized
to that width (a network trained at 320 px then runs on 640 px frames at its own scale, and
faster), and the flow is resized back and rescaled. Outputs are always at the full input size.
"""
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.correspondences import bilinear_sample, build_matches, pixel_grid
from model.masknet import MaskNet
from model.pwcnet import PWCNet
from model.solver import SolverProblem, solve
from model.warp import warp_points
from options import SolverOptions, TrackerOptions

FLOW_SCALE = 20.0  # PWC-Net flows are in units of 20 pixels


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


def dis_flow(source_rgb: np.ndarray, target_rgb: np.ndarray, options: TrackerOptions
             ) -> Tuple[np.ndarray, np.ndarray]:
    """DIS optical flow between two (H, W, 3) uint8 RGB frames.

    Returns flow (2, H, W) float32 in pixels (NaN where the forward-backward check fails) and
    weights (H, W) float32 in [0, 1].
    """
    import cv2

    presets = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
               "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST, "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
    dis = cv2.DISOpticalFlow_create(presets[options.dis_preset])
    source_gray = cv2.cvtColor(source_rgb, cv2.COLOR_RGB2GRAY)
    target_gray = cv2.cvtColor(target_rgb, cv2.COLOR_RGB2GRAY)
    forward = dis.calc(source_gray, target_gray, None)                      # (H, W, 2)
    height, width = source_gray.shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    map_x, map_y = xs + forward[..., 0], ys + forward[..., 1]
    valid = (map_x >= 0) & (map_x <= width - 1) & (map_y >= 0) & (map_y <= height - 1)
    if options.dis_consistency > 0:
        backward = dis.calc(target_gray, source_gray, None)
        back_at_match = cv2.remap(backward, map_x, map_y, cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=(1e6, 1e6))
        valid &= np.linalg.norm(forward + back_at_match, axis=-1) <= options.dis_consistency
    if options.dis_weights == "photometric":
        warped = cv2.remap(target_rgb, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        difference = (warped.astype(np.float32) - source_rgb.astype(np.float32)) / 255.0
        # Gaussian of the mean colour difference; sigma 0.1 of the colour range.
        weights = np.exp(-(difference ** 2).mean(axis=-1) / (2 * 0.1 ** 2)).astype(np.float32)
    else:
        weights = np.ones((height, width), dtype=np.float32)
    flow = forward.transpose(2, 0, 1).copy()
    flow[:, ~valid] = np.nan
    return flow, weights


class Tracker(nn.Module):
    """Flow front-end + differentiable Gauss-Newton solver + dense warp.

    State dict keys follow the reference (`flow_net.*`, `mask_net.*`), so its checkpoints load.
    The networks exist only for the network front-end.
    """

    def __init__(self, options: TrackerOptions = TrackerOptions(),
                 solver_options: SolverOptions = SolverOptions()):
        super().__init__()
        self.options = options
        self.solver_options = solver_options
        if options.flow == "network":
            self.flow_net = PWCNet(options.cost_volume)
            self.mask_net = MaskNet()

    # ------------------------------------------------------------------------------------------
    # Front-ends

    def network_frame(self, batch: Dict) -> NetworkFrame:
        H, W = batch["source_color"].shape[-2:]
        return NetworkFrame(H, W, self.options.network_width, self.options.network_input)

    def _network_flow(self, batch: Dict) -> Dict:
        source, target = batch["source_color"], batch["target_color"]
        B, _, H, W = source.shape
        frame = self.network_frame(batch)
        flow2, flow3, flow4, flow5, flow6, features2 = self.flow_net(frame.image_in(source), frame.image_in(target))
        net_flow = FLOW_SCALE * F.interpolate(flow2, size=frame.window[2:], mode="bilinear", align_corners=False)
        flow = frame.flow_out(net_flow)
        out = {"flow": flow, "flow_pyramid": [flow2, flow3, flow4, flow5, flow6],
               "network_frame": frame, "weights": None}
        if self.options.use_mask:
            # The 12 channels: source RGB, source XYZ, target RGB and XYZ sampled at the match.
            pixels = pixel_grid(H, W, flow.device, flow.dtype)[None] + torch.nan_to_num(flow).permute(0, 2, 3, 1)
            target_rgb = bilinear_sample(target, pixels)
            target_xyz = bilinear_sample(batch["target_points"], pixels)
            x = torch.cat((source, batch["source_points"], target_rgb, target_xyz), dim=1)
            mask = self.mask_net(features2, frame.image_in(x, "nearest"))
            out["weights"] = frame.map_out(mask, 0.0)[:, 0]
        return out

    def _dis_flow(self, batch: Dict) -> Dict:
        flows, weights = [], []
        for source, target in zip(batch["source_color"], batch["target_color"]):
            to_u8 = lambda image: (image.permute(1, 2, 0).detach().cpu().numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)  # noqa: E731
            flow, weight = dis_flow(to_u8(source), to_u8(target), self.options)
            flows.append(torch.from_numpy(flow))
            weights.append(torch.from_numpy(weight))
        device = batch["source_color"].device
        return {"flow": torch.stack(flows).to(device), "weights": torch.stack(weights).to(device)}

    def _gt_flow(self, batch: Dict) -> Dict:
        if "optical_flow" not in batch:
            raise ValueError("--flow gt needs the ground-truth optical flow, which this data "
                             "does not have (the test split has none)")
        return {"flow": batch["optical_flow"], "weights": None}

    # ------------------------------------------------------------------------------------------

    def forward(self, batch: Dict, run_solver: bool = True,
                generator: Optional[torch.Generator] = None) -> Dict:
        """Runs the front-end, the solver and the dense warp on a collated batch.

        Returns a dict with:
          flow (B, 2, H, W) pixels, NaN where unknown; weights (B, H, W) correspondence weights;
          flow_pyramid [flow2..flow6] and network_frame (network front-end only);
          matches (model.correspondences.Matches) and match_mask (B, H, W);
          and with run_solver: solver (SolverResult), rotations (B, N, 3, 3), translations
          (B, N, 3), warp_mask (B, H, W) pixels with 4 anchors and valid depth,
          warped_points (B, H, W, 3) and scene_flow (B, 3, H, W), NaN outside warp_mask.
        """
        front = {"network": self._network_flow, "dis": self._dis_flow, "gt": self._gt_flow}
        out = front[self.options.flow](batch)
        flow = out["flow"]
        flow_valid = torch.isfinite(flow).all(dim=1)
        weights = out["weights"]
        if weights is None:
            weights = torch.ones_like(flow[:, 0])
        out["weights"] = weights
        source_points = batch["source_points"].permute(0, 2, 3, 1)
        matches = build_matches(source_points, torch.where(flow_valid[:, None], flow, torch.zeros_like(flow)),
                                batch["target_points"][:, 2], batch["pixel_anchors"],
                                batch["pixel_weights"], weights, self.solver_options.max_depth,
                                flow_valid, self.options.max_depth_jump)
        out["matches"] = matches
        out["match_mask"] = matches.valid_mask
        if not run_solver:
            return out

        problem = SolverProblem.from_matches(matches, batch["nodes"], batch["num_nodes"],
                                             batch["edges"], batch["edges_weights"],
                                             batch["clusters"], batch["intrinsics"])
        result = solve(problem, self.solver_options, generator)
        out["solver"] = result
        out["rotations"], out["translations"] = result.rotations, result.translations
        out.update(dense_warp(batch, result.rotations, result.translations, self.solver_options.max_depth))
        return out


def dense_warp(batch: Dict, rotations: torch.Tensor, translations: torch.Tensor,
               max_depth: float = 6.0) -> Dict[str, torch.Tensor]:
    """Warps every source pixel with 4 anchors and depth in (0, max_depth].

    Returns warp_mask (B, H, W), warped_points (B, H, W, 3) and scene_flow (B, 3, H, W), both
    NaN outside the mask.
    """
    points = batch["source_points"].permute(0, 2, 3, 1)
    anchors = batch["pixel_anchors"]
    B, H, W, _ = points.shape
    N = batch["nodes"].shape[1]
    z = points[..., 2]
    mask = (anchors >= 0).all(dim=-1) & (z > 0) & (z <= max_depth)
    sample, ys, xs = torch.nonzero(mask, as_tuple=True)
    flat_anchors = sample[:, None] * N + anchors[sample, ys, xs].long()
    warped = warp_points(points[sample, ys, xs], flat_anchors, batch["pixel_weights"][sample, ys, xs],
                         batch["nodes"].reshape(B * N, 3), rotations.reshape(B * N, 3, 3),
                         translations.reshape(B * N, 3))
    dense = points.new_full((B, H, W, 3), float("nan"))
    dense = dense.index_put((sample, ys, xs), warped)
    return {"warp_mask": mask, "warped_points": dense,
            "scene_flow": (dense - points).permute(0, 3, 1, 2)}
