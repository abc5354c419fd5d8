"""The terms of Instant-NK's residual field over a whole sequence (docs/DESIGN.md 5.9).

    data = SequenceData.build(canonical, faces, warped, times, depths, colors, intrinsics, options)
    field = ResidualDeformer(data.canonical.min(0).values, data.canonical.max(0).values,
                             options, generator, pinned=False)
    frames, chosen, neighbours = data.draw(options, generator)        # one mini-batch
    terms = sequence_losses(field, data, frames, chosen, neighbours, options)
    refined = refine(field, data)                                      # (T, V, 3)

A canonical vertex x_c (the fused mesh) moves in frame t to y = w_t(x_c) + d(x_c, t): w_t is the
graph warp of that frame (the fusion's frames/NNNNNN.ply), d the field of model/residual.py
(unpinned: free at every t, exactly 0 before the fit), t the frame's time normalised over the
sequence. Forward, canonical -> live, so that the refined mesh of a frame is exactly the
canonical mesh's vertices moved, with its topology.

The terms of one step, on `points` vertices of each of `frames_per_step` frames (drawn among the
vertices the frame sees under the graph warp: depth at their projection within `occlusion`):
  * plane: robust (Geman-McClure) point-to-plane distance of y to the frame's depth surface at
    y's projection (smoothed edge-aware, normals from it; held fixed within the step, as in
    projective ICP), skipping y whose depth disagrees with the frame's by more than
    `occlusion` (occluded, or off the object), millimetres squared;
  * color: robust distance of the vertex colour (its mean over the frames that see it) to the
    frame's colour at y's projection, differentiable through the projection;
  * magnitude: |d|^2; smoothness: |d(x_c, t) - d(x_n, t)|^2 for a random mesh neighbour x_n;
    temporal: |d(x_c, t) - d(x_c, t')|^2 for the neighbouring frame's time t'.
Ground truth is never read: only depth, colour, intrinsics and the graph warp.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from model.correspondences import bilinear_sample
from model.image_proc import backproject_depth
from model.residual import MM, ResidualDeformer, geman_mcclure, smooth_surface, surface_normals
from options import SequenceResidualOptions

TERMS = ("plane", "color", "magnitude", "smoothness", "temporal")


def mesh_neighbours(faces: torch.Tensor, num_vertices: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Vertex adjacency of a triangle mesh as CSR: faces (F, 3) int -> offsets (V + 1,) int64,
    neighbours (offsets[-1],) int64 (each undirected edge once in both directions, sorted)."""
    faces = faces.long()
    edges = torch.cat((faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]))
    edges = torch.cat((edges, edges.flip(1)))
    # One int64 key per directed edge: a 1D unique (sorted by source vertex, then neighbour) is
    # far faster than unique over rows.
    keys = torch.unique(edges[:, 0] * num_vertices + edges[:, 1])
    counts = torch.bincount(keys // num_vertices, minlength=num_vertices)
    offsets = torch.zeros(num_vertices + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets, (keys % num_vertices).contiguous()


def project(points: torch.Tensor, intrinsics: Tuple[float, float, float, float]) -> torch.Tensor:
    """(..., 3) camera points -> (..., 2) pixel coordinates (x, y); depth clamped above 0."""
    fx, fy, cx, cy = intrinsics
    z = points[..., 2].clamp(min=1e-6)
    return torch.stack((fx * points[..., 0] / z + cx, fy * points[..., 1] / z + cy), dim=-1)


@dataclass
class SequenceData:
    """Everything the fit reads, as tensors (T frames, V canonical vertices, H x W images).

    canonical (V, 3) and faces (F, 3) the canonical mesh; warped (T, V, 3) its graph warp into
    every frame; times (T,) in [0, 1]; previous (T,) the frame the temporal term compares with;
    geometry (T, 7, H, W) the smoothed depth surface (xyz), its normals and their validity
    (depth 0 = none); color (T, 3, H, W) in [0, 1]; vertex_color (V, 3) the vertex's colour
    (given, or its mean over the frames that see it under the graph warp) and colored (V,)
    whether it has one; offsets, neighbours: mesh adjacency (CSR); visible: per frame, the vertices it sees
    under the graph warp; intrinsics fx, fy, cx, cy."""

    canonical: torch.Tensor
    faces: torch.Tensor
    warped: torch.Tensor
    times: torch.Tensor
    previous: torch.Tensor
    geometry: torch.Tensor
    color: torch.Tensor
    vertex_color: torch.Tensor
    colored: torch.Tensor
    offsets: torch.Tensor
    neighbours: torch.Tensor
    visible: List[torch.Tensor]
    intrinsics: Tuple[float, float, float, float]
    max_depth: float

    @staticmethod
    def build(canonical: torch.Tensor, faces: torch.Tensor, warped: torch.Tensor,
              times: torch.Tensor, depths: torch.Tensor, colors: torch.Tensor,
              intrinsics: Dict[str, float], options: SequenceResidualOptions,
              vertex_color: Optional[torch.Tensor] = None, max_depth: float = 6.0) -> "SequenceData":
        """canonical (V, 3), faces (F, 3), warped (T, V, 3) metres; times (T,) in [0, 1],
        increasing; depths (T, H, W) metres; colors (T, 3, H, W) in [0, 1]; vertex_color (V, 3)
        in [0, 1], or None to take each vertex's mean colour over the frames that see it.
        Raises ValueError on shapes that disagree."""
        V, T = canonical.shape[0], warped.shape[0]
        if canonical.dim() != 2 or canonical.shape[1] != 3 or warped.shape[1:] != (V, 3):
            raise ValueError(f"canonical (V, 3) and warped (T, V, 3) disagree: "
                             f"{tuple(canonical.shape)} and {tuple(warped.shape)}")
        if times.shape != (T,) or depths.shape[0] != T or colors.shape[:2] != (T, 3) \
                or colors.shape[2:] != depths.shape[1:]:
            raise ValueError(f"times {tuple(times.shape)}, depths {tuple(depths.shape)} and colors "
                             f"{tuple(colors.shape)} must hold the {T} frames of warped")
        if T > 1 and bool((times[1:] <= times[:-1]).any()):
            raise ValueError("times must increase")
        intr = tuple(float(intrinsics[k]) for k in ("fx", "fy", "cx", "cy"))
        H, W = depths.shape[1:]
        geometry = torch.zeros(T, 7, H, W)
        for t, depth in enumerate(depths):
            # Only the window the mesh can reach is needed (its graph-warped projection, widened
            # by what the bounded residual can add and the smoothing radius): the rest of the
            # frame stays 0, "no surface", and the per-frame setup shrinks with the object.
            pixels = project(warped[t].float(), intr)
            depth_min = float(warped[t, :, 2].min().clamp(min=1e-3))
            reach = int(math.ceil(2 * options.max * max(intr[0], intr[1]) / depth_min)) + 8
            x0, y0 = (pixels.min(dim=0).values.floor().long() - reach).clamp(min=0).tolist()
            x1, y1 = (pixels.max(dim=0).values.ceil().long() + reach + 1).tolist()
            x1, y1 = min(x1, W), min(y1, H)
            if x1 <= x0 or y1 <= y0:
                continue
            points = backproject_depth(depth, intrinsics, max_depth).permute(2, 0, 1)[None, :, y0:y1, x0:x1]
            points = smooth_surface(points.contiguous(), options.target_smoothing)
            normals, valid = surface_normals(points)
            geometry[t, :, y0:y1, x0:x1] = torch.cat((points, normals, valid[:, None].to(points.dtype)), dim=1)[0]
        previous = torch.arange(T) - 1
        previous[0] = min(1, T - 1)
        offsets, neighbours = mesh_neighbours(faces, V)
        data = SequenceData(canonical.float(), faces.long(), warped.float(), times.float(), previous,
                            geometry, colors.float(),
                            torch.zeros(V, 3), torch.ones(V, dtype=torch.bool), offsets, neighbours, [], intr, max_depth)
        data.visible = [torch.nonzero(data.sees(t, data.warped[t], options.occlusion))[:, 0]
                        for t in range(T)]
        if vertex_color is not None:
            data.vertex_color = vertex_color.float()
        else:
            # The fused mesh's own colours are a blend of the same frames; taking them from the
            # frames keeps the term independent of whether a mesh file carries colours.
            total, count = torch.zeros(V, 3), torch.zeros(V)
            for t, seen in enumerate(data.visible):
                pixels = project(data.warped[t, seen], intr)[None, None]
                total.index_add_(0, seen, bilinear_sample(data.color[t:t + 1], pixels)[0, :, 0].T)
                count.index_add_(0, seen, torch.ones(seen.numel()))
            data.vertex_color = total / count.clamp(min=1)[:, None]
            data.colored = count > 0
        return data

    @property
    def num_frames(self) -> int:
        return self.warped.shape[0]

    def sample(self, t: int, points: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Frame t's depth surface at the projections of points (K, 3): geometry (K, 7) (xyz,
        normal, normal validity) and valid (K,): all 4 pixels around the projection have a
        normal, so valid depth and no depth edge near them (a bilinear mix across an edge is
        on neither surface)."""
        pixels = project(points, self.intrinsics)[None, None]
        geometry = bilinear_sample(self.geometry[t:t + 1], pixels)[0, :, 0].T
        return geometry, geometry[:, 6] >= 0.999

    def sees(self, t: int, points: torch.Tensor, occlusion: float) -> torch.Tensor:
        """(K, 3) live points of frame t -> (K,) bool: on the frame's depth surface there
        (valid depth and normal, depth within `occlusion`)."""
        with torch.no_grad():
            geometry, valid = self.sample(t, points)
            return valid & ((points[:, 2] - geometry[:, 2]).abs() <= occlusion)

    def draw(self, options: SequenceResidualOptions, generator: torch.Generator
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One mini-batch: frames (B,), chosen (B, K) vertices each frame sees (drawn with
        replacement), neighbours (B, K) a random mesh neighbour of each (itself if it has
        none). Frames that see nothing are not drawn; B = 0 when none sees anything."""
        usable = torch.tensor([v.numel() > 0 for v in self.visible])
        candidates = torch.nonzero(usable)[:, 0]
        B = min(options.frames_per_step, candidates.numel())
        frames = candidates[torch.randperm(candidates.numel(), generator=generator)[:B]]
        K = options.points
        chosen = torch.stack([self.visible[int(t)][torch.randint(self.visible[int(t)].numel(), (K,),
                                                                  generator=generator)]
                              for t in frames]) if B else torch.zeros(0, K, dtype=torch.long)
        start, degree = self.offsets[chosen], self.offsets[chosen + 1] - self.offsets[chosen]
        pick = (torch.rand(chosen.shape, generator=generator) * degree).long()
        neighbours = torch.where(degree > 0, self.neighbours[(start + pick).clamp(
            max=max(self.neighbours.numel() - 1, 0))] if self.neighbours.numel() else chosen, chosen)
        return frames, chosen, neighbours


def sequence_losses(field: ResidualDeformer, data: SequenceData, frames: torch.Tensor,
                    chosen: torch.Tensor, neighbours: torch.Tensor,
                    options: SequenceResidualOptions) -> Dict[str, torch.Tensor]:
    """The terms (scalars, see the module docstring) of one mini-batch from data.draw."""
    device = data.canonical.device
    frames, chosen, neighbours = frames.to(device), chosen.to(device), neighbours.to(device)
    B, K = chosen.shape
    flat = chosen.reshape(-1)
    frame_of = frames[:, None].expand(B, K).reshape(-1)
    t = data.times[frame_of]
    # One field evaluation for the vertex, its mesh neighbour and its neighbouring frame.
    points = torch.cat((data.canonical[flat], data.canonical[neighbours.reshape(-1)], data.canonical[flat]))
    d_all = field(points, torch.cat((t, t, data.times[data.previous[frame_of]])))
    d, d_neighbour, d_previous = d_all.split(B * K)
    y = data.warped[frame_of, flat] + d

    plane, color = [], []
    for b in range(B):
        yb = y[b * K:(b + 1) * K]
        with torch.no_grad():
            geometry, valid = data.sample(int(frames[b]), yb)
            visible = valid & ((yb[:, 2] - geometry[:, 2]).abs() <= options.occlusion)
        normal = F.normalize(geometry[:, 3:6], dim=1)
        distance = MM * ((yb - geometry[:, :3]) * normal).sum(dim=1)
        plane.append(geman_mcclure(distance[visible] ** 2, MM * options.plane_scale))
        if options.color_weight > 0:
            pixels = project(yb, data.intrinsics)[None, None]
            target = bilinear_sample(data.color[int(frames[b]):int(frames[b]) + 1], pixels)[0, :, 0].T
            error = ((target - data.vertex_color[chosen[b]]) ** 2).sum(dim=1)
            # Normalised per point (colours have no millimetres): an outlier costs at most 1.
            keep = visible & data.colored[chosen[b]]
            color.append(geman_mcclure(error[keep], options.color_scale) / options.color_scale ** 2)

    def mean(values: List[torch.Tensor]) -> torch.Tensor:
        values = torch.cat(values) if values else d.new_zeros(0)
        return values.sum() / max(values.numel(), 1)

    return {"plane": mean(plane), "color": mean(color),
            "magnitude": mean([((MM * d) ** 2).sum(dim=1)]),
            "smoothness": mean([((MM * (d - d_neighbour)) ** 2).sum(dim=1)]),
            "temporal": mean([((MM * (d - d_previous)) ** 2).sum(dim=1)])}


def total_loss(terms: Dict[str, torch.Tensor], options: SequenceResidualOptions) -> torch.Tensor:
    weights = {"plane": options.plane_weight, "color": options.color_weight,
               "magnitude": options.magnitude_weight, "smoothness": options.smoothness_weight,
               "temporal": options.temporal_weight}
    return sum(weights[name] * terms[name] for name in TERMS)


def residuals(field: ResidualDeformer, data: SequenceData, chunk: int = 65536) -> torch.Tensor:
    """d(x_c, t) of every canonical vertex in every frame: (T, V, 3) metres, no gradient."""
    with torch.no_grad():
        return torch.stack([torch.cat([field(part, float(t)) for part in data.canonical.split(chunk)])
                            for t in data.times])


def frame_errors(data: SequenceData, vertices: torch.Tensor, occlusion: float) -> torch.Tensor:
    """Per frame, the mean |point-to-plane distance| in mm of the vertices (T, V, 3) the frame
    sees (within `occlusion` of its depth) to its smoothed depth surface: (T,), NaN where it
    sees none. A self-check without ground truth: what the fit lowers."""
    errors = []
    with torch.no_grad():
        for t in range(data.num_frames):
            seen = data.sees(t, vertices[t], occlusion)
            geometry = data.sample(t, vertices[t])[0]
            normal = F.normalize(geometry[seen, 3:6], dim=1)
            distance = MM * ((vertices[t][seen] - geometry[seen, :3]) * normal).sum(dim=1).abs()
            errors.append(distance.mean() if distance.numel() else distance.new_tensor(float("nan")))
    return torch.stack(errors)
