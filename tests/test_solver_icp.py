"""The dense point-to-plane term of the solver (SolverOptions.icp_weight): its Jacobian blocks
against autograd and finite differences in float64, and solves that use it."""
import dataclasses

import torch

from model import solver as gn
from model.solver.terms import icp_terms
from model.warp import so3_exp
from options import SolverOptions
from tests.conftest import assert_close
from tests.solver_problems import angle_error, make_problem, to_solver_problem


def _random_icp(M=9, N=6, A=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d = torch.float64
    nodes = torch.randn(N, 3, generator=gen, dtype=d) * 0.1 + torch.tensor([0, 0, 1.0], dtype=d)
    anchors = torch.stack([torch.randperm(N, generator=gen)[:A] for _ in range(M)])
    anchor_weights = torch.softmax(torch.randn(M, A, generator=gen, dtype=d), dim=1)
    points = torch.randn(M, 3, generator=gen, dtype=d) * 0.1 + torch.tensor([0, 0, 1.0], dtype=d)
    normals = torch.nn.functional.normalize(torch.randn(M, 3, generator=gen, dtype=d), dim=1)
    targets = points + 0.01 * torch.randn(M, 3, generator=gen, dtype=d)
    weights = torch.rand(M, generator=gen, dtype=d)
    R = so3_exp(0.2 * torch.randn(N, 3, generator=gen, dtype=d))
    t = 0.02 * torch.randn(N, 3, generator=gen, dtype=d)
    return nodes, anchors, anchor_weights, points, normals, targets, weights, R, t


def _terms(nodes, anchors, anchor_weights, points, normals, targets, weights, R, t, jacobians=True):
    return icp_terms(points, anchors, anchor_weights, nodes, targets, normals, weights, R, t, 7.0, jacobians)


def _residual_of_increment(data, delta):
    """Residuals with every node's motion updated by delta (N, 6): R <- exp(dw) R, t <- t + dt."""
    nodes, anchors, anchor_weights, points, normals, targets, weights, R, t = data
    return _terms(nodes, anchors, anchor_weights, points, normals, targets, weights,
                  so3_exp(delta[:, :3]) @ R, t + delta[:, 3:], jacobians=False)[0]


def _dense(J, anchors, N):
    """(M, 1, 6A) blocks -> (M, 6N) dense Jacobian rows."""
    M, A = anchors.shape
    dense = torch.zeros(M, N, 6, dtype=J.dtype)
    blocks = J.reshape(M, A, 6)
    for k in range(A):
        dense[torch.arange(M), anchors[:, k]] += blocks[:, k]
    return dense.reshape(M, 6 * N)


def test_icp_jacobian_equals_autograd_and_finite_differences():
    data = _random_icp()
    N = data[0].shape[0]
    r, J = _terms(*data)
    assert r.shape == (9, 1) and J.shape == (9, 1, 24)
    zero = torch.zeros(N, 6, dtype=torch.float64)
    auto = torch.autograd.functional.jacobian(lambda x: _residual_of_increment(data, x)[:, 0], zero)
    ours = _dense(J, data[1], N)
    assert_close(ours, auto.reshape(9, 6 * N), atol=1e-12, what="Jacobian vs autograd")
    eps = 1e-6
    fd = torch.zeros_like(ours)
    for j in range(6 * N):
        step = torch.zeros(N * 6, dtype=torch.float64)
        step[j] = eps
        fd[:, j] = ((_residual_of_increment(data, step.reshape(N, 6))
                     - _residual_of_increment(data, -step.reshape(N, 6)))[:, 0] / (2 * eps))
    assert_close(ours, fd, atol=1e-8, what="Jacobian vs finite differences")
    # The residual is sqrt(weight) c n . (x' - y).
    nodes, anchors, w, points, normals, targets, weights, R, t = data
    warped = (w[..., None] * (torch.einsum("maij,maj->mai", R[anchors], points[:, None] - nodes[anchors])
                              + nodes[anchors] + t[anchors])).sum(dim=1)
    assert_close(r[:, 0], 7.0 ** 0.5 * weights * ((warped - targets) * normals).sum(dim=1), atol=1e-14,
                 what="residuals")


def test_icp_terms_gradcheck():
    nodes, anchors, w, points, normals, targets, weights, R, t = _random_icp(M=4, N=5, seed=2)
    leaves = tuple(x.clone().requires_grad_(True) for x in (targets, normals, weights, R, t))

    def run(targets, normals, weights, R, t):
        return _terms(nodes, anchors, w, points, normals, targets, weights, R, t)

    assert torch.autograd.gradcheck(run, leaves, eps=1e-6, atol=1e-6)


def _surface_normals(points):
    """Unit normals of make_problem's surface z = 1 + 0.05 sin(6x) cos(5y) at (P, 3) points."""
    x, y = points[:, 0], points[:, 1]
    dzdx = 0.3 * torch.cos(6 * x) * torch.cos(5 * y)
    dzdy = -0.25 * torch.sin(6 * x) * torch.sin(5 * y)
    return torch.nn.functional.normalize(torch.stack((-dzdx, -dzdy, torch.ones_like(x)), 1), dim=1)


def _with_icp(problem, p, normals, weights=None):
    M = p["points"].shape[0]
    return dataclasses.replace(
        problem, icp_sample=torch.zeros(M, dtype=torch.int64), icp_source_points=p["points"],
        icp_anchors=p["anchors"], icp_anchor_weights=p["anchor_weights"], icp_target_points=p["warped_gt"],
        icp_target_normals=normals, icp_weights=torch.ones(M, dtype=torch.float64) if weights is None else weights)


def _options(**changes):
    base = SolverOptions(remove_clusters=False, convergence_tolerance=0.0, robust_loss="none")
    return dataclasses.replace(base, **changes)


def test_point_to_plane_alone_recovers_a_rigid_motion():
    # No flow and no depth term: the point-to-plane residuals against the true warped points
    # and normals of the wavy surface pin all six degrees of freedom.
    p = make_problem(rigid=True, rotation=0.05, translation=0.02, seed=1)
    normals = (p["rotations_gt"][0] @ _surface_normals(p["points"]).T).T
    problem = _with_icp(to_solver_problem([p]), p, normals)
    options = _options(iterations=15, flow_weight=0.0, depth_weight=0.0, icp_weight=1.0, lm_damping=1e-6)
    result = gn.solve(problem, options)
    assert result.status == ["max_iterations"]
    assert (result.translations[0] - p["translations_gt"]).abs().max() < 1e-6
    assert angle_error(result.rotations[0], p["rotations_gt"]).max() < 1e-5
    energies = result.energies[0]
    assert energies[-1] < 1e-16
    # The first energy is the data energy at the identity motion: sum (n . (x - y))^2.
    expected = float((((p["points"] - p["warped_gt"]) * normals).sum(dim=1) ** 2).sum())
    assert expected > 1e-6 and abs(result.data_energies[0][0] - expected) < 1e-12 * max(1.0, expected)
    # Without the term the same problem has no data and nothing moves.
    off = gn.solve(problem, dataclasses.replace(options, icp_weight=0.0))
    assert off.translations.abs().max() < 1e-12


def test_point_to_plane_off_leaves_the_solve_unchanged_and_on_fits_depth():
    p = make_problem(seed=3)
    normals = _surface_normals(p["points"])  # not the warped ones: the term disagrees a little
    plain = to_solver_problem([p])
    with_icp = _with_icp(plain, p, normals)
    a = gn.solve(plain, _options(iterations=3))
    b = gn.solve(with_icp, _options(iterations=3))
    assert_close(b.translations, a.translations, atol=0, what="icp_weight 0")
    c = gn.solve(with_icp, _options(iterations=3, icp_weight=10.0))
    assert c.status == ["max_iterations"] and (c.translations - a.translations).abs().max() > 1e-9
    assert c.data_energies[0][0] > a.data_energies[0][0]   # the term adds to the data energy


def test_point_to_plane_terms_robust_and_invalid_terms_dropped():
    p = make_problem(rigid=True, rotation=0.03, translation=0.01, seed=5)
    normals = (p["rotations_gt"][0] @ _surface_normals(p["points"]).T).T
    problem = _with_icp(to_solver_problem([p]), p, normals)
    gen = torch.Generator().manual_seed(0)
    bad = torch.rand(p["points"].shape[0], generator=gen) < 0.15
    targets = problem.icp_target_points.clone()
    targets[bad] += 0.05 * normals[bad]
    anchors = problem.icp_anchors.clone()
    anchors[:3, 0] = -1          # no anchor: dropped
    targets[3:5] = float("nan")  # not finite: dropped
    problem = dataclasses.replace(problem, icp_target_points=targets, icp_anchors=anchors)
    errors = {}
    for loss in ("none", "cauchy"):
        out = gn.solve(problem, _options(iterations=10, flow_weight=0.0, depth_weight=0.0, icp_weight=1.0,
                                         lm_damping=1e-6, robust_loss=loss, icp_robust_scale=0.005))
        assert out.status != ["failed"] and torch.isfinite(out.translations).all()
        errors[loss] = float((out.translations[0] - p["translations_gt"]).norm(dim=1).mean())
    assert errors["cauchy"] < 0.3 * errors["none"], errors


def test_point_to_plane_with_the_sparse_solver_matches_dense():
    p = make_problem(seed=7)
    problem = _with_icp(to_solver_problem([p]), p, _surface_normals(p["points"]))
    dense = gn.solve(problem, _options(iterations=3, icp_weight=5.0, linear_solver="dense"))
    sparse = gn.solve(problem, _options(iterations=3, icp_weight=5.0, linear_solver="sparse",
                                        cg_tolerance=1e-12))
    assert_close(sparse.translations, dense.translations, atol=1e-9, what="sparse vs dense")
