"""Multiresolution hash encoding of 3D or 4D points (docs/DESIGN.md 5.7), over csrc/hashgrid.

    encoder = HashGridEncoder(input_dim=4)            # (x, y, z, t) in [0, 1]^4
    features = encoder(points)                         # (N, 4) -> (N, 16 * 2)

Level l has R_l = floor(N_min * b^l) cells per axis, b = exp((ln N_max - ln N_min) / (L - 1)).
A point x is mapped to position x * R_l; its cell is min(floor(x * R_l), R_l - 1) and the level's
F features are the multilinear interpolation of the table rows of the cell's 2^D corners (grid
points 0..R_l per axis). A level whose (R_l + 1)^D grid points fit in its 2^T rows indexes them
densely, the others through the spatial hash (XOR of coordinates times 1, 2654435761, 805459861,
3674653429, mod 2^T). The table is one tensor (L, 2^T, F); rows of a dense level past its grid
are unused (gradient 0).

Coordinates outside [0, 1] are clamped to it and get zero gradient in that dimension; a NaN
coordinate gives a NaN output row.
"""
import math
from typing import List, Optional

import torch
from torch import nn

from model.ext import C

MAX_LEVELS = 64
FEATURES_PER_LEVEL = (1, 2, 4, 8)
INPUT_DIMS = (3, 4)


def level_resolutions(num_levels: int, base_resolution: int, max_resolution: int) -> List[int]:
    """Cells per axis of each level: floor(N_min * b^l), growing geometrically from
    base_resolution to max_resolution. A relative guard of 1e-9 keeps the last level at exactly
    max_resolution when b^(L-1) rounds just below N_max / N_min. One level uses base_resolution."""
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, found {num_levels}")
    if base_resolution < 1 or max_resolution < base_resolution:
        raise ValueError("resolutions must satisfy 1 <= base_resolution <= max_resolution, found "
                         f"base_resolution={base_resolution}, max_resolution={max_resolution}")
    if num_levels == 1:
        return [int(base_resolution)]
    growth = math.exp((math.log(max_resolution) - math.log(base_resolution)) / (num_levels - 1))
    return [int(math.floor(base_resolution * growth ** level * (1 + 1e-9)))
            for level in range(num_levels)]


class _HashEncode(torch.autograd.Function):
    """out (N, L * F) = encoding of x (N, D) with table (L, S, F); gradients to both."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, table: torch.Tensor, resolutions: List[int]) -> torch.Tensor:
        ctx.save_for_backward(x, table)
        ctx.resolutions = resolutions
        return C.hashgrid_forward(x, table, resolutions)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # Grad mode is on here exactly when the caller asked for create_graph=True. The kernel's
        # gradients are not differentiable, and returning them as constants would silently drop
        # second-order terms (e.g. of a penalty on d out / d x), so refuse.
        if torch.is_grad_enabled():
            raise RuntimeError("hash_encode does not support double backward (create_graph=True): "
                               "its backward is a kernel without a derivative of its own")
        x, table = ctx.saved_tensors
        need_x, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_table, grad_x = C.hashgrid_backward(grad_out.contiguous(), x, table, ctx.resolutions,
                                                 need_table, need_x)
        return grad_x, grad_table, None


def hash_encode(x: torch.Tensor, table: torch.Tensor, base_resolution: int = 16,
                max_resolution: int = 2048) -> torch.Tensor:
    """Multiresolution hash encoding.

    Args:
        x: (N, D) float32 or float64, D in {3, 4}, coordinates in [0, 1] (others are clamped).
        table: (L, S, F) of the dtype and device of x; S a power of two, F in {1, 2, 4, 8},
            L <= 64.
        base_resolution, max_resolution: cells per axis of the first and last level.

    Returns:
        (N, L * F), column l * F + f is feature f of level l. Differentiable once w.r.t. x and
        table (a double backward raises an error).
    """
    if not torch.is_tensor(x) or not torch.is_tensor(table):
        raise ValueError(f"x and table must be tensors, found {type(x).__name__} and "
                         f"{type(table).__name__}")
    if x.dim() != 2 or x.shape[1] not in INPUT_DIMS:
        raise ValueError(f"x must have shape (N, 3) or (N, 4), found {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x must be float32 or float64, found {x.dtype}")
    if table.dim() != 3:
        raise ValueError(f"table must have shape (L, S, F), found {tuple(table.shape)}")
    if table.dtype != x.dtype:
        raise ValueError(f"table must have the dtype of x ({x.dtype}), found {table.dtype}")
    if table.device != x.device:
        raise ValueError(f"table must be on the device of x ({x.device}), found {table.device}")
    num_levels, table_size, features = table.shape
    if not 1 <= num_levels <= MAX_LEVELS:
        raise ValueError(f"table must have 1 to {MAX_LEVELS} levels, found {num_levels}")
    if table_size < 1 or table_size & (table_size - 1) or table_size > 2 ** 30:
        raise ValueError(f"table rows per level must be a power of two <= 2^30, found {table_size}")
    if features not in FEATURES_PER_LEVEL:
        raise ValueError(f"features per level must be one of {FEATURES_PER_LEVEL}, found "
                         f"{features}")
    resolutions = level_resolutions(num_levels, base_resolution, max_resolution)
    if resolutions[-1] > 2 ** 24:
        raise ValueError(f"max_resolution must be <= 2^24, found {max_resolution}")
    return _HashEncode.apply(x, table, resolutions)


class HashGridEncoder(nn.Module):
    """Multiresolution hash encoding with a learnable table.

    Args:
        input_dim: D, 3 for (x, y, z) or 4 for (x, y, z, t).
        num_levels: L, number of resolution levels (<= 64).
        features_per_level: F, in {1, 2, 4, 8}.
        log2_table_size: T, 2^T table rows per level (<= 30).
        base_resolution: N_min, cells per axis of the coarsest level.
        max_resolution: N_max, cells per axis of the finest level.
        init_scale: table entries start uniform in [-init_scale, init_scale]; small, so that a
            network on top starts close to its response to zero features.
        dtype, device: of the table.

    Shapes: forward (N, D) float in [0, 1] (same dtype and device as the table) -> (N, L * F).
    Gradients reach the table and the input coordinates; a double backward is not supported and
    raises an error.
    """

    def __init__(self, input_dim: int, num_levels: int = 16, features_per_level: int = 2,
                 log2_table_size: int = 19, base_resolution: int = 16, max_resolution: int = 2048,
                 init_scale: float = 1e-4, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None):
        super().__init__()
        if input_dim not in INPUT_DIMS:
            raise ValueError(f"input_dim must be 3 or 4, found {input_dim}")
        if features_per_level not in FEATURES_PER_LEVEL:
            raise ValueError(f"features_per_level must be one of {FEATURES_PER_LEVEL}, found "
                             f"{features_per_level}")
        if not 0 <= log2_table_size <= 30:
            raise ValueError(f"log2_table_size must be in [0, 30], found {log2_table_size}")
        if not 1 <= num_levels <= MAX_LEVELS:
            raise ValueError(f"num_levels must be in [1, {MAX_LEVELS}], found {num_levels}")
        self.input_dim = input_dim
        self.num_levels = num_levels
        self.features_per_level = features_per_level
        self.log2_table_size = log2_table_size
        self.base_resolution = base_resolution
        self.max_resolution = max_resolution
        self.resolutions = level_resolutions(num_levels, base_resolution, max_resolution)
        table = torch.empty(num_levels, 2 ** log2_table_size, features_per_level, dtype=dtype,
                            device=device)
        self.table = nn.Parameter(table.uniform_(-init_scale, init_scale))

    @property
    def output_dim(self) -> int:
        return self.num_levels * self.features_per_level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"x must have shape (N, {self.input_dim}), found {tuple(x.shape)}")
        return hash_encode(x, self.table, self.base_resolution, self.max_resolution)

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, num_levels={self.num_levels}, "
                f"features_per_level={self.features_per_level}, "
                f"log2_table_size={self.log2_table_size}, resolutions={self.resolutions}")
