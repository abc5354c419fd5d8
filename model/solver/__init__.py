"""Differentiable Gauss-Newton solver for the motion of an embedded deformation graph.

docs/DESIGN.md 5.3. One idea per module:
  * problem.py: the batch of problems (SolverProblem), the result and the status enum;
  * terms.py: linearisation, per-match (one fused C++ op with its backward) and per-edge
    residuals and Jacobian blocks, differentiable through the linearisation point, the
    correspondences and their weights;
  * normal_equations.py: A = J^T J, b = J^T r assembled by the C++ ops, never forming J: block
    by block over a block pattern built once per problem (block-sparse), or row by row
    straight into the dense matrix over the slot lists (the dense solver's);
  * linear_solvers.py: the damped step, by dense Cholesky or block-Jacobi preconditioned
    conjugate gradients, both differentiated implicitly (the adjoint with the same solver);
  * gauss_newton.py: the loop (`solve`), with per-sample status and energies per iteration.
"""
from model.solver.gauss_newton import solve
from model.solver.linear_solvers import (CGResult, StepSetup, block_jacobi, cholesky_solve,
                                         gauss_newton_step, memory_estimate_gb, pcg)
from model.solver.normal_equations import (BlockPattern, SlotLists, assemble_block_sparse,
                                           assemble_blocks, assemble_dense,
                                           assemble_normal_equations, block_matvec, blocks_to_dense,
                                           build_block_pattern, build_slot_lists)
from model.solver.problem import (STATUS_CONVERGED, STATUS_FAILED, STATUS_MAX_ITERATIONS, SolverProblem,
                                  SolverResult, SolveStatus)
from model.solver.terms import ROBUST_LOSSES, edge_terms, icp_terms, match_terms, robust_icp_weights

__all__ = [
    "solve", "CGResult", "StepSetup", "block_jacobi", "cholesky_solve", "gauss_newton_step",
    "memory_estimate_gb", "pcg", "BlockPattern", "assemble_block_sparse", "assemble_blocks",
    "assemble_normal_equations", "block_matvec", "blocks_to_dense", "build_block_pattern",
    "SlotLists", "assemble_dense", "build_slot_lists",
    "STATUS_CONVERGED", "STATUS_FAILED", "STATUS_MAX_ITERATIONS", "SolverProblem", "SolverResult",
    "SolveStatus", "ROBUST_LOSSES", "edge_terms", "icp_terms", "match_terms", "robust_icp_weights",
]
