"""The tracker: source and target RGB-D in, node motions and a dense warp out (docs/DESIGN.md 5.3-5.4).

    tracker = Tracker(TrackerOptions(flow="dis"), SolverOptions())
    out = tracker(batch)          # batch from dataset.deepdeform.collate (or make_batch)

Correspondence front-ends (TrackerOptions.flow):
  * network: the PWC-Net flow backbone and the weighting head (MaskNet), end to end trainable;
    or, with network_flow "hybrid", DIS and PWC-Net flows blended per pixel and weighted by a
    small learned head (model/hybrid.py);
  * dis: OpenCV's DIS optical flow with uniform or photometric weights and a forward-backward
    consistency check; needs no checkpoint;
  * gt: the ground-truth optical flow of the batch (oracle studies).
The correspondences feed the differentiable Gauss-Newton solver (model/solver/); its node
motions warp every source pixel that has 4 anchors and valid depth.
How frames map to the network input: model/network_frame.py; DIS flow: model/dis_flow.py.
"""
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.correspondences import bilinear_sample, build_matches, pixel_grid
from model.dis_flow import dis_flow, dis_forward_backward
from model.hybrid import HybridHead, blend, hybrid_features
from model.masknet import MaskNet
from model.network_frame import NetworkFrame
from model.pwcnet import FLOW_SCALE, PWCNet
from model.solver import SolverProblem, solve
from model.warp import warp_points
from options import SolverOptions, TrackerOptions


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
            if options.network_flow == "hybrid":
                self.hybrid_head = HybridHead()

    # ------------------------------------------------------------------------------------------
    # Front-ends

    def network_frame(self, batch: Dict) -> NetworkFrame:
        H, W = batch["source_color"].shape[-2:]
        return NetworkFrame(H, W, self.options.network_width, self.options.network_input)

    def _pwc_flow(self, source: torch.Tensor, target: torch.Tensor, frame: NetworkFrame):
        """PWC-Net's flow (B, 2, H, W) frame pixels, its pyramid and level-2 features."""
        flow2, flow3, flow4, flow5, flow6, features2 = self.flow_net(frame.image_in(source), frame.image_in(target))
        net_flow = FLOW_SCALE * F.interpolate(flow2, size=frame.window[2:], mode="bilinear", align_corners=False)
        return frame.flow_out(net_flow), [flow2, flow3, flow4, flow5, flow6], features2

    def _network_flow(self, batch: Dict) -> Dict:
        if self.options.network_flow == "hybrid":
            return self._hybrid_flow(batch)
        source, target = batch["source_color"], batch["target_color"]
        B, _, H, W = source.shape
        frame = self.network_frame(batch)
        flow, pyramid, features2 = self._pwc_flow(source, target, frame)
        out = {"flow": flow, "flow_pyramid": pyramid, "network_frame": frame, "weights": None}
        if self.options.use_mask:
            # The 12 channels: source RGB, source XYZ, target RGB and XYZ sampled at the match.
            pixels = pixel_grid(H, W, flow.device, flow.dtype)[None] + torch.nan_to_num(flow).permute(0, 2, 3, 1)
            target_rgb = bilinear_sample(target, pixels)
            target_xyz = bilinear_sample(batch["target_points"], pixels)
            x = torch.cat((source, batch["source_points"], target_rgb, target_xyz), dim=1)
            mask = self.mask_net(features2, frame.image_in(x, "nearest"))
            out["weights"] = frame.map_out(mask, 0.0)[:, 0]
        return out

    def _hybrid_flow(self, batch: Dict) -> Dict:
        """DIS and PWC-Net flows, both directions, blended and weighted by the hybrid head."""
        source, target = batch["source_color"], batch["target_color"]
        frame = self.network_frame(batch)
        train_flow = any(p.requires_grad for p in self.flow_net.parameters()) and torch.is_grad_enabled()
        with torch.set_grad_enabled(train_flow):
            pwc_forward, pyramid, _ = self._pwc_flow(source, target, frame)
        with torch.no_grad():
            pwc_backward = self._pwc_flow(target, source, frame)[0]
        dis_forward, dis_backward = [], []
        for s, t in zip(source, target):
            forward, backward = dis_forward_backward(_to_u8(s), _to_u8(t), self.options.dis_preset)
            dis_forward.append(torch.from_numpy(forward))
            dis_backward.append(torch.from_numpy(backward))
        dis_forward = torch.stack(dis_forward).to(source)
        dis_backward = torch.stack(dis_backward).to(source)
        # Flow outside PWC-Net's crop is unknown: there DIS is the only flow.
        pwc_known = torch.isfinite(pwc_forward).all(dim=1, keepdim=True)
        pwc_forward = torch.where(pwc_known, pwc_forward, dis_forward)
        pwc_backward = torch.where(torch.isfinite(pwc_backward), pwc_backward, dis_backward)
        anchored = (batch["pixel_anchors"] >= 0).all(dim=-1)
        features, prior_a, prior_w = hybrid_features(
            source, target, batch["source_points"][:, 2], batch["target_points"][:, 2],
            dis_forward, dis_backward, pwc_forward.detach(), pwc_backward, anchored)
        flow, weights, a = blend(self.hybrid_head, features, prior_a, prior_w, dis_forward, pwc_forward)
        return {"flow": flow, "flow_pyramid": pyramid, "network_frame": frame, "weights": weights,
                "blend": a}

    def _dis_flow(self, batch: Dict) -> Dict:
        flows, weights = [], []
        anchored = (batch["pixel_anchors"] >= 0).all(dim=-1).cpu().numpy()
        for source, target, mask in zip(batch["source_color"], batch["target_color"], anchored):
            flow, weight = dis_flow(_to_u8(source), _to_u8(target), self.options, mask)
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


def _to_u8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) colour in [0, 1] -> (H, W, 3) uint8, as OpenCV takes it."""
    return (image.permute(1, 2, 0).detach().cpu().numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)


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
