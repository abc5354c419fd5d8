"""The canonical model: a TSDF in sparse 8^3 voxel blocks, warped integration, marching cubes.

Blocks are allocated only near observed surface (memory grows with the surface, not with the
bounding box). Keys are kept sorted as int64 codes, so finding a block is a binary search and
the structure lives in plain tensors on any device (and in a checkpoint). The voxel layout is
Open3D's VoxelBlockGrid's, so marching cubes is Open3D's, run on a grid filled with our arrays.
The integration itself is the csrc/fusion kernel (nnrt_ext.integrate_warped).
"""
from typing import Dict, Tuple

import numpy as np
import torch

from model.ext import C

BLOCK = 8
_OFFSET = 1 << 20          # block keys in [-2^20, 2^20) per axis pack into one int64 code


def encode_keys(keys: torch.Tensor) -> torch.Tensor:
    k = keys.long() + _OFFSET
    return (k[:, 0] << 42) | (k[:, 1] << 21) | k[:, 2]


def decode_keys(codes: torch.Tensor) -> torch.Tensor:
    mask = (1 << 21) - 1
    return torch.stack(((codes >> 42) & mask, (codes >> 21) & mask, codes & mask), dim=1).sub(_OFFSET).to(torch.int32)


def _unique_rows(rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """np.unique(rows, axis=0, return_inverse=True) for (R, 3) rows, by a lexicographic sort
    (np.unique's row view sorts several times slower; this runs on every frame's mesh).
    Returns the unique rows sorted and the (R,) index of each row among them."""
    order = np.lexsort(rows.T[::-1])
    ordered = rows[order]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    inverse = np.empty(len(rows), dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return ordered[first], inverse


class TSDFVolume:
    """tsdf / weight (C, 8, 8, 8), color (C, 8, 8, 8, 3) float32; keys (B, 3) int32 of the B used
    slots (slot i holds block keys[i]); codes (B,) sorted with order (B,) giving their slots."""

    def __init__(self, voxel_size: float, truncation: float, weight_cap: float,
                 device: torch.device = torch.device("cpu"), capacity: int = 1024):
        self.voxel_size, self.truncation, self.weight_cap = float(voxel_size), float(truncation), float(weight_cap)
        self.device = torch.device(device)
        self.keys = torch.zeros(0, 3, dtype=torch.int32, device=self.device)
        self.codes = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.order = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._storage(capacity)

    def _storage(self, capacity: int) -> None:
        shape = (capacity, BLOCK, BLOCK, BLOCK)
        self.tsdf = torch.ones(shape, dtype=torch.float32, device=self.device)
        self.weight = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self.color = torch.zeros(shape + (3,), dtype=torch.float32, device=self.device)

    @property
    def num_blocks(self) -> int:
        return int(self.keys.shape[0])

    @property
    def block_size(self) -> float:
        return BLOCK * self.voxel_size

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.tsdf, self.weight, self.color))

    def find(self, keys: torch.Tensor) -> torch.Tensor:
        """Slots of (P, 3) block keys, -1 where not allocated."""
        if self.num_blocks == 0 or keys.shape[0] == 0:
            return torch.full((keys.shape[0],), -1, dtype=torch.int64, device=self.device)
        codes = encode_keys(keys)
        pos = torch.searchsorted(self.codes, codes).clamp(max=self.num_blocks - 1)
        found = self.codes[pos] == codes
        return torch.where(found, self.order[pos], torch.full_like(pos, -1))

    def allocate_near(self, points: torch.Tensor) -> int:
        """Allocates every block within the truncation of the (P, 3) canonical points. Returns how
        many blocks were added."""
        points = points.to(self.device, torch.float32)
        points = points[torch.isfinite(points).all(dim=1)]
        if points.shape[0] == 0:
            return 0
        # Offsets across the point's truncation box, at most a block apart, so that every block
        # the box touches is named (the box spans up to 3 blocks per axis: truncation < 8 voxels).
        r = self.truncation
        steps = int(np.ceil(2 * r / self.block_size)) + 1
        axis = torch.linspace(-r, r, steps, device=self.device)
        offsets = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
        keys = torch.floor((points[:, None, :] + offsets[None]) / self.block_size).reshape(-1, 3)
        # Unique over int64 codes: torch.unique(dim=0) on rows is many times slower.
        new = decode_keys(torch.unique(encode_keys(keys)))
        new = new[self.find(new) < 0]
        if new.shape[0] == 0:
            return 0
        self._append(new)
        return int(new.shape[0])

    def _append(self, new: torch.Tensor) -> None:
        needed = self.num_blocks + new.shape[0]
        if needed > self.tsdf.shape[0]:
            capacity = max(needed, 2 * self.tsdf.shape[0])
            old = (self.tsdf, self.weight, self.color)
            self._storage(capacity)
            for dst, src in zip((self.tsdf, self.weight, self.color), old):
                dst[:src.shape[0]] = src
        self.keys = torch.cat((self.keys, new.to(torch.int32)))
        codes = encode_keys(self.keys)
        self.codes, self.order = torch.sort(codes)

    def block_centres(self) -> torch.Tensor:
        return (self.keys.float() + 0.5 - 0.5 / BLOCK) * self.block_size

    def candidates(self, nodes: torch.Tensor, count: int) -> torch.Tensor:
        """(B, count) nearest nodes to each block's centre (-1 padding when fewer nodes): the
        candidate anchors of its voxels."""
        if self.num_blocks == 0:
            return torch.zeros(0, count, dtype=torch.int64, device=self.device)
        k = min(count, nodes.shape[0])
        distances = torch.cdist(self.block_centres(), nodes.to(self.device, torch.float32))
        ids = torch.topk(distances, k, dim=1, largest=False).indices
        if k < count:
            ids = torch.cat((ids, ids.new_full((ids.shape[0], count - k), -1)), dim=1)
        return ids.contiguous()

    def integrate(self, depth: torch.Tensor, image: torch.Tensor, mask: torch.Tensor,
                  intrinsics: Dict[str, float], nodes: torch.Tensor, rotations: torch.Tensor,
                  translations: torch.Tensor, coverage: float, max_anchor_distance: float,
                  num_anchors: int = 4, num_candidates: int = 16, dual_quaternion: bool = False,
                  color_observations: int = 0) -> None:
        """Warped projective integration of one frame into every allocated block.

        depth (H, W) metres; image (H, W, 3) 0..255; mask (H, W) bool; nodes (N, 3) canonical;
        rotations (N, 3, 3), translations (N, 3) canonical -> live. color_observations > 0: a
        voxel's colour averages only its first that many observations and then stays (the
        geometry keeps averaging up to the weight cap).
        """
        if self.num_blocks == 0:
            return
        dev, f = self.device, torch.float32
        n = self.num_blocks
        if color_observations > 0:
            settled = self.weight[:n] >= color_observations
            kept = self.color[:n][settled]
        candidates = self.candidates(nodes, num_candidates)
        C.integrate_warped(self.tsdf, self.weight, self.color, self.keys,
                           torch.arange(self.num_blocks, device=dev), candidates,
                           nodes.to(dev, f).contiguous(), rotations.to(dev, f).contiguous(),
                           translations.to(dev, f).contiguous(), depth.to(dev, f).contiguous(),
                           image.to(dev, f).contiguous(), mask.to(dev, torch.bool).contiguous(),
                           self.voxel_size, self.truncation, self.weight_cap, intrinsics["fx"],
                           intrinsics["fy"], intrinsics["cx"], intrinsics["cy"], coverage,
                           max_anchor_distance, num_anchors, dual_quaternion)
        if color_observations > 0:
            self.color[:n][settled] = kept

    def extract_mesh(self, weight_threshold: float = 0.5) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Marching cubes (Open3D's, on a VoxelBlockGrid filled with these arrays).

        Returns vertices (V, 3) float32 canonical metres, one per position, sorted; faces (F, 3)
        int64; colours (V, 3) float32 in [0, 1]. Empty arrays when there is no surface.
        """
        import open3d as o3d
        import open3d.core as o3c

        empty = (np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64), np.zeros((0, 3), np.float32))
        if self.num_blocks == 0:
            return empty
        grid = o3d.t.geometry.VoxelBlockGrid(
            attr_names=("tsdf", "weight", "color"), attr_dtypes=(o3c.float32, o3c.float32, o3c.float32),
            attr_channels=((1), (1), (3)), voxel_size=self.voxel_size, block_resolution=BLOCK,
            block_count=max(self.num_blocks, 16), device=o3c.Device("CPU:0"))
        keys = o3c.Tensor(self.keys.cpu().numpy())
        slots, _ = grid.hashmap().activate(keys)
        slots = torch.from_numpy(slots.numpy().astype(np.int64))
        n = self.num_blocks
        for name, ours in (("tsdf", self.tsdf[:n, ..., None]), ("weight", self.weight[:n, ..., None]),
                           ("color", self.color[:n])):
            theirs = torch.utils.dlpack.from_dlpack(grid.attribute(name).to_dlpack())
            theirs[slots] = ours.cpu()
        mesh = grid.extract_triangle_mesh(weight_threshold=float(weight_threshold))
        if mesh.vertex.positions.shape[0] == 0:
            return empty
        vertices = mesh.vertex.positions.numpy().astype(np.float32)
        faces = mesh.triangle.indices.numpy().astype(np.int64)
        colors = np.clip(mesh.vertex.colors.numpy().astype(np.float32), 0, 1)
        # Open3D emits vertices in thread order, and a surface through a voxel (a TSDF of exactly 0
        # there) as several vertices at one position. Welding those makes the mesh, and
        # everything warped from it (a resumed run included), the same on every run: a stable
        # sort alone kept tied copies in thread order.
        vertices, inverse = _unique_rows(vertices)
        count = np.bincount(inverse, minlength=vertices.shape[0]).astype(np.float32)[:, None]
        colors = np.stack([np.bincount(inverse, colors[:, k], vertices.shape[0]) for k in range(3)], axis=1)
        colors = (colors / count).astype(np.float32)
        faces = inverse[faces]
        faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
        # Each triangle starts at its smallest index, its winding (the normal) kept.
        start = np.argmin(faces, axis=1)[:, None]
        faces = np.take_along_axis(faces, (start + np.arange(3)[None]) % 3, axis=1)
        return vertices, _unique_rows(faces)[0], colors

    def state_dict(self) -> Dict[str, torch.Tensor]:
        n = self.num_blocks
        return {"keys": self.keys.cpu(), "tsdf": self.tsdf[:n].cpu(), "weight": self.weight[:n].cpu(),
                "color": self.color[:n].cpu(),
                "params": torch.tensor([self.voxel_size, self.truncation, self.weight_cap], dtype=torch.float64)}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        n = state["keys"].shape[0]
        self.keys = torch.zeros(0, 3, dtype=torch.int32, device=self.device)
        self._storage(max(n, 1024))
        self._append(state["keys"].to(self.device))
        self.tsdf[:n] = state["tsdf"].to(self.device)
        self.weight[:n] = state["weight"].to(self.device)
        self.color[:n] = state["color"].to(self.device)
