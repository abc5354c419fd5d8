"""Multiresolution hash encoding in plain PyTorch: slow, literal, differentiable by autograd.

It spells out the convention of csrc/hashgrid/hashgrid.h one step at a time, so that the kernel
can be compared with it (outputs, table gradients and input gradients):

- level l has R_l = floor(N_min * b^l) cells per axis, b = exp((ln N_max - ln N_min) / (L - 1));
- a coordinate is clamped to [0, 1] and mapped to position p = x * R; its cell is
  c = min(floor(p), R - 1) and its fraction p - c;
- corner k of the cell is c + (bit d of k) in dimension d; its weight is the product over d of
  the fraction (bit set) or one minus it (bit clear);
- a level with (R + 1)^D <= S grid points indexes a corner g densely as sum_d g_d (R + 1)^d,
  otherwise as (XOR_d g_d * prime_d) mod S;
- the output is (N, L * F), level-major: column l * F + f is feature f of level l.

NaN coordinates are not supported here (the kernel propagates them; see its header).
"""
import math
from typing import List, Sequence

import torch

PRIMES = (1, 2654435761, 805459861, 3674653429)


def reference_resolutions(num_levels: int, base_resolution: int, max_resolution: int) -> List[int]:
    """R_l = floor(N_min * b^l), computed in float64 with a 1e-9 relative guard against rounding
    N_max * (1 - eps) down to N_max - 1 at the last level."""
    if num_levels == 1:
        return [int(base_resolution)]
    growth = math.exp((math.log(max_resolution) - math.log(base_resolution)) / (num_levels - 1))
    return [int(math.floor(base_resolution * growth ** level * (1 + 1e-9)))
            for level in range(num_levels)]


def corner_rows(corner: Sequence[torch.Tensor], resolution: int, table_size: int) -> torch.Tensor:
    """Table rows (N,) int64 of grid points given per dimension as (N,) int64 tensors."""
    dim = len(corner)
    if (resolution + 1) ** dim <= table_size:
        row = torch.zeros_like(corner[0])
        for d in range(dim):
            row = row + corner[d] * (resolution + 1) ** d
        return row
    # int64 products of coordinates (< 2^25) and primes (< 2^32) do not overflow; taking them
    # mod 2^32 reproduces the kernel's uint32 arithmetic.
    row = torch.zeros_like(corner[0])
    for d in range(dim):
        row = row ^ ((corner[d] * PRIMES[d]) & 0xFFFFFFFF)
    return row % table_size


def hash_encode_reference(x: torch.Tensor, table: torch.Tensor,
                          resolutions: Sequence[int]) -> torch.Tensor:
    """x (N, D) float, table (L, S, F) of the same dtype, one resolution per level
    -> (N, L * F). Differentiable w.r.t. x and table by autograd."""
    num_points, dim = x.shape
    num_levels, table_size, features = table.shape
    assert len(resolutions) == num_levels
    clamped = x.clamp(0.0, 1.0)
    rows, weights = [], []  # per (level, corner): (N,) rows of the flattened table, (N,) weights
    for level, resolution in enumerate(resolutions):
        pos = clamped * resolution
        cell = pos.detach().floor().long().clamp(max=resolution - 1)
        frac = pos - cell.to(x.dtype)
        for k in range(2 ** dim):
            bits = [(k >> d) & 1 for d in range(dim)]
            corner = [cell[:, d] + bits[d] for d in range(dim)]
            weight = torch.ones_like(frac[:, 0])
            for d in range(dim):
                weight = weight * (frac[:, d] if bits[d] else 1 - frac[:, d])
            rows.append(level * table_size + corner_rows(corner, resolution, table_size))
            weights.append(weight)
    # One gather for all levels and corners: autograd turns it into one index_add_ into a
    # table-sized gradient (a gather per corner would allocate a table-sized gradient each, and
    # advanced indexing would back-propagate through the slower index_put_ with accumulation).
    rows = torch.stack(rows, dim=1).view(-1)
    weights = torch.stack(weights, dim=1).view(num_points, num_levels, 2 ** dim, 1)
    values = table.reshape(num_levels * table_size, features).index_select(0, rows)
    values = values.view(num_points, num_levels, 2 ** dim, features)
    return (weights * values).sum(dim=2).reshape(num_points, num_levels * features)
