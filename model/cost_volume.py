"""Cost volume (correlation layer) of the PWC-Net flow backbone, in plain PyTorch.

For source features ``first`` and target features ``second`` of one pyramid level::

    out[b, (dy+4)*9 + (dx+4), y, x] = (1/C) * sum_c first[b, c, y, x] * second[b, c, y+dy, x+dx]

for dy, dx in -4..4 (dy-major: channel 0 is (-4, -4), channel 8 is (-4, +4), channel 40 is
(0, 0)), with positions outside ``second`` counting as zero. This is the reference's cupy
kernel; ``tests/reference/pwcnet_reference.py``
holds the literal 81-displacement loop it is tested against.

How it is computed, and why. The 81 dot products per pixel are a banded matrix product. Take a
tile of ``t`` columns of one row of ``first`` (a ``t x C`` matrix, contiguous in channels-last
layout) and the ``9 x (t+8)`` target pixels that any of them can reach (rows y-4..y+4, columns
x0-4..x0+t+3). One matrix product gives all ``t * 9 * (t+8)`` dot products, of which the
``t * 81`` on the band ``column = x + dx`` are wanted; they are read out with a strided view.
Batched over all rows of the level, each tile is one ``bmm`` call. This spends
``(t+8)/9`` times the minimal arithmetic (2.7x for ``t = 16``) but runs in the BLAS kernel, which
on CPU is far faster than 81 elementwise passes over memory, and it never materialises the 81
shifted copies of ``second``: the 9 rows of the window are a view (``unfold``) of one padded copy
of the tile. Measured at 640x448 input (level 2: C=32, 112x160) on this project's 2-core CPU
machine: about 5 ms on 2 threads (8 ms on 1) against 23-30 ms (31-45 ms) for the elementwise
loop, and 1.3 ms against 6-7 ms at level 3. Tiles of 8 to 16 columns were within noise of each
other; 32 columns and more lose to the wasted arithmetic, and one band over the whole row (a
9x(W+8)-wide product per row) to memory traffic.

Everything here is differentiable with ordinary autograd (``unfold``, ``bmm``, a non-overlapping
strided view of each product and one ``stack``), which tests check against the literal loop. The
loop runs over tiles (10 at level 2 for 640 columns; on a GPU the batch is part of each product,
so it gets one launch per tile whatever the batch size), so the whole level is a few dozen operator
calls, where the literal loop makes 162.
"""
from typing import Optional

import torch
import torch.nn.functional as F

RADIUS = 4
WINDOW = 2 * RADIUS + 1
TILE = 16


def correlation(first: torch.Tensor, second: torch.Tensor, tile: int = TILE,
                images_per_product: Optional[int] = None) -> torch.Tensor:
    """Cost volume of search radius 4 between two feature maps.

    Args:
        first: (B, C, H, W) float source features (any memory format; channels-last avoids a copy).
        second: (B, C, H, W) float target features, same shape, dtype and device.
        tile: the most columns per matrix product (a speed knob; the result does not depend on it
            beyond float rounding). The width is split into equal tiles of at most this size.
        images_per_product: how many images of the batch share one matrix product (another speed
            knob; None: the whole batch on a GPU, one image on a CPU).
    Returns:
        (B, 81, H, W) tensor, channels-last in memory for B = 1: the mean over channels of
        ``first * second`` shifted by (dy, dx), channel ``(dy+4)*9 + (dx+4)``.
    Raises:
        ValueError: if the shapes, dtypes or devices differ or the inputs are not 4-D.
    """
    if first.dim() != 4 or first.shape != second.shape:
        raise ValueError(f"correlation expects two (B, C, H, W) tensors of the same shape, got "
                         f"{tuple(first.shape)} and {tuple(second.shape)}")
    if first.dtype != second.dtype or first.device != second.device:
        raise ValueError(f"correlation inputs differ in dtype/device: {first.dtype} on {first.device} "
                         f"vs {second.dtype} on {second.device}")
    batch, channels, height, width = first.shape
    count = -(-width // tile)
    tile = -(-width // count)
    extra = count * tile - width  # zero columns that make every tile full; cropped at the end
    span = tile + 2 * RADIUS
    # (B, H, count*tile, C): pixels as rows of C-vectors, the layout a matrix product wants.
    rows = first.permute(0, 2, 3, 1)
    rows = (F.pad(rows, (0, 0, 0, extra)) if extra else rows).contiguous()
    padded = F.pad(second.permute(0, 2, 3, 1), (0, 0, RADIUS, RADIUS + extra, RADIUS, RADIUS))
    # The reachable columns of every tile, copied once: (B, count, H+8, span, C). The 9-row
    # windows of a tile are then a view (H, 9, span, C) whose (9, span) merge into one dimension.
    reach = padded.unfold(2, span, tile).permute(0, 2, 1, 4, 3).contiguous()
    # On a GPU the whole batch goes into each product (one launch per tile). On a CPU one image at
    # a time is faster: its window copy (about 3 MB at level 2) stays in cache for the product,
    # where the whole batch's does not (measured 2.3x slower at batch 4, same results).
    step = images_per_product or (batch if first.is_cuda else 1)
    per_chunk = []
    for b0 in range(0, batch, step):
        n = min(step, batch - b0)
        bands = []
        for i in range(count):
            windows = reach[b0:b0 + n, i].unfold(1, WINDOW, 1).permute(0, 1, 4, 2, 3)  # (n, H, 9, span, C)
            windows = windows.reshape(n * height, WINDOW * span, channels)
            tile_rows = rows[b0:b0 + n, :, i * tile:(i + 1) * tile].reshape(n * height, tile, channels)
            products = torch.bmm(tile_rows, windows.transpose(1, 2))  # (n*H, t, 9*span)
            # products[b*H + y, x, dy*span + x + dx] is the wanted entry: stride 9*span+1 along x.
            bands.append(products.as_strided((n, height, tile, WINDOW, WINDOW),
                                             (height * tile * WINDOW * span, tile * WINDOW * span,
                                              WINDOW * span + 1, span, 1)))
        per_chunk.append(torch.stack(bands, dim=2))  # (n, H, count, t, 9, 9)
    out = per_chunk[0] if len(per_chunk) == 1 else torch.cat(per_chunk, dim=0)
    out = out.view(batch, height, count * tile, WINDOW * WINDOW)[:, :, :width]
    return out.permute(0, 3, 1, 2).div_(channels)
