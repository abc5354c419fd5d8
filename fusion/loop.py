"""The per-frame fusion loop (docs/DESIGN.md 5.9).

Frame 0 integrates rigidly into the TSDF and builds the graph (dataset/graph.py) from the
first frame's masked depth. Every later frame:
  1. render: the canonical mesh (marching cubes of the TSDF), warped by the previous frame's
     node motions, is ray cast into the camera: depth, colour, canonical point per pixel;
  2. flow + solve: the existing tracker's front-end (network, dis, gt) matches the rendering to
     the new frame (coloured from keyframes' input images, sharp, where they saw the surface:
     fusion/texture.py, --texture-keyframes); near the rendered silhouette the flow is refined
     by a Lucas-Kanade search over the model's own pixels (fusion/refine.py, --refine-border;
     not for gt), where the flow's patches mix in the static background; matches whose target point is far from
     the rendered point, or whose normals disagree, are dropped; the Gauss-Newton solver
     finds the increment of every node's motion on top of the previous one (the warm start:
     the rendering already sits at the previous motion). A failed solve is reported, keeps the last good motion and the
     frame is not integrated;
  3. integrate: the frame is fused warped (csrc/fusion) where it belongs to the object: where
     the model explains it, or near a warped node (new surface); the background stays out;
  4. grow: nodes are inserted where the new surface lies beyond node coverage, their motion
     blended from their neighbours for this and (back-filled) every earlier frame.
Tracking is against the model, not a chain of frame pairs, so errors do not accumulate without
bound (`tracking="previous"` and `"keyframe"` offer the frame-to-frame and keyframe-to-frame
variants for comparison).
"""
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Optional

import cv2
import numpy as np
import torch

from dataset.graph import GraphError, build_graph
from fusion.depth_term import pixel_normals, point_to_plane_terms
from fusion.graph import NodeGraph, blend_motions, inverse_warp, knn, warp_with_anchors
from fusion.gt import GroundTruth
from fusion.hidden import arap_extension, fade_edge_rest, update_edge_rest
from fusion.refine import masked_lucas_kanade
from fusion.render import Rendering, render
from fusion.sequence import Frame, Sequence
from fusion.texture import keyframe_colors
from fusion.volume import TSDFVolume
from model import image_proc
from model.correspondences import build_matches
from model.solver import SolverProblem, solve
from options import FusionOptions, GraphOptions, SolverOptions

STEPS = ("render", "flow", "solve", "integrate", "grow", "extract")
# --rest-smoothing's default with a tracked front-end (1 with exact flow): BENCHMARKS.md.
TRACKED_REST_SMOOTHING = 0.3
# --icp-reassociate's default with a tracked front-end (0 with exact flow): BENCHMARKS.md.
TRACKED_ICP_REASSOCIATE = 1
# --hidden-support's default with a tracked front-end and with exact flow: BENCHMARKS.md.
TRACKED_HIDDEN_SUPPORT, EXACT_HIDDEN_SUPPORT = 40.0, 20.0


@dataclass
class FrameLog:
    frame_id: int
    seconds: float
    matches: int
    status: str
    energy: float
    nodes: int
    new_nodes: int
    message: str = ""
    steps: Dict[str, float] = field(default_factory=dict)


@dataclass
class Mesh:
    vertices: np.ndarray       # (V, 3) float32 canonical
    faces: np.ndarray          # (F, 3) int64
    colors: np.ndarray         # (V, 3) float32 [0, 1]
    anchors: torch.Tensor      # (V, A) int64
    weights: torch.Tensor      # (V, A) float32


class Fusion:
    """State and steps of one fusion run. `step(frame)` processes one frame; `state_dict` /
    `load_state_dict` save and restore everything the later frames depend on."""

    def __init__(self, sequence: Sequence, options: FusionOptions, solver_options: SolverOptions,
                 tracker=None, ground_truth: Optional[GroundTruth] = None,
                 device: torch.device = torch.device("cpu")):
        if options.tracking == "keyframe" and options.texture_keyframes < 1:
            raise ValueError("--tracking keyframe needs --texture-keyframes of at least 1 (the keyframe interval)")
        self.sequence, self.options, self.solver_options = sequence, options, solver_options
        self.tracker, self.gt, self.device = tracker, ground_truth, torch.device(device)
        self.intrinsics = sequence.intrinsics
        self.volume = TSDFVolume(options.voxel_size, options.truncation, options.weight_cap, self.device)
        self.graph: Optional[NodeGraph] = None
        self.rotations_history: List[torch.Tensor] = []     # per processed frame (N, 3, 3)
        self.translations_history: List[torch.Tensor] = []  # per processed frame (N, 3)
        self.frame_ids: List[int] = []
        self.log: List[FrameLog] = []
        self.previous: Optional[Frame] = None
        self._mesh: Optional[Mesh] = None
        self._tracking: Optional[tuple] = None   # (Mesh, Rendering or None) the next frame tracks against
        self.keyframes: List[tuple] = []         # (history index, Frame): --texture-keyframes
        # --hidden-rest seen: the rest vectors of the directed graph edges as last seen well (keys,
        # vectors, frames: fusion/hidden.py), and the nodes the last solve saw well.
        self.edge_rest: Optional[tuple] = None
        self._well_seen: Optional[torch.Tensor] = None
        # --hidden-rest auto and --rest-smoothing's default, by front-end (measured:
        # BENCHMARKS.md): exact flow's seen shapes are kept as they were last seen; a tracked
        # front-end's carry its errors, so they are averaged over the frames that saw them. auto
        # is the seen rest with every front-end since the tracked front-ends' weakly supported
        # nodes follow their neighbours (--hidden-support 40); with 20 the averaged seen rest
        # was no better than the canonical one on sequences not used to tune it.
        flow = tracker.options.flow if tracker is not None else None
        self.hidden_rest = options.hidden_rest
        if self.hidden_rest == "auto":
            self.hidden_rest = "seen"
        self.rest_smoothing = options.rest_smoothing
        if self.rest_smoothing is None:
            self.rest_smoothing = 1.0 if flow == "gt" else TRACKED_REST_SMOOTHING
        # --icp-reassociate: a second solve at the re-made associations lowers a tracked
        # front-end's drift; with exact flow it changed nothing beyond noise (BENCHMARKS.md).
        self.icp_reassociate = options.icp_reassociate
        if self.icp_reassociate is None:
            self.icp_reassociate = 0 if flow == "gt" else TRACKED_ICP_REASSOCIATE
        # --hidden-support: a tracked front-end's few matches on a grazing border (the flow there
        # measured a fraction of the motion) fix a node worse than its well-seen neighbours'
        # extrapolated motion does; exact flow's do not (BENCHMARKS.md).
        self.hidden_support = options.hidden_support
        if self.hidden_support is None:
            self.hidden_support = EXACT_HIDDEN_SUPPORT if flow == "gt" else TRACKED_HIDDEN_SUPPORT

    # ------------------------------------------------------------------------------------------
    # Motion state

    @property
    def rotations(self) -> torch.Tensor:
        return self.rotations_history[-1]

    @property
    def translations(self) -> torch.Tensor:
        return self.translations_history[-1]

    def _record(self, frame_id: int, rotations: torch.Tensor, translations: torch.Tensor) -> None:
        self.rotations_history.append(rotations.float().clone())
        self.translations_history.append(translations.float().clone())
        self.frame_ids.append(frame_id)

    # ------------------------------------------------------------------------------------------

    def _tensors(self, frame: Frame):
        depth = torch.from_numpy(frame.depth)
        image = torch.from_numpy(frame.color.astype(np.float32))
        return depth, image

    def _integrate(self, frame: Frame, mask: np.ndarray) -> None:
        o = self.options
        depth, image = self._tensors(frame)
        self.volume.integrate(depth, image, torch.from_numpy(mask), self.intrinsics, self.graph.positions,
                              self.rotations, self.translations, o.node_coverage,
                              o.max_anchor_distance * o.node_coverage, 4, o.anchor_candidates,
                              o.dual_quaternion, o.color_observations)

    def first_frame(self, frame: Frame, mask: np.ndarray) -> FrameLog:
        start = time.perf_counter()
        o = self.options
        try:
            graph = build_graph(frame.depth, self.intrinsics, mask=mask,
                                options=GraphOptions(node_coverage=o.node_coverage,
                                                     max_depth=self.sequence.max_depth))
        except GraphError as error:
            raise GraphError(f"{self.sequence.depth_path(frame.frame_id)} within the first frame's mask: "
                             f"{error}") from None
        self.graph = NodeGraph.from_deformation_graph(graph, o.node_coverage)
        n = self.graph.num_nodes
        self._record(frame.frame_id, torch.eye(3).repeat(n, 1, 1), torch.zeros(n, 3))
        points = image_proc.backproject_depth(torch.from_numpy(frame.depth), self.intrinsics,
                                              self.sequence.max_depth)
        mask = mask & ~self._edges(points)
        object_points = points[torch.from_numpy(mask) & (points[..., 2] > 0)]
        self.volume.allocate_near(object_points)
        self._integrate(frame, mask)
        self.previous = frame
        self._mesh = None
        self.keyframes = [(0, frame)] if o.texture_keyframes > 0 else []
        entry = FrameLog(frame.frame_id, time.perf_counter() - start, 0, "first", 0.0, n, n)
        self.log.append(entry)
        return entry

    # ------------------------------------------------------------------------------------------

    def mesh(self) -> Mesh:
        """The current canonical mesh (marching cubes) with its vertices' anchors."""
        if self._mesh is None:
            vertices, faces, colors = self.volume.extract_mesh(self.options.extraction_weight)
            anchors, weights = self.graph.anchors(torch.from_numpy(vertices))
            self._mesh = Mesh(vertices, faces, colors, anchors, weights)
        return self._mesh

    def warped_vertices(self, mesh: Mesh, rotations: torch.Tensor, translations: torch.Tensor) -> np.ndarray:
        if mesh.vertices.shape[0] == 0:
            return mesh.vertices
        return warp_with_anchors(torch.from_numpy(mesh.vertices), mesh.anchors, mesh.weights,
                                 self.graph.positions, rotations, translations).numpy()

    def render(self, rotations: torch.Tensor, translations: torch.Tensor, mesh: Optional[Mesh] = None) -> Rendering:
        mesh = mesh if mesh is not None else self.mesh()
        live = self.warped_vertices(mesh, rotations, translations)
        return render(live, mesh.vertices, mesh.faces, mesh.colors, self.intrinsics,
                      self.sequence.height, self.sequence.width)

    # ------------------------------------------------------------------------------------------

    def _batch(self, source_color: np.ndarray, source_points: np.ndarray, anchors: np.ndarray,
               weights: np.ndarray, frame: Frame, target_points: torch.Tensor,
               flow: Optional[np.ndarray], translations: torch.Tensor) -> Dict:
        g = self.graph
        live_nodes = g.positions + translations
        i = self.intrinsics
        batch = {
            "source_color": torch.from_numpy(source_color).permute(2, 0, 1)[None].float(),
            "target_color": torch.from_numpy(frame.color.astype(np.float32) / 255).permute(2, 0, 1)[None],
            "source_points": torch.from_numpy(source_points).permute(2, 0, 1)[None].float(),
            "target_points": target_points.permute(2, 0, 1)[None],
            "pixel_anchors": torch.from_numpy(anchors)[None],
            "pixel_weights": torch.from_numpy(weights)[None],
            "nodes": live_nodes[None].float(), "num_nodes": torch.tensor([g.num_nodes]),
            "edges": g.edges[None], "edges_weights": g.edge_weights[None], "clusters": g.clusters[None],
            "intrinsics": torch.tensor([[i["fx"], i["fy"], i["cx"], i["cy"]]], dtype=torch.float32),
        }
        if flow is not None:
            batch["optical_flow"] = torch.from_numpy(flow)[None]
        return {k: v.to(self.device) for k, v in batch.items()}

    def _pixel_anchors(self, canonical: np.ndarray, valid: np.ndarray):
        H, W = valid.shape
        anchors = np.full((H, W, 4), -1, np.int32)
        weights = np.zeros((H, W, 4), np.float32)
        ys, xs = np.nonzero(valid)
        a, w = self.graph.anchors(torch.from_numpy(canonical[ys, xs]))
        anchors[ys, xs] = a.numpy().astype(np.int32)
        weights[ys, xs] = w.numpy()
        return anchors, weights

    def _filter_matches(self, matches, source_normals: np.ndarray, target_points: torch.Tensor,
                        normals: torch.Tensor):
        """Robust weighting of the correspondences: drop those whose target point is far from
        the source point, or whose surface normals disagree (a match to another surface)."""
        o = self.options
        H, W = source_normals.shape[:2]
        tp = matches.target_pixels
        xi = tp[:, 0].round().long().clamp(0, W - 1)
        yi = tp[:, 1].round().long().clamp(0, H - 1)
        target = target_points[yi, xi]
        keep = (target - matches.source_points).norm(dim=1) <= o.max_match_distance
        if o.max_normal_angle < 180:
            n_s = torch.from_numpy(source_normals).reshape(-1, 3)[matches.pixel]
            cos = (normals[yi, xi] * n_s).sum(dim=1)
            keep &= cos >= np.cos(np.radians(o.max_normal_angle))
        return keep

    def _track(self, frame: Frame, rendering: Rendering, timings: Dict[str, float],
               rotations: torch.Tensor, translations: torch.Tensor, later: bool = False):
        """One tracking pass from `rendering`, the model seen at the node motions (`rotations`,
        `translations`); the solve finds the increment on top of them. Adds its times to
        `timings`. Returns (rotations, translations, status, message, matches, energy)."""
        o = self.options
        tick = time.perf_counter()
        target_points = image_proc.backproject_depth(torch.from_numpy(frame.depth), self.intrinsics,
                                                     self.sequence.max_depth)
        if o.tracking in ("previous", "keyframe"):
            # Frame-to-frame or keyframe-to-frame: that input frame, with the canonical points
            # the model showed there (rendered at its motion), is the source.
            source = self.previous if o.tracking == "previous" else self.keyframes[-1][1]
            source_color = source.color.astype(np.float32) / 255
        else:
            # The rendered model where it is seen, the previous frame around it (gives the
            # flow's image pyramid context at the object's border); in a later pass, whose
            # rendering sits at this frame's motion already, this frame around it.
            context = (frame if later else self.previous).color.astype(np.float32) / 255
            source_color = np.where(rendering.mask[..., None], rendering.color, context)
        anchors, weights = self._pixel_anchors(rendering.canonical, rendering.mask)
        if self.keyframes and o.tracking == "model":
            source_color = self._keyframe_texture(rendering, anchors, weights, source_color)
        flow = None
        if self.tracker.options.flow == "gt":
            flow = self.gt.flow(rendering.canonical, rendering.mask, frame.frame_id, self.intrinsics,
                                frame.depth)
        batch = self._batch(source_color, rendering.points, anchors, weights, frame,
                            target_points, flow, translations)
        with torch.no_grad():
            out = self.tracker(batch, run_solver=False)
        if o.refine_border > 0 and self.tracker.options.flow != "gt":
            # (Ground-truth flow is exact: nothing to refine.)
            out["matches"] = self._refine_border(batch, out, rendering.mask)
        # The filter and the solve run on the CPU (the front-end on the chosen device).
        matches = out["matches"]
        for name in ("sample", "pixel", "source_points", "anchors", "anchor_weights", "target_pixels",
                     "target_depth", "weights"):
            setattr(matches, name, getattr(matches, name).cpu())
        normals = pixel_normals(target_points)
        keep = self._filter_matches(matches, rendering.normals, target_points, normals)
        for name in ("sample", "pixel", "source_points", "anchors", "anchor_weights", "target_pixels",
                     "target_depth", "weights"):
            setattr(matches, name, getattr(matches, name)[keep])
        batch = {k: v.cpu() for k, v in batch.items()}
        timings["flow"] += time.perf_counter() - tick
        tick = time.perf_counter()
        problem = SolverProblem.from_matches(matches, batch["nodes"], batch["num_nodes"], batch["edges"],
                                             batch["edges_weights"], batch["clusters"], batch["intrinsics"])
        associate = None
        if self.solver_options.icp_weight > 0 and o.tracking == "model":
            # The live frame's depth jumps once for every association of this pass.
            boundary = self._depth_jumps(target_points)
            associate = partial(self._icp_terms, rendering, anchors, weights, target_points, normals,
                                boundary=boundary)
            for name, value in associate().items():
                setattr(problem, name, value)
        generator = torch.Generator().manual_seed(frame.frame_id)
        with torch.no_grad():
            result = solve(problem, self.solver_options, generator)
        timings["solve"] += time.perf_counter() - tick
        status, message = result.status[0], result.messages[0]
        energy = result.energies[0][-1] if result.energies[0] else float("nan")
        count = int(result.num_matches[0])
        if not bool(result.valid[0]):
            return rotations, translations, status, message, count, energy
        # Increments on top of the previous motion: node k moves y -> dR_k (y - g'_k) + g'_k + dt_k
        # around its live position g'_k = g_k + t_k, so R <- dR R and t <- t + dt exactly.
        dR = result.rotations[0].cpu().float()
        dt = result.translations[0].cpu().float()
        if associate is not None and self.icp_reassociate > 0:
            tick = time.perf_counter()
            dR, dt, energy, note = self._reassociate(frame, rendering, anchors, weights, associate, matches, problem,
                                                     rotations, translations, dR, dt, energy)
            message = "; ".join(m for m in (message, note) if m)
            timings["solve"] += time.perf_counter() - tick
        if self.hidden_support > 0:
            dR, dt = self._follow_visible(dR, dt, rotations, translations, matches)
        return dR @ rotations, translations + dt, status, message, count, energy

    def _keyframe_texture(self, rendering: Rendering, anchors: np.ndarray, weights: np.ndarray,
                          source_color: np.ndarray) -> np.ndarray:
        """The flow's source image with the rendered model's pixels coloured from the keyframes
        that saw their canonical points (fusion/texture.py), at the node motions of each
        keyframe's frame; the model's own colour where none did."""
        keys = [(key.color, key.depth, self.rotations_history[index], self.translations_history[index])
                for index, key in self.keyframes]
        colored, _ = keyframe_colors(rendering.canonical, anchors, weights, rendering.mask, source_color, keys,
                                     self.graph.positions, self.intrinsics, self.options.texture_tolerance)
        return colored

    def _refine_border(self, batch: Dict, out: Dict, rendered: np.ndarray):
        """Matches rebuilt, as the tracker builds them, from its flow refined within
        --refine-border pixels of the rendered silhouette (fusion/refine.py) at every 2nd pixel;
        the band's other pixels, and windows without texture, give no match."""
        flow = out["flow"][0].cpu().numpy()
        silhouette = cv2.distanceTransform(rendered.astype(np.uint8), cv2.DIST_L2, 5)
        band = rendered & (silhouette <= self.options.refine_border)
        sub = np.zeros_like(band)
        sub[::2, ::2] = True
        refined, _ = masked_lucas_kanade(image_proc.to_u8(batch["source_color"][0]),
                                         image_proc.to_u8(batch["target_color"][0]), rendered, flow, band & sub)
        refined[:, band & ~sub] = np.nan
        flow = torch.from_numpy(refined)[None].to(out["flow"])
        valid = torch.isfinite(flow).all(dim=1)
        t = self.tracker.options
        return build_matches(batch["source_points"].permute(0, 2, 3, 1), torch.where(valid[:, None], flow, 0.0),
                             batch["target_points"][:, 2], batch["pixel_anchors"], batch["pixel_weights"],
                             out["weights"], self.solver_options.max_depth, valid, t.max_depth_jump)

    def _remember_seen_edges(self) -> None:
        """--hidden-rest seen: every edge i -> j whose two nodes this frame's solve saw well keeps
        its shape now as its rest in the hidden-node extension, in node i's canonical frame:
        R_i^T (p_j - p_i) (q_j - q_i while the edge moves rigidly)."""
        if self._well_seen is None:
            return
        seen, self._well_seen = self._well_seen, None
        N = seen.shape[0]
        edges = self.graph.edges[:N]
        i = torch.arange(N)[:, None].expand_as(edges)
        both = (edges >= 0) & seen[:, None] & seen[edges.clamp(min=0)]
        i, j = i[both], edges[both].long()
        # Both directions: the extension's edge list is symmetric, and a direction missing from
        # the store would fall back to the canonical shape on that side.
        i, j = torch.cat((i, j)), torch.cat((j, i))
        p = self.graph.positions + self.translations
        vectors = torch.einsum("eba,eb->ea", self.rotations[i], p[j] - p[i])
        self.edge_rest = update_edge_rest(self.edge_rest, i, j, vectors, len(self.rotations_history) - 1,
                                          self.rest_smoothing)

    def _refine(self, frame: Frame, timings: Dict[str, float], first: tuple) -> tuple:
        """--passes beyond the first: the model rendered at the motion just solved, the flow
        from it to the live frame again (the remainder of the motion: the flow measures a weak
        texture's motion short, and each pass leaves only that fraction of what was left), and a
        solve on top of that motion. The current mesh serves (the later integration reuses its
        extraction). A failed later pass keeps the earlier pass's motion."""
        result = first
        for _ in range(self.options.passes - 1):
            if result[2] == "failed":
                break
            tick = time.perf_counter()
            mesh = self.mesh()
            timings["extract"] += time.perf_counter() - tick
            tick = time.perf_counter()
            rendering = self.render(result[0], result[1], mesh)
            timings["render"] += time.perf_counter() - tick
            again = self._track(frame, rendering, timings, result[0], result[1], later=True)
            if again[2] == "failed":
                break
            result = again
        return result

    def _follow_visible(self, dR: torch.Tensor, dt: torch.Tensor, rotations: torch.Tensor,
                        translations: torch.Tensor, matches):
        """Increments (dR, dt) of the solve on top of the previous motion (rotations,
        translations) with those of the nodes the frame's matches barely touch (support: the sum
        of the matches' anchor x correspondence weights below --hidden-support) replaced: the
        blend of their nearest supported nodes' increments (a rigid extrapolation; the ARAP
        term alone lets a hidden region lag behind a turn, its rotation unknowns held by the
        damping far more than by the edges), then the as-rigid-as-possible extension from there
        (fusion/hidden.py), against each edge's shape when last seen well (--hidden-rest seen,
        auto's choice with gt) or the graph's canonical shape (--hidden-rest canonical)."""
        o = self.options
        live_nodes = self.graph.positions + translations
        support = node_support(matches, live_nodes.shape[0])
        seen = support >= self.hidden_support
        if self.hidden_rest == "seen":
            self._well_seen = support >= self.hidden_support * o.rest_support
        hidden = torch.nonzero(~seen).squeeze(1)
        if hidden.numel() == 0 or int(seen.sum()) < 4:
            return dR, dt
        visible = torch.nonzero(seen).squeeze(1)
        k = min(4, visible.numel())
        d = torch.cdist(live_nodes[hidden], live_nodes[visible])
        dist, near = torch.topk(d, k, dim=1, largest=False)
        # Softmax of the Gaussian's exponent: no underflow for a node far from every seen one.
        w = torch.softmax(-dist ** 2 / (2 * (2 * o.node_coverage) ** 2), dim=1)
        R_new, t_new = blend_motions(live_nodes[hidden], near, w, live_nodes[visible], dR[visible][None],
                                     dt[visible][None])
        dR, dt = dR.clone(), dt.clone()
        dR[hidden], dt[hidden] = R_new[0], t_new[0]
        if o.hidden_arap_iterations <= 0:
            return dR, dt
        if self.hidden_rest == "previous":
            # ARAP against the live shape before the frame: the increments themselves.
            return arap_extension(live_nodes, self.graph.edges, self.graph.edge_weights, dR, dt, ~seen,
                                  o.hidden_arap_iterations)
        # ARAP against the canonical shape (or, --hidden-rest seen, each edge's last well-seen
        # shape): the whole motions, so that what a hidden region's shape got wrong in earlier
        # frames is undone, not carried on (measured: BENCHMARKS.md).
        rest = None
        if self.hidden_rest == "seen":
            rest = fade_edge_rest(self.edge_rest, self.graph.positions, len(self.rotations_history), o.rest_half_life)
        R, t = arap_extension(self.graph.positions, self.graph.edges, self.graph.edge_weights, dR @ rotations,
                              translations + dt, ~seen, o.hidden_arap_iterations, rest=rest)
        # Back to increments by the inverse, not the transpose, of the previous rotations:
        # R R_prev^T R_prev would multiply R_prev's rounding away from a rotation every frame
        # (tests/test_fusion_loop.py).
        dR[hidden] = R[hidden] @ torch.linalg.inv(rotations[hidden])
        dt[hidden] = t[hidden] - translations[hidden]
        return dR, dt

    def _reassociate(self, frame: Frame, rendering: Rendering, anchors: np.ndarray, weights: np.ndarray,
                     associate, matches, problem: SolverProblem, rotations: torch.Tensor,
                     translations: torch.Tensor, dR: torch.Tensor, dt: torch.Tensor, energy: float):
        """--icp-reassociate: the point-to-plane associations were made at the previous motion
        and stay fixed through the solve's iterations, where on a curved surface they pull every
        point back toward the live point it started over (a spring of the curvature's order
        against the flow). Here each round warps the rendered canonical points by the motion
        just solved, associates them again with the live pixel each now projects to, and
        solves again from that motion, the flow's matches unchanged (their source points warped
        alike; `associate(live)`: _icp_terms of this frame). The normal check keeps the rendered
        normals (one frame's rotation is far below --icp-max-normal-angle). A failed round keeps
        the motion before it and says so in the returned note (frames.csv's message). `matches`
        and `problem` are updated in place.
        Returns the increments on top of (rotations, translations), the last energy and the
        note ("" when every round solved)."""
        R, t = dR @ rotations, translations + dt
        canonical = torch.from_numpy(np.nan_to_num(rendering.canonical[rendering.mask]))
        pixel_anchors = torch.from_numpy(anchors[rendering.mask]).long()
        pixel_weights = torch.from_numpy(weights[rendering.mask])
        note = ""
        for round_ in range(self.icp_reassociate):
            live = np.zeros_like(rendering.points)
            live[rendering.mask] = warp_with_anchors(canonical, pixel_anchors.clamp(min=0), pixel_weights,
                                                     self.graph.positions, R, t).numpy()
            matches.source_points = torch.from_numpy(live.reshape(-1, 3))[matches.pixel]
            for name, value in associate(live).items():
                setattr(problem, name, value)
            problem.nodes = (self.graph.positions + t)[None].float()
            problem.source_points = matches.source_points
            generator = torch.Generator().manual_seed(frame.frame_id * 8 + round_ + 1)
            with torch.no_grad():
                result = solve(problem, self.solver_options, generator)
            if not bool(result.valid[0]):
                note = f"re-associated solve {round_ + 1} failed ({result.messages[0]}): the motion before it kept"
                break
            R, t = result.rotations[0].cpu().float() @ R, t + result.translations[0].cpu().float()
            energy = result.energies[0][-1] if result.energies[0] else energy
        return R @ torch.linalg.inv(rotations), t - translations, energy, note

    def _icp_terms(self, rendering: Rendering, anchors: np.ndarray, weights: np.ndarray,
                   target_points: torch.Tensor, normals: torch.Tensor, live: Optional[np.ndarray] = None,
                   boundary: Optional[np.ndarray] = None) -> Dict[str, torch.Tensor]:
        """The problem's point-to-plane terms (fusion/depth_term.py) of the rendered model's
        points, at the previous motion (`live` None: the rendering's own) or as given; `boundary`
        the live frame's _depth_jumps (computed when not given)."""
        o = self.options
        if boundary is None:
            boundary = self._depth_jumps(target_points)
        return point_to_plane_terms(rendering.mask, rendering.points if live is None else live, rendering.normals,
                                    anchors, weights, target_points, normals, self.intrinsics, o.icp_stride,
                                    o.icp_max_distance, o.icp_max_normal_angle, boundary)

    def _depth_jumps(self, points: torch.Tensor) -> np.ndarray:
        """(H, W) bool: pixels within --edge-margin of a depth jump (none with 0)."""
        o = self.options
        if o.edge_margin <= 0:
            return np.zeros(points.shape[:2], bool)
        return image_proc.depth_boundary_mask(points, o.edge_margin, o.edge_jump).numpy()

    def _edges(self, points: torch.Tensor) -> np.ndarray:
        """Pixels within --edge-margin pixels of a depth jump (their depth mixes the object with
        what lies behind it: flying pixels that would grow false surface off its border), and
        pixels whose surface is seen more than --max-view-angle degrees off its normal."""
        o = self.options
        edges = self._depth_jumps(points)
        if o.max_view_angle < 90:
            # Surface seen at a grazing angle: its depth smears along the ray.
            normals = pixel_normals(points)
            rays = points / points.norm(dim=-1, keepdim=True).clamp(min=1e-9)
            cos = -(normals * rays).sum(dim=-1)
            edges |= ((cos < np.cos(np.radians(o.max_view_angle))) & (normals.norm(dim=-1) > 0)).numpy()
        return edges

    def _object_mask(self, frame: Frame, rendering: Rendering, rotations, translations):
        """Live pixels that belong to the object: explained by the model at the new motion
        (depth within 3 truncations of the rendering), or near a warped node where the model
        is not seen (new surface). Returns the mask and the live points."""
        o = self.options
        points = image_proc.backproject_depth(torch.from_numpy(frame.depth), self.intrinsics,
                                              self.sequence.max_depth)
        valid = (points[..., 2] > 0).numpy()
        live_nodes = (self.graph.positions + translations).contiguous()
        # Only points inside the warped nodes' bounding box (grown by the radius) can be near one.
        radius = o.object_distance * o.node_coverage
        low, high = live_nodes.min(dim=0).values - radius, live_nodes.max(dim=0).values + radius
        inside = valid & ((points >= low) & (points <= high)).all(dim=-1).numpy()
        near = np.zeros_like(valid)
        if inside.any():
            _, distance = knn(live_nodes, points[torch.from_numpy(inside)], 1)
            near[inside] = (distance[:, 0] <= radius).numpy()
        explained = rendering.mask & (np.abs(frame.depth - rendering.depth) <= 3 * o.truncation)
        mask = valid & (explained | (~rendering.mask & near)) & ~self._edges(points)
        return mask, points, explained

    def step(self, frame: Frame) -> FrameLog:
        """Tracks, integrates and grows for one frame after the first."""
        o = self.options
        timings = {name: 0.0 for name in STEPS}
        start = tick = time.perf_counter()
        # The model as rendered at the end of the previous frame (its mesh before that frame's
        # integration, at that frame's motion): one extraction and one ray cast per frame.
        if self._tracking is None:
            self._tracking = (self.mesh(), None)
        timings["extract"] = time.perf_counter() - tick
        tick = time.perf_counter()
        rendering, start_motion = self._tracking[1], (self.rotations, self.translations)
        if o.tracking == "keyframe":
            index = self.keyframes[-1][0]
            rendering, start_motion = None, (self.rotations_history[index], self.translations_history[index])
        if rendering is None:
            rendering = self.render(*start_motion, self._tracking[0])
        timings["render"] = time.perf_counter() - tick
        message = ""
        if o.oracle_motion:
            tick = time.perf_counter()
            rotations, translations = self.gt.node_motions(self.graph.positions, frame.frame_id, o.node_coverage)
            status, count, energy = "oracle", 0, 0.0
            timings["solve"] = time.perf_counter() - tick
        else:
            rotations, translations, status, message, count, energy = self._track(
                frame, rendering, timings, *start_motion)
            if o.tracking == "model":
                rotations, translations, status, message, count, energy = self._refine(
                    frame, timings, (rotations, translations, status, message, count, energy))
        new_nodes = 0
        if status == "failed":
            self._record(frame.frame_id, self.rotations, self.translations)
        else:
            self._record(frame.frame_id, rotations, translations)
            self._remember_seen_edges()
            if o.texture_keyframes > 0 and (len(self.frame_ids) - 1) % o.texture_keyframes == 0:
                self.keyframes.append((len(self.frame_ids) - 1, frame))
            tick = time.perf_counter()
            mesh = self.mesh()
            timings["extract"] += time.perf_counter() - tick
            tick = time.perf_counter()
            after = self.render(rotations, translations, mesh)
            self._tracking = (mesh, after)
            timings["render"] += time.perf_counter() - tick
            tick = time.perf_counter()
            mask, points, explained = self._object_mask(frame, after, rotations, translations)
            # Allocate where the object is seen (every 2nd pixel suffices: blocks are 4 cm).
            sub = np.zeros_like(mask)
            sub[::2, ::2] = mask[::2, ::2]
            live = points[torch.from_numpy(sub)]
            canonical = inverse_warp(live, self.graph.positions, rotations, translations, o.node_coverage)
            self.volume.allocate_near(canonical)
            self._integrate(frame, mask)
            self._mesh = None
            timings["integrate"] = time.perf_counter() - tick
            tick = time.perf_counter()
            if o.grow_nodes and self.graph.num_nodes < self.solver_options.max_nodes:
                new_surface = sub & ~explained
                fresh = inverse_warp(points[torch.from_numpy(new_surface)], self.graph.positions, rotations,
                                     translations, o.node_coverage)
                new_nodes = self._grow(fresh, len(self.frame_ids) - 1)
            timings["grow"] = time.perf_counter() - tick
        self.previous = frame
        entry = FrameLog(frame.frame_id, time.perf_counter() - start, count, status, energy,
                         self.graph.num_nodes, new_nodes, message, timings)
        self.log.append(entry)
        return entry

    def _grow(self, candidates: torch.Tensor, frame_index: int) -> int:
        o = self.options
        old = self.graph.num_nodes
        old_positions = self.graph.positions
        ids = self.graph.insert(candidates, frame_index, min(o.max_new_nodes, self.solver_options.max_nodes - old))
        if ids.numel() == 0:
            return 0
        # Motions of the new nodes, for every frame so far, blended from the nodes that existed.
        new_positions = self.graph.positions[ids]
        k = min(4, old)
        d = torch.cdist(new_positions, old_positions)
        dist, anchors = torch.topk(d, k, dim=1, largest=False)
        w = torch.exp(-dist ** 2 / (2 * o.node_coverage ** 2))
        w = w / w.sum(dim=1, keepdim=True).clamp(min=1e-12)
        R_hist = torch.stack([R[:old] for R in self.rotations_history])
        t_hist = torch.stack([t[:old] for t in self.translations_history])
        R_new, t_new = blend_motions(new_positions, anchors, w, old_positions, R_hist, t_hist)
        for i in range(len(self.rotations_history)):
            self.rotations_history[i] = torch.cat((self.rotations_history[i], R_new[i]))
            self.translations_history[i] = torch.cat((self.translations_history[i], t_new[i]))
        self._mesh = None
        return int(ids.numel())

    # ------------------------------------------------------------------------------------------

    def history(self):
        """(T, N, 3, 3) rotations and (T, N, 3) translations of every processed frame."""
        return torch.stack(self.rotations_history), torch.stack(self.translations_history)

    def state_dict(self) -> dict:
        R, t = self.history()
        return {"volume": self.volume.state_dict(), "graph": self.graph.state_dict(),
                "rotations": R, "translations": t, "frame_ids": list(self.frame_ids),
                "log": [entry.__dict__ for entry in self.log],
                "previous_index": self.previous.index,
                "keyframes": [(index, key.index) for index, key in self.keyframes],
                "edge_rest": self.edge_rest,
                "tracking_mesh": None if self._tracking is None else self._tracking[0].__dict__}

    def load_state_dict(self, state: dict) -> None:
        self.volume.load_state_dict(state["volume"])
        self.graph = NodeGraph.from_state_dict(state["graph"])
        self.rotations_history = list(state["rotations"])
        self.translations_history = list(state["translations"])
        self.frame_ids = list(state["frame_ids"])
        self.log = [FrameLog(**entry) for entry in state["log"]]
        self.previous = self.sequence.read(int(state["previous_index"]))
        self.keyframes = [(int(index), self.sequence.read(int(key))) for index, key in state.get("keyframes", [])]
        self.edge_rest = state.get("edge_rest")
        if self.edge_rest is not None and len(self.edge_rest) == 2:
            # A state written before the store kept the frame of each vector: as of now.
            self.edge_rest = (*self.edge_rest, torch.full_like(self.edge_rest[0], len(self.frame_ids) - 1))
        self._mesh = None
        mesh = state.get("tracking_mesh")
        self._tracking = None if mesh is None else (Mesh(**mesh), None)


def node_support(matches, count: int) -> torch.Tensor:
    """(count,) float64: each node's match support, the sum of the matches' anchor x
    correspondence weights (--hidden-support thresholds it)."""
    support = torch.zeros(count, dtype=torch.float64)
    support.index_add_(0, matches.anchors.reshape(-1).long().clamp(min=0),
                       (matches.anchor_weights * matches.weights[:, None]).reshape(-1).double())
    return support

