"""The tracker: source and target RGB-D in, node motions and a dense warp out (docs/DESIGN.md 5.3-5.4).

    tracker = Tracker(TrackerOptions(flow="dis"), SolverOptions())
    out = tracker(batch)          # batch from dataset.deepdeform.collate (or make_batch)

Correspondence front-ends (TrackerOptions.flow):
  * network: the PWC-Net flow backbone and the weighting head (MaskNet), end to end trainable;
    or, with network_flow "hybrid", DIS and PWC-Net flows blended per pixel and weighted by a
    small learned head (model/hybrid.py), optionally twice (hybrid_passes 2: a second pass on
    the target resampled by the first solve's motion, then a second solve);
  * dis: OpenCV's DIS optical flow with uniform or photometric weights and a forward-backward
    consistency check; needs no checkpoint;
  * gt: the ground-truth optical flow of the batch (oracle studies).
The correspondences feed the differentiable Gauss-Newton solver (model/solver/); its node
motions warp every source pixel that has 4 anchors and valid depth.
How frames map to the network input: model/network_frame.py; DIS flow: model/dis_flow.py.
"""
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import image_proc
from model.correspondences import bilinear_sample, build_matches, pixel_grid, sample_target_depth
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
        return self._hybrid_pass(batch, batch["target_color"], batch["target_points"][:, 2])

    def _hybrid_pass(self, batch: Dict, target: torch.Tensor, target_depth: torch.Tensor) -> Dict:
        """DIS and PWC-Net flows, both directions, blended and weighted by the hybrid head.
        target (B, 3, H, W) and target_depth (B, H, W): the batch's target frame, or (second
        pass) that frame resampled by the first pass's flow."""
        source = batch["source_color"]
        frame = self.network_frame(batch)
        train_flow = any(p.requires_grad for p in self.flow_net.parameters()) and torch.is_grad_enabled()
        with torch.set_grad_enabled(train_flow):
            pwc_forward, pyramid, _ = self._pwc_flow(source, target, frame)
        with torch.no_grad():
            pwc_backward = self._pwc_flow(target, source, frame)[0]
        dis_forward, dis_backward = [], []
        for s, t in zip(source, target):
            forward, backward = dis_forward_backward(image_proc.to_u8(s), image_proc.to_u8(t),
                                                     self.options.dis_preset)
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
            source, target, batch["source_points"][:, 2], target_depth,
            dis_forward, dis_backward, pwc_forward.detach(), pwc_backward, anchored)
        flow, weights, a = blend(self.hybrid_head, features, prior_a, prior_w, dis_forward, pwc_forward)
        return {"flow": flow, "flow_pyramid": pyramid, "network_frame": frame, "weights": weights,
                "blend": a}

    def _hybrid_second_pass(self, batch: Dict, first: Dict) -> Dict:
        """The hybrid front-end again, on what the first solve left: the target frame resampled
        at the first pass's flow (the solved motion projected into the target view, see
        solved_flow) looks like the source up to a small residual motion, which DIS and PWC-Net
        find far better than the full one; the head blends and weights those residual flows and
        the residual is composed with the first flow: flow(u) = r(u) + first(u + r(u)).
        No gradient reaches the first pass through this (its flow is an input here)."""
        source = batch["source_color"]
        B, _, H, W = source.shape
        grid = pixel_grid(H, W, source.device, source.dtype)[None]
        with torch.no_grad():
            prior = solved_flow(batch, first)
            pixels = grid + prior.permute(0, 2, 3, 1)
            target = bilinear_sample(batch["target_color"], pixels)
            depth, depth_ok = sample_target_depth(batch["target_points"][:, 2], pixels,
                                                  self.solver_options.max_depth, self.options.max_depth_jump)
            depth = torch.where(depth_ok, depth, torch.zeros_like(depth))
        out = self._hybrid_pass(batch, target, depth)
        residual = out["flow"]
        at = grid + residual.permute(0, 2, 3, 1)
        flow = residual + bilinear_sample(prior, at)
        inside = (at[..., 0] >= 0) & (at[..., 0] <= W - 1) & (at[..., 1] >= 0) & (at[..., 1] <= H - 1)
        out.update(flow=torch.where(inside[:, None], flow, torch.full_like(flow, float("nan"))),
                   residual_flow=residual, prior_flow=prior)
        return out

    def _dis_flow(self, batch: Dict) -> Dict:
        flows, weights = [], []
        anchored = (batch["pixel_anchors"] >= 0).all(dim=-1).cpu().numpy()
        for source, target, mask in zip(batch["source_color"], batch["target_color"], anchored):
            flow, weight = dis_flow(image_proc.to_u8(source), image_proc.to_u8(target), self.options, mask)
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
        With the hybrid front-end's second pass (hybrid_passes 2, run_solver): all of these are
        the second pass's (flow composed with the first pass's, see _hybrid_second_pass), with
        residual_flow and prior_flow (B, 2, H, W) and first_pass, the first pass's own dict.
        """
        front = {"network": self._network_flow, "dis": self._dis_flow, "gt": self._gt_flow}
        out = self._match(batch, front[self.options.flow](batch))
        if not run_solver:
            return out
        out = self._solve(batch, out, generator)
        if self.options.flow == "network" and self.options.network_flow == "hybrid" \
                and self.options.hybrid_passes == 2:
            first = out
            out = self._solve(batch, self._match(batch, self._hybrid_second_pass(batch, first)), generator)
            out["first_pass"] = first
        return out

    def _match(self, batch: Dict, out: Dict) -> Dict:
        """Adds the matches of a front-end's flow and weights to its output."""
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
        return out

    def _solve(self, batch: Dict, out: Dict, generator: Optional[torch.Generator]) -> Dict:
        """Adds the solve of out's matches and its dense warp to out."""
        problem = SolverProblem.from_matches(out["matches"], batch["nodes"], batch["num_nodes"],
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


def solved_flow(batch: Dict, out: Dict) -> torch.Tensor:
    """The optical flow (B, 2, H, W) a solve implies: every warped source pixel whose 4 anchors
    were solved (in a sample whose solve did not fail), projected into the target camera; the
    front-end's own flow (out["flow"], NaN read as 0) everywhere else. out: a solved tracker
    output (warped_points, warp_mask, solver)."""
    flow = torch.nan_to_num(out["flow"].detach(), nan=0.0)
    B, _, H, W = flow.shape
    result = out["solver"]
    anchors = batch["pixel_anchors"].long()
    node_ok = torch.gather(result.node_valid.detach(), 1, anchors.clamp(min=0).reshape(B, -1)).reshape(anchors.shape)
    points = out["warped_points"].detach()
    z = points[..., 2]
    use = (out["warp_mask"] & node_ok.all(dim=-1) & result.valid.detach()[:, None, None]
           & torch.isfinite(points).all(dim=-1) & (z > 1e-6))
    fx, fy, cx, cy = [batch["intrinsics"][:, i, None, None].to(flow) for i in range(4)]
    safe_z = torch.where(use, z, torch.ones_like(z))
    grid = pixel_grid(H, W, flow.device, flow.dtype)
    projected = torch.stack((fx * points[..., 0] / safe_z + cx - grid[..., 0],
                             fy * points[..., 1] / safe_z + cy - grid[..., 1]), dim=1)
    return torch.where(use[:, None], torch.nan_to_num(projected), flow)
