"""The deformation graph of the canonical model, and how it grows.

Frame 0 builds it with the project's graph construction (dataset/graph.py: geodesic edges on the
first frame's depth). Later, where the canonical surface outgrows node coverage, nodes are
inserted: each gets Euclidean edges to its nearest nodes, the cluster of its nearest node, and a
motion blended from its neighbours (for the current frame and, back-filled, for every earlier
frame, so the final mesh can be warped into every frame). Anchors of canonical points (voxels,
mesh vertices, rendered pixels) are their nearest nodes with Gaussian weights on the coverage,
as the pixel anchors of dataset/graph.py.
"""
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch

from dataset.graph import DeformationGraph, gaussian_weights
from model.warp import anchor_terms


def knn(points: torch.Tensor, queries: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k nearest of (N, 3) points to each of (P, 3) queries, nearest first: ids (P, k) int64
    and distances (P, k) float32 (Open3D's k-d tree; k is clamped to N)."""
    import open3d.core as o3c

    k = min(k, points.shape[0])
    if queries.shape[0] == 0:
        return torch.zeros(0, k, dtype=torch.int64), torch.zeros(0, k)
    search = o3c.nns.NearestNeighborSearch(o3c.Tensor(points.detach().float().contiguous().cpu().numpy()))
    search.knn_index()
    ids, d2 = search.knn_search(o3c.Tensor(queries.detach().float().contiguous().cpu().numpy()), k)
    return (torch.from_numpy(ids.numpy().astype(np.int64)),
            torch.from_numpy(d2.numpy().astype(np.float32)).clamp(min=0).sqrt())


@dataclass
class NodeGraph:
    positions: torch.Tensor      # (N, 3) float32 canonical node positions
    edges: torch.Tensor          # (N, K) int64 neighbour ids, -1 = none
    edge_weights: torch.Tensor   # (N, K) float32
    clusters: torch.Tensor       # (N,) int64
    created: torch.Tensor        # (N,) int64 index of the processed frame that inserted the node
    coverage: float

    @classmethod
    def from_deformation_graph(cls, graph: DeformationGraph, coverage: float) -> "NodeGraph":
        n = graph.num_nodes
        return cls(positions=torch.from_numpy(graph.nodes).float(),
                   edges=torch.from_numpy(graph.edges).long(),
                   edge_weights=torch.from_numpy(graph.edges_weights).float(),
                   clusters=torch.from_numpy(graph.clusters.reshape(-1)).long(),
                   created=torch.zeros(n, dtype=torch.int64), coverage=float(coverage))

    @property
    def num_nodes(self) -> int:
        return int(self.positions.shape[0])

    def anchors(self, points: torch.Tensor, num_anchors: int = 4) -> Tuple[torch.Tensor, torch.Tensor]:
        """Nearest nodes (P, A) int64 and normalised Gaussian weights (P, A) float32 of (P, 3)
        canonical points (all A anchors exist when the graph has at least A nodes)."""
        points = points.float().contiguous()
        if points.shape[0] == 0:
            return (torch.zeros(0, num_anchors, dtype=torch.int64), torch.zeros(0, num_anchors))
        ids, distances = knn(self.positions, points, num_anchors)
        weights = gaussian_weights(distances.numpy(), ids.numpy() >= 0, self.coverage)
        return ids, torch.from_numpy(weights)

    def nearest_distance(self, points: torch.Tensor) -> torch.Tensor:
        """(P,) distance of each canonical point to its nearest node."""
        if points.shape[0] == 0:
            return torch.zeros(0)
        return knn(self.positions, points, 1)[1][:, 0]

    def insert(self, candidates: torch.Tensor, frame_index: int, max_new: int,
               max_distance_factor: float = 2.0) -> torch.Tensor:
        """Inserts nodes among the (P, 3) canonical candidate points so that every candidate
        within max_distance_factor x coverage of the graph is covered; farther candidates are
        left for later frames (growth stays connected, and stray points do not seed islands).
        Greedy, nearest candidates first (deterministic). Returns the ids of the new nodes."""
        if candidates.shape[0] == 0 or max_new <= 0:
            return torch.zeros(0, dtype=torch.int64)
        candidates = candidates.float()
        distance = self.nearest_distance(candidates)
        keep = (distance > self.coverage) & (distance <= max_distance_factor * self.coverage)
        candidates, distance = candidates[keep], distance[keep]
        new = []
        while candidates.shape[0] and len(new) < max_new:
            best = int(torch.argmin(distance))
            node = candidates[best]
            new.append(node)
            distance = torch.minimum(distance, (candidates - node).norm(dim=1))
            alive = distance > self.coverage
            candidates, distance = candidates[alive], distance[alive]
        if not new:
            return torch.zeros(0, dtype=torch.int64)
        start = self.num_nodes
        added = torch.stack(new)
        self.positions = torch.cat((self.positions, added))
        ids = torch.arange(start, self.num_nodes)
        K = self.edges.shape[1]
        distances = torch.cdist(added, self.positions)
        distances[torch.arange(len(new)), ids] = float("inf")
        k = min(K, self.num_nodes - 1)
        d, nearest = torch.topk(distances, k, dim=1, largest=False)
        edges = torch.full((len(new), K), -1, dtype=torch.int64)
        edge_d = torch.zeros(len(new), K)
        edges[:, :k], edge_d[:, :k] = nearest, d
        weights = torch.from_numpy(gaussian_weights(edge_d.numpy(), edges.numpy() >= 0, self.coverage))
        self.edges = torch.cat((self.edges, edges))
        self.edge_weights = torch.cat((self.edge_weights, weights))
        # New nodes join their nearest node's cluster; the nearest may itself be new, so resolve
        # in insertion order: the nearest among the nodes that have a cluster by then (the old
        # ones and the new ones inserted before it; the old nearest when none is in its list).
        clusters = self.clusters.tolist()
        for row in range(len(new)):
            known = nearest[row][nearest[row] < len(clusters)]
            first = int(known[0]) if known.numel() else int(torch.argmin(distances[row, :start]))
            clusters.append(clusters[first])
        self.clusters = torch.tensor(clusters, dtype=torch.int64)
        self.created = torch.cat((self.created, torch.full((len(new),), frame_index, dtype=torch.int64)))
        return ids

    def state_dict(self) -> dict:
        return {"positions": self.positions, "edges": self.edges, "edge_weights": self.edge_weights,
                "clusters": self.clusters, "created": self.created,
                "coverage": torch.tensor(self.coverage, dtype=torch.float64)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "NodeGraph":
        return cls(positions=state["positions"], edges=state["edges"], edge_weights=state["edge_weights"],
                   clusters=state["clusters"], created=state["created"], coverage=float(state["coverage"]))


def project_to_rotation(matrices: torch.Tensor) -> torch.Tensor:
    """Nearest rotation (..., 3, 3) of each (..., 3, 3) matrix (SVD, determinant +1)."""
    U, _, Vh = torch.linalg.svd(matrices.double())
    d = torch.det(U @ Vh)
    S = torch.diag_embed(torch.stack((torch.ones_like(d), torch.ones_like(d), d), dim=-1))
    return (U @ S @ Vh).to(matrices.dtype)


def blend_motions(points: torch.Tensor, anchors: torch.Tensor, weights: torch.Tensor,
                  nodes: torch.Tensor, rotations: torch.Tensor, translations: torch.Tensor
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Motions of new nodes at (P, 3) from their anchors' motions, for T frames at once.

    anchors, weights (P, A); nodes (N, 3); rotations (T, N, 3, 3); translations (T, N, 3).
    The rotation is the blend of the anchors' rotations projected onto SO(3); the translation
    moves the point where the anchors' blended warp takes it. Returns (T, P, 3, 3), (T, P, 3).
    """
    w = weights[None, :, :, None]
    g = nodes[anchors]                                                        # (P, A, 3)
    R = rotations[:, anchors]                                                 # (T, P, A, 3, 3)
    moved = torch.einsum("tpaij,paj->tpai", R, points[:, None, :] - g) + g + translations[:, anchors]
    warped = (w * moved).sum(dim=2)                                           # (T, P, 3)
    blended = project_to_rotation((weights[None, :, :, None, None] * R).sum(dim=2))
    return blended, warped - points[None]


def warp_with_anchors(points: torch.Tensor, anchors: torch.Tensor, weights: torch.Tensor,
                      nodes: torch.Tensor, rotations: torch.Tensor, translations: torch.Tensor) -> torch.Tensor:
    """Linear blend warp of (P, 3) canonical points (model/warp.py's formula; all anchors valid)."""
    return anchor_terms(points, anchors, weights, nodes, rotations, translations)[1]


def inverse_warp(live: torch.Tensor, nodes: torch.Tensor, rotations: torch.Tensor,
                 translations: torch.Tensor, coverage: float, num_anchors: int = 4) -> torch.Tensor:
    """Canonical positions of (P, 3) live points: anchored to the nearest warped nodes
    (g + t), x = sum_k w_k (R_k^T (y - g_k - t_k) + g_k). Exact for rigid motion, first order
    otherwise, which is all allocation and growth need."""
    if live.shape[0] == 0:
        return live.clone()
    warped_nodes = (nodes + translations).float().contiguous()
    ids, distances = knn(warped_nodes, live, num_anchors)
    w = torch.from_numpy(gaussian_weights(distances.numpy(), ids.numpy() >= 0, coverage))
    local = torch.einsum("paji,paj->pai", rotations[ids], live[:, None, :] - warped_nodes[ids])
    return (w[..., None] * (local + nodes[ids])).sum(dim=1)

