"""The tracker: network front-end end to end, gradients through the solver, network frames, and
checkpoints (ours and the reference's) through generate.py."""
import os
import subprocess
import sys

import pytest
import torch

from dataset.deepdeform import DeepDeformDataset, collate
from tests.reference.reference_weights import deterministic_reference_state_dict
from model.network_frame import NetworkFrame
from model.tracker import Tracker
from options import SolverOptions, TrackerOptions
from tests.conftest import FIXTURES, REPO, require, small_synthetic_split
from utils.checkpoints import load_tracker, save_checkpoint

SHAPES = os.path.join(FIXTURES, "nnrt_reference", "state_dict_shapes.json")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return small_synthetic_split(tmp_path_factory, "tracker_data", 2, 21)


@pytest.fixture(scope="module")
def reference_checkpoints(tmp_path_factory):
    state = deterministic_reference_state_dict(require(SHAPES))
    folder = tmp_path_factory.mktemp("checkpoints")
    full, flow_only = str(folder / "model_A.pt"), str(folder / "pwc.pt")
    torch.save(state, full)
    torch.save({k[len("flow_net."):]: v for k, v in state.items() if k.startswith("flow_net.")}, flow_only)
    broken = dict(state)
    del broken["mask_net.model.4.weight"]
    torch.save(broken, str(folder / "missing.pt"))
    misshaped = dict(state)
    misshaped["flow_net.moduleTwo.moduleSix.0.weight"] = torch.zeros(3, 3)
    torch.save(misshaped, str(folder / "misshaped.pt"))
    return folder


def test_network_frames_map_back_and_forth():
    for height, width, network_width, mode in ((480, 640, 0, "crop"), (480, 640, 0, "pad"),
                                               (240, 320, 256, "pad"), (100, 150, 0, "pad")):
        frame = NetworkFrame(height, width, network_width, mode)
        assert frame.window[2] % 64 == 0 and frame.window[3] % 64 == 0
        flow = torch.randn(1, 2, height, width) * 5
        back = frame.flow_out(frame.flow_in(flow))
        known = torch.isfinite(back).all(dim=1)
        if network_width == 0:
            assert torch.allclose(back[:, :, known[0]], flow[:, :, known[0]])
            assert known.float().mean() == (1.0 if mode == "pad" else 448 / 480)


def test_network_front_end_is_differentiable_end_to_end(split):
    torch.manual_seed(0)
    tracker = Tracker(TrackerOptions(flow="network", use_mask=True, network_input="pad"),
                      SolverOptions(robust_loss="none", max_matches=2000))
    state = deterministic_reference_state_dict(require(SHAPES))
    tracker.load_state_dict(state)
    batch = collate([DeepDeformDataset(split, "test")[0]])
    out = tracker(batch)
    assert out["flow"].shape == (1, 2, 240, 320) and out["weights"].shape == (1, 240, 320)
    assert ((out["weights"] >= 0) & (out["weights"] <= 1)).all()
    assert out["solver"].valid.all(), out["solver"].messages
    (out["translations"] ** 2).sum().backward()
    flow_grad = sum(float(p.grad.abs().sum()) for p in tracker.flow_net.parameters() if p.grad is not None)
    mask_grad = sum(float(p.grad.abs().sum()) for p in tracker.mask_net.parameters() if p.grad is not None)
    assert flow_grad > 0 and mask_grad > 0


def test_our_checkpoints_rebuild_the_model(split, tmp_path):
    tracker = Tracker(TrackerOptions(flow="network", network_width=256, network_input="pad"),
                      SolverOptions(iterations=2))
    path = str(tmp_path / "ours.pt")
    save_checkpoint(path, tracker, {"iteration": 7})
    loaded = load_tracker(path)
    assert loaded.options == tracker.options and loaded.solver_options == tracker.solver_options
    batch = collate([DeepDeformDataset(split, "test")[1]])
    with torch.no_grad():
        a, b = tracker.eval()(batch), loaded.eval()(batch)
    assert torch.equal(a["flow"].nan_to_num(), b["flow"].nan_to_num())
    assert torch.equal(a["translations"], b["translations"])


def test_a_checkpoint_keeps_its_cost_volume(tmp_path):
    """The cost volume is part of what the weights mean: options asked for at load time cannot
    change it, and a reference-layout checkpoint (no options stored) gets the product volume."""
    tracker = Tracker(TrackerOptions(flow="network", cost_volume="product"))
    path = str(tmp_path / "product.pt")
    save_checkpoint(path, tracker)
    messages = []
    loaded = load_tracker(path, TrackerOptions(flow="network", cost_volume="normalized"), log=messages.append)
    assert loaded.options.cost_volume == "product" and loaded.flow_net.cost_volume == "product"
    assert messages and "'product' cost volume" in messages[0]
    reference_layout = str(tmp_path / "reference.pt")
    torch.save({"state_dict": tracker.state_dict()}, reference_layout)
    assert load_tracker(reference_layout, log=messages.append).flow_net.cost_volume == "product"
    assert Tracker(TrackerOptions(flow="network")).flow_net.cost_volume == "normalized"


def _generate(split, out, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, "generate.py"), "--dataset-dir", split,
                           "--split", "test", "--out", str(out), "--quiet", *args],
                          capture_output=True, text=True, cwd=REPO)


def test_reference_checkpoints_run_through_generate(split, reference_checkpoints, tmp_path):
    result = _generate(split, tmp_path / "full", "--flow", "network", "--checkpoint",
                       str(reference_checkpoints / "model_A.pt"))
    assert result.returncode == 0, result.stderr
    assert len([f for f in os.listdir(tmp_path / "full") if f.endswith(".sflow")]) == 2
    result = _generate(split, tmp_path / "flow_only", "--checkpoint", str(reference_checkpoints / "pwc.pt"))
    assert result.returncode == 0, result.stderr
    assert "weighting head is off" in result.stdout


@pytest.mark.parametrize("name,text", [("missing.pt", "'model.4.weight'"),
                                       ("misshaped.pt", "'moduleTwo.moduleSix.0.weight' has shape (3, 3)")])
def test_broken_checkpoints_are_refused(split, reference_checkpoints, tmp_path, name, text):
    result = _generate(split, tmp_path / "x", "--flow", "network", "--checkpoint", str(reference_checkpoints / name))
    assert result.returncode == 1 and text in result.stderr and name in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
