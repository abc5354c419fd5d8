"""Gauss-Newton solver: Jacobians, assembly, the solve, gradients, recovery and failure cases."""
import dataclasses

import pytest
import torch

from model import solver as gn
from model.ext import C
from model.solver import linear_solvers
from model.warp import left_rotate, so3_exp
from options import SolverOptions
from tests.conftest import assert_close
from tests.reference import dense_solver, terms_reference
from tests.solver_problems import angle_error, make_problem, to_solver_problem

WEIGHTS = {"flow": 0.001, "depth": 1.0, "arap": 1.0}


def _blocks_to_dense(J, nodes, num_nodes):
    """Scatter per-term blocks (M, R, 6S) into a dense (M*R, 6N) matrix."""
    M, R, cols = J.shape
    dense = torch.zeros(M * R, 6 * num_nodes, dtype=J.dtype)
    for m in range(M):
        for s in range(cols // 6):
            n = int(nodes[m, s])
            if n >= 0:
                dense[m * R:(m + 1) * R, 6 * n:6 * n + 6] += J[m, :, 6 * s:6 * s + 6]
    return dense


def _ours_dense_jacobian(p, R, t):
    N = p["nodes"].shape[0]
    M = p["points"].shape[0]
    r_m, J_m = gn.match_terms(p["points"], p["anchors"], p["anchor_weights"], p["nodes"], p["target_pixels"],
                              p["target_depth"], p["weights"], p["intrinsics"].expand(M, 4), R, t,
                              WEIGHTS["flow"], WEIGHTS["depth"])
    r_e, J_e = gn.edge_terms(p["edges"][:, 0], p["edges"][:, 1], p["edge_weights"], p["nodes"], R, t,
                             WEIGHTS["arap"])
    dense = torch.cat((_blocks_to_dense(J_m, p["anchors"], N), _blocks_to_dense(J_e, p["edges"], N)))
    return torch.cat((r_m.reshape(-1), r_e.reshape(-1))), dense


def _autodiff_jacobian(p, R, t):
    N = p["nodes"].shape[0]

    def f(delta):
        delta = delta.reshape(N, 6)
        return dense_solver.residuals(p, dense_solver.exp_so3(delta[:, :3]) @ R, t + delta[:, 3:], WEIGHTS)

    return torch.autograd.functional.jacobian(f, torch.zeros(6 * N, dtype=R.dtype))


def _perturbed_state(p, seed=1):
    gen = torch.Generator().manual_seed(seed)
    N = p["nodes"].shape[0]
    R = so3_exp(0.1 * torch.randn(N, 3, generator=gen, dtype=torch.float64))
    t = 0.02 * torch.randn(N, 3, generator=gen, dtype=torch.float64)
    return R, t


def test_jacobians_equal_autodiff_and_dense_reference():
    p = make_problem(points_side=6)
    R, t = _perturbed_state(p)
    truth = _autodiff_jacobian(p, R, t)
    r_ours, J_ours = _ours_dense_jacobian(p, R, t)
    assert_close(r_ours, dense_solver.residuals(p, R, t, WEIGHTS), atol=1e-12, what="residuals")
    assert_close(J_ours, truth, atol=1e-9, rtol=1e-7, what="our Jacobian vs autodiff")
    assert_close(dense_solver.dense_jacobian(p, R, t, WEIGHTS), truth, atol=1e-9, rtol=1e-7,
                 what="dense reference Jacobian vs autodiff")


def test_reference_flow_rotation_defect_is_caught():
    """The original code weighted only one of the two products in the rotation part of the flow
    rows by sqrt(flow_weight), leaving the d/dz product ~31.6x too large. Rebuilding that variant
    shows the autodiff comparison above rejects it, while our Jacobian passes."""
    from model.warp import anchor_terms

    p = make_problem(points_side=5)
    R, t = _perturbed_state(p)
    truth = _autodiff_jacobian(p, R, t)
    _, J_ours = _ours_dense_jacobian(p, R, t)
    q, warped = anchor_terms(p["points"], p["anchors"], p["anchor_weights"], p["nodes"], R, t)
    fx, fy = p["intrinsics"][0], p["intrinsics"][1]
    x, y, z = warped.unbind(1)
    c = p["weights"]
    s = WEIGHTS["flow"] ** 0.5
    M, N = p["points"].shape[0], p["nodes"].shape[0]
    defect = J_ours.clone()
    for row, missing in ((0, (1 - s) * c * (-fx * x / z ** 2)), (1, (1 - s) * c * (-fy * y / z ** 2))):
        extra_d = torch.stack((0 * missing, 0 * missing, missing), 1)   # unweighted part of D[row, z]
        for k in range(4):
            add = p["anchor_weights"][:, k:k + 1] * torch.cross(q[:, k], extra_d, dim=1)
            for m in range(M):
                n = int(p["anchors"][m, k])
                defect[3 * m + row, 6 * n:6 * n + 3] += add[m]
    assert torch.allclose(J_ours, truth, atol=1e-9, rtol=1e-7)
    rot_cols = torch.arange(6 * N).reshape(N, 6)[:, :3].reshape(-1)
    error = (defect - truth)[:, rot_cols].abs().max()
    scale = truth[:, rot_cols].abs().max()
    assert error > 0.5 * scale, f"defect changes rotation columns by only {error} of {scale}"


def _random_terms(M=7, R=3, S=4, B=2, N=5, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(M, R, 6 * S, generator=gen, dtype=dtype)
    r = torch.randn(M, R, generator=gen, dtype=dtype)
    sample = torch.randint(0, B, (M, 1), generator=gen)
    local = torch.randint(0, N, (M, S), generator=gen)
    local[0, 1] = local[0, 0]          # a repeated node within one term
    nodes = sample * N + local
    nodes[1, S - 1] = -1               # an unused slot
    return J, r, nodes


def _dense_assembly(J, r, nodes, B, N):
    A = torch.zeros(B, 6 * N, 6 * N, dtype=J.dtype)
    b = torch.zeros(B, 6 * N, dtype=J.dtype)
    for m in range(J.shape[0]):
        used = [s for s in range(nodes.shape[1]) if nodes[m, s] >= 0]
        sample = int(nodes[m, used[0]]) // N
        P = torch.zeros(6 * nodes.shape[1], 6 * N, dtype=J.dtype)
        for s in used:
            n = int(nodes[m, s]) % N
            P[6 * s:6 * s + 6, 6 * n:6 * n + 6] = torch.eye(6, dtype=J.dtype)
        A[sample] += P.T @ J[m].T @ J[m] @ P
        b[sample] += P.T @ J[m].T @ r[m]
    return A, b


@pytest.mark.parametrize("S", [2, 4])
def test_assembly_matches_dense(S):
    J, r, nodes = _random_terms(M=40, S=S)
    A, b = gn.assemble_normal_equations(J, r, nodes, 2, 5)
    A_ref, b_ref = _dense_assembly(J, r, nodes, 2, 5)
    assert_close(A, A_ref, atol=1e-10, what="A")
    assert_close(b, b_ref, atol=1e-10, what="b")
    assert torch.equal(A, A.transpose(1, 2))


def test_assembly_float32_matches_float64():
    J, r, nodes = _random_terms(M=300)
    A64, b64 = gn.assemble_normal_equations(J, r, nodes, 2, 5)
    A32, b32 = gn.assemble_normal_equations(J.float(), r.float(), nodes, 2, 5)
    assert A32.dtype == torch.float32
    assert_close(A32, A64, atol=1e-3, rtol=1e-5, what="float32 A")


def test_assembly_gradcheck():
    J, r, nodes = _random_terms(M=6, N=3)
    J.requires_grad_(True)
    r.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda J, r: gn.assemble_normal_equations(J, r, nodes, 2, 3),
                                    (J, r), eps=1e-6, atol=1e-6)


def test_assembly_rejects_bad_input():
    J, r, nodes = _random_terms()
    with pytest.raises(ValueError, match="inconsistent shapes"):
        gn.assemble_normal_equations(J[:, :, :12], r, nodes, 2, 5)
    bad = nodes.clone()
    bad[0] = torch.tensor([0, 5, 1, 2])   # slots in samples 0 and 1
    with pytest.raises(RuntimeError, match="mixes samples"):
        gn.assemble_normal_equations(J, r, bad, 2, 5)
    with pytest.raises(RuntimeError, match="outside"):
        gn.assemble_normal_equations(J, r, nodes + 100, 2, 5)


def test_cholesky_solve_and_gradcheck():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(3, 5, 5, generator=gen, dtype=torch.float64)
    A = (X @ X.transpose(1, 2) + torch.eye(5, dtype=torch.float64)).requires_grad_(True)
    b = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    x, failed = gn.cholesky_solve(A, b)
    assert not failed.any()
    assert_close(x, torch.linalg.solve(A, b), atol=1e-10, what="x")
    # The factorisation reads one triangle, so check through a symmetric parametrisation (in the
    # solver A is symmetric by construction and the assembly backward symmetrises its gradient).
    S = X.clone().requires_grad_(True)
    sym = lambda S: S @ S.transpose(1, 2) + torch.eye(5, dtype=torch.float64)  # noqa: E731
    assert torch.autograd.gradcheck(lambda S, b: gn.cholesky_solve(sym(S), b)[0], (S, b))


def test_cholesky_solve_flags_bad_systems():
    A = torch.eye(4, dtype=torch.float64).repeat(3, 1, 1)
    A[1] = -A[1]                   # not positive definite
    A[2, 0, 0] = float("nan")      # not finite
    b = torch.ones(3, 4, dtype=torch.float64, requires_grad=True)
    x, failed = gn.cholesky_solve(A, b)
    assert failed.tolist() == [False, True, True]
    assert torch.equal(x[1:], torch.zeros(2, 4, dtype=torch.float64))
    x.sum().backward()
    assert torch.isfinite(b.grad).all() and torch.equal(b.grad[1:], torch.zeros(2, 4, dtype=torch.float64))


@pytest.mark.skipif(not C.has_lapack_factor(), reason="no LAPACK potrf reachable in this process")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factor_upper_in_place_equals_torch_cholesky_and_leaves_the_lower_triangle(dtype):
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(3, 12, 30, generator=gen, dtype=torch.float64)
    A = (X @ X.mT / 30 + 0.1 * torch.eye(12, dtype=torch.float64)).to(dtype)
    A[2] = -A[2]                                   # not positive definite
    work = A.triu()
    lower = torch.ones(12, 12, dtype=torch.bool).tril(-1)
    work[:, lower] = float("nan")                  # never read, never written
    info = C.factor_upper_(work)
    assert info.dtype == torch.int64 and info[:2].tolist() == [0, 0] and info[2] > 0
    assert torch.isnan(work[:, lower]).all()
    U = torch.linalg.cholesky_ex(A[:2], upper=True)[0]
    assert_close(work[:2].triu(), U, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                 atol=1e-5 if dtype == torch.float32 else 1e-12, what="U")
    for bad in (A.mT, A[..., :6], A.int()):
        with pytest.raises(RuntimeError, match="contiguous"):
            C.factor_upper_(bad)


def test_the_step_factored_in_place_equals_torch_cholesky(monkeypatch):
    """The dense step with the in-place LAPACK factor of the upper triangle (the CPU default)
    and with torch.linalg.cholesky_ex on the mirrored matrix (a GPU's path): the same step,
    gradients and failure flags."""
    J, r, nodes = _random_terms(M=40, S=4, N=4, seed=5)
    diagonal = torch.full((2, 24), 0.1, dtype=torch.float64)
    diagonal[1] = -1e3                             # sample 1 not positive definite: failed

    def step():
        leaves = [t.clone().requires_grad_(True) for t in (J, r)]
        x, failed = gn.gauss_newton_step(diagonal, 2, 4, leaves[0], leaves[1], nodes)
        return x, failed, torch.autograd.grad((x * torch.arange(48.0, dtype=x.dtype).reshape(2, 24)).sum(), leaves)

    ours = step()
    monkeypatch.setattr(linear_solvers, "_LAPACK_IN_PLACE", False)
    theirs = step()
    assert ours[1].tolist() == theirs[1].tolist() == [False, True]
    assert_close(ours[0], theirs[0], atol=1e-12, what="step")
    for a, b in zip(ours[2], theirs[2]):
        assert_close(a, b, atol=1e-10, what="gradient")


def _options(**changes):
    base = SolverOptions(remove_clusters=False, convergence_tolerance=0.0, robust_loss="none")
    return dataclasses.replace(base, **changes)


def test_solve_matches_dense_reference_values_and_gradients():
    p = make_problem(points_side=10, seed=3)
    leaves = {k: p[k].clone().requires_grad_(True) for k in ("weights", "target_pixels", "target_depth")}
    ours_problem = to_solver_problem([{**p, **leaves}])
    result = gn.solve(ours_problem, _options(iterations=3))
    ref = dense_solver.gauss_newton({**p, **leaves}, 3, WEIGHTS, 0.1)
    assert result.status == ["max_iterations"]
    assert_close(result.translations[0], ref["translations"], atol=1e-9, what="translations")
    assert_close(result.rotations[0], ref["rotations"], atol=1e-9, what="rotations")
    assert_close(torch.tensor(result.energies[0]), torch.tensor(ref["energies"]), rtol=1e-8,
                 atol=1e-12, what="energies")
    gen = torch.Generator().manual_seed(5)
    probe_t = torch.randn(result.translations[0].shape, generator=gen, dtype=torch.float64)
    probe_R = torch.randn(result.rotations[0].shape, generator=gen, dtype=torch.float64)
    ours = torch.autograd.grad((result.translations[0] * probe_t).sum()
                               + (result.rotations[0] * probe_R).sum(), list(leaves.values()))
    theirs = torch.autograd.grad((ref["translations"] * probe_t).sum()
                                 + (ref["rotations"] * probe_R).sum(), list(leaves.values()))
    for name, a, b in zip(leaves, ours, theirs):
        assert b.abs().max() > 0, name
        assert_close(a, b, atol=1e-9, rtol=1e-6, what=f"gradient w.r.t. {name}")


def test_solve_gradcheck():
    p = make_problem(num_nodes_side=2, points_side=4, seed=4)

    def run(weights, target_pixels, target_depth):
        q = to_solver_problem([{**p, "weights": weights, "target_pixels": target_pixels,
                                "target_depth": target_depth}])
        out = gn.solve(q, _options(iterations=2))
        return out.translations, out.rotations

    inputs = tuple(p[k].clone().requires_grad_(True) for k in ("weights", "target_pixels", "target_depth"))
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-5)


def test_recovers_rigid_motion_exactly():
    p = make_problem(rigid=True, rotation=0.1, translation=0.05, seed=1)
    result = gn.solve(to_solver_problem([p]), _options(iterations=30, convergence_tolerance=1e-10))
    assert result.status == ["converged"] and result.iterations[0] < 30
    assert (result.translations[0] - p["translations_gt"]).abs().max() < 1e-9
    assert angle_error(result.rotations[0], p["rotations_gt"]).max() < 1e-6   # arccos resolution
    energies = result.energies[0]
    assert energies[-1] < 1e-15 and all(b <= a for a, b in zip(energies, energies[1:]))


def test_recovers_non_rigid_motion():
    p = make_problem(rotation=0.05, translation=0.02, seed=2)
    result = gn.solve(to_solver_problem([p]), _options(iterations=20, arap_weight=1e-8,
                                                       lm_damping=1e-6, convergence_tolerance=1e-12))
    assert (result.translations[0] - p["translations_gt"]).abs().max() < 1e-5
    assert angle_error(result.rotations[0], p["rotations_gt"]).max() < 1e-4


def test_float32_solve_close_to_float64():
    p = make_problem(seed=6)
    r64 = gn.solve(to_solver_problem([p]), _options(iterations=3))
    p32 = {k: (v.float() if v.is_floating_point() else v) for k, v in p.items()}
    r32 = gn.solve(to_solver_problem([p32]), _options(iterations=3))
    assert_close(r32.translations, r64.translations, atol=2e-5, what="float32 translations")


def test_batch_with_failures_never_raises():
    good = make_problem(seed=7)
    other = make_problem(num_nodes_side=4, points_side=9, seed=8)
    tiny = make_problem(num_nodes_side=2, points_side=5, seed=9)
    tiny = {**tiny, "nodes": tiny["nodes"][:3], "edges": tiny["edges"][tiny["edges"].max(1).values < 3],
            "anchors": tiny["anchors"].clamp(max=2)}
    no_matches = {**make_problem(seed=10)}
    no_matches["target_depth"] = torch.full_like(no_matches["target_depth"], float("nan"))
    batch = to_solver_problem([good, tiny, no_matches, other])
    result = gn.solve(batch, _options(iterations=3))
    assert result.status[1] == "failed" and "too few nodes" in result.messages[1]
    assert result.status[2] == "failed" and "no valid matches" in result.messages[2]
    assert result.valid.tolist() == [True, False, False, True]
    assert torch.equal(result.translations[1], torch.zeros_like(result.translations[1]))
    # The good samples get the same answer as when solved alone.
    alone = gn.solve(to_solver_problem([other], pad_nodes=batch.nodes.shape[1]), _options(iterations=3))
    assert_close(result.translations[3], alone.translations[0], atol=1e-10, what="batched vs alone")


def test_singular_system_is_a_failed_solve():
    p = make_problem(seed=11)
    # Without damping and with nodes that no match touches, J^T J is singular.
    extra = torch.tensor([[5.0, 5.0, 5.0]], dtype=torch.float64)
    q = {**p, "nodes": torch.cat((p["nodes"], extra))}
    result = gn.solve(to_solver_problem([q, p]), _options(iterations=2, lm_damping=0.0, arap_weight=0.0))
    assert result.status[0] == "failed" and "singular" in result.messages[0]
    assert result.valid.tolist() == [False, True]


def test_too_many_nodes_and_cluster_removal():
    p = make_problem(seed=12)
    assert gn.solve(to_solver_problem([p]), _options(max_nodes=5)).status == ["failed"]
    q = to_solver_problem([p])
    q.clusters[0, :3] = 1          # a cluster of 3 nodes
    heavy = gn.solve(q, _options(remove_clusters=True, min_cluster_weight=1e9))
    assert heavy.status == ["failed"]
    light = gn.solve(q, _options(remove_clusters=True, min_cluster_weight=1.0))
    assert light.valid.all() and light.node_valid.all()


def test_robust_loss_resists_outlier_matches():
    p = make_problem(num_nodes_side=3, points_side=14, seed=13)
    gen = torch.Generator().manual_seed(1)
    bad = torch.rand(p["points"].shape[0], generator=gen) < 0.15
    corrupted = p["target_pixels"].clone()
    corrupted[bad] += 60 * torch.randn(int(bad.sum()), 2, generator=gen, dtype=torch.float64)
    q = to_solver_problem([{**p, "target_pixels": corrupted}])
    error = {}
    for loss in ("none", "huber", "cauchy"):
        out = gn.solve(q, _options(iterations=8, robust_loss=loss, robust_scale=2.0))
        error[loss] = float((out.translations[0] - p["translations_gt"]).norm(dim=1).mean())
    assert error["cauchy"] < 0.3 * error["none"], error
    assert error["huber"] < error["none"], error


def test_gauss_newton_step_equals_assembly_and_solve_composed():
    J1, r1, n1 = _random_terms(M=30, S=4, N=4, seed=1)
    J2, r2, n2 = _random_terms(M=12, S=2, N=4, seed=2)
    diagonal = torch.full((2, 24), 0.1, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (J1, r1, J2, r2)]
    x, failed = gn.gauss_newton_step(diagonal, 2, 4, leaves[0], leaves[1], n1, leaves[2], leaves[3], n2)
    A1, b1 = gn.assemble_normal_equations(leaves[0], leaves[1], n1, 2, 4)
    A2, b2 = gn.assemble_normal_equations(leaves[2], leaves[3], n2, 2, 4)
    x_ref, _ = gn.cholesky_solve(A1 + A2 + torch.diag_embed(diagonal), -(b1 + b2))
    assert not failed.any()
    assert_close(x, x_ref, atol=1e-12, what="step")
    probe = torch.randn(x.shape, dtype=torch.float64)
    ours = torch.autograd.grad((x * probe).sum(), leaves)
    theirs = torch.autograd.grad((x_ref * probe).sum(), leaves)
    for a, b, name in zip(ours, theirs, ("J1", "r1", "J2", "r2")):
        assert_close(a, b, atol=1e-10, what=f"gradient w.r.t. {name}")
    J, r, nodes = _random_terms(M=5, S=4, N=3, seed=3)
    J.requires_grad_(True)
    r.requires_grad_(True)
    step = lambda J, r: gn.gauss_newton_step(torch.full((2, 18), 0.5, dtype=torch.float64), 2, 3, J, r, nodes)[0]  # noqa: E731
    assert torch.autograd.gradcheck(step, (J, r), eps=1e-6, atol=1e-6)


def random_match_inputs(M=9, A=4, T=5, dtype=torch.float64, seed=4):
    """Inputs of match_terms in its argument order."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=gen, dtype=dtype)  # noqa: E731
    nodes = torch.cat((0.2 * rand(T, 2) - 0.1, 0.8 + 0.4 * rand(T, 1)), dim=1)
    anchors = torch.randint(0, T, (M, A), generator=gen)
    anchor_weights = torch.softmax(torch.randn(M, A, generator=gen, dtype=dtype), dim=1)
    source_points = nodes[anchors[:, 0]] + 0.05 * torch.randn(M, 3, generator=gen, dtype=dtype)
    target_pixels = 300 * rand(M, 2) + 100
    target_depth = 0.8 + 0.4 * rand(M)
    weights = 0.5 + rand(M)
    intrinsics = torch.tensor([[500.0, 520.0, 320.0, 240.0]], dtype=dtype).expand(M, 4).contiguous()
    rotations = so3_exp(0.2 * torch.randn(T, 3, generator=gen, dtype=dtype))
    translations = 0.02 * torch.randn(T, 3, generator=gen, dtype=dtype)
    return (source_points, anchors, anchor_weights, nodes, target_pixels, target_depth, weights, intrinsics,
            rotations, translations)


DIFFERENTIABLE = (0, 4, 5, 6, 8, 9)  # source points, target pixels/depth, weights, R, t


@pytest.mark.parametrize("robust", ["none", "cauchy", "huber"])
def test_match_terms_op_equals_reference(robust):
    """The fused op against the plain-PyTorch reference: residuals, Jacobian blocks and the
    gradients of every differentiable input, with the robust weights as constants in both."""
    inputs = list(random_match_inputs())
    leaves = [x.clone().requires_grad_(i in DIFFERENTIABLE) for i, x in enumerate(inputs)]
    probes = (torch.randn(9, 3, dtype=torch.float64), torch.randn(9, 3, 24, dtype=torch.float64))
    results = []
    for fn in (gn.match_terms, terms_reference.match_terms):
        r, J = fn(*leaves, 0.001, 1.0, robust, 3.0)
        wrt = [leaves[i] for i in DIFFERENTIABLE]
        grads = torch.autograd.grad((r * probes[0]).sum() + (J * probes[1]).sum(), wrt)
        results.append((r, J, grads))
    (r, J, grads), (r_ref, J_ref, grads_ref) = results
    assert_close(r, r_ref, atol=1e-12, what="residuals")
    assert_close(J, J_ref, atol=1e-12, what="Jacobian blocks")
    for i, a, b in zip(DIFFERENTIABLE, grads, grads_ref):
        assert_close(a, b, atol=1e-10, rtol=1e-9, what=f"gradient of input {i}")
    if robust != "none":  # the reweighting did something on these inputs
        plain, _ = gn.match_terms(*inputs, 0.001, 1.0, "none", 3.0)
        assert not torch.allclose(plain, r.detach())


def test_match_terms_op_gradcheck():
    inputs = list(random_match_inputs(M=5, A=4, T=3))

    def f(*diff):
        args = list(inputs)
        for i, x in zip(DIFFERENTIABLE, diff):
            args[i] = x
        return gn.match_terms(*args, 0.001, 1.0)

    diff = [inputs[i].clone().requires_grad_(True) for i in DIFFERENTIABLE]
    assert torch.autograd.gradcheck(f, diff)


def test_match_terms_op_rejects_bad_input():
    inputs = list(random_match_inputs())
    bad = list(inputs)
    bad[1] = inputs[1].clone()
    bad[1][3, 2] = 7  # node 7 of 5
    with pytest.raises(RuntimeError, match="match 3 anchor 2: node 7 outside"):
        gn.match_terms(*bad, 0.001, 1.0)
    bad = list(inputs)
    bad[4] = inputs[4][:, :1]
    with pytest.raises(RuntimeError, match="target pixels must be"):
        gn.match_terms(*bad, 0.001, 1.0)
    with pytest.raises(ValueError, match="robust_loss"):
        gn.match_terms(*inputs, 0.001, 1.0, "tukey")


def test_edge_terms_op_equals_reference_and_gradcheck():
    gen = torch.Generator().manual_seed(6)
    T, E = 6, 11
    nodes = torch.randn(T, 3, generator=gen, dtype=torch.float64)
    sources = torch.randint(0, T, (E,), generator=gen)
    targets = (sources + 1 + torch.randint(0, T - 1, (E,), generator=gen)) % T
    R = so3_exp(0.3 * torch.randn(T, 3, generator=gen, dtype=torch.float64)).requires_grad_(True)
    t = (0.1 * torch.randn(T, 3, generator=gen, dtype=torch.float64)).requires_grad_(True)
    w = (0.5 + torch.rand(E, generator=gen, dtype=torch.float64)).requires_grad_(True)
    probes = (torch.randn(E, 3, generator=gen, dtype=torch.float64),
              torch.randn(E, 3, 12, generator=gen, dtype=torch.float64))
    results = []
    for fn in (gn.edge_terms, terms_reference.edge_terms):
        r, J = fn(sources, targets, w, nodes, R, t, 2.0)
        results.append((r, J, torch.autograd.grad((r * probes[0]).sum() + (J * probes[1]).sum(), (w, R, t))))
    (r, J, grads), (r_ref, J_ref, grads_ref) = results
    assert_close(r, r_ref, atol=1e-12, what="residuals")
    assert_close(J, J_ref, atol=1e-12, what="Jacobian blocks")
    for a, b, name in zip(grads, grads_ref, ("weights", "rotations", "translations")):
        assert_close(a, b, atol=1e-12, what=f"gradient w.r.t. {name}")
    assert torch.autograd.gradcheck(lambda w, R, t: gn.edge_terms(sources, targets, w, nodes, R, t, 2.0),
                                    (w, R, t))
    bad = targets.clone()
    bad[4] = T
    with pytest.raises(RuntimeError, match="edge 4 end 1: node 6 outside"):
        gn.edge_terms(sources, bad, w, nodes, R, t, 2.0)


@pytest.mark.parametrize("scale", [0.0, 1e-5, 1e-3, 0.3, 2.0])
def test_left_rotate_equals_rodrigues_with_autograd(scale):
    """The solver's rotation update (analytic backward) against so3_exp @ R differentiated by
    autograd, at zero, in the Taylor branch and at large angles; gradcheck in float64."""
    g = torch.Generator().manual_seed(1)
    w = (scale * torch.randn(6, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    R = so3_exp(torch.randn(6, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(left_rotate, (w, R))
    probe = torch.randn(6, 3, 3, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad((left_rotate(w, R) * probe).sum(), (w, R))
    reference = torch.autograd.grad(((so3_exp(w) @ R) * probe).sum(), (w, R))
    assert_close(left_rotate(w, R), so3_exp(w) @ R, atol=1e-14, what="left_rotate")
    for a, b in zip(ours, reference):
        assert_close(a, b, atol=1e-12, what="left_rotate gradient")
    # float32, any leading shape, and one-line shape errors (the fused op, csrc LeftRotateBody).
    w32, R32 = w.detach().float().reshape(2, 3, 3), R.detach().float().reshape(2, 3, 3, 3)
    assert_close(left_rotate(w32, R32), so3_exp(w32) @ R32, atol=1e-6, what="left_rotate float32")
    with pytest.raises(ValueError, match="expected omega"):
        left_rotate(w32, R32[:1])
    assert_close(left_rotate(w, R), so3_exp(w) @ R, atol=1e-14, what="left_rotate")
