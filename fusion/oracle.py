"""An oracle graph-only reconstruction of a synthetic sequence, from its ground truth.

    python -m fusion.oracle --sequence DIR --out OUT [--node-coverage 0.05]

What a perfect graph tracker with a perfect fusion would give, written in the fusion's output
contract (so that `python -m fusion.residual --out OUT` and `fuse.py --residual-only` run on it,
and `evaluate.py --sequence DIR --reconstruction OUT` scores it):
  * canonical mesh = the true mesh of the first frame, its vertices visible in that frame
    (faces whose three corners are);
  * nodes sampled on it at `--node-coverage` (the graph construction's sampler), 4 Euclidean
    anchors per vertex with Gaussian skinning weights (as dataset/graph.py);
  * per frame, each node's rotation and translation fitted by weighted least squares
    (Procrustes) to the true positions of the vertices it anchors, weighted by their skinning
    weights; frames/NNNNNN.ply = the canonical mesh warped by those motions (model/warp.py).
The motion is therefore exactly what the graph can express: whatever is finer than the nodes
(the generator's `--detail` wrinkles) is left for the residual field to recover.
Writes OUT/canonical.ply, OUT/frames/NNNNNN.ply, OUT/nodes.npz (positions (N, 3), rotations
(T, N, 3, 3), translations (T, N, 3), frame_ids (T,), node_coverage, created (N,),
vertex_anchors (V, 4), vertex_weights (V, 4), status (T,)), OUT/fusion_options.json.
"""
import json
import os
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from dataset import io
from dataset.fileio import atomic_open, atomic_write_bytes
from dataset.graph import NUM_ANCHORS, gaussian_weights
from dataset.synthetic_sequence import read_ground_truth
from model.ext import C
from model.warp import warp_points
from options import ArgumentParser, OptionError, check_flag


class OracleError(ValueError):
    """The sequence has no usable ground truth."""


def node_procrustes(canonical: torch.Tensor, targets: torch.Tensor, nodes: torch.Tensor,
                    anchors: torch.Tensor, weights: torch.Tensor):
    """Per node and frame, the rotation R and translation t minimising
    sum_v w_vk |R (x_v - g_k) + g_k + t - y_v|^2 over the vertices v that node k anchors.

    canonical (V, 3), targets (T, V, 3), nodes (N, 3), anchors (V, A) int64 (-1 = none),
    weights (V, A). Returns rotations (T, N, 3, 3), translations (T, N, 3); a node anchoring no
    vertex keeps the identity.
    """
    N, T = nodes.shape[0], targets.shape[0]
    valid = (anchors >= 0) & (weights > 0)
    vertex = torch.arange(anchors.shape[0])[:, None].expand_as(anchors)[valid]
    node, w = anchors[valid], weights[valid].double()
    p = (canonical.double()[vertex] - nodes.double()[node])                      # (M, 3)
    y = targets.double()[:, vertex]                                              # (T, M, 3)
    total = torch.zeros(N, dtype=torch.float64).index_add_(0, node, w)
    safe = total.clamp(min=1e-12)
    p_mean = torch.zeros(N, 3, dtype=torch.float64).index_add_(0, node, w[:, None] * p) / safe[:, None]
    y_mean = torch.zeros(T, N, 3, dtype=torch.float64).index_add_(1, node, w[None, :, None] * y) / safe[:, None]
    outer = w[None, :, None, None] * (p - p_mean[node])[None, :, :, None] * (y - y_mean[:, node])[:, :, None, :]
    H = torch.zeros(T, N, 3, 3, dtype=torch.float64).index_add_(1, node, outer)
    U, _, Vh = torch.linalg.svd(H)
    # R = V diag(1, 1, det(V U^T)) U^T: the rotation (not a reflection) closest to the fit.
    sign = torch.linalg.det(Vh.transpose(-1, -2) @ U.transpose(-1, -2))
    D = torch.diag_embed(torch.stack((torch.ones_like(sign), torch.ones_like(sign), sign), dim=-1))
    R = Vh.transpose(-1, -2) @ D @ U.transpose(-1, -2)
    used = total > 1e-9
    R = torch.where(used[None, :, None, None], R, torch.eye(3, dtype=R.dtype).expand_as(R))
    # g + t = y_mean - R p_mean.
    t = y_mean - (R @ p_mean[None, :, :, None])[..., 0] - nodes.double()[None]
    t = torch.where(used[None, :, None], t, torch.zeros_like(t))
    return R.float(), t.float()


def oracle_reconstruction(vertices: np.ndarray, faces: np.ndarray, visible0: np.ndarray,
                          coverage: float = 0.05) -> Dict[str, np.ndarray]:
    """Ground truth vertices (T, V, 3), faces (F, 3), visible0 (V,) bool -> the oracle's
    canonical mesh (its own vertex numbering), graph, node motions and warped frames (T, V', 3)."""
    faces = np.asarray(faces, dtype=np.int64)
    keep_face = visible0[faces].all(axis=1)
    used = np.zeros(vertices.shape[1], bool)
    used[faces[keep_face].ravel()] = True
    if used.sum() < 4:
        raise OracleError(f"only {int(used.sum())} vertices of the first frame lie on visible faces")
    new_index = np.cumsum(used) - 1
    canon_faces = new_index[faces[keep_face]]
    targets = torch.from_numpy(np.ascontiguousarray(vertices[:, used], dtype=np.float32))
    canonical = targets[0].clone()
    node_vertices = C.sample_nodes(canonical, torch.ones(canonical.shape[0], dtype=torch.bool), coverage)
    nodes = canonical[node_vertices.long()].contiguous()
    anchors, distances = C.euclidean_knn(nodes, canonical, min(NUM_ANCHORS, nodes.shape[0]), False)
    anchors = anchors.long()
    weights = torch.from_numpy(gaussian_weights(distances.numpy(), anchors.numpy() >= 0, coverage))
    rotations, translations = node_procrustes(canonical, targets, nodes, anchors, weights)
    frames = torch.stack([warp_points(canonical, anchors, weights, nodes, rotations[t], translations[t])
                          for t in range(targets.shape[0])])
    return {"canonical": canonical.numpy(), "faces": canon_faces, "frames": frames.numpy(),
            "positions": nodes.numpy(), "rotations": rotations.numpy(), "translations": translations.numpy(),
            "vertex_anchors": anchors.numpy(), "vertex_weights": weights.numpy(),
            "vertex_ids": np.nonzero(used)[0]}


def frame_names(sequence_dir: str) -> list:
    folder = os.path.join(sequence_dir, "depth")
    if not os.path.isdir(folder):
        raise OracleError(f"{folder}: depth folder not found")
    names = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".png"))
    if not names:
        raise OracleError(f"{folder}: no NNNNNN.png depth frames")
    return names


def write_oracle(sequence_dir: str, out_dir: str, coverage: float = 0.05, log=print) -> Dict:
    """Builds the oracle reconstruction of a synthetic sequence and writes it to out_dir."""
    path = os.path.join(sequence_dir, "gt", "gt.npz")
    faces, vertices, visible = read_ground_truth(sequence_dir)   # FormatError naming the file
    names = frame_names(sequence_dir)
    if vertices.shape[0] != len(names):
        raise OracleError(f"{path}: {vertices.shape[0]} frames of vertices, {len(names)} depth frames")
    result = oracle_reconstruction(vertices, faces, visible[0].astype(bool), coverage)
    os.makedirs(os.path.join(out_dir, "frames"), exist_ok=True)
    io.write_ply(os.path.join(out_dir, "canonical.ply"), result["canonical"], result["faces"])
    for name, frame in zip(names, result["frames"]):
        io.write_ply(os.path.join(out_dir, "frames", name + ".ply"), frame, result["faces"])
    N, T = result["positions"].shape[0], len(names)
    with atomic_open(os.path.join(out_dir, "nodes.npz"), "wb") as handle:
        np.savez(handle, positions=result["positions"], rotations=result["rotations"],
                 translations=result["translations"],
                 frame_ids=np.array([int(n) if n.isdigit() else i for i, n in enumerate(names)], np.int64),
                 node_coverage=np.float32(coverage), created=np.zeros(N, np.int64),
                 vertex_anchors=result["vertex_anchors"], vertex_weights=result["vertex_weights"],
                 status=np.array(["oracle"] * T))
    atomic_write_bytes(os.path.join(out_dir, "fusion_options.json"), (json.dumps(
        {"sequence": os.path.abspath(sequence_dir), "oracle": True, "node_coverage": coverage}, indent=1)
        + "\n").encode())
    log(f"oracle reconstruction: {result['canonical'].shape[0]} vertices, {N} nodes at {coverage} m, "
        f"{T} frames -> {out_dir}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(prog="python -m fusion.oracle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequence", required=True, help="a synthetic sequence folder (with gt/gt.npz)")
    parser.add_argument("--out", required=True, help="output folder, in the fusion's output contract")
    parser.add_argument("--node-coverage", type=float, default=0.05,
                        help="node spacing in metres (default: 0.05, as the fusion's graph)")
    args = parser.parse_args(argv)
    try:
        check_flag("--sequence", args.sequence, str, path="dir")
        check_flag("--out", args.out, str, path="out_dir")
        check_flag("--node-coverage", args.node_coverage, float, gt=0)
        write_oracle(args.sequence, args.out, args.node_coverage)
    except (OptionError, OracleError, io.FormatError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
