"""Where the hybrid front-end's error comes from on one pair, and what would remove it (the
diagnosis behind BENCHMARKS.md's "What limits seq258"): which matches are far off, how much
weight they carry, which signal available at test time flags them, and what the solve would
give with oracle weights or oracle flow in that region.

    python benchmarks/bench_hybrid_regions.py --dataset-dir D --split S [--index 0]
        [--checkpoint checkpoints/nnrt_hybrid.pt] [--bad-px 10] [--png out.png] [--threads 1]

The pair needs ground truth (optical and scene flow). The tracker runs as generate.py runs it
(the checkpoint's options, the generator seeded with the pair index), one pass (of a two-pass
checkpoint, the first). "Bad" matches: those whose
2D flow is more than --bad-px from the ground truth. Printed:
  regions   EPE 3D (mm) over the bad matches' pixels and over the rest, the mean weight of each;
  oracles   the same solve re-run with the front-end's weights zeroed on matches more than
            T px off (oracle weights: the best any weighting of these matches could do), with
            the true flow substituted on the bad matches only (oracle flow there), and
            everywhere (the solver's own limit with these weights); with DIS's or PWC-Net's flow
            alone, and with the better of the two at every pixel (the best the head's blend
            could pick), without and with oracle weights;
  signals   for each per-pixel signal a weighting could use, its mean on the bad and on the
            other matches and its AUC at telling them apart (0.5: blind, 1: perfect; the
            weight is read inverted, a low weight flagging a bad match);
  photo     the photometric error (mean absolute colour difference, grey levels of 255) of the
            true flow and of the front-end's flow on the bad matches, raw and box-blurred: a
            flow method that minimises it cannot prefer the truth where the truth's is larger.
  DIS      DIS (the checkpoint's preset) started at the true flow: how far from it it ends.
--png writes the source frame with the bad matches outlined, the flow error, the weights, the
first solve's residual and the two forward-backward errors, side by side.
"""
import argparse
import dataclasses
import sys
from typing import Dict

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from dataset.deepdeform import DeepDeformDataset, collate
from model import image_proc
from model.correspondences import bilinear_sample, pixel_grid, sample_target_depth
from model.dis_flow import _dis, dis_forward_backward
from model.hybrid import flow_features
from model.tracker import Tracker, solved_flow
from utils.checkpoints import load_tracker
from utils.metrics import evaluation_mask, pair_errors


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-dir", required=True, help="DeepDeform-format dataset folder")
    parser.add_argument("--split", required=True, help="split with ground truth")
    parser.add_argument("--index", type=int, default=0, help="pair index in the split")
    parser.add_argument("--checkpoint", default="checkpoints/nnrt_hybrid.pt", help="a hybrid checkpoint")
    parser.add_argument("--bad-px", type=float, default=10.0, help="2D flow error (px) beyond which a match is bad")
    parser.add_argument("--png", default=None, help="write the panels here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    return parser.parse_args()


def auc(signal: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive (bad) match has a larger signal than a negative one (ties
    count half): the area under the ROC curve of the signal as a detector."""
    _, inverse, counts = np.unique(signal, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]     # 1-based, ties averaged
    p, n = int(positive.sum()), int((~positive).sum())
    if p == 0 or n == 0:
        return float("nan")
    return float((ranks[positive].sum() - p * (p + 1) / 2) / (p * n))


def epe_regions(batch: Dict, out: Dict, bad: np.ndarray) -> Dict[str, float]:
    """EPE 3D (mm): all evaluated pixels, those of bad matches, the rest."""
    n = int(batch["num_nodes"][0])
    mask = evaluation_mask(batch["scene_flow"][0].numpy(), batch["source_points"][0, 2].numpy(),
                           batch["pixel_anchors"][0].numpy())
    error = np.linalg.norm(np.nan_to_num(out["scene_flow"][0].numpy()) - batch["scene_flow"][0].numpy(), axis=0)
    total = pair_errors("", out["translations"][0, :n].numpy(), batch["node_deformations"][0, :n].numpy(),
                        np.nan_to_num(out["scene_flow"][0].numpy()), batch["scene_flow"][0].numpy(),
                        batch["source_points"][0, 2].numpy(), batch["pixel_anchors"][0].numpy()).epe_mm
    return {"all": total, "bad": 1000 * float(error[mask & bad].mean()) if (mask & bad).any() else float("nan"),
            "rest": 1000 * float(error[mask & ~bad].mean())}


def resolve(tracker: Tracker, batch: Dict, flow: torch.Tensor, weights: torch.Tensor, index: int) -> Dict:
    """The tracker's solve of a given flow and weights."""
    out = tracker._match(batch, {"flow": flow, "weights": weights})
    return tracker._solve(batch, out, torch.Generator().manual_seed(index))


def photometric(source: torch.Tensor, target: torch.Tensor, flow: torch.Tensor, blur: int) -> torch.Tensor:
    """Mean absolute colour difference (B, H, W) between the source and the target at the flow,
    after a (2 blur + 1)^2 box blur of both frames."""
    if blur:
        source = F.avg_pool2d(source, 2 * blur + 1, 1, blur, count_include_pad=False)
        target = F.avg_pool2d(target, 2 * blur + 1, 1, blur, count_include_pad=False)
    H, W = flow.shape[-2:]
    pixels = pixel_grid(H, W, flow.device, flow.dtype)[None] + torch.nan_to_num(flow).permute(0, 2, 3, 1)
    return (bilinear_sample(target, pixels) - source).abs().mean(dim=1)


def raw_flows(tracker: Tracker, batch: Dict) -> Dict[str, torch.Tensor]:
    """The hybrid's two flows, both directions, (B, 2, H, W) each, as _hybrid_pass makes them
    (DIS where PWC-Net's crop has no flow)."""
    source, target = batch["source_color"], batch["target_color"]
    forward, backward = dis_forward_backward(image_proc.to_u8(source[0]), image_proc.to_u8(target[0]),
                                             tracker.options.dis_preset)
    dis_forward, dis_backward = torch.from_numpy(forward)[None], torch.from_numpy(backward)[None]
    frame = tracker.network_frame(batch)
    pwc_forward = tracker._pwc_flow(source, target, frame)[0]
    pwc_backward = tracker._pwc_flow(target, source, frame)[0]
    return {"dis": dis_forward, "dis_backward": dis_backward,
            "pwc": torch.where(torch.isfinite(pwc_forward), pwc_forward, dis_forward),
            "pwc_backward": torch.where(torch.isfinite(pwc_backward), pwc_backward, dis_backward)}


def signals(tracker: Tracker, batch: Dict, out: Dict, flows: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Per-pixel signals (B, H, W) a weighting could use, each larger where a match is worse."""
    source, target = batch["source_color"], batch["target_color"]
    source_depth, target_depth = batch["source_points"][:, 2], batch["target_points"][:, 2]
    dis = flow_features(flows["dis"], flows["dis_backward"], source, target, source_depth, target_depth)
    pwc = flow_features(flows["pwc"], flows["pwc_backward"], source, target, source_depth, target_depth)
    H, W = source.shape[-2:]
    projected = solved_flow(batch, out)
    pixels = pixel_grid(H, W, source.device, source.dtype)[None] + projected.permute(0, 2, 3, 1)
    depth, depth_ok = sample_target_depth(target_depth, pixels, tracker.solver_options.max_depth,
                                          tracker.options.max_depth_jump)
    depth_residual = torch.where(depth_ok, (depth - out["warped_points"][..., 2]).abs(),
                                 torch.full_like(depth, float("nan")))
    return {"1 - weight": 1 - out["weights"],
            "DIS forward-backward (px)": dis["fb"], "PWC-Net forward-backward (px)": pwc["fb"],
            "DIS - PWC-Net (px)": torch.linalg.vector_norm(flows["dis"] - flows["pwc"], dim=1),
            "photometric error of the flow": photometric(source, target, out["flow"], 0),
            "first solve's residual (px)": torch.linalg.vector_norm(projected - torch.nan_to_num(out["flow"]), dim=1),
            "depth residual after the solve (m)": depth_residual}


def heat(values: np.ndarray, high: float, mask: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, high] -> (H, W, 3) uint8 RGB (jet), black outside mask."""
    scaled = (255 * np.clip(np.nan_to_num(values) / high, 0, 1)).astype(np.uint8)
    rgb = cv2.applyColorMap(scaled, cv2.COLORMAP_JET)[..., ::-1].copy()
    rgb[~mask] = 0
    return rgb


def panels(batch: Dict, maps: Dict[str, np.ndarray], bad: np.ndarray, matched: np.ndarray) -> np.ndarray:
    """Source frame with the bad matches outlined, then one labelled heat map per entry of
    maps (name -> (values, high)), at half resolution, in rows of three."""
    source = image_proc.to_u8(batch["source_color"][0]).copy()
    contours, _ = cv2.findContours(bad.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(source, contours, -1, (255, 0, 0), 2)
    tiles = [("source, bad matches outlined", source)]
    tiles += [(f"{name} (0-{high:g})", heat(values, high, matched)) for name, (values, high) in maps.items()]
    small = []
    for title, image in tiles:
        image = cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2), interpolation=cv2.INTER_AREA)
        cv2.putText(image, title, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        small.append(image)
    while len(small) % 3:
        small.append(np.zeros_like(small[0]))
    return np.concatenate([np.concatenate(small[i:i + 3], axis=1) for i in range(0, len(small), 3)], axis=0)


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    tracker = load_tracker(args.checkpoint, log=lambda *a: None)
    if tracker.options.network_flow != "hybrid":
        print(f"error: {args.checkpoint} is not a hybrid checkpoint (network_flow "
              f"'{tracker.options.network_flow}')", file=sys.stderr)
        return 1
    tracker.options = dataclasses.replace(tracker.options, hybrid_passes=1)
    tracker.eval()
    batch = collate([DeepDeformDataset(args.dataset_dir, args.split)[args.index]])
    if "optical_flow" not in batch:
        print(f"error: {args.dataset_dir} {args.split} has no ground-truth flow", file=sys.stderr)
        return 1
    with torch.no_grad():
        out = tracker(batch, generator=torch.Generator().manual_seed(args.index))
        gt = batch["optical_flow"]
        error = torch.linalg.vector_norm(out["flow"] - gt, dim=1)
        matched = (out["match_mask"] & torch.isfinite(error))[0].numpy()
        bad = matched & (error[0].nan_to_num(0).numpy() > args.bad_px)
        weights = out["weights"][0].numpy()
        regions = epe_regions(batch, out, bad)
        print(f"{batch['name'][0]}: {int(matched.sum())} matches, {int(bad.sum())} more than {args.bad_px:g} px "
              f"off; EPE 3D {regions['all']:.2f} mm (bad matches' pixels {regions['bad']:.2f}, the rest "
              f"{regions['rest']:.2f}); mean weight bad {weights[bad].mean():.3f}, rest {weights[matched & ~bad].mean():.3f}")
        gt_known = torch.isfinite(gt)
        for threshold in (5.0, args.bad_px):
            keep = torch.where(error < threshold, out["weights"], torch.zeros_like(out["weights"]))
            r = epe_regions(batch, resolve(tracker, batch, out["flow"], keep, args.index), bad)
            print(f"oracle weights (0 beyond {threshold:g} px): EPE 3D {r['all']:.2f} mm (bad {r['bad']:.2f}, rest {r['rest']:.2f})")
        fixed = torch.where(torch.from_numpy(bad)[None, None] & gt_known, gt, out["flow"])
        r = epe_regions(batch, resolve(tracker, batch, fixed, out["weights"], args.index), bad)
        print(f"oracle flow on the bad matches: EPE 3D {r['all']:.2f} mm (bad {r['bad']:.2f}, rest {r['rest']:.2f})")
        r = epe_regions(batch, resolve(tracker, batch, torch.where(gt_known, gt, out["flow"]), out["weights"],
                                       args.index), bad)
        print(f"oracle flow everywhere, same weights: EPE 3D {r['all']:.2f} mm")
        flows = raw_flows(tracker, batch)
        dis_error, pwc_error = (torch.linalg.vector_norm(flows[k] - gt, dim=1) for k in ("dis", "pwc"))
        for name, flow in (("DIS", flows["dis"]), ("PWC-Net", flows["pwc"])):
            r = epe_regions(batch, resolve(tracker, batch, flow, out["weights"], args.index), bad)
            print(f"{name} flow alone, same weights: EPE 3D {r['all']:.2f} mm (bad {r['bad']:.2f}, rest {r['rest']:.2f})")
        # The best a per-pixel choice between the two flows could do (the head's blend at its
        # sharpest), with the front-end's weights and with oracle weights on top.
        choice = torch.where((pwc_error < dis_error)[:, None], flows["pwc"], flows["dis"])
        choice_error = torch.minimum(dis_error, pwc_error)
        r = epe_regions(batch, resolve(tracker, batch, choice, out["weights"], args.index), bad)
        print(f"oracle choice of DIS or PWC-Net per pixel, same weights: EPE 3D {r['all']:.2f} mm "
              f"(bad {r['bad']:.2f}, rest {r['rest']:.2f}; its flow error on the bad matches "
              f"{choice_error[0].numpy()[bad].mean():.2f} px)")
        keep = torch.where(choice_error < 5.0, out["weights"], torch.zeros_like(out["weights"]))
        r = epe_regions(batch, resolve(tracker, batch, choice, keep, args.index), bad)
        print(f"oracle choice and oracle weights (0 beyond 5 px): EPE 3D {r['all']:.2f} mm")
        values = {name: value[0].numpy() for name, value in signals(tracker, batch, out, flows).items()}
        print(f"{'signal':36s} {'bad':>10s} {'rest':>10s} {'AUC':>6s}")
        for name, value in values.items():
            ok = matched & np.isfinite(value)
            print(f"{name:36s} {value[ok & bad].mean():10.4f} {value[ok & ~bad].mean():10.4f} "
                  f"{auc(value[ok], bad[ok]):6.3f}")
        for blur in (0, 2, 5):
            truth = 255 * photometric(batch["source_color"], batch["target_color"], gt, blur)[0].numpy()
            ours = 255 * photometric(batch["source_color"], batch["target_color"], out["flow"], blur)[0].numpy()
            ok = bad & np.isfinite(truth)
            print(f"photometric error on the bad matches, blur {2 * blur + 1}x{2 * blur + 1}: true flow "
                  f"{truth[ok].mean():.2f}, front-end's flow {ours[ok].mean():.2f} (the rest: "
                  f"{truth[matched & ~bad & np.isfinite(truth)].mean():.2f}, {ours[matched & ~bad].mean():.2f})")
        # DIS started at the true flow (OpenCV's DIS refines a flow passed in at the frames' size):
        # where the frames' colours favour another alignment, it walks away from the truth.
        dis, source_gray, target_gray = _dis(image_proc.to_u8(batch["source_color"][0]),
                                             image_proc.to_u8(batch["target_color"][0]), tracker.options.dis_preset)
        start = np.ascontiguousarray(np.nan_to_num(gt[0].numpy()).transpose(1, 2, 0))
        refined = torch.from_numpy(dis.calc(source_gray, target_gray, start).transpose(2, 0, 1).copy())[None]
        drift = torch.linalg.vector_norm(refined - gt, dim=1)[0].numpy()
        print(f"DIS ({tracker.options.dis_preset}) started at the true flow ends {drift[bad].mean():.2f} px from it on "
              f"the bad matches, {drift[matched & ~bad].mean():.2f} px on the rest (from the usual start: "
              f"{dis_error[0].numpy()[bad].mean():.2f} and {dis_error[0].numpy()[matched & ~bad].mean():.2f})")
    if args.png:
        maps = {"flow error, px": (error[0].numpy(), 30.0), "weight": (weights, 1.0),
                "first solve's residual, px": (values["first solve's residual (px)"], 10.0),
                "DIS forward-backward, px": (values["DIS forward-backward (px)"], 10.0),
                "PWC-Net forward-backward, px": (values["PWC-Net forward-backward (px)"], 10.0)}
        cv2.imwrite(args.png, panels(batch, maps, bad, matched)[..., ::-1])
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
