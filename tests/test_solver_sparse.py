"""Block-sparse normal equations and the conjugate-gradient solve against the dense path.

The launch logic (csrc/solver/solver.h) is the same on CPU and GPU, so these CPU tests exercise
what a GPU thread runs: which blocks a term adds, when b is added (every used slot, slot 0 unused
or not), the input checks (node range, one sample per term), the deterministic block sums.
"""
import dataclasses

import pytest
import torch

from model import solver as gn
from model.ext import C
from options import SolverOptions
from tests.conftest import assert_close
from tests.solver_problems import make_problem, to_solver_problem
from tests.test_solver import random_match_inputs


def _random_terms(M=7, R=3, S=4, B=2, N=5, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(M, R, 6 * S, generator=gen, dtype=dtype)
    r = torch.randn(M, R, generator=gen, dtype=dtype)
    sample = torch.randint(0, B, (M, 1), generator=gen)
    nodes = sample * N + torch.randint(0, N, (M, S), generator=gen)
    nodes[0, 1] = nodes[0, 0]          # a repeated node within one term
    nodes[1, S - 1] = -1               # an unused last slot
    nodes[2, 0] = -1                   # an unused slot 0 (the old CUDA launcher skipped J^T r)
    return J, r, nodes


def _reference(J, r, nodes, B, N):
    """A (B, 6N, 6N), b (B, 6N) by scattering each term's J into a dense row block."""
    A = torch.zeros(B, 6 * N, 6 * N, dtype=J.dtype)
    b = torch.zeros(B, 6 * N, dtype=J.dtype)
    for m in range(J.shape[0]):
        used = [s for s in range(nodes.shape[1]) if nodes[m, s] >= 0]
        if not used:
            continue
        Jd = torch.zeros(J.shape[1], 6 * N, dtype=J.dtype)
        for s in used:
            n = int(nodes[m, s]) % N
            Jd[:, 6 * n:6 * n + 6] += J[m, :, 6 * s:6 * s + 6]
        sample = int(nodes[m, used[0]]) // N
        A[sample] += Jd.T @ Jd
        b[sample] += Jd.T @ r[m]
    return A, b


@pytest.mark.parametrize("S", [2, 4])
def test_block_sparse_assembly_equals_dense_reference(S):
    J, r, nodes = _random_terms(M=60, S=S)
    pattern = gn.build_block_pattern([nodes], 2, 5)
    blocks, b = gn.assemble_block_sparse(J, r, nodes, pattern)
    A = gn.blocks_to_dense(pattern, blocks)
    A_ref, b_ref = _reference(J, r, nodes, 2, 5)
    assert_close(A, A_ref, atol=1e-12, what="A from blocks")
    assert_close(b.reshape(2, 30), b_ref, atol=1e-12, what="b")
    assert torch.equal(A, A.transpose(1, 2)), "A must be exactly symmetric"
    # the dense op is the same launch logic
    A_op, b_op = gn.assemble_normal_equations(J, r, nodes, 2, 5)
    assert torch.equal(A_op, A) and torch.equal(b_op, b.reshape(2, 30))
    x = torch.randn(10, 6, dtype=torch.float64)
    assert_close(gn.block_matvec(pattern, blocks, x).reshape(2, 30),
                 torch.einsum("bij,bj->bi", A_ref, x.reshape(2, 30)), atol=1e-11, what="A x")


@pytest.mark.parametrize("S", [2, 4])
def test_dense_assembly_equals_dense_reference(S):
    J, r, nodes = _random_terms(M=60, S=S)
    J2, r2, nodes2 = _random_terms(M=25, S=2, seed=7)
    A_ref, b_ref = _reference(J, r, nodes, 2, 5)
    A_ref2, b_ref2 = _reference(J2, r2, nodes2, 2, 5)
    for layout in (gn.build_slot_lists([nodes, nodes2], 2, 5), gn.build_block_pattern([nodes, nodes2], 2, 5)):
        A, b = gn.assemble_dense(layout, [(J, r, nodes), (J2, r2, nodes2)])
        assert_close(A, A_ref + A_ref2, atol=1e-12, what="A")
        assert_close(b, b_ref + b_ref2, atol=1e-12, what="b")
        assert torch.equal(A, A.transpose(1, 2)), "A must be exactly symmetric"


@pytest.mark.parametrize("A", [4, 3])
def test_dense_assembly_from_the_match_structure_equals_the_one_from_J(A):
    """The match terms' dense assembly from their structure (dv, q and the skinning weights:
    csrc AssembleDenseMatchRowBody) against the generic one from J, beside a generic group,
    with and without the mirror; repeated anchors within a match included."""
    inputs = random_match_inputs(M=300, A=A, T=10, seed=9)
    r, J, structure = gn.match_terms(*inputs, 0.001, 1.0, "cauchy", 3.0, structure=True)
    assert structure.shape == (300, 5 + 3 * A) and not structure.requires_grad
    anchors, anchor_weights = inputs[1], inputs[2]
    J2, r2, nodes2 = _random_terms(M=25, S=2, B=1, N=10, seed=3)
    layout = gn.build_slot_lists([anchors, nodes2], 1, 10)
    groups = [(J, r, anchors), (J2, r2, nodes2)]
    for mirror in (True, False):
        A_ref, b_ref = gn.assemble_dense(layout, groups, mirror=mirror)
        A_op, b_op = gn.assemble_dense(layout, groups, mirror=mirror, structures=[(structure, anchor_weights), None])
        scale = float(A_ref.abs().max())
        assert_close(A_op, A_ref, atol=1e-12 * scale, what="A")
        assert_close(b_op, b_ref, atol=1e-12 * float(b_ref.abs().max()), what="b")
    with pytest.raises(RuntimeError, match="structure .M, 5 . 3A."):
        gn.assemble_dense(layout, groups, structures=[(structure[:, :-1], anchor_weights), None])


def test_step_from_the_match_structure_equals_the_step_from_J():
    """The dense step with the match terms given by their structure (assembly and backward from
    dv, q and the skinning weights) against the step from J: the same step and the same
    gradients of every differentiable input of match_terms and of the generic group beside it;
    gradcheck in float64 through both ops."""
    inputs = list(random_match_inputs(M=200, A=4, T=8, seed=10))
    J2, r2, nodes2 = _random_terms(M=20, S=2, B=1, N=8, seed=4)
    diagonal = torch.full((1, 48), 0.3, dtype=torch.float64)

    def run(structured, x, tp, td, c, R, t, J2, r2, robust="cauchy"):
        args = (x, inputs[1], inputs[2], inputs[3], tp, td, c, inputs[7], R, t, 0.001, 1.0, robust, 3.0)
        if structured:
            r, _, first = gn.match_terms(*args, structure=True, jacobian=False)
        else:
            r, first = gn.match_terms(*args)
        return gn.gauss_newton_step(diagonal, 1, 8, first, r, inputs[1], J2, r2, nodes2,
                                    skinning=[inputs[2] if structured else None, None])[0]

    leaves = [inputs[i] for i in (0, 4, 5, 6, 8, 9)] + [J2, r2]
    probe = torch.randn(1, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    results = []
    for structured in (False, True):
        copies = [t.clone().requires_grad_(True) for t in leaves]
        x = run(structured, *copies)
        results.append((x, torch.autograd.grad((x * probe).sum(), copies)))
    assert_close(results[1][0], results[0][0], atol=1e-12, what="step")
    for i, (a, b) in enumerate(zip(results[1][1], results[0][1])):
        assert_close(a, b, atol=1e-9 * max(1.0, float(b.abs().max())), what=f"gradient {i}")
    small = [t[:3].clone() if t.dim() and t.shape[0] == 200 else t.clone() for t in leaves]
    inputs[1], inputs[2], inputs[7] = inputs[1][:3], inputs[2][:3], inputs[7][:3]
    small = [t.requires_grad_(True) for t in small]
    # (without a robust loss: its weights are constants of the linearisation, which finite
    # differences would not hold constant)
    assert torch.autograd.gradcheck(lambda *a: run(True, *a, robust="none"), small, eps=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="sparse linear solve needs J"):
        gn.gauss_newton_step(diagonal, 1, 8, small[0], small[0], inputs[1], skinning=[inputs[2]],
                             setup=gn.StepSetup(gn.build_block_pattern([inputs[1]], 1, 8), linear_solver="sparse"))


def test_dense_assembly_checks_terms_and_is_deterministic_across_thread_counts():
    J, r, nodes = _random_terms(M=3000, S=4, B=2, N=40, dtype=torch.float32, seed=5)
    layout = gn.build_slot_lists([nodes], 2, 40)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        A1, b1 = gn.assemble_dense(layout, [(J, r, nodes)])
        torch.set_num_threads(max(2, threads))
        A2, b2 = gn.assemble_dense(layout, [(J, r, nodes)])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(A1, A2) and torch.equal(b1, b2)
    bad = nodes.clone()
    bad[4] = torch.tensor([0, 45, 1, 2])
    with pytest.raises(RuntimeError, match="term 4 .* mixes samples"):
        gn.build_slot_lists([bad], 2, 40)
    with pytest.raises(ValueError, match="needs the block pattern"):
        gn.gauss_newton_step(torch.ones(2, 240), 2, 40, J, r, nodes,
                             setup=gn.StepSetup(layout, linear_solver="sparse"))


def test_term_block_keys_and_pattern():
    # term 0: slots (0: node 3, 1: unused, 2: node 1); pairs in order (0,0) (0,1) (0,2) (1,1) (1,2) (2,2)
    nodes = torch.tensor([[3, -1, 1]])
    T = 5
    keys = C.term_block_keys(nodes, 1, 5)
    assert keys.tolist() == [[3 * T + 3, -1, 1 * T + 3, -1, -1, 1 * T + 1]]
    pattern = gn.build_block_pattern([nodes], 1, 5)
    # every diagonal block, plus the upper block (1, 3)
    assert list(zip(pattern.block_row.tolist(), pattern.block_col.tolist())) == [
        (0, 0), (1, 1), (1, 3), (2, 2), (3, 3), (4, 4)]
    assert pattern.diagonal.tolist() == [0, 1, 3, 4, 5]


def test_cpu_pattern_equals_the_sorted_pattern_a_gpu_builds():
    _, _, n1 = _random_terms(M=200, S=4, B=2, N=9, seed=3)
    _, _, n2 = _random_terms(M=50, S=2, B=2, N=9, seed=4)
    ours = C.build_block_pattern([n1, n2], 2, 9)
    sorted_ = C.build_block_pattern_sorted([n1, n2], 2, 9)
    assert len(ours) == len(sorted_) == 15
    for a, b in zip(ours, sorted_):
        assert torch.equal(a, b)


def test_slot_zero_unused_still_adds_the_other_slots():
    J, r, _ = _random_terms(M=3, S=4, B=1, N=4)
    J, r = J[:1], r[:1]
    nodes = torch.tensor([[-1, 2, 0, 3]])
    A, b = gn.assemble_normal_equations(J, r, nodes, 1, 4)
    A_ref, b_ref = _reference(J, r, nodes, 1, 4)
    assert_close(b, b_ref, atol=1e-12, what="b with slot 0 unused")
    assert float(b_ref.abs().sum()) > 0
    assert_close(A, A_ref, atol=1e-12, what="A with slot 0 unused")


def test_bad_terms_are_one_line_errors_in_every_op():
    J, r, nodes = _random_terms(M=6, S=4, B=2, N=5)
    out_of_range = nodes.clone()
    out_of_range[3, 2] = 10            # B * N = 10
    mixed = nodes.clone()
    mixed[4] = torch.tensor([0, 5, 1, 2])
    u = torch.zeros(2, 30, dtype=torch.float64)
    for bad, match in ((out_of_range, "term 3 .* outside"), (mixed, "term 4 .* mixes samples")):
        with pytest.raises(RuntimeError, match=match):
            gn.build_block_pattern([bad], 2, 5)
        with pytest.raises(RuntimeError, match=match):
            gn.assemble_normal_equations(J, r, bad, 2, 5)
        with pytest.raises(RuntimeError, match=match):
            C.assemble_normal_equations_backward(torch.zeros(2, 30, 30, dtype=torch.float64), u, J, r, bad, 5)
        # the step's backward checked neither the sample nor (on CUDA) the range before
        with pytest.raises(RuntimeError, match=match):
            C.solve_step_backward(J, r, bad, u, u)


def test_assembly_is_deterministic_across_thread_counts():
    J, r, nodes = _random_terms(M=3000, S=4, B=2, N=40, dtype=torch.float32, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        A1, b1 = gn.assemble_normal_equations(J, r, nodes, 2, 40)
        torch.set_num_threads(max(2, threads))
        A2, b2 = gn.assemble_normal_equations(J, r, nodes, 2, 40)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(A1, A2) and torch.equal(b1, b2)


def test_block_sparse_assembly_gradcheck():
    J, r, nodes = _random_terms(M=6, S=4, B=2, N=3, seed=2)
    pattern = gn.build_block_pattern([nodes], 2, 3)
    J.requires_grad_(True)
    r.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda J, r: gn.assemble_block_sparse(J, r, nodes, pattern),
                                    (J, r), eps=1e-6, atol=1e-6)


def _step_setup(groups, B, N, solver, **cg):
    pattern = gn.build_block_pattern([g[2] for g in groups], B, N)
    return gn.StepSetup(pattern, linear_solver=solver, **cg)


def test_sparse_step_equals_dense_step_with_gradients():
    J1, r1, n1 = _random_terms(M=40, S=4, N=6, seed=1)
    J2, r2, n2 = _random_terms(M=20, S=2, N=6, seed=2)
    diagonal = torch.full((2, 36), 0.1, dtype=torch.float64)
    probe = torch.randn(2, 36, dtype=torch.float64)
    results = {}
    for solver in ("dense", "sparse"):
        leaves = [t.clone().requires_grad_(True) for t in (J1, r1, J2, r2)]
        setup = _step_setup([(J1, r1, n1), (J2, r2, n2)], 2, 6, solver, cg_tolerance=1e-13)
        x, failed = gn.gauss_newton_step(diagonal, 2, 6, leaves[0], leaves[1], n1, leaves[2], leaves[3],
                                         n2, setup=setup)
        assert not failed.any()
        results[solver] = (x, torch.autograd.grad((x * probe).sum(), leaves))
    assert_close(results["sparse"][0], results["dense"][0], atol=1e-10, what="sparse step")
    for a, b in zip(results["sparse"][1], results["dense"][1]):
        assert_close(a, b, atol=1e-9, what="sparse step gradient")


def test_sparse_step_gradcheck():
    J, r, nodes = _random_terms(M=6, S=4, B=2, N=3, seed=3)
    J.requires_grad_(True)
    r.requires_grad_(True)

    def step(J, r):
        setup = _step_setup([(J, r, nodes)], 2, 3, "sparse", cg_tolerance=1e-14)
        return gn.gauss_newton_step(torch.full((2, 18), 0.5, dtype=torch.float64), 2, 3, J, r, nodes,
                                    setup=setup)[0]

    assert torch.autograd.gradcheck(step, (J, r), eps=1e-6, atol=1e-6)


def _options(**kw):
    base = dict(iterations=3, remove_clusters=False, robust_loss="none", convergence_tolerance=0.0,
                cg_tolerance=1e-12)
    base.update(kw)
    return SolverOptions(**base)


def test_sparse_solve_equals_dense_solve_with_gradients():
    problems = [make_problem(num_nodes_side=4, points_side=10, seed=s) for s in (0, 1)]
    problems[1] = {**problems[1], "nodes": problems[1]["nodes"][:12]}  # a padded sample
    problems[1]["anchors"] = problems[1]["anchors"].clamp(max=11)
    problems[1]["edges"] = problems[1]["edges"][(problems[1]["edges"] < 12).all(1)]
    out = {}
    for solver in ("dense", "sparse"):
        problem = to_solver_problem(problems)
        leaves = {k: getattr(problem, k).clone().requires_grad_(True) for k in ("weights", "target_depth")}
        problem = dataclasses.replace(problem, **leaves)
        result = gn.solve(problem, _options(linear_solver=solver, robust_loss="cauchy"))
        assert result.linear_solver == solver and result.valid.all(), result.messages
        loss = (result.translations ** 2).sum() + result.rotations.sum()
        out[solver] = (result, torch.autograd.grad(loss, list(leaves.values())))
    dense, sparse = out["dense"][0], out["sparse"][0]
    assert_close(sparse.translations, dense.translations, atol=1e-10, what="translations")
    assert_close(sparse.rotations, dense.rotations, atol=1e-10, what="rotations")
    assert sparse.status == dense.status
    for a, b in zip(sparse.energies, dense.energies):
        assert a == pytest.approx(b, rel=1e-9)
    assert all(len(c) == 3 and min(c) > 0 for c in sparse.cg_iterations)
    for a, b in zip(out["sparse"][1], out["dense"][1]):
        assert_close(a, b, atol=1e-8, rtol=1e-6, what="solve gradient")


def test_auto_chooses_sparse_above_sparse_min_nodes():
    problem = to_solver_problem([make_problem(num_nodes_side=3, points_side=8)])
    assert gn.solve(problem, _options(sparse_min_nodes=9)).linear_solver == "dense"
    assert gn.solve(problem, _options(sparse_min_nodes=8)).linear_solver == "sparse"


def test_cg_not_converged_is_a_reported_failure():
    problem = to_solver_problem([make_problem(num_nodes_side=4, points_side=10)])
    result = gn.solve(problem, _options(linear_solver="sparse", cg_max_iterations=2))
    assert result.status == ["failed"] and not result.valid.any()
    assert "conjugate gradients" in result.messages[0] and "--cg-max-iterations 2" in result.messages[0]
    assert float(result.translations.abs().max()) == 0.0


def test_memory_estimate_replaces_the_node_limit():
    dense = gn.memory_estimate_gb("dense", 4096, [(50000, 4), (4096 * 8, 2)], torch.float32)
    assert dense == pytest.approx(3 * (6 * 4096) ** 2 * 4 / 2 ** 30)
    small = gn.memory_estimate_gb("sparse", 1000, [(10000, 4), (8000, 2)], torch.float32)
    large = gn.memory_estimate_gb("sparse", 4000, [(40000, 4), (32000, 2)], torch.float32)
    assert large == pytest.approx(4 * small, rel=1e-6)          # linear in nodes and terms
    assert large < 0.5                                          # against 1.1 GiB dense
    problem = to_solver_problem([make_problem(num_nodes_side=4, points_side=10)])
    refused = gn.solve(problem, _options(linear_solver="dense", max_memory_gb=1e-6))
    assert refused.status == ["failed"] and "--max-memory-gb" in refused.messages[0]
    assert "--linear-solver sparse" in refused.messages[0]
    assert gn.solve(problem, _options(linear_solver="sparse", max_memory_gb=1e-2)).valid.all()
