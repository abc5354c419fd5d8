"""The hybrid front-end (DIS + PWC-Net blended and weighted by a learned head): features and
priors, gradients, checkpoints, the photo textures of its training data, and a tiny training run
of stage 4_hybrid that resumes."""
import dataclasses
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dataset.deepdeform import DeepDeformDataset, collate
from dataset.synthetic import generate
from dataset.synthetic.textures import object_texture, photo_texture, procedural_texture
from model.hybrid import FEATURE_CHANNELS, HybridHead, blend, hybrid_features
from model.correspondences import pixel_grid
from model.tracker import Tracker, solved_flow
from options import SolverOptions, SyntheticOptions, TrackerOptions
from tests.conftest import REPO, small_synthetic_split
from utils.checkpoints import load_tracker, save_checkpoint
from utils.curves import main as curves_main, read_scalars


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return small_synthetic_split(tmp_path_factory, "hybrid_data", 2, 23)


def _flows(B=1, H=24, W=32, shift=(1.5, -0.5)):
    """A constant flow, its exact backward flow, and colour / depth frames it maps onto each other."""
    forward = torch.empty(B, 2, H, W)
    forward[:, 0], forward[:, 1] = shift
    torch.manual_seed(1)
    source = torch.rand(B, 3, H, W)
    depth = torch.full((B, H, W), 1.5)
    return forward, -forward, source, depth


def test_features_shapes_and_priors():
    forward, backward, source, depth = _flows()
    anchored = torch.ones(1, 24, 32, dtype=torch.bool)
    bad = forward.clone()
    bad[..., :16] += 9.0   # a second flow whose backward check fails on the left half
    features, prior_a, prior_w = hybrid_features(source, source, depth, depth, forward, backward,
                                                 bad, backward, anchored)
    assert features.shape == (1, FEATURE_CHANNELS, 24, 32) and torch.isfinite(features).all()
    assert prior_a.shape == prior_w.shape == (1, 24, 32)
    inner = (slice(None), slice(2, -2), slice(2, -11))   # matches inside the image for both flows
    # DIS (the first flow) is consistent: the rule takes it.
    assert (prior_a[inner] > 0).all()
    # The roles swapped: DIS inconsistent, PWC-Net consistent, the rule takes PWC-Net.
    _, prior_b, _ = hybrid_features(source, source, depth, depth, bad, backward, forward, backward, anchored)
    assert (prior_b[:, 2:-2, 2:12] < 0).all() and (prior_b[:, 2:-2, 18:-4] > 0).all()
    # A check that fails (almost) everywhere failed as a whole, and is not used.
    _, prior_c, _ = hybrid_features(source, source, depth, depth, forward + 9.0, backward, forward,
                                    backward, anchored)
    assert (prior_c > 0).all()
    assert ((prior_w > 0) & (prior_w < 1)).all()


def test_an_untrained_head_is_the_rule():
    forward, backward, source, depth = _flows()
    anchored = torch.ones(1, 24, 32, dtype=torch.bool)
    pwc = forward + 0.7
    features, prior_a, prior_w = hybrid_features(source, source, depth, depth, forward, backward,
                                                 pwc, -pwc, anchored)
    flow, weights, a = blend(HybridHead(), features, prior_a, prior_w, forward, pwc)
    assert torch.allclose(a, torch.sigmoid(prior_a))
    assert torch.allclose(weights, prior_w, atol=1e-6)
    assert torch.allclose(flow, a[:, None] * forward + (1 - a[:, None]) * pwc)


def test_blend_gradients():
    """Plain autograd (no custom backward), checked in float64 against finite differences, with
    respect to the head's input and both flows."""
    torch.manual_seed(2)
    head = HybridHead(width=4).double()
    torch.nn.init.normal_(head.layers[-1].weight, std=0.3)
    features = torch.randn(1, FEATURE_CHANNELS, 6, 7, dtype=torch.float64, requires_grad=True)
    prior_a = torch.randn(1, 6, 7, dtype=torch.float64)
    prior_w = torch.rand(1, 6, 7, dtype=torch.float64) * 0.9 + 0.05
    dis = torch.randn(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    pwc = torch.randn(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)

    def run(f, d, p):
        flow, weights, _ = blend(head, f, prior_a, prior_w, d, p)
        return flow, weights

    assert torch.autograd.gradcheck(run, (features, dis, pwc), eps=1e-6, atol=1e-5)


def _small_hybrid(solver_options: SolverOptions, **options) -> Tracker:
    """A hybrid tracker at 160 px with PWC-Net frozen and the head's last layer nudged off its
    rule (zero-initialised, it would pass no gradient to the layers before it)."""
    tracker = Tracker(TrackerOptions(flow="network", network_flow="hybrid", use_mask=False,
                                     network_width=160, network_input="pad", **options), solver_options)
    for p in tracker.flow_net.parameters():
        p.requires_grad_(False)
    torch.nn.init.normal_(tracker.hybrid_head.layers[-1].weight, std=0.01)
    return tracker


def test_tracker_trains_the_head_through_the_solver(split, tmp_path):
    torch.manual_seed(0)
    tracker = _small_hybrid(SolverOptions(robust_loss="none", max_matches=2000))
    batch = collate([DeepDeformDataset(split, "test")[0]])
    out = tracker(batch)
    assert out["flow"].shape == (1, 2, 240, 320) and out["weights"].shape == (1, 240, 320)
    assert out["solver"].valid.all(), out["solver"].messages
    (out["translations"] ** 2).sum().backward()
    grads = [p.grad for p in tracker.hybrid_head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0

    # The head's tensors travel with the checkpoint and load back.
    path = str(tmp_path / "hybrid.pt")
    save_checkpoint(path, tracker)
    loaded = load_tracker(path)
    assert loaded.options.network_flow == "hybrid"
    for key, value in tracker.hybrid_head.state_dict().items():
        assert torch.equal(loaded.hybrid_head.state_dict()[key], value)
    # A PWC-Net checkpoint run as a hybrid starts from the rule and says so.
    pwc_path = str(tmp_path / "pwc.pt")
    save_checkpoint(pwc_path, Tracker(TrackerOptions(flow="network", network_width=160, network_input="pad")))
    messages = []
    rule = load_tracker(pwc_path, TrackerOptions(flow="network", network_flow="hybrid"), log=messages.append)
    assert rule.options.network_flow == "hybrid" and any("untrained" in m for m in messages)
    assert all(float(p.abs().sum()) == 0 for p in rule.hybrid_head.layers[-1].parameters())


def test_solved_flow_projects_the_solve():
    """Where every anchor of a pixel was solved, the flow is the warped point's projection minus
    the pixel; elsewhere (an unsolved anchor, no anchor, a failed sample) the front-end's flow."""
    B, H, W = 2, 6, 8
    fx, fy, cx, cy = 50.0, 60.0, 4.0, 3.0
    grid = pixel_grid(H, W)
    z = torch.full((B, H, W), 2.0)
    points = torch.stack(((grid[..., 0] - cx) * z / fx, (grid[..., 1] - cy) * z / fy, z), dim=-1)
    warped = points + torch.tensor([0.04, -0.02, 0.5])          # moved and pushed back
    anchors = torch.zeros(B, H, W, 4, dtype=torch.int32)
    anchors[:, 0, :, 1] = 2                                       # row 0 hangs on node 2 too
    anchors[:, 1, :] = -1                                         # row 1 has no anchors
    front = torch.full((B, 2, H, W), 7.0)
    front[:, :, 2, 0] = float("nan")
    solver = SimpleNamespace(node_valid=torch.tensor([[True, True, False], [True, True, True]]),
                             valid=torch.tensor([True, False]))
    out = {"flow": front, "solver": solver, "warped_points": warped,
           "warp_mask": (anchors >= 0).all(dim=-1)}
    batch = {"pixel_anchors": anchors, "intrinsics": torch.tensor([[fx, fy, cx, cy]] * B)}
    flow = solved_flow(batch, out)
    assert flow.shape == (B, 2, H, W) and torch.isfinite(flow).all()
    expected_u = fx * warped[0, ..., 0] / warped[0, ..., 2] + cx - grid[..., 0]
    expected_v = fy * warped[0, ..., 1] / warped[0, ..., 2] + cy - grid[..., 1]
    assert torch.allclose(flow[0, 0, 2:], expected_u[2:], atol=1e-5)
    assert torch.allclose(flow[0, 1, 2:], expected_v[2:], atol=1e-5)
    assert (flow[0, :, :2] == 7).all()                            # node 2 unsolved; no anchors
    front_read = torch.nan_to_num(front[1], nan=0.0)
    assert torch.equal(flow[1], front_read)                       # the failed sample


def test_second_pass_is_left_a_small_motion(split):
    """The two-pass hybrid: the target resampled by the first solve leaves a residual flow much
    smaller than the motion; the composed flow is what the second solve used; the head gets a
    gradient from the second solve; the option travels with the checkpoint, and a checkpoint
    from before it (no such key) runs one pass."""
    tracker = _small_hybrid(SolverOptions(robust_loss="cauchy", max_matches=4000), hybrid_passes=2)
    batch = collate([DeepDeformDataset(split, "test")[1]])
    out = tracker(batch)
    first = out["first_pass"]
    assert first["solver"].valid.all() and out["solver"].valid.all()
    for key in ("flow", "residual_flow", "prior_flow"):
        assert out[key].shape == (1, 2, 240, 320)
    on = out["match_mask"][0]
    motion = torch.linalg.vector_norm(out["prior_flow"][0], dim=0)[on].mean()
    residual = torch.linalg.vector_norm(out["residual_flow"][0], dim=0)[on].mean()
    assert motion > 2 and residual < 0.5 * motion, (float(motion), float(residual))
    gt = batch["optical_flow"][0]
    error = [torch.linalg.vector_norm(f[0] - gt, dim=0)[on].nanmean() for f in (first["flow"], out["flow"])]
    assert error[1] < error[0] + 0.5, error
    (out["translations"] ** 2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tracker.hybrid_head.parameters())
    assert sum(float(p.grad.abs().sum()) for p in tracker.hybrid_head.parameters()) > 0


def test_hybrid_passes_travel_with_checkpoints(tmp_path):
    path = str(tmp_path / "two.pt")
    options = TrackerOptions(flow="network", network_flow="hybrid", use_mask=False, network_width=128,
                             network_input="pad", hybrid_passes=2)
    save_checkpoint(path, Tracker(options))
    assert load_tracker(path).options.hybrid_passes == 2
    assert load_tracker(path, dataclasses.replace(options, hybrid_passes=1)).options.hybrid_passes == 1
    state = torch.load(path, weights_only=True)
    del state["tracker_options"]["hybrid_passes"]                # a checkpoint of before the option
    torch.save(state, path)
    assert load_tracker(path).options.hybrid_passes == 1


def test_photo_textures():
    # procedural draws what it always did: earlier data stays byte-identical.
    a = object_texture(np.random.default_rng(3), 32, 48, 1.0, "procedural")
    b = procedural_texture(np.random.default_rng(3), 32, 48, 1.0)
    assert np.array_equal(a, b)
    try:
        import skimage  # noqa: F401  (optional: only photo textures need it)
    except ImportError:
        with pytest.raises(ValueError, match="pip install scikit-image"):
            photo_texture(np.random.default_rng(5), 40, 90)
        return
    rng = np.random.default_rng(5)
    for height, width in ((40, 90), (128, 64)):
        texture = photo_texture(rng, height, width)
        assert texture.shape == (height, width, 3) and texture.dtype == np.float32
        assert texture.min() >= 0 and texture.max() <= 255 and texture.std() > 1


@pytest.mark.parametrize("passes", [1, 2])
def test_stage_4_hybrid_trains_and_resumes(tmp_path, passes):

    root = str(tmp_path / "data")
    generate(root, "train", 2, 31, SyntheticOptions(width=160, height=120), progress=False)
    generate(root, "val", 1, 32, SyntheticOptions(width=160, height=120), progress=False)
    ws = str(tmp_path / "ws")
    common = [sys.executable, os.path.join(REPO, "train.py"), "--stage", "4_hybrid", "--dataset-dir", root,
              "--workspace", ws, "--experiment", "h", "--network-width", "128", "--network-input", "pad",
              "--batch-size", "2", "--num-workers", "0", "--val-pairs", "1", "--threads", "1",
              "--optimizer", "adam", "--learning-rate", "1e-3", "--hybrid-passes", str(passes)]
    result = subprocess.run(common + ["--max-iterations", "2", "--val-every", "2"], capture_output=True,
                            text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    last = os.path.join(ws, "h", "checkpoints", "last.pt")
    state = torch.load(last, weights_only=True)
    assert state["iteration"] == 2 and state["tracker_options"]["network_flow"] == "hybrid"
    assert state["tracker_options"]["hybrid_passes"] == passes
    head = {k: v for k, v in state["model"].items() if k.startswith("hybrid_head.")}
    assert head and float(head["hybrid_head.layers.6.weight"].abs().sum()) > 0   # it learned
    frozen = Tracker(TrackerOptions(flow="network", network_width=128, network_input="pad")).flow_net
    assert set(frozen.state_dict()) == {k[len("flow_net."):] for k in state["model"] if k.startswith("flow_net.")}
    result = subprocess.run(common + ["--max-iterations", "3", "--val-every", "100", "--resume"],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at iteration 2" in result.stdout + result.stderr
    assert torch.load(last, weights_only=True)["iteration"] == 3


def test_training_curve_png(tmp_path):
    import cv2
    from torch.utils.tensorboard import SummaryWriter


    experiment = tmp_path / "exp"
    writer = SummaryWriter(str(experiment / "tensorboard"))
    for step, value in ((100, 9.0), (200, 8.5), (300, 8.7)):
        writer.add_scalar("val/epe_3d_mm", value, step)
    writer.close()
    points = read_scalars(str(experiment), "val/epe_3d_mm")
    assert [p[0] for p in points] == [100, 200, 300]
    assert [p[1] for p in points] == pytest.approx([9.0, 8.5, 8.7])
    out = str(tmp_path / "curve.png")
    assert curves_main([str(experiment), "--out", out, "--start", "9.5", "--baseline", "12"]) == 0
    image = cv2.imread(out)
    assert image is not None and image.shape == (420, 720, 3)
    # The curve is drawn (its blue-ish colour) and so is the red baseline.
    assert ((image[..., 0] > 150) & (image[..., 2] < 50)).sum() > 100
    assert ((image[..., 2] > 150) & (image[..., 0] < 50)).sum() > 50
    assert curves_main([str(tmp_path / "none"), "--out", out]) == 1


def _bench_regions():
    """benchmarks/bench_hybrid_regions.py as a module (benchmarks/ is a folder of scripts)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_hybrid_regions",
                                                  os.path.join(REPO, "benchmarks", "bench_hybrid_regions.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_region_diagnosis_auc_counts_pairs_and_ties():
    auc = _bench_regions().auc
    rng = np.random.default_rng(0)
    signal = rng.integers(0, 5, 200).astype(np.float64)       # many ties
    positive = rng.random(200) < 0.3
    pairs = signal[positive][:, None] - signal[~positive][None, :]
    expected = ((pairs > 0) + 0.5 * (pairs == 0)).mean()
    assert abs(auc(signal, positive) - expected) < 1e-12
    assert auc(np.arange(6.0), np.array([0, 0, 0, 1, 1, 1], dtype=bool)) == 1.0
    assert np.isnan(auc(np.arange(3.0), np.zeros(3, dtype=bool)))


def test_region_diagnosis_runs_on_a_pair(split, tmp_path):
    path = str(tmp_path / "hybrid.pt")
    save_checkpoint(path, Tracker(TrackerOptions(flow="network", network_flow="hybrid", use_mask=False,
                                                 network_width=128, network_input="pad", hybrid_passes=2)))
    png = str(tmp_path / "regions.png")
    result = subprocess.run([sys.executable, "benchmarks/bench_hybrid_regions.py", "--dataset-dir", split,
                             "--split", "test", "--checkpoint", path, "--bad-px", "1", "--png", png],
                            capture_output=True, text=True, cwd=REPO, timeout=600,
                            env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("oracle weights (0 beyond 1 px)", "oracle flow everywhere", "oracle choice of DIS or PWC-Net",
                 "first solve's residual (px)", "DIS (medium) started at the true flow"):
        assert line in result.stdout, result.stdout
    import cv2
    assert cv2.imread(png).shape == (2 * 120, 3 * 160, 3)     # two rows of three half-size panels
    not_hybrid = str(tmp_path / "pwc.pt")
    save_checkpoint(not_hybrid, Tracker(TrackerOptions(flow="network", use_mask=False, network_width=128)))
    result = subprocess.run([sys.executable, "benchmarks/bench_hybrid_regions.py", "--dataset-dir", split,
                             "--split", "test", "--checkpoint", not_hybrid], capture_output=True, text=True,
                            cwd=REPO, timeout=600, env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 1 and "is not a hybrid checkpoint" in result.stderr
