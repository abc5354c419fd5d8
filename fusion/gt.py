"""Ground truth of a synthetic sequence (DIR/gt/gt.npz) for oracle studies.

gt.npz holds faces (F, 3), vertices (T, V, 3) metres in each frame's camera coordinates and
visible (T, V). The canonical space is the camera space of the first processed frame, so a
canonical point is tied to the ground-truth surface by its nearest vertices in that frame, and
its true position in frame t follows those vertices. Oracle node motions fit a rotation and a
translation to the ground-truth vertices around each node (weighted Kabsch).
"""
import os
from typing import Dict, Tuple

import numpy as np
import open3d.core as o3c
import torch

from fusion.sequence import SequenceError

NEIGHBOURS = 4


class GroundTruth:
    def __init__(self, root: str, first_frame_id: int):
        path = os.path.join(root, "gt", "gt.npz")
        if not os.path.isfile(path):
            raise SequenceError(f"{path}: not found (--flow gt and --oracle-motion need a synthetic "
                                "sequence's ground truth)")
        try:
            data = np.load(path)
            vertices = np.asarray(data["vertices"], dtype=np.float32)
        except (OSError, ValueError, KeyError) as error:
            raise SequenceError(f"{path}: not a ground-truth file with 'vertices' ({error})") from None
        if vertices.ndim != 3 or vertices.shape[2] != 3:
            raise SequenceError(f"{path}: vertices must be (T, V, 3), found {vertices.shape}")
        self.path = path
        self.vertices = torch.from_numpy(vertices)
        if not 0 <= first_frame_id < vertices.shape[0]:
            raise SequenceError(f"{path}: has {vertices.shape[0]} frames, the first processed frame is {first_frame_id}")
        self.canonical = self.vertices[first_frame_id]
        self._nns = None

    def _search(self):
        """Open3D's k-d tree over the canonical ground-truth vertices (built once)."""
        if self._nns is None:
            self._nns = o3c.nns.NearestNeighborSearch(o3c.Tensor(self.canonical.contiguous().numpy()))
            self._nns.knn_index()
        return self._nns

    def check_frame(self, frame_id: int) -> None:
        if not 0 <= frame_id < self.vertices.shape[0]:
            raise SequenceError(f"{self.path}: has {self.vertices.shape[0]} frames, frame {frame_id} asked for")

    def ties(self, points: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Nearest ground-truth vertices (P, 4) of (P, 3) canonical points and inverse-distance
        weights (P, 4)."""
        if points.shape[0] == 0:
            return torch.zeros(0, NEIGHBOURS, dtype=torch.int64), torch.zeros(0, NEIGHBOURS)
        idx, d2 = self._search().knn_search(o3c.Tensor(points.float().contiguous().numpy()), NEIGHBOURS)
        idx = torch.from_numpy(idx.numpy().astype(np.int64))
        dist = torch.from_numpy(d2.numpy()).clamp(min=0).sqrt()
        w = 1.0 / dist.clamp(min=1e-5)
        return idx, w / w.sum(dim=1, keepdim=True)

    def move(self, points: torch.Tensor, frame_id: int, ties=None) -> torch.Tensor:
        """True positions in frame `frame_id` of (P, 3) canonical points."""
        self.check_frame(frame_id)
        idx, w = ties if ties is not None else self.ties(points)
        displacement = self.vertices[frame_id][idx] - self.canonical[idx]
        return points + (w[..., None] * displacement).sum(dim=1)

    def node_motions(self, nodes: torch.Tensor, frame_id: int, coverage: float
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Oracle (N, 3, 3) rotations and (N, 3) translations of canonical nodes in frame
        `frame_id`: weighted Kabsch on the ground-truth vertices within 2 x coverage."""
        self.check_frame(frame_id)
        d = torch.cdist(nodes.float(), self.canonical)
        k = min(64, self.canonical.shape[0])
        dist, idx = torch.topk(d, k, dim=1, largest=False)
        w = torch.exp(-dist ** 2 / (2 * coverage ** 2)) * (dist <= 2 * coverage)
        w[:, 0] = torch.where(w.sum(dim=1) > 0, w[:, 0], torch.ones_like(w[:, 0]))
        w = (w / w.sum(dim=1, keepdim=True)).double()
        P, Q = self.canonical[idx].double(), self.vertices[frame_id][idx].double()
        cp = (w[..., None] * P).sum(dim=1)
        cq = (w[..., None] * Q).sum(dim=1)
        H = torch.einsum("nk,nki,nkj->nij", w, P - cp[:, None], Q - cq[:, None])
        U, _, Vh = torch.linalg.svd(H)
        V = Vh.transpose(1, 2)
        sign = torch.det(V @ U.transpose(1, 2))
        D = torch.diag_embed(torch.stack((torch.ones_like(sign), torch.ones_like(sign), sign), dim=1))
        R = V @ D @ U.transpose(1, 2)
        g = nodes.double()
        # The node's own position moves like the vertices around it: R (g - cp) + cq.
        t = torch.einsum("nij,nj->ni", R, g - cp) + cq - g
        return R.float(), t.float()

    def flow(self, canonical: np.ndarray, valid: np.ndarray, frame_id: int, intrinsics: Dict[str, float],
             target_depth: np.ndarray, occlusion: float = 0.02) -> np.ndarray:
        """Ground-truth optical flow (2, H, W) of rendered pixels: where the canonical point seen
        at each pixel is in frame `frame_id`; NaN where nothing is rendered or the point is hidden
        there (its depth differs from the frame's by more than `occlusion` metres)."""
        H, W = valid.shape
        flow = np.full((2, H, W), np.nan, np.float32)
        ys, xs = np.nonzero(valid)
        if ys.size == 0:
            return flow
        moved = self.move(torch.from_numpy(canonical[ys, xs]), frame_id).numpy()
        z = moved[:, 2]
        u = intrinsics["fx"] * moved[:, 0] / z + intrinsics["cx"]
        v = intrinsics["fy"] * moved[:, 1] / z + intrinsics["cy"]
        inside = (z > 0) & (u >= 0) & (u <= W - 1) & (v >= 0) & (v <= H - 1)
        ui = np.clip(np.round(u), 0, W - 1).astype(int)
        vi = np.clip(np.round(v), 0, H - 1).astype(int)
        seen = inside & (np.abs(target_depth[vi, ui] - z) <= occlusion)
        flow[0, ys[seen], xs[seen]] = u[seen] - xs[seen]
        flow[1, ys[seen], xs[seen]] = v[seen] - ys[seen]
        return flow
