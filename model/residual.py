"""Instant-NK-style 4D hash-grid residual deformer refining the graph warp (docs/DESIGN.md 5.7).

    out = tracker(batch)                                  # the graph warp of a pair
    fit = fit_residual(batch, out, ResidualOptions())     # a fresh deformer per pair, fitted
    fit["warped_points"], fit["scene_flow"]               # graph warp + residual

The deformer maps a source point x (metres, camera frame of the source) and a time t in [0, 1]
to a displacement r(x, t) = max_residual * t * tanh(MLP(encoding(x_n, t))), where x_n is x
normalised to [0, 1]^3 by a cube around the object's bounding box and the encoding is the
multiresolution hash encoding of model/hashgrid.py. The factor t makes r exactly zero at t = 0
(the source frame), and tanh bounds every component by max_residual. For a pair the target is
t = 1, so a source point moves to y = graph_warp(x) + r(x, 1).

The fit is self-supervised (no ground truth): starting from r = 0 it optimises the table and the
MLP with Adam so that y
  * lies on the target surface: point-to-plane distance to the target point at y's projection,
    whose target depth must be valid, free of depth edges and within `--residual-occlusion` of y's
    depth (otherwise the point is occluded in the target or an outlier, and the term skips it);
  * keeps its colour: source colour against the target colour at y's projection;
  * agrees with the tracker's correspondences: distance to the match's target point, times the
    match weight;
  * stays small (squared residual) and smooth: the squared difference between neighbouring
    source pixels (on the same surface) of the refined warp's detail y - w_low, where w_low is
    the graph warp with its scene flow low-passed in the image (Gaussian, `--residual-flow-blur`
    pixels). The graph warp is rougher than real motion at the pixel scale: it jumps wherever
    a pixel's set of 4 anchors changes, and blends disagreeing node motions over a few pixels.
    Smoothing the scene flow itself would remove that roughness but also penalise rotations and
    bends (which move neighbours apart); smoothing only the detail keeps the graph's large-scale
    motion, whatever it is, and asks the residual to take out the roughness while the data terms
    shape it. With `--residual-flow-blur` 0 the term is the residual's own smoothness.
The three data terms are robust (Geman-McClure: quadratic for small errors, bounded for large
ones, so occlusions and wrong matches stop pulling). Geometric terms are in squared millimetres.
The point-to-plane term sees the target surface after a light edge-aware smoothing: depth noise
is per pixel, and on our synthetic pairs a sigma of 1 pixel halved the mean distance of the
true target positions to the surface (on the real seq258 pair it changed nothing).
"""
import math
import time
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from model.correspondences import bilinear_sample, sample_target_depth
from model.hashgrid import HashGridEncoder
from options import HashFieldOptions, ResidualOptions

MM = 1000.0   # metres -> millimetres: the geometric terms are in squared millimetres


class ResidualDeformer(nn.Module):
    """r(x, t): a bounded residual displacement of points at time t.

    Two uses: a pair (pinned, the default) where r = max_residual * t * tanh(MLP) is exactly 0
    at the source time t = 0; and a whole sequence (pinned=False, fusion/residual.py) where
    r = max_residual * tanh(MLP) is free at every t, including the reference frame (whose
    canonical surface the fusion has averaged), and the MLP's last layer starts at exactly 0,
    so that the field is the identity until it is fitted.

    Args:
        bounds_min, bounds_max: (3,) corners of the source object's bounding box in metres.
            The encoder sees x normalised by the cube of side max(extent) + 2 margin centred
            on the box, so that hash cells are cubes and every object point is inside [0, 1]^3
            (points outside are clamped by the encoding).
        options: ResidualOptions or SequenceResidualOptions (encoder size, MLP width, max
            residual, margin).
        generator: seeds the initial table and MLP weights (default: torch's global RNG).
        pinned: multiply by t (zero at t = 0); otherwise start from exactly zero everywhere.
        reference_time: unpinned only: if given, r(x, t) = f(x, t) - f(x, t_ref) with f the
            bounded MLP output, exactly 0 at t_ref at every x (each term bounded by
            max_residual) while every other time stays free.

    Shapes: forward(points (N, 3) metres, t float or (N,) in [0, 1]) -> (N, 3) metres, every
    component in (-max_residual, max_residual); pinned: exactly 0 where t = 0.
    """

    def __init__(self, bounds_min: torch.Tensor, bounds_max: torch.Tensor,
                 options: HashFieldOptions = ResidualOptions(),
                 generator: Optional[torch.Generator] = None, pinned: bool = True,
                 reference_time: Optional[float] = None):
        super().__init__()
        if pinned and reference_time is not None:
            raise ValueError("reference_time is for an unpinned deformer (a pinned one is 0 at t = 0)")
        self.pinned = pinned
        self.reference_time = reference_time
        bounds_min = torch.as_tensor(bounds_min, dtype=torch.float32)
        bounds_max = torch.as_tensor(bounds_max, dtype=torch.float32)
        if (bounds_min.shape != (3,) or bounds_max.shape != (3,)
                or bool((bounds_max < bounds_min).any())):
            raise ValueError(f"bounds must be two (3,) corners with min <= max, found "
                             f"{bounds_min.tolist()} and {bounds_max.tolist()}")
        if options.max <= 0:
            raise ValueError(f"--residual-max must be positive, found {options.max}")
        side = float((bounds_max - bounds_min).max()) + 2 * options.margin
        if side <= 0:
            raise ValueError("the bounding box and margin are empty: give --residual-margin > 0")
        self.register_buffer("origin", (bounds_min + bounds_max) / 2 - side / 2)
        self.side = side
        self.max_residual = float(options.max)
        self.encoder = HashGridEncoder(4, options.levels, options.features,
                                       options.log2_table_size,
                                       options.base_resolution,
                                       options.max_resolution)
        layers, width = [], self.encoder.output_dim
        # Unpinned, the hidden layers have no biases (as Instant-NGP's MLPs): starting from a
        # zero last layer and near-zero features, Adam's scale-free steps moved the biases far
        # faster than the feature weights and could switch every ReLU off for good, leaving a
        # field constant in x and t.
        for _ in range(options.layers):
            layers += [nn.Linear(width, options.hidden, bias=pinned), nn.ReLU()]
            width = options.hidden
        layers.append(nn.Linear(width, 3))
        self.mlp = nn.Sequential(*layers)
        self._initialise(generator)

    def _initialise(self, generator: Optional[torch.Generator]) -> None:
        # Seeded, so that a fit is repeatable. The last layer starts tiny (not zero, so that
        # the first step already reaches the table and every layer): the fit starts from the
        # graph warp itself.
        with torch.no_grad():
            self.encoder.table.uniform_(-1e-4, 1e-4, generator=generator)
            for layer in self.mlp:
                if isinstance(layer, nn.Linear):
                    bound = 1 / math.sqrt(layer.in_features)
                    layer.weight.uniform_(-bound, bound, generator=generator)
                    if layer.bias is not None:
                        layer.bias.zero_()
            # Unpinned, nothing else makes the start the identity: a zero last layer does
            # (its first step gives it weights, after which gradients reach everything).
            self.mlp[-1].weight.mul_(1e-3 if self.pinned else 0.0)

    def normalise(self, points: torch.Tensor, t: Union[float, torch.Tensor]) -> torch.Tensor:
        """(N, 3) metres and t -> (N, 4) encoder input (x_n, y_n, z_n, t) in [0, 1]."""
        t = torch.as_tensor(t, dtype=points.dtype, device=points.device).expand(points.shape[0])
        return torch.cat(((points - self.origin) / self.side, t[:, None]), dim=1).clamp(0.0, 1.0)

    def forward(self, points: torch.Tensor, t: Union[float, torch.Tensor] = 1.0) -> torch.Tensor:
        if points.dim() != 2 or points.shape[1] != 3:
            raise ValueError(f"points must have shape (N, 3), found {tuple(points.shape)}")
        x = self.normalise(points, t)
        if self.reference_time is not None:
            # One encoder call for both times.
            x = torch.cat((x, self.normalise(points, self.reference_time)))
        raw = self.max_residual * torch.tanh(self.mlp(self.encoder(x)))
        if self.reference_time is not None:
            at_t, at_reference = raw.split(points.shape[0])
            return at_t - at_reference
        return x[:, 3:] * raw if self.pinned else raw


def geman_mcclure(squared: torch.Tensor, scale: float) -> torch.Tensor:
    """Geman-McClure of squared errors: s^2 e^2 / (e^2 + s^2), ~e^2 below the scale s, at most
    s^2 above it (so an outlier's pull fades instead of growing)."""
    scale2 = scale * scale
    return scale2 * squared / (squared + scale2)


def surface_normals(points: torch.Tensor, max_jump: float = 0.05) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unit normals of a point image by central differences.

    points (B, 3, H, W) metres (z = 0 invalid) -> normals (B, 3, H, W), valid (B, H, W) bool:
    the pixel and its 4 neighbours have depth, and no neighbour is farther than max_jump
    metres (a normal across a depth edge belongs to neither surface). Invalid normals are 0.
    """
    padded = F.pad(points, (1, 1, 1, 1))
    centre = padded[..., 1:-1, 1:-1]
    left, right = padded[..., 1:-1, :-2], padded[..., 1:-1, 2:]
    up, down = padded[..., :-2, 1:-1], padded[..., 2:, 1:-1]
    valid = centre[:, 2] > 0
    for other in (left, right, up, down):
        # Squared distances: torch's norm over the channel dimension of an image is several
        # times slower on the CPU than this sum.
        valid &= (other[:, 2] > 0) & (((other - centre) ** 2).sum(dim=1) <= max_jump * max_jump)
    normals = torch.cross(right - left, down - up, dim=1)
    # F.normalize's eps 1e-12, without its slow channel norm.
    normals = normals / ((normals ** 2).sum(dim=1, keepdim=True).sqrt().clamp(min=1e-12))
    return normals * valid[:, None], valid


def low_pass(image: torch.Tensor, mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian low-pass of (B, C, H, W) over the pixels of mask (B, H, W) only (normalised
    convolution, so that pixels outside the mask neither contribute nor dilute)."""
    if sigma <= 0:
        return image
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    weights = mask[:, None].to(image.dtype)
    stacked = torch.cat((image * weights, weights), dim=1)
    C = stacked.shape[1]
    row = kernel.view(1, 1, 1, -1).expand(C, 1, 1, -1).contiguous()
    stacked = F.conv2d(stacked, row, padding=(0, radius), groups=C)
    stacked = F.conv2d(stacked, row.transpose(2, 3).contiguous(), padding=(radius, 0), groups=C)
    return stacked[:, :-1] / stacked[:, -1:].clamp(min=1e-12)


def smooth_surface(points: torch.Tensor, sigma: float, max_jump: float = 0.02) -> torch.Tensor:
    """Edge-aware Gaussian smoothing of a point image: (B, 3, H, W) metres (z = 0 invalid) ->
    the same shape. Each valid pixel becomes the weighted mean of the valid pixels within
    2 sigma whose depth is within max_jump of its own (so surfaces are not blended across depth
    edges); invalid pixels stay 0."""
    if sigma <= 0:
        return points
    radius = max(1, int(math.ceil(2 * sigma)))
    H, W = points.shape[-2:]
    padded = F.pad(points, (radius, radius, radius, radius))
    depth = points[:, 2:3]
    total = torch.zeros_like(points)
    weight = torch.zeros_like(depth)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            other = padded[..., radius + dy:radius + dy + H, radius + dx:radius + dx + W]
            w = math.exp(-(dx * dx + dy * dy) / (2 * sigma * sigma)) * (
                (other[:, 2:3] > 0) & ((other[:, 2:3] - depth).abs() <= max_jump)).to(points.dtype)
            total += w * other
            weight += w
    return torch.where(depth > 0, total / weight.clamp(min=1e-12), points)


class _PairData:
    """Everything the fit of sample b needs, packed per object point (P points = the pixels of
    warp_mask in row-major order)."""

    def __init__(self, batch: Dict, out: Dict, b: int, options: ResidualOptions):
        mask = out["warp_mask"][b].clone()
        H, W = mask.shape
        ys, xs = torch.nonzero(mask, as_tuple=True)
        self.mask = mask
        self.source = batch["source_points"][b].permute(1, 2, 0)[ys, xs].clone()          # (P, 3)
        self.warped = out["warped_points"][b][ys, xs].clone()                             # (P, 3)
        self.color = batch["source_color"][b].permute(1, 2, 0)[ys, xs].clone()            # (P, 3)
        self.intrinsics = [float(v) for v in batch["intrinsics"][b]]
        index = torch.full((H, W), -1, dtype=torch.long, device=mask.device)
        index[ys, xs] = torch.arange(ys.numel(), device=mask.device)

        # Neighbour pairs on the same surface for the smoothness term: right and lower pixel.
        def neighbour(dy: int, dx: int) -> torch.Tensor:
            other = torch.full_like(ys, -1)
            inside = (ys + dy < H) & (xs + dx < W)
            other[inside] = index[ys[inside] + dy, xs[inside] + dx]
            distance = (self.source - self.source[other.clamp(min=0)]).norm(dim=1)
            close = distance <= options.neighbor_distance
            return torch.where((other >= 0) & close, other, torch.full_like(other, -1))

        self.right, self.down = neighbour(0, 1), neighbour(1, 0)

        # The graph warp with its scene flow low-passed over the object's pixels (w_low): the
        # smoothness term acts on the refined warp's detail relative to it. The blur is given
        # for 640-pixel-wide frames, so that it covers the same part of the object at any size.
        flow = torch.zeros(3, H, W, dtype=self.source.dtype, device=mask.device)
        flow[:, ys, xs] = (self.warped - self.source).T
        low = low_pass(flow[None], mask[None], options.flow_blur * W / 640)[0]
        self.low_warped = self.source + low[:, ys, xs].T                                   # (P, 3)

        # The matches of this sample, per point: target point and weight (0 = no match).
        matches = out["matches"]
        mine = matches.sample == b
        point = index.reshape(-1)[matches.pixel[mine]]
        keep = point >= 0
        target = bilinear_sample(batch["target_points"][b:b + 1],
                                 matches.target_pixels[mine][keep][None, None].to(self.source.dtype))
        self.match_target = torch.zeros_like(self.source)
        self.match_weight = torch.zeros_like(self.source[:, 0])
        self.match_target[point[keep]] = target[0, :, 0].T
        self.match_weight[point[keep]] = matches.weights[mine][keep].to(self.source.dtype).clamp(0, 1)

        target_points = smooth_surface(batch["target_points"][b:b + 1].clone(),
                                       options.target_smoothing)
        normals, normal_valid = surface_normals(target_points)
        # One image to sample per step: target xyz, normal, normal validity.
        self.target_geometry = torch.cat((target_points, normals, normal_valid[:, None].to(normals.dtype)),
                                         dim=1)
        self.target_depth = target_points[:, 2]
        self.target_color = batch["target_color"][b:b + 1].clone()

    def project(self, points: torch.Tensor) -> torch.Tensor:
        """(N, 3) -> (1, 1, N, 2) pixel coordinates (x, y) for bilinear_sample."""
        fx, fy, cx, cy = self.intrinsics
        z = points[:, 2].clamp(min=1e-6)
        return torch.stack((fx * points[:, 0] / z + cx, fy * points[:, 1] / z + cy), dim=-1)[None, None]


def _losses(deformer: ResidualDeformer, data: _PairData, chosen: torch.Tensor,
            options: ResidualOptions, max_depth: float) -> Dict[str, torch.Tensor]:
    """The five terms (scalars) on the points `chosen` (K,) of one step."""
    K = chosen.numel()
    # The chosen points and their right and lower neighbours (-1 = none): one encoder call.
    stencil = torch.stack((chosen, data.right[chosen], data.down[chosen]))          # (3, K)
    present = stencil >= 0
    evaluated = deformer(data.source[stencil[present]], 1.0)
    residual_all = evaluated.new_zeros(3, K, 3).index_put((present,), evaluated)
    residual = residual_all[0]
    y = data.warped[chosen] + residual

    pixels = data.project(y)
    # Point-to-plane against the target surface at y's projection, with that surface point
    # and normal held fixed within the step (as in projective ICP): moving y along the surface
    # changes neither the distance nor, on a plane, the sampled point, so differentiating
    # through the sampling would only add the depth noise's gradient.
    with torch.no_grad():
        geometry = bilinear_sample(data.target_geometry, pixels)[0, :, 0].T           # (K, 7)
        depth, depth_valid = sample_target_depth(data.target_depth, pixels, max_depth)
        visible = (depth_valid[0, 0] & (geometry[:, 6] >= 0.999)
                   & ((y[:, 2] - depth[0, 0]).abs() <= options.occlusion))
    normal = F.normalize(geometry[:, 3:6], dim=1)
    distance = MM * ((y - geometry[:, :3]) * normal).sum(dim=1)
    plane = geman_mcclure(distance[visible] ** 2, MM * options.plane_scale)

    # Colour: differentiable through the projection, which is what moves y along the surface.
    target_color = bilinear_sample(data.target_color, pixels)[0, :, 0].T
    color_error = ((target_color - data.color[chosen]) ** 2).sum(dim=1)
    # Normalised to [0, 1) per point (colours have no millimetres): a colour outlier costs at
    # most --residual-color-weight.
    color_scale = options.color_scale
    color = geman_mcclure(color_error[visible], color_scale) / color_scale ** 2

    weight = data.match_weight[chosen]
    matched = weight > 0
    match_error = (MM * (y - data.match_target[chosen])[matched]) ** 2
    match = weight[matched] * geman_mcclure(match_error.sum(dim=1), MM * options.match_scale)

    magnitude = ((MM * residual) ** 2).sum(dim=1)
    # Smoothness of the detail y - w_low between each point and its right and lower neighbour.
    index = stencil.clamp(min=0)
    detail = data.warped[index] - data.low_warped[index] + residual_all                   # (3, K, 3)
    smoothness = torch.cat([((MM * (detail[0] - detail[k])[present[k]]) ** 2).sum(dim=1)
                            for k in (1, 2)])

    def mean(values: torch.Tensor) -> torch.Tensor:
        return values.sum() / max(values.numel(), 1)

    return {"plane": mean(plane), "color": mean(color), "match": mean(match),
            "magnitude": mean(magnitude), "smoothness": mean(smoothness)}


def _fit_one(data: _PairData, options: ResidualOptions, max_depth: float, start: float,
             progress: bool, desc: str) -> Tuple[torch.Tensor, Dict]:
    """Fits a fresh deformer to one pair; returns the residual of every point (P, 3) and stats.
    `start` is the time.perf_counter() at which the pair's time budget began."""
    P = data.source.shape[0]
    losses: Dict[str, float] = {}
    iterations = 0
    if P == 0:   # an empty warp mask: nothing to refine
        return data.source.clone(), {"iterations": 0, "seconds": time.perf_counter() - start,
                                     "points": 0, "losses": losses, "mean_residual_mm": 0.0}
    device = data.source.device
    generator = torch.Generator().manual_seed(options.seed)
    deformer = ResidualDeformer(data.source.min(dim=0).values.cpu(),
                                data.source.max(dim=0).values.cpu(), options, generator).to(device)
    # Instant-NGP's Adam settings: beta2 0.99 and a tiny epsilon, so that rarely hit table rows
    # still take full-size steps.
    optimiser = torch.optim.Adam(deformer.parameters(), lr=options.learning_rate,
                                 betas=(0.9, 0.99), eps=1e-15)
    weights = {"plane": options.plane_weight, "color": options.color_weight,
               "match": options.match_weight, "magnitude": options.magnitude_weight,
               "smoothness": options.smoothness_weight}
    K = min(options.points, P)
    bar = tqdm(total=options.iterations, desc=desc, disable=not progress, leave=False)
    while iterations < options.iterations:
        # At least one step, whatever the setup cost: a fit stopped before its first step
        # would silently return the unrefined warp (seen on a loaded machine).
        budget = options.time_budget
        if iterations > 0 and budget > 0 and time.perf_counter() - start >= budget:
            break
        chosen = torch.randperm(P, generator=generator)[:K].to(device)
        terms = _losses(deformer, data, chosen, options, max_depth)
        total = sum(weights[name] * value for name, value in terms.items())
        optimiser.zero_grad(set_to_none=True)
        total.backward()
        optimiser.step()
        iterations += 1
        losses = {name: float(value.detach()) for name, value in terms.items()}
        losses["total"] = float(total.detach())
        bar.update(1)
        bar.set_postfix(total=f"{losses['total']:.3g}", plane=f"{losses['plane']:.3g}",
                        refresh=False)
    bar.close()
    with torch.no_grad():
        residual = torch.cat([deformer(chunk, 1.0) for chunk in data.source.split(65536)])
    stats = {"iterations": iterations, "seconds": time.perf_counter() - start, "points": P,
             "losses": losses, "mean_residual_mm": float(MM * residual.norm(dim=1).mean())}
    return residual, stats


def fit_residual(batch: Dict, out: Dict, options: ResidualOptions = ResidualOptions(),
                 progress: bool = False, max_depth: float = 6.0) -> Dict:
    """Refines a tracked batch's graph warp with a residual deformer fitted per pair.

    Args:
        batch: a collated batch (dataset.deepdeform.collate): source_points, target_points
            (B, 3, H, W) metres, source_color, target_color (B, 3, H, W) in [0, 1], intrinsics
            (B, 4). Ground truth, if present, is not read.
        out: the tracker's output for it: warp_mask (B, H, W), warped_points (B, H, W, 3),
            matches (Matches) and their weights.
        options: ResidualOptions.
        progress: a tqdm bar per pair.
        max_depth: target depths beyond this many metres are invalid (the solver's max_depth).

    Every sample of the batch gets its own fresh deformer (fitted one after another), each
    within its own time budget. Works on tensors made under torch.inference_mode (it copies what
    it needs). On a CPU, torch runs with options.threads threads meanwhile.

    Returns a dict with warped_points (B, H, W, 3) = graph warp + residual, scene_flow
    (B, 3, H, W) = warped_points - source points, residual (B, H, W, 3), all metres and NaN
    outside warp_mask; and stats: a list of B dicts with iterations, seconds, points,
    losses (the terms of the last step, and their weighted total) and mean_residual_mm.
    """
    B, H, W, _ = out["warped_points"].shape
    threads = torch.get_num_threads()
    if options.threads > 0 and out["warped_points"].device.type == "cpu":
        torch.set_num_threads(options.threads)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            source = batch["source_points"].permute(0, 2, 3, 1).clone()
            warped = source.new_full((B, H, W, 3), float("nan"))
            residual = source.new_full((B, H, W, 3), float("nan"))
            stats = []
            for b in range(B):
                start = time.perf_counter()
                data = _PairData(batch, out, b, options)
                name = batch["name"][b] if "name" in batch else str(b)
                r, s = _fit_one(data, options, max_depth, start, progress, f"residual {name}")
                warped[b][data.mask] = data.warped + r
                residual[b][data.mask] = r
                stats.append(s)
    finally:
        torch.set_num_threads(threads)
    warped, residual = warped.detach(), residual.detach()
    return {"warped_points": warped, "residual": residual,
            "scene_flow": (warped - source).permute(0, 3, 1, 2).contiguous(), "stats": stats}
