"""The solver's inputs and outputs: a batch of problems, the per-sample status and the result."""
from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional

import torch


class SolveStatus(str, Enum):
    """Outcome of one sample's solve. A str, so `status == "converged"` and JSON keep working."""

    CONVERGED = "converged"            # the largest increment fell below convergence_tolerance
    MAX_ITERATIONS = "max_iterations"  # every iteration was applied
    FAILED = "failed"                  # identity motion; SolverResult.messages says why

    def __str__(self) -> str:
        return self.value


STATUS_CONVERGED = SolveStatus.CONVERGED
STATUS_MAX_ITERATIONS = SolveStatus.MAX_ITERATIONS
STATUS_FAILED = SolveStatus.FAILED


@dataclass
class SolverProblem:
    """A batch of problems. B samples, nodes padded to N, M matches packed over the batch."""

    nodes: torch.Tensor            # (B, N, 3) node positions
    num_nodes: torch.Tensor        # (B,) int64 real nodes per sample (the rest is padding)
    edges: torch.Tensor            # (B, N, K) int64 neighbour ids, -1 = none
    edge_weights: torch.Tensor     # (B, N, K) graph edge weights (used with edge_weighting)
    clusters: torch.Tensor         # (B, N) int64 cluster id of each node
    intrinsics: torch.Tensor       # (B, 4) fx, fy, cx, cy
    match_sample: torch.Tensor     # (M,) int64 sample of each match
    source_points: torch.Tensor    # (M, 3)
    anchors: torch.Tensor          # (M, 4) int64 node ids within the sample, -1 = none
    anchor_weights: torch.Tensor   # (M, 4) skinning weights
    target_pixels: torch.Tensor    # (M, 2) target pixel (x, y) of each match
    target_depth: torch.Tensor     # (M,) depth of the target point at that pixel
    weights: torch.Tensor          # (M,) correspondence weights in [0, 1]
    # Optional dense point-to-plane terms (used with SolverOptions.icp_weight > 0), P of them
    # packed over the batch: a source point with its anchors, the live point y it is associated
    # with and y's unit normal n; residual n . (warp(source) - y).
    icp_sample: Optional[torch.Tensor] = None          # (P,) int64 sample of each term
    icp_source_points: Optional[torch.Tensor] = None   # (P, 3)
    icp_anchors: Optional[torch.Tensor] = None         # (P, 4) int64 node ids within the sample
    icp_anchor_weights: Optional[torch.Tensor] = None  # (P, 4)
    icp_target_points: Optional[torch.Tensor] = None   # (P, 3)
    icp_target_normals: Optional[torch.Tensor] = None  # (P, 3) unit
    icp_weights: Optional[torch.Tensor] = None         # (P,) in [0, 1]

    @classmethod
    def from_matches(cls, matches, nodes, num_nodes, edges, edge_weights, clusters, intrinsics):
        """Builds a problem from packed `model.correspondences.Matches` and a padded batch of
        graphs: nodes (B, N, 3), num_nodes (B,), edges (B, N, K), edge_weights (B, N, K),
        clusters (B, N) or (B, N, 1), intrinsics (B, 4)."""
        return cls(nodes=nodes, num_nodes=num_nodes.long(), edges=edges.long(),
                   edge_weights=edge_weights, clusters=clusters.reshape(clusters.shape[:2]).long(),
                   intrinsics=intrinsics, match_sample=matches.sample,
                   source_points=matches.source_points, anchors=matches.anchors,
                   anchor_weights=matches.anchor_weights, target_pixels=matches.target_pixels,
                   target_depth=matches.target_depth, weights=matches.weights)


@dataclass
class SolverResult:
    rotations: torch.Tensor        # (B, N, 3, 3), identity for unsolved nodes
    translations: torch.Tensor     # (B, N, 3), zero for unsolved nodes
    node_valid: torch.Tensor       # (B, N) bool: node was solved in a successful sample
    valid: torch.Tensor            # (B,) bool: status is not failed
    status: List[SolveStatus]      # per sample
    messages: List[str]            # per sample: why it failed ("" otherwise)
    energies: List[List[float]]    # per sample: total energy at each linearisation, then final
    data_energies: List[List[float]]
    arap_energies: List[List[float]]
    num_matches: torch.Tensor      # (B,) matches used by the solve
    iterations: List[int] = field(default_factory=list)  # per sample: iterations applied
    linear_solver: str = "dense"   # the linear solve used: dense or sparse
    # per sample, per applied iteration: conjugate-gradient iterations (sparse solve only)
    cg_iterations: List[List[int]] = field(default_factory=list)
