"""Normal equations A = J^T J, b = J^T r of groups of terms, never forming J (docs/DESIGN.md 5.3).

A term (a match, an edge) has R residual rows over S node slots of 6 unknowns each:
J (M, R, 6S), r (M, R), nodes (M, S) int64 flat over the batch (sample * N + node, -1 =
unused slot). csrc/solver assembles A block by block (6x6 blocks, the upper triangle, a fixed
summation order, so the same A on every device and thread count) over a pattern built once per
problem (`build_block_pattern`); A is then either written densely (B, 6N, 6N) or kept as blocks
for the sparse solve (`block_matvec`).
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from model.ext import C


@dataclass
class BlockPattern:
    """Which 6x6 blocks of A exist and which terms feed them, for T = B * N flat nodes.

    Blocks are sorted by (row, col) with row <= col; every diagonal block is present, so
    `diagonal` (T,) = row_start[:-1] indexes them. Per term group g: term_blocks[g] (M_g, E_g)
    (block of each slot pair, -1 none), entry_order / entry_start (entries by block),
    slot_order / slot_start (used slots by node). See csrc/solver/solver.h for the layout.
    """

    num_samples: int
    num_nodes: int
    block_row: torch.Tensor
    block_col: torch.Tensor
    row_start: torch.Tensor
    col_order: torch.Tensor
    col_start: torch.Tensor
    term_blocks: List[torch.Tensor]
    entry_order: List[torch.Tensor]
    entry_start: List[torch.Tensor]
    slot_order: List[torch.Tensor]
    slot_start: List[torch.Tensor]

    @property
    def num_blocks(self) -> int:
        return self.block_row.shape[0]

    @property
    def diagonal(self) -> torch.Tensor:
        return self.row_start[:-1]


def build_block_pattern(nodes_list: Sequence[torch.Tensor], num_samples: int, num_nodes: int) -> BlockPattern:
    """The block pattern of term groups (each nodes (M_g, S_g) int64 as above). Raises a
    one-line RuntimeError for a node outside the batch or a term over two samples."""
    out = C.build_block_pattern(list(nodes_list), int(num_samples), int(num_nodes))
    head, groups = out[:5], out[5:]
    return BlockPattern(int(num_samples), int(num_nodes), *head, term_blocks=groups[0::5],
                        entry_order=groups[1::5], entry_start=groups[2::5], slot_order=groups[3::5],
                        slot_start=groups[4::5])


@dataclass
class SlotLists:
    """The used slots of each term group by node, for T = B * N flat nodes: all the dense
    assembly needs (a BlockPattern carries the same lists). slot_order[g]: the slots m * S + s
    of group g with a node, by node, ids ascending; slot_start[g] (T + 1,) their ranges."""

    num_samples: int
    num_nodes: int
    slot_order: List[torch.Tensor]
    slot_start: List[torch.Tensor]


def build_slot_lists(nodes_list: Sequence[torch.Tensor], num_samples: int, num_nodes: int) -> SlotLists:
    """SlotLists of term groups (each nodes (M_g, S_g) int64 as above), checked as
    build_block_pattern checks them (a one-line RuntimeError for a node outside the batch or a
    term over two samples): the dense solver's setup, without the block pattern's sorting."""
    out = C.build_slot_lists(list(nodes_list), int(num_samples), int(num_nodes))
    return SlotLists(int(num_samples), int(num_nodes), out[0::2], out[1::2])


def assemble_dense(layout, groups: Sequence[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                   mirror: bool = True,
                   structures: Optional[Sequence[Optional[Tuple[torch.Tensor, torch.Tensor]]]] = None):
    """A (B, 6N, 6N) and b (B, 6N) summed over the (J, r, nodes) groups, without autograd and
    without a block pattern (csrc AssembleDenseRowBody: row by row straight into the dense
    matrix). layout: SlotLists or a BlockPattern of the groups. A holds both triangles, or with
    mirror=False the upper one only (zeros below the diagonal: what factor_upper_ reads).
    structures: per group None, or for a group of match terms (structure (M, 5 + 3A) from
    match_terms(..., structure=True), skinning weights (M, A)), which the assembly then reads
    instead of J (csrc AssembleDenseMatchRowBody: about half the arithmetic), and J may be None."""
    r0 = groups[0][1]
    B, N = layout.num_samples, layout.num_nodes
    A = torch.zeros((B, 6 * N, 6 * N), dtype=r0.dtype, device=r0.device)
    b = torch.empty((B, 6 * N), dtype=r0.dtype, device=r0.device)
    for g, (J, r, nodes) in enumerate(groups):
        structure = structures[g] if structures is not None else None
        finish = mirror and g == len(groups) - 1
        if structure is not None:
            C.assemble_dense_match(structure[0], structure[1].detach(), r.detach(), nodes,
                                   layout.slot_order[g], layout.slot_start[g], A, b, g > 0, finish)
        else:
            C.assemble_dense(J.detach(), r.detach(), nodes, layout.slot_order[g], layout.slot_start[g], A, b,
                             g > 0, finish)
    return A, b


def assemble_blocks(pattern: BlockPattern, groups: Sequence[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """blocks (P, 6, 6) and b (T, 6) summed over the (J, r, nodes) groups, without autograd."""
    J0 = groups[0][0]
    blocks = torch.empty((pattern.num_blocks, 6, 6), dtype=J0.dtype, device=J0.device)
    b = torch.empty((pattern.num_samples * pattern.num_nodes, 6), dtype=J0.dtype, device=J0.device)
    for g, (J, r, nodes) in enumerate(groups):
        C.assemble_blocks(J.detach(), r.detach(), nodes, pattern.entry_order[g], pattern.entry_start[g],
                          pattern.slot_order[g], pattern.slot_start[g], blocks, b, g > 0)
    return blocks, b


def blocks_to_dense(pattern: BlockPattern, blocks: torch.Tensor) -> torch.Tensor:
    """A (B, 6N, 6N), both triangles, from the upper blocks."""
    return C.blocks_to_dense(blocks, pattern.block_row, pattern.block_col, pattern.num_samples,
                             pattern.num_nodes)


def block_matvec(pattern: BlockPattern, blocks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A x for x (T, 6) with A given by its upper blocks; returns (T, 6)."""
    return C.block_matvec(blocks, pattern.block_row, pattern.block_col, pattern.row_start,
                          pattern.col_order, pattern.col_start, x)


class _AssembleNormalEquations(torch.autograd.Function):
    @staticmethod
    def forward(ctx, J, r, nodes, num_samples, num_nodes):
        A, b = C.assemble_normal_equations(J, r, nodes, num_samples, num_nodes)
        ctx.save_for_backward(J, r, nodes)
        ctx.num_nodes = num_nodes
        return A, b

    @staticmethod
    def backward(ctx, grad_A, grad_b):
        J, r, nodes = ctx.saved_tensors
        if grad_A is None:
            grad_A = torch.zeros((grad_b.shape[0], grad_b.shape[1], grad_b.shape[1]),
                                 dtype=J.dtype, device=J.device)
        if grad_b is None:
            grad_b = torch.zeros(grad_A.shape[:2], dtype=J.dtype, device=J.device)
        grad_J, grad_r = C.assemble_normal_equations_backward(grad_A, grad_b, J, r, nodes,
                                                              ctx.num_nodes)
        return grad_J, grad_r, None, None, None


def _check_terms(J: torch.Tensor, r: torch.Tensor, nodes: torch.Tensor) -> None:
    if J.dim() != 3 or r.dim() != 2 or nodes.dim() != 2:
        raise ValueError(f"expected J (M, R, 6S), r (M, R), nodes (M, S); found {tuple(J.shape)}, "
                         f"{tuple(r.shape)}, {tuple(nodes.shape)}")
    if J.shape[2] != 6 * nodes.shape[1] or J.shape[:2] != r.shape or J.shape[0] != nodes.shape[0]:
        raise ValueError(f"inconsistent shapes J {tuple(J.shape)}, r {tuple(r.shape)}, "
                         f"nodes {tuple(nodes.shape)}")
    if nodes.dtype != torch.int64:
        raise ValueError(f"nodes must be int64, found {nodes.dtype}")


def assemble_normal_equations(J: torch.Tensor, r: torch.Tensor, nodes: torch.Tensor,
                              num_samples: int, num_nodes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A = sum_m P_m^T J_m^T J_m P_m and b = sum_m P_m^T J_m^T r_m, dense, differentiable.

    J (M, R, 6S) float; r (M, R); nodes (M, S) int64, node of each slot flattened over the batch
    (sample * num_nodes + node), -1 = unused. Returns A (B, 6N, 6N), b (B, 6N).
    """
    _check_terms(J, r, nodes)
    return _AssembleNormalEquations.apply(J, r, nodes, int(num_samples), int(num_nodes))


class _AssembleBlockSparse(torch.autograd.Function):
    """(J, r) -> (blocks, b) of one term group; bilinear, so the backward is a per-term gather
    (csrc SparseTermGradientBody), as the dense assembly's."""

    @staticmethod
    def forward(ctx, J, r, nodes, pattern, group):
        blocks = torch.empty((pattern.num_blocks, 6, 6), dtype=J.dtype, device=J.device)
        b = torch.empty((pattern.num_samples * pattern.num_nodes, 6), dtype=J.dtype, device=J.device)
        C.assemble_blocks(J, r, nodes, pattern.entry_order[group], pattern.entry_start[group],
                          pattern.slot_order[group], pattern.slot_start[group], blocks, b, False)
        ctx.save_for_backward(J, r, nodes, pattern.term_blocks[group])
        ctx.sizes = (blocks.shape[0], b.shape[0])
        return blocks, b

    @staticmethod
    def backward(ctx, grad_blocks, grad_b):
        J, r, nodes, term_blocks = ctx.saved_tensors
        P, T = ctx.sizes
        if grad_blocks is None:
            grad_blocks = torch.zeros((P, 6, 6), dtype=J.dtype, device=J.device)
        if grad_b is None:
            grad_b = torch.zeros((T, 6), dtype=J.dtype, device=J.device)
        grad_J, grad_r = C.assemble_blocks_backward(grad_blocks, grad_b, J, r, nodes, term_blocks)
        return grad_J, grad_r, None, None, None


def assemble_block_sparse(J: torch.Tensor, r: torch.Tensor, nodes: torch.Tensor, pattern: BlockPattern,
                          group: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Upper 6x6 blocks (P, 6, 6) of A and b (T, 6) of term group `group` of `pattern`,
    differentiable w.r.t. J and r. Same numbers as assemble_normal_equations, block by block."""
    _check_terms(J, r, nodes)
    return _AssembleBlockSparse.apply(J, r, nodes, pattern, int(group))
