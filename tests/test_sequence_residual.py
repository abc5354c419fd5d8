"""The residual field over a whole sequence (model/sequence_residual.py, fusion/residual.py) and
the oracle graph-only reconstruction it is tested on (fusion/oracle.py)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from dataset import io
from fusion.oracle import node_procrustes, write_oracle
from fusion.residual import ResidualError, build_data, fit, load_inputs, new_field, run_residual
from model.residual import ResidualDeformer
from model.sequence_residual import mesh_neighbours, residuals, sequence_losses
from model.warp import so3_exp, warp_points
from options import SequenceResidualOptions
from tests.conftest import REPO, assert_close
from tests.sequence_scene import accuracy_mm, write_sheet_sequence

# Small and quick; the defaults are for 40 frames of 640x480.
FAST = SequenceResidualOptions(iterations=80, frames_per_step=3, points=512, checkpoint_every=40)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    root = tmp_path_factory.mktemp("sequence_residual")
    sequence = write_sheet_sequence(str(root / "sequence"), frames=6)
    out = str(root / "oracle")
    write_oracle(sequence, out, 0.05, log=lambda *_: None)
    return sequence, out


def _copy(out, tmp_path):
    target = str(tmp_path / "reconstruction")
    shutil.copytree(out, target)
    return target


def test_node_procrustes_recovers_node_motions():
    """Vertices moved by a known graph warp give back those node motions."""
    generator = torch.Generator().manual_seed(0)
    canonical = torch.rand(400, 3, generator=generator, dtype=torch.float64).float()
    nodes = canonical[:12]
    anchors = torch.cdist(canonical, nodes).topk(4, largest=False).indices
    weights = torch.full((400, 4), 0.25)
    rotations = so3_exp(0.3 * torch.randn(2, 12, 3, generator=generator))
    translations = 0.05 * torch.randn(2, 12, 3, generator=generator)
    # One motion per node shared by all its vertices is only consistent when every vertex's
    # anchors agree: give all nodes the same motion per frame.
    rotations[:] = rotations[:, :1]
    translations[:] = translations[:, :1] + (rotations[:, :1] @ nodes[None, :, :, None])[..., 0] \
        - (rotations[:, :1] @ nodes[None, :1, :, None])[..., 0] - nodes[None] + nodes[None, :1]
    targets = torch.stack([warp_points(canonical, anchors, weights, nodes, rotations[t], translations[t])
                           for t in range(2)])
    R, t = node_procrustes(canonical, targets, nodes, anchors, weights)
    assert_close(R, rotations, atol=1e-4, what="rotations")
    assert_close(t, translations, atol=1e-4, what="translations")


def test_oracle_reconstruction_contract(oracle):
    sequence, out = oracle
    canonical, faces = io.read_ply(os.path.join(out, "canonical.ply"))
    assert faces.shape[1] == 3
    names = sorted(os.listdir(os.path.join(out, "frames")))
    assert names == [f"{t:06d}.ply" for t in range(6)]
    for name in names:
        vertices, frame_faces = io.read_ply(os.path.join(out, "frames", name))
        assert vertices.shape == canonical.shape and np.array_equal(frame_faces, faces)
        assert np.isfinite(vertices).all()
    with np.load(os.path.join(out, "nodes.npz")) as nodes:
        N = nodes["positions"].shape[0]
        assert nodes["rotations"].shape == (6, N, 3, 3) and nodes["translations"].shape == (6, N, 3)
        assert nodes["vertex_anchors"].shape == (canonical.shape[0], 4)
        assert_close(nodes["rotations"][0], np.tile(np.eye(3), (N, 1, 1)), atol=1e-4,
                     what="frame-0 rotations")
    assert json.load(open(os.path.join(out, "fusion_options.json")))["sequence"] == os.path.abspath(sequence)
    # The first frame is the true surface; later frames miss the wrinkles the nodes cannot hold.
    errors = accuracy_mm(out, sequence, "frames")
    assert errors[0] < 0.05 and errors[1:].mean() > 0.5, errors


def test_mesh_neighbours():
    offsets, neighbours = mesh_neighbours(torch.tensor([[0, 1, 2], [1, 3, 2]]), 5)
    lists = [neighbours[offsets[v]:offsets[v + 1]].tolist() for v in range(5)]
    assert lists == [[1, 2], [0, 2, 3], [0, 1, 3], [1, 2], []]


def test_field_is_the_identity_before_fitting(oracle):
    """refined == graph-only before any step, exactly, pinned at the first frame or not."""
    _, out = oracle
    inputs = load_inputs(out, oracle[0])
    for pin in (False, True):
        options = SequenceResidualOptions(pin_reference=pin)
        data = build_data(inputs, options)
        field = new_field(data, options, torch.Generator().manual_seed(0))
        assert torch.equal(residuals(field, data), torch.zeros_like(data.warped))


def test_field_gradcheck_float64():
    """Gradients of the sequence field (hash kernel, MLP, tanh bound, reference pin) with respect
    to the points and every parameter, in float64."""
    options = SequenceResidualOptions(levels=2, log2_table_size=6, hidden=4, layers=1, max_resolution=8)
    field = ResidualDeformer(torch.tensor([-0.2, -0.2, 0.9]), torch.tensor([0.2, 0.2, 1.1]), options,
                             torch.Generator().manual_seed(0), pinned=False, reference_time=0.0).double()
    with torch.no_grad():   # give the zero-initialised last layer weights, so every path is live
        field.mlp[-1].weight.normal_(0, 1, generator=torch.Generator().manual_seed(1))
        field.encoder.table.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    points = (torch.rand(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 0.3
              + torch.tensor([-0.15, -0.15, 0.85], dtype=torch.float64)).requires_grad_()
    times = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: field(p, times), (points,), eps=1e-6, atol=1e-5)
    names = ["encoder.table"] + [f"mlp.{n}" for n, _ in field.mlp.named_parameters()]
    values = tuple(field.state_dict()[n].detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(
        lambda *v: torch.func.functional_call(field, dict(zip(names, v)), (points.detach(), times)),
        values, eps=1e-6, atol=1e-5)
    assert torch.equal(field(points.detach(), 0.0), torch.zeros(5, 3, dtype=torch.float64))


def test_losses_are_finite_and_reach_the_field(oracle):
    sequence, out = oracle
    data = build_data(load_inputs(out, sequence), FAST)
    field = new_field(data, FAST, torch.Generator().manual_seed(0))
    frames, chosen, neighbours = data.draw(FAST, torch.Generator().manual_seed(1))
    assert frames.numel() == 3 and chosen.shape == (3, 512)
    for b, t in enumerate(frames.tolist()):
        assert bool(torch.isin(chosen[b], data.visible[t]).all())
    terms = sequence_losses(field, data, frames, chosen, neighbours, FAST)
    assert set(terms) == {"plane", "color", "magnitude", "smoothness", "temporal"}
    assert all(bool(torch.isfinite(v)) for v in terms.values())
    # Before the fit the residual is 0, so its own terms are 0 and the data terms are not.
    terms = {k: float(v.detach()) for k, v in terms.items()}
    assert terms["magnitude"] == 0 and terms["temporal"] == 0 and terms["plane"] > 0


def test_fit_improves_accuracy_over_the_oracle_graph(oracle, tmp_path):
    """Never reading ground truth, the field recovers the wrinkles the graph cannot express."""
    sequence, out = oracle
    out = _copy(out, tmp_path)
    summary = run_residual(out, None, FAST, progress=False, log=lambda *_: None)
    before = accuracy_mm(out, sequence, "frames")
    after = accuracy_mm(out, sequence, "frames_refined")
    assert after[1:].mean() < 0.7 * before[1:].mean(), (before, after)
    assert summary["mean_plane_error_mm"]["refined"] < summary["mean_plane_error_mm"]["graph"]
    assert summary["temporal_jitter_mm"] < summary["graph_motion_per_frame_mm"]
    for name in ("residual.pt", "residual_errors.png", "residual_summary.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert os.listdir(os.path.join(out, "residual_tensorboard"))
    refined, faces = io.read_ply(os.path.join(out, "frames_refined", "000003.ply"))
    assert np.array_equal(faces, io.read_ply(os.path.join(out, "canonical.ply"))[1])


def test_pinned_reference_keeps_the_first_frame(oracle, tmp_path):
    sequence, out = oracle
    options = SequenceResidualOptions(**{**FAST.__dict__, "iterations": 10, "pin_reference": True})
    data = build_data(load_inputs(out, sequence), options)
    field, _ = fit(data, options, [str(t) for t in range(6)], progress=False, log=lambda *_: None)
    d = residuals(field, data)
    assert torch.equal(d[0], torch.zeros_like(d[0])) and float(d[1:].abs().max()) > 0


def test_resume_continues_exactly(oracle, tmp_path):
    """An interrupted fit resumed from OUT/residual.pt ends where an uninterrupted one does."""
    sequence, out = oracle
    options = SequenceResidualOptions(**{**FAST.__dict__, "iterations": 6, "checkpoint_every": 3})
    data = build_data(load_inputs(out, sequence), options)
    names = [str(t) for t in range(6)]
    whole, _ = fit(data, options, names, str(tmp_path / "a.pt"), progress=False, log=lambda *_: None)
    path = str(tmp_path / "b.pt")
    fit(data, options, names, path, progress=False, stop_after=3, log=lambda *_: None)
    assert torch.load(path, weights_only=True)["iteration"] == 3
    resumed, stats = fit(data, options, names, path, resume=True, progress=False, log=lambda *_: None)
    assert stats["iterations"] == 6 and stats["steps_this_run"] == 3
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ResidualError, match="other frames"):
        fit(data, options, names[:5] + ["x"], path, resume=True, progress=False, log=lambda *_: None)


def test_bad_inputs_are_one_line_errors(oracle, tmp_path):
    sequence, out = oracle
    with pytest.raises(ResidualError, match="frames"):
        load_inputs(str(tmp_path), sequence)
    broken = _copy(out, tmp_path)
    os.remove(os.path.join(broken, "frames", "000002.ply"))
    shutil.copy(os.path.join(sequence, "gt", "gt.npz"), os.path.join(broken, "frames", "000002.ply"))
    with pytest.raises(Exception, match="000002.ply"):
        load_inputs(broken, sequence)
    result = subprocess.run([sys.executable, "-m", "fusion.residual", "--out", str(tmp_path / "missing")],
                            cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "missing" in result.stderr


def test_fit_improves_the_generators_detail_sequence(tmp_path):
    """On the sequence generator's --detail wrinkles (6 frames at 320x240), scored by the
    sequence scorer: the refined meshes are more accurate than the oracle graph's."""
    from dataset.synthetic_sequence import generate_sequence
    from options import SequenceOptions
    from utils.sequence_metrics import evaluate_sequence

    sequence = str(tmp_path / "sequence")
    generate_sequence(SequenceOptions(out=sequence, frames=6, seed=1, detail=True, width=320, height=240),
                      progress=False)
    out = str(tmp_path / "oracle")
    write_oracle(sequence, out, 0.05, log=lambda *_: None)
    run_residual(out, None, FAST, progress=False, log=lambda *_: None)
    before = evaluate_sequence(sequence, out)
    after = evaluate_sequence(sequence, out, "frames_refined")
    assert after.accuracy < 0.85 * before.accuracy, (before.accuracy, after.accuracy)
    # The bar for the deformation error (its first frames are exact in the oracle, below
    # the noise floor of any fit to depth, so it need not fall on 6 frames).
    assert after.deformation_error < 1.05 * before.deformation_error


def test_fuse_hook_runs_only_when_asked(oracle, tmp_path):
    """fuse.py's --residual / --residual-only: the flags and the hook it calls after fusion."""
    import argparse

    from fusion.residual import add_fuse_flags, residual_after_fusion

    sequence, out = oracle
    out = _copy(out, tmp_path)
    parser = argparse.ArgumentParser()
    add_fuse_flags(parser)
    assert residual_after_fusion(parser.parse_args([]), out, sequence, False, "cpu", False) is None
    assert not os.path.isdir(os.path.join(out, "frames_refined"))
    args = parser.parse_args(["--residual-only", "--residual-iterations", "4", "--residual-points", "64"])
    summary = residual_after_fusion(args, out, sequence, False, "cpu", False, log=lambda *_: None)
    assert summary["iterations"] == 4 and len(os.listdir(os.path.join(out, "frames_refined"))) == 6


def test_fuse_residual_only_reads_the_recorded_sequence(oracle, tmp_path):
    """`fuse.py --out OUT --residual-only` needs no --sequence (OUT/fusion_options.json names it);
    without --residual-only, --sequence stays required."""
    import subprocess
    import sys

    from tests.conftest import REPO

    _, out = oracle
    out = _copy(out, tmp_path)
    run = [sys.executable, os.path.join(REPO, "fuse.py"), "--out", out, "--quiet"]
    done = subprocess.run(run + ["--residual-only", "--residual-iterations", "3", "--residual-points", "64"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert len(os.listdir(os.path.join(out, "frames_refined"))) == 6
    for picture in ("preview_refined.png", "fusion_refined.mp4"):
        assert os.path.getsize(os.path.join(out, picture)) > 1000, picture
    refused = subprocess.run(run, capture_output=True, text=True, cwd=REPO)
    assert refused.returncode == 2 and "--sequence" in refused.stderr
