"""The 4D hash-grid residual deformer and its per-pair fit (model/residual.py, docs/DESIGN.md 5.7)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dataset.deepdeform import DeepDeformDataset, collate
from model.residual import ResidualDeformer, fit_residual, geman_mcclure, surface_normals
from model.tracker import Tracker
from options import ResidualOptions, SolverOptions, TrackerOptions
from tests.conftest import REPO, small_synthetic_split
from dataset.io import prediction_paths

# Small and quick: the tests check behaviour, the defaults are tuned for 640x480 frames.
FAST = ResidualOptions(iterations=60, time_budget=0, points=2048)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return small_synthetic_split(tmp_path_factory, "synthetic_residual", 2, 11)


@pytest.fixture(scope="module")
def tracked(split):
    """Both pairs of the split as one batch, tracked with the ground-truth flow."""
    dataset = DeepDeformDataset(split, "test")
    batch = collate([dataset[0], dataset[1]])
    with torch.inference_mode():
        out = Tracker(TrackerOptions(flow="gt"), SolverOptions(iterations=5)).eval()(batch)
    assert bool(out["solver"].valid.all())
    return batch, out


@pytest.fixture(scope="module")
def fitted(tracked):
    batch, out = tracked
    return fit_residual(batch, out, FAST)


def _deformer(**overrides):
    options = ResidualOptions(**{"log2_table_size": 12, **overrides})
    return ResidualDeformer(torch.tensor([-0.3, -0.2, 0.8]), torch.tensor([0.3, 0.2, 1.2]), options,
                            torch.Generator().manual_seed(0))


def _points(n=500):
    generator = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, generator=generator) * torch.tensor([0.6, 0.4, 0.4]) + torch.tensor([-0.3, -0.2, 0.8])


def test_deformer_shapes_bounded_and_zero_at_t0():
    deformer = _deformer(max=0.02)
    points = _points()
    residual = deformer(points, 1.0)
    assert residual.shape == (500, 3) and residual.dtype == torch.float32
    assert torch.equal(deformer(points, 0.0), torch.zeros(500, 3))
    # Per-point times: the rows at t = 0 are exactly zero, the others follow t.
    t = torch.rand(500, generator=torch.Generator().manual_seed(2))
    t[::3] = 0
    per_point = deformer(points, t)
    assert torch.equal(per_point[::3], torch.zeros_like(per_point[::3]))
    # However large the network's output, every component stays below the bound.
    with torch.no_grad():
        deformer.mlp[-1].weight.mul_(1e6)
        deformer.encoder.table.uniform_(-1, 1)
    saturated = deformer(points, 1.0)
    assert saturated.abs().max() <= 0.02 and saturated.abs().max() > 0.019
    assert torch.equal(deformer(points, 0.0), torch.zeros(500, 3))
    # Points far outside the box are clamped into it, not an error.
    assert torch.isfinite(deformer(points * 10, 1.0)).all()
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        deformer(points[:, :2], 1.0)
    with pytest.raises(ValueError, match="min <= max"):
        ResidualDeformer(torch.ones(3), torch.zeros(3))


def test_normalised_input_covers_the_object_in_unit_cube():
    deformer = _deformer(margin=0.05)
    corners = torch.tensor([[-0.3, -0.2, 0.8], [0.3, 0.2, 1.2]])
    x = deformer.normalise(corners, 0.5)
    assert x.shape == (2, 4) and bool((x > 0).all()) and bool((x < 1).all())
    assert torch.allclose(x[:, 3], torch.full((2,), 0.5))
    # A cube, so that hash cells are cubes: the same scale on every axis.
    side = 0.6 + 2 * 0.05
    assert torch.allclose(x[1, :3] - x[0, :3], torch.tensor([0.6, 0.4, 0.4]) / side)


def test_gradients_reach_the_table_and_every_layer():
    deformer = _deformer()
    points = _points().requires_grad_()
    (deformer(points, 0.7) ** 2).sum().backward()
    assert deformer.encoder.table.grad is not None and deformer.encoder.table.grad.abs().sum() > 0
    linears = [m for m in deformer.mlp if isinstance(m, torch.nn.Linear)]
    assert len(linears) == ResidualOptions().layers + 1
    for layer in linears:
        assert layer.weight.grad.abs().sum() > 0 and layer.bias.grad.abs().sum() > 0
    assert points.grad.abs().sum() > 0
    # ... and a step of the fit's optimiser changes the residual.
    before = deformer(points.detach(), 1.0).detach()
    torch.optim.Adam(deformer.parameters(), lr=1e-2).step()
    assert not torch.equal(before, deformer(points.detach(), 1.0).detach())


def test_geman_mcclure_and_normals():
    e2 = torch.tensor([0.0, 1e-4, 1.0, 1e6])
    rho = geman_mcclure(e2, 1.0)
    assert rho[0] == 0 and torch.isclose(rho[1], torch.tensor(1e-4), rtol=1e-3) and rho[-1] < 1.0
    # A tilted plane z = 1 + 0.5 x: the normal is (0.5, 0, -1) normalised, up to its sign.
    ys, xs = torch.meshgrid(torch.linspace(-0.08, 0.08, 9), torch.linspace(-0.1, 0.1, 11), indexing="ij")
    points = torch.stack((xs, ys, 1 + 0.5 * xs))[None]
    normals, valid = surface_normals(points)
    assert not valid[0, 0].any() and not valid[0, :, 0].any() and valid[0, 1:-1, 1:-1].all()
    expected = torch.tensor([0.5, 0.0, -1.0]) / np.sqrt(1.25)
    inner = normals[0, :, 1:-1, 1:-1].reshape(3, -1).T
    assert torch.allclose((inner @ expected).abs(), torch.ones(len(inner)), atol=1e-5)


def test_fit_outputs(tracked, fitted):
    batch, out = tracked
    B, _, H, W = batch["source_points"].shape
    assert fitted["warped_points"].shape == (B, H, W, 3) and fitted["scene_flow"].shape == (B, 3, H, W)
    mask = out["warp_mask"]
    assert torch.isfinite(fitted["warped_points"][mask]).all()
    assert torch.isnan(fitted["warped_points"][~mask]).all()
    flow = fitted["scene_flow"].permute(0, 2, 3, 1)
    assert torch.isnan(flow[~mask]).all()
    source = batch["source_points"].permute(0, 2, 3, 1)
    assert torch.allclose(flow[mask], fitted["warped_points"][mask] - source[mask])
    # The refinement is the graph warp plus a bounded residual.
    residual = fitted["warped_points"][mask] - out["warped_points"][mask]
    assert torch.allclose(residual, fitted["residual"][mask], atol=1e-6)
    assert residual.abs().max() <= FAST.max + 1e-6 and residual.abs().max() > 1e-4
    for stats in fitted["stats"]:
        assert stats["iterations"] == FAST.iterations and stats["points"] > 1000
        assert set(stats["losses"]) == {"plane", "color", "match", "magnitude", "smoothness", "total"}


def _point_to_plane_mm(batch, points, mask):
    """Median |point-to-plane distance| (mm) of each sample's points to the target surface at
    their projection (nearest pixel, plane of its normal), over projections with a normal."""
    normals, valid = surface_normals(batch["target_points"])
    fx, fy, cx, cy = batch["intrinsics"].unbind(dim=1)
    medians = []
    for b in range(points.shape[0]):
        p = points[b][mask[b]]
        u = (fx[b] * p[:, 0] / p[:, 2] + cx[b]).round().long()
        v = (fy[b] * p[:, 1] / p[:, 2] + cy[b]).round().long()
        H, W = valid.shape[1:]
        inside = (u >= 0) & (u < W) & (v >= 0) & (v < H)
        u, v, p = u[inside], v[inside], p[inside]
        ok = valid[b, v, u]
        target = batch["target_points"][b, :, v, u].T
        distance = ((p - target) * normals[b, :, v, u].T).sum(dim=1)[ok]
        medians.append(1000 * float(distance.abs().median()))
    return medians


def test_fit_brings_points_onto_the_target_surface(tracked, fitted):
    batch, out = tracked
    before = _point_to_plane_mm(batch, out["warped_points"], out["warp_mask"])
    after = _point_to_plane_mm(batch, fitted["warped_points"], out["warp_mask"])
    # The raw target depth is noisy (about 1 mm here), which bounds what any fit can reach, so
    # every pair must get closer, and the pairs together by at least 10 %.
    assert all(a < 0.97 * b for a, b in zip(after, before)), (before, after)
    assert sum(after) < 0.9 * sum(before), (before, after)


def _epe(batch, out, scene_flow):
    """Pooled EPE 3D in mm (ground truth is read here, for evaluation only)."""
    gt = batch["scene_flow"]
    mask = out["warp_mask"] & torch.isfinite(gt).all(dim=1)
    errors = (scene_flow - gt).permute(0, 2, 3, 1)[mask].norm(dim=1)
    return 1000 * float(errors.mean())


def test_refined_epe_lower_than_graph_warp(tracked, fitted):
    batch, out = tracked
    graph, refined = _epe(batch, out, out["scene_flow"]), _epe(batch, out, fitted["scene_flow"])
    assert refined < 0.95 * graph, (graph, refined)


def test_fit_does_not_read_ground_truth(tracked, fitted):
    batch, out = tracked
    blind = {k: v for k, v in batch.items() if k not in ("scene_flow", "optical_flow", "node_deformations")}
    again = fit_residual(blind, out, FAST)
    assert torch.equal(torch.nan_to_num(again["scene_flow"]), torch.nan_to_num(fitted["scene_flow"]))


def test_time_budget_is_respected(tracked):
    batch, out = tracked
    fit_residual(batch, out, ResidualOptions(iterations=1))   # first-call costs out
    options = ResidualOptions(iterations=100000, time_budget=0.5)
    fit = fit_residual(batch, out, options)
    for stats in fit["stats"]:
        # The budget, not the iteration count, ended the fit, after at least one step (however
        # long the setup took: no bound on wall time, which depends on the machine's load).
        assert 1 <= stats["iterations"] < 100000 and stats["seconds"] >= 0.5


def test_generate_with_residual(split, tmp_path):
    def run(out, *extra):
        return subprocess.run([sys.executable, os.path.join(REPO, "generate.py"), "--dataset-dir", split,
                               "--split", "test", "--out", str(out), "--flow", "gt", "--quiet",
                               "--threads", "1", *extra], capture_output=True, text=True, cwd=REPO)

    plain = run(tmp_path / "graph")
    assert plain.returncode == 0, plain.stderr
    refined = run(tmp_path / "refined", "--residual", "--residual-iterations", "30",
                  "--residual-points", "2048")
    assert refined.returncode == 0, refined.stderr
    assert "residual deformer: 2 pair(s) refined" in refined.stdout
    from dataset import io

    dataset = DeepDeformDataset(split, "test")
    for index in range(len(dataset)):
        name = dataset.name(index)
        (nodes_a, flow_a), (nodes_b, flow_b) = (prediction_paths(str(tmp_path / d), name)
                                                for d in ("graph", "refined"))
        # Node translations stay the graph's; the scene flow includes the residual.
        assert np.array_equal(io.read_graph_node_deformations(nodes_a), io.read_graph_node_deformations(nodes_b))
        graph_flow, refined_flow = io.read_flow(flow_a), io.read_flow(flow_b)
        assert np.array_equal(np.isfinite(graph_flow), np.isfinite(refined_flow))
        finite = np.isfinite(graph_flow)
        difference = np.abs(graph_flow[finite] - refined_flow[finite])
        assert difference.max() > 1e-4 and difference.max() <= ResidualOptions().max + 1e-5
    with open(tmp_path / "refined" / "generate_test_shard0of1.json") as f:
        record = json.load(f)
    assert set(record["residual"]["seconds"]) == {dataset.name(i) for i in range(len(dataset))}
    assert record["residual"]["options"]["residual_iterations"] == 30


def test_demo_renders_the_refined_alignment(tmp_path):
    import cv2

    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    result = subprocess.run([sys.executable, os.path.join(REPO, "example_viz.py"), "--headless", "--out",
                             str(tmp_path), "--flow", "dis", "--residual", "--residual-iterations", "30",
                             "--residual-time-budget", "0"],
                            capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("EPE 3D"))
    assert "refined by the residual deformer" in line
    aligned = cv2.imread(str(tmp_path / "aligned.png")).astype(np.float32)
    refined = cv2.imread(str(tmp_path / "aligned_refined.png")).astype(np.float32)
    assert refined.shape == aligned.shape and refined.std() > 20
    # The same view of the same scene, with the object moved by the residual.
    assert 0 < np.abs(refined - aligned).mean() < 20
