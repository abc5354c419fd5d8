"""Linear solves of the Gauss-Newton step and their implicit-differentiation backward.

Two ways to solve the damped normal equations (A + diag(d)) x = -b of a batch:
  * dense: the (B, 6N, 6N) matrix and a batched Cholesky factorisation (memory N^2, time N^3),
    the reference, and the fastest for small graphs;
  * sparse: the upper 6x6 blocks only and preconditioned conjugate gradients (`pcg`) with the
    inverse diagonal blocks as preconditioner (block Jacobi, what GPU fusion systems use),
    warm-started from the previous step; memory and time per iteration linear in the blocks.
Both are differentiated implicitly: the adjoint system A u = grad_x is solved with the same
solver (the Cholesky factor, or CG with the same blocks and preconditioner), and the term
gradients are formed from u and x directly (csrc StepTermBackward), never a dense grad_A.
"""
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union
import warnings

import torch

from model.ext import C
from model.solver.normal_equations import (BlockPattern, SlotLists, assemble_blocks,
                                           assemble_dense, block_matvec, build_slot_lists)


# The dense CPU path factors the assembled upper triangle in place by LAPACK (csrc/solver
# factor_cpu.cpp): no clone, no zeroing of the other triangle, no mirror. Elsewhere (a GPU, or a
# torch whose LAPACK the extension cannot reach) torch.linalg.cholesky_ex does it.
_LAPACK_IN_PLACE = bool(C.has_lapack_factor())


def factors_in_place(device: torch.device) -> bool:
    """Whether _factor_and_solve(..., overwrite=True) factors on `device` in place, reading the
    upper triangle only (so that the assembly need not mirror it)."""
    return device.type == "cpu" and _LAPACK_IN_PLACE


def _triangular_solve(U: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x = (U^T U)^-1 b for U (B, D, D) upper triangular and b (B, D): two triangular solves
    (several times faster than torch.cholesky_solve for one right-hand side on the CPU)."""
    y = torch.linalg.solve_triangular(U.mT, b.unsqueeze(-1), upper=False)
    return torch.linalg.solve_triangular(U, y, upper=True).squeeze(-1)


def _factor_and_solve(A: torch.Tensor, b: torch.Tensor, overwrite: bool = False):
    """Cholesky factor U of A (B, D, D), A = U^T U, and x = A^-1 b (B, D), with failed (B,) bool.

    With overwrite (where factors_in_place(A.device)), A's upper triangle alone is read, its
    strictly lower triangle must be zero, and A itself becomes U; otherwise A is symmetric and
    kept. A sample whose factorisation fails (not positive definite) or whose solution is not
    finite (a non-finite A or b ends here too) gets x = 0 and U = I, so that nothing downstream,
    the backward included, sees garbage from it. On a GPU without host synchronisation; on the
    CPU, where reading a flag back is free, the identity is only formed when a sample failed.
    """
    if overwrite and factors_in_place(A.device):
        U, failed = A, C.factor_upper_(A) != 0
    else:
        U, info = torch.linalg.cholesky_ex(A, upper=True)
        failed = info != 0
    on_cpu = A.device.type == "cpu"
    if not on_cpu or bool(failed.any()):
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)
        U = torch.where(failed[:, None, None], eye, U)
        b = torch.where(failed[:, None], torch.zeros_like(b), b)
    x = _triangular_solve(U, b)
    bad = failed | ~torch.isfinite(x).all(dim=1)
    if not on_cpu or bool((bad & ~failed).any()):
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)
        U = torch.where((bad & ~failed)[:, None, None], eye, U)
    x = torch.where(bad[:, None], torch.zeros_like(x), x)
    return x, bad, U


class _CholeskySolve(torch.autograd.Function):
    """x = A^-1 b for a batch of symmetric positive definite A, reusing the factor in backward.

    Implicit differentiation of A x = b: dA x + A dx = db, so for an upstream gradient g = dL/dx
        dL/db = A^-T g = A^-1 g        (one more solve with the same Cholesky factor)
        dL/dA = -(dL/db) x^T.
    A sample whose factorisation fails or whose solution is not finite is flagged in `failed`,
    and gets x = 0 (and zero gradients) instead of garbage.
    """

    @staticmethod
    def forward(ctx, A, b):
        x, failed, U = _factor_and_solve(A, b)
        ctx.save_for_backward(U, x, failed)
        ctx.mark_non_differentiable(failed)
        return x, failed

    @staticmethod
    def backward(ctx, grad_x, _grad_failed):
        U, x, failed = ctx.saved_tensors
        grad_x = torch.where(failed[:, None], torch.zeros_like(grad_x), grad_x)
        grad_b = _triangular_solve(U, grad_x)
        grad_A = -grad_b.unsqueeze(-1) * x.unsqueeze(-2)
        return grad_A, grad_b


def cholesky_solve(A: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Solves A x = b for A (B, D, D) SPD and b (B, D). Returns x (B, D) and failed (B,) bool."""
    if A.dim() != 3 or b.dim() != 2 or A.shape[:2] != b.shape or A.shape[1] != A.shape[2]:
        raise ValueError(f"expected A (B, D, D) and b (B, D), found {tuple(A.shape)}, {tuple(b.shape)}")
    return _CholeskySolve.apply(A, b)


# ----------------------------------------------------------------------------------------------
# Preconditioned conjugate gradients on the block-sparse matrix


def block_jacobi(blocks: torch.Tensor, pattern: BlockPattern) -> torch.Tensor:
    """Inverses (T, 6, 6) of the diagonal blocks of A. A block that is not positive definite
    (a singular system) gets the identity: CG then reports what it reaches, never garbage."""
    D = blocks[pattern.diagonal]
    L, info = torch.linalg.cholesky_ex(D)
    eye = torch.eye(6, dtype=D.dtype, device=D.device).expand_as(D)
    return torch.where((info != 0)[:, None, None], eye, torch.cholesky_inverse(torch.where(
        (info != 0)[:, None, None], eye, L)))


@dataclass
class CGResult:
    x: torch.Tensor              # (B, 6N)
    converged: torch.Tensor      # (B,) bool: relative residual <= tolerance
    residual: torch.Tensor       # (B,) relative residual |b - A x| / |b| (recurrence)
    iterations: int              # iterations run (the batch stops together)


def pcg(blocks: torch.Tensor, pattern: BlockPattern, preconditioner: torch.Tensor, b: torch.Tensor,
        x0: Optional[torch.Tensor], max_iterations: int, tolerance: float,
        check_every: Optional[int] = None) -> CGResult:
    """Solves A x = b per sample by block-Jacobi preconditioned conjugate gradients.

    blocks (P, 6, 6) upper blocks of A (SPD per sample); preconditioner (T, 6, 6); b (B, 6N);
    x0 (B, 6N) warm start or None. Samples stop updating once their residual is below
    tolerance * |b|; convergence is read back every `check_every` iterations (1 on the CPU,
    where that costs nothing; 10 on a GPU, so that iterations queue without host syncs).
    """
    B, D = b.shape
    T = D // 6 * B
    if check_every is None:
        check_every = 1 if b.device.type == "cpu" else 10

    def matvec(v):
        return block_matvec(pattern, blocks, v.reshape(T, 6)).reshape(B, D)

    def precondition(v):
        return torch.bmm(preconditioner, v.reshape(T, 6, 1)).reshape(B, D)

    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    target = tolerance * b.norm(dim=1)
    z = precondition(r)
    p = z.clone()
    rz = (r * z).sum(dim=1)
    done = r.norm(dim=1) <= target
    tiny = torch.finfo(b.dtype).tiny
    iterations = 0
    for iterations in range(1, max_iterations + 1):
        Ap = matvec(p)
        pAp = (p * Ap).sum(dim=1)
        alpha = torch.where(done | (pAp <= 0), torch.zeros_like(pAp), rz / pAp.clamp(min=tiny))
        x.addcmul_(alpha[:, None], p)
        r.addcmul_(alpha[:, None], Ap, value=-1)
        done = done | (r.norm(dim=1) <= target)
        if iterations % check_every == 0 and bool(done.all()):
            break
        z = precondition(r)
        rz_new = (r * z).sum(dim=1)
        beta = torch.where(done, torch.zeros_like(rz), rz_new / rz.clamp(min=tiny))
        p = z + beta[:, None] * p
        rz = rz_new
    residual = r.norm(dim=1) / b.norm(dim=1).clamp(min=tiny)
    finite = torch.isfinite(x).all(dim=1)
    return CGResult(torch.where(finite[:, None], x, torch.zeros_like(x)), done & finite, residual,
                    iterations)


# ----------------------------------------------------------------------------------------------
# The Gauss-Newton step


@dataclass
class StepSetup:
    """What a step needs besides its tensors: the layout of the terms (built once per problem:
    the block pattern for the sparse solver; for the dense one the slot lists suffice, and a
    pattern serves too), the solver, the CG budget and warm start; CG statistics of the
    forward come back in `cg_*`."""

    pattern: Union[BlockPattern, SlotLists]
    linear_solver: str = "dense"           # dense | sparse
    cg_max_iterations: int = 1000
    cg_tolerance: float = 1e-6
    warm_start: Optional[torch.Tensor] = None
    cg_iterations: int = 0
    cg_residual: Optional[torch.Tensor] = None
    cg_failed: Optional[torch.Tensor] = None
    backward_warnings: List[str] = field(default_factory=list)


class _GaussNewtonStep(torch.autograd.Function):
    """The damped Gauss-Newton step x = -(A + diag(d))^-1 b of a batch, where A and b are
    assembled (by the C++ op) from groups of terms (J, r, nodes).

    Backward: with u = (A + diag(d))^-1 grad_x (the adjoint solve, with the same solver),
    dL/dA = -u x^T and dL/db = -u are rank one per sample, so instead of materialising them the
    term gradients are formed directly (csrc/solver StepTermBackward):
        grad_J = -[(J u_m) x_m^T + (J x_m + r) u_m^T],   grad_r = -J u_m.
    Equivalent to assemble_normal_equations + cholesky_solve composed by autograd (a test checks
    this), but with no dense (B, 6N, 6N) gradient and four small products per term.
    """

    @staticmethod
    def forward(ctx, diagonal, setup, skinning, *groups):
        pattern = setup.pattern
        B, N = pattern.num_samples, pattern.num_nodes
        triples = list(zip(groups[0::3], groups[1::3], groups[2::3]))
        ctx.setup, ctx.skinning = setup, skinning
        if setup.linear_solver == "dense":
            # Straight into the matrix (no block list); its upper triangle only where the
            # factorisation reads nothing else.
            in_place = factors_in_place(diagonal.device)
            structures = [None if w is None else (first, w) for (first, _, _), w in zip(triples, skinning)]
            A, b = assemble_dense(pattern, triples, mirror=not in_place, structures=structures)
            A.diagonal(dim1=1, dim2=2).add_(diagonal.to(A.dtype))
            x, failed, U = _factor_and_solve(A, -b, overwrite=in_place)
            ctx.save_for_backward(x, failed, U, *groups)
        else:
            blocks, b = assemble_blocks(pattern, triples)
            blocks[pattern.diagonal] += torch.diag_embed(diagonal.reshape(B * N, 6).to(blocks.dtype))
            M_inv = block_jacobi(blocks, pattern)
            cg = pcg(blocks, pattern, M_inv, -b.reshape(B, 6 * N), setup.warm_start,
                     setup.cg_max_iterations, setup.cg_tolerance)
            failed = ~cg.converged
            x = torch.where(failed[:, None], torch.zeros_like(cg.x), cg.x)
            setup.cg_iterations, setup.cg_residual, setup.cg_failed = cg.iterations, cg.residual, failed
            ctx.save_for_backward(x, failed, blocks, M_inv, *groups)
        ctx.mark_non_differentiable(failed)
        return x, failed

    @staticmethod
    def backward(ctx, grad_x, _grad_failed):
        setup = ctx.setup
        x, failed, solver_state_a, *rest = ctx.saved_tensors
        grad_x = torch.where(failed[:, None], torch.zeros_like(grad_x), grad_x)
        if setup.linear_solver == "dense":
            groups = rest
            u = _triangular_solve(solver_state_a, grad_x)
        else:
            M_inv, *groups = rest
            cg = pcg(solver_state_a, setup.pattern, M_inv, grad_x, None, setup.cg_max_iterations,
                     setup.cg_tolerance)
            if not bool((cg.converged | failed).all()):
                # An adjoint that CG cannot solve gets no gradient rather than a wrong one.
                message = (f"adjoint solve: conjugate gradients reached {setup.cg_max_iterations} "
                           f"iterations without --cg-tolerance {setup.cg_tolerance}; those samples "
                           "get no gradient through this step")
                setup.backward_warnings.append(message)
                warnings.warn(message)
            u = torch.where(cg.converged[:, None], cg.x, torch.zeros_like(cg.x))
        grads = []
        for J, r, nodes, w in zip(groups[0::3], groups[1::3], groups[2::3], ctx.skinning):
            if not (ctx.needs_input_grad[3 + len(grads)] or ctx.needs_input_grad[4 + len(grads)]):
                grad_J = grad_r = None
            elif w is not None:  # match terms given by their structure
                grad_J, grad_r = C.match_step_backward(J, w, r, nodes, u, x)
            else:
                grad_J, grad_r = C.solve_step_backward(J, r, nodes, u, x)
            grads += [grad_J, grad_r, None]
        return (None, None, None, *grads)


def gauss_newton_step(diagonal: torch.Tensor, num_samples: int, num_nodes: int, *groups,
                      setup: Optional[StepSetup] = None, skinning: Optional[Sequence[Optional[torch.Tensor]]] = None):
    """x (B, 6N) = -(sum_g J_g^T J_g + diag(diagonal))^-1 sum_g J_g^T r_g and failed (B,) bool.

    diagonal (B, 6N); groups: (J, r, nodes) triples as for assemble_normal_equations. `setup`
    chooses the linear solver and carries the layout (slot lists built here, dense, when not
    given). skinning: per group None, or for a group of match terms given as (structure, r,
    nodes) instead of (J, r, nodes) (match_terms(..., structure=True)), their skinning weights
    (M, A): the dense assembly and the backward (csrc AssembleDenseMatchRowBody,
    MatchStepBackwardBody) read the structure, and its gradient flows back to the match terms.
    The sparse solve needs J for every group.
    """
    if len(groups) % 3 or not groups:
        raise ValueError("groups must be (J, r, nodes) triples")
    if setup is None:
        setup = StepSetup(build_slot_lists(list(groups[2::3]), num_samples, num_nodes))
    if setup.linear_solver == "sparse" and not isinstance(setup.pattern, BlockPattern):
        raise ValueError("the sparse linear solve needs the block pattern (build_block_pattern), "
                         "not slot lists")
    if (setup.pattern.num_samples, setup.pattern.num_nodes) != (int(num_samples), int(num_nodes)):
        raise ValueError(f"the pattern is for {setup.pattern.num_samples} samples of "
                         f"{setup.pattern.num_nodes} nodes, not {num_samples} of {num_nodes}")
    skinning = tuple(skinning) if skinning is not None else (None,) * (len(groups) // 3)
    if len(skinning) != len(groups) // 3:
        raise ValueError(f"skinning must have one entry per group ({len(groups) // 3}), found {len(skinning)}")
    if setup.linear_solver == "sparse" and any(w is not None for w in skinning):
        raise ValueError("the sparse linear solve needs J for every group, not match structures")
    return _GaussNewtonStep.apply(diagonal, setup, skinning, *groups)


def memory_estimate_gb(linear_solver: str, num_nodes: int, num_terms: Sequence[Tuple[int, int]],
                       dtype: torch.dtype) -> float:
    """Working memory (GiB) of one sample's linear solve: dense, the matrix, its factor and the
    backward's solve (3 x (6N)^2 values); sparse, an upper bound (the pattern is not built
    yet): its blocks (every slot pair of every term its own block, at most one per node pair)
    three times (blocks, preconditioner, gradients), the CG vectors and the pattern's index
    lists. num_terms: (count, slots) per term group."""
    size = torch.finfo(dtype).bits // 8
    if linear_solver == "dense":
        return 3 * (6 * num_nodes) ** 2 * size / 2 ** 30
    pairs = sum(m * s * (s + 1) // 2 for m, s in num_terms)
    blocks = min(num_nodes + pairs, num_nodes * (num_nodes + 1) // 2)
    return (3 * 36 * blocks * size + 8 * 6 * num_nodes * size
            + 8 * (3 * pairs + 2 * blocks + sum(m * s for m, s in num_terms))) / 2 ** 30
