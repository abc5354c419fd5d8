"""Training: the stages run, checkpoints carry everything, --resume continues, failed solves are
counted and skipped, and two processes train under torchrun."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dataset import io
from options import SyntheticOptions
from tests.conftest import REPO

SMALL = ["--network-width", "160", "--network-input", "pad", "--batch-size", "2", "--num-workers", "0",
         "--val-pairs", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from dataset.synthetic import generate

    root = str(tmp_path_factory.mktemp("train_data"))
    options = SyntheticOptions(width=160, height=120)
    generate(root, "train", 4, 11, options, progress=False)
    generate(root, "val", 2, 12, options, progress=False)
    return root


def _train(*args, cwd=REPO, torchrun=False):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    return subprocess.run(command + [os.path.join(REPO, "train.py"), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def test_stages_resume_and_checkpoints(data, tmp_path):
    ws = str(tmp_path / "ws")
    common = ["--dataset-dir", data, "--workspace", ws, *SMALL]
    result = _train("--stage", "0_flow", "--experiment", "s0", "--max-iterations", "2", "--val-every", "2", *common)
    assert result.returncode == 0, result.stderr[-3000:]
    last = os.path.join(ws, "s0", "checkpoints", "last.pt")
    best = os.path.join(ws, "s0", "checkpoints", "best.pt")
    assert os.path.isfile(last) and os.path.isfile(best)
    assert any(f.startswith("events") for f in os.listdir(os.path.join(ws, "s0", "tensorboard")))
    state = torch.load(last, weights_only=True)
    assert state["iteration"] == 2 and state["tracker_options"]["network_width"] == 160
    assert {"optimizer", "scheduler", "rng", "model", "solver_options"} <= set(state)
    assert {"torch", "numpy_keys", "python_state", "cuda"} <= set(state["rng"])  # CUDA's too, [] without a GPU
    # --resume continues from iteration 2 and says so
    result = _train("--stage", "0_flow", "--experiment", "s0", "--max-iterations", "4", "--val-every", "100",
                    "--resume", *common)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed" in (result.stdout + result.stderr) and "at iteration 2" in (result.stdout + result.stderr)
    assert torch.load(last, weights_only=True)["iteration"] == 4
    # the next stage starts from the best checkpoint and keeps its network options
    result = _train("--stage", "1_solver", "--experiment", "s1", "--init", best, "--max-iterations", "1",
                    "--val-every", "1", "--dataset-dir", data, "--workspace", ws, "--batch-size", "2",
                    "--num-workers", "0", "--val-pairs", "1", "--threads", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(os.path.join(ws, "s1", "checkpoints", "last.pt"), weights_only=True)
    assert state["tracker_options"]["network_width"] == 160 and state["train_options"]["run_solver"]
    # a training checkpoint, and its weights-only release, rebuild a tracker by themselves
    from utils.checkpoints import load_tracker

    s1 = os.path.join(ws, "s1", "checkpoints", "last.pt")
    tracker = load_tracker(s1)
    assert tracker.options.network_width == 160
    release = str(tmp_path / "release.pt")
    result = subprocess.run([sys.executable, "-m", "utils.checkpoints", s1, release, "--history", best],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    state = torch.load(release, weights_only=True)
    assert not {"optimizer", "scheduler", "rng"} & set(state)
    assert [h["train_options"]["stage"] for h in state["history"]] == ["0_flow", "1_solver"]
    # inference solver by default, the training one kept beside it
    assert state["solver_options"]["robust_loss"] == "cauchy"
    assert state["training_solver_options"]["robust_loss"] == "none"
    assert os.path.getsize(release) < 0.6 * os.path.getsize(s1)  # no Adam moments
    released = load_tracker(release)
    for key, value in tracker.state_dict().items():
        assert torch.equal(released.state_dict()[key], value), key


def test_failed_solves_are_counted_not_fatal(data, tmp_path):
    root = str(tmp_path / "broken")
    shutil.copytree(data, root)
    labels = io.read_labels(os.path.join(root, "train_graphs.json"))
    for label in labels[:2]:           # two pairs whose pixels have no anchors: no match, failed solve
        path = os.path.join(root, label["pixel_anchors"])
        io.write_pixel_anchors(path, np.full_like(io.read_pixel_anchors(path), -1))
    from options import DataOptions, SolverOptions, TrackerOptions, TrainOptions
    from utils.trainer import Trainer

    trainer = Trainer(TrainOptions(stage="1_solver", dataset_dir=root, val_split="", experiment="f",
                                   workspace=str(tmp_path / "ws"), max_iterations=2, batch_size=2,
                                   num_workers=0, run_solver=True, use_graph_loss=True,
                                   use_warp_loss=True, optimizer="adam", learning_rate=1e-5),
                      TrackerOptions(flow="network", use_mask=False, network_width=160, network_input="pad"),
                      SolverOptions(robust_loss="none"), DataOptions(), log=lambda *a: None)
    trainer.run()
    assert trainer.iteration == 2 and trainer.stats["failed_solves"] >= 1
    for p in trainer.tracker.flow_net.parameters():
        assert torch.isfinite(p).all()


def test_two_processes_under_torchrun(data, tmp_path):
    result = _train("--stage", "0_flow", "--experiment", "ddp", "--max-iterations", "2", "--val-every", "2",
                    "--dataset-dir", data, "--workspace", str(tmp_path), "--network-width", "160", "--network-input", "pad", "--batch-size", "1",
                    "--num-workers", "0", "--val-pairs", "1", "--threads", "1", torchrun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(os.path.join(tmp_path, "ddp", "checkpoints", "last.pt"), weights_only=True)
    assert state["iteration"] == 2
    assert result.stderr.count("done:") + result.stdout.count("done:") == 1   # rank 0 only


def test_run_train_goes_through_the_four_stages(data, tmp_path):
    ws = str(tmp_path / "ws")
    result = subprocess.run(["bash", os.path.join(REPO, "run_train.sh"), data, "tiny", ws, "--max-iterations", "1",
                             "--val-every", "1", *SMALL], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    release = torch.load(os.path.join(ws, "tiny.pt"), weights_only=True)
    assert [h["train_options"]["stage"] for h in release["history"]] == ["0_flow", "1_solver", "2_mask", "3_refine"]
    assert release["train_options"]["stage"] == "3_refine" and release["tracker_options"]["use_mask"]
    assert release["history"][1]["file"].endswith(os.path.join("tiny_1_solver", "checkpoints", "best.pt"))


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_step_and_resume_continues(data, tmp_path, signal_number):
    """Ctrl-C or a batch system's SIGTERM: the step in flight finishes, last.pt is written at
    that iteration, the exit status is 130, and --resume goes on from there."""
    ws = str(tmp_path / "ws")
    args = [os.path.join(REPO, "train.py"), "--stage", "0_flow", "--experiment", "sig", "--dataset-dir", data,
            "--workspace", ws, "--max-iterations", "100000", "--val-every", "100000",
            "--checkpoint-every", "100000", *SMALL]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=stderr, cwd=REPO)
        deadline = time.time() + 300
        while not re.search(r"\| *[2-9]\d*/100000", log.read_text()) and time.time() < deadline:
            assert process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        process.send_signal(signal_number)
        assert process.wait(timeout=300) == 130, log.read_text()[-3000:]
    text = log.read_text()
    assert "stopping after this step" in text and "--resume continues" in text
    state = torch.load(os.path.join(ws, "sig", "checkpoints", "last.pt"), weights_only=True)
    assert state["iteration"] >= 2 and f"at iteration {state['iteration']}:" in text
    result = _train(*args[1:], "--resume", "--max-iterations", str(state["iteration"] + 1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at iteration {state['iteration']}" in result.stdout + result.stderr


def test_checkpoints_never_impose_machine_limits():
    """The shipped checkpoint was made under the old 500-node dense limit: a run with it takes
    its node cap, memory budget and linear solve from its own flags and defaults."""
    from options import SOLVER_MACHINE_FIELDS, SolverOptions
    from utils.checkpoints import checkpoint_options, load_tracker, read_checkpoint

    shipped = os.path.join(REPO, "checkpoints", "nnrt_synthetic.pt")
    stored = read_checkpoint(shipped)
    assert stored["solver_options"]["max_nodes"] == 500
    _, solver = checkpoint_options(stored, shipped)
    assert not set(SOLVER_MACHINE_FIELDS) & set(solver) and solver["iterations"] == 3
    assert load_tracker(shipped, log=lambda *_: None).solver_options.max_nodes == SolverOptions().max_nodes
