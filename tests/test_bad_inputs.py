"""Bad inputs against every entry point, run as a user runs them (a subprocess each).

Each row of CASES names the tool, how to break its input (a copy of a small synthetic split, a
flag, a file), the exit status and a part of the one-line error. Every case must exit with that
status, print exactly one error line on stderr (no traceback, no usage block) and leave no
checkpoint or prediction that holds a non-finite value.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np
import pytest
import torch

from dataset import io
from model.ext import cuda_unavailable_reason
from tests.conftest import REPO

ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
# Small, fast settings for training cases: no network width beyond 160 px, one thread.
TRAIN_SMALL = ["--network-width", "160", "--network-input", "pad", "--batch-size", "1",
               "--num-workers", "0", "--val-pairs", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A 160x120 synthetic dataset: split "train" of 2 pairs and "val" of 1, with ground truth."""
    from dataset.synthetic import generate
    from options import SyntheticOptions

    root = str(tmp_path_factory.mktemp("bad_inputs_data"))
    options = SyntheticOptions(width=160, height=120)
    generate(root, "train", 2, 5, options, progress=False)
    generate(root, "val", 1, 6, options, progress=False)
    return root


@dataclass
class Context:
    """What a case's setup and arguments see: a private copy of the split and a scratch folder."""
    root: str
    tmp: str
    labels: list = field(default_factory=list)

    def path(self, index: int, key: str, split: str = "train") -> str:
        labels = io.read_labels(os.path.join(self.root, f"{split}_graphs.json"))
        return os.path.join(self.root, labels[index][key])

    def edit_labels(self, change: Callable[[list], None], split: str = "train") -> None:
        path = os.path.join(self.root, f"{split}_graphs.json")
        labels = json.load(open(path))
        change(labels)
        json.dump(labels, open(path, "w"))

    def name(self, index: int, split: str = "train") -> str:
        return io.pair_name(io.read_labels(os.path.join(self.root, f"{split}_graphs.json"))[index])


@dataclass
class Case:
    id: str
    tool: str                                   # script, or "-m module"
    args: Callable[[Context], List[str]]
    message: str                                # part of the one error line
    status: int = 1
    setup: Optional[Callable[[Context], None]] = None
    check: Optional[Callable[[Context], None]] = None   # after the run


def _nan_node(ctx):
    nodes = io.read_graph_nodes(ctx.path(0, "graph_nodes"))
    nodes[1, 2] = np.nan
    io.write_graph_nodes(ctx.path(0, "graph_nodes"), nodes)


def _edge_out_of_range(ctx):
    edges = io.read_graph_edges(ctx.path(0, "graph_edges"))
    edges[0, 0] = edges.shape[0] + 5
    io.write_graph_edges(ctx.path(0, "graph_edges"), edges)


def _six_anchors(ctx):
    for key, writer, reader in (("pixel_anchors", io.write_pixel_anchors, io.read_pixel_anchors),
                                ("pixel_weights", io.write_pixel_weights, io.read_pixel_weights)):
        array = reader(ctx.path(0, key))
        writer(ctx.path(0, key), np.concatenate((array, array[..., :2]), axis=2))


def _truncate(ctx, key, index=0):
    path = ctx.path(index, key)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _zero_depth(ctx, key, index=0):
    depth = io.read_depth(ctx.path(index, key))
    io.write_depth(ctx.path(index, key), np.zeros_like(depth))


def _depth_in_wrong_unit(ctx):
    # tenths of millimetres written as if millimetres: 10x too far
    path = ctx.path(0, "source_depth")
    raw = io.read_depth(path) * 1000.0
    import cv2

    cv2.imwrite(os.path.join(ctx.tmp, "depth_tenth_mm.png"), np.clip(raw * 10, 0, 65535).astype(np.uint16))


def _intrinsics_file(ctx):
    labels = io.read_labels(os.path.join(ctx.root, "train_graphs.json"))
    io.write_intrinsics(os.path.join(ctx.tmp, "intrinsics.txt"), labels[0]["intrinsics"])


def _one_pixel_mask(ctx):
    _intrinsics_file(ctx)
    depth = io.read_depth(ctx.path(0, "source_depth"))
    mask = np.zeros(depth.shape, bool)
    ys, xs = np.nonzero(depth > 0)
    mask[ys[len(ys) // 2], xs[len(xs) // 2]] = True
    io.write_mask(os.path.join(ctx.tmp, "mask.png"), mask)


def _kind_folder_is_file(ctx):
    _intrinsics_file(ctx)
    os.makedirs(os.path.join(ctx.tmp, "graphs"))
    open(os.path.join(ctx.tmp, "graphs", "pixel_weights"), "w").write("in the way")


def _nothing_written(ctx):
    folder = os.path.join(ctx.tmp, "graphs")
    written = [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files]
    assert written == [os.path.join(folder, "pixel_weights")], written


def _random_checkpoint(ctx):
    open(os.path.join(ctx.tmp, "random.pt"), "wb").write(os.urandom(4096))


def _nan_checkpoint(ctx):
    from utils.checkpoints import default_checkpoint

    state = torch.load(default_checkpoint(), map_location="cpu", weights_only=True)
    key = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][key] = torch.full_like(state["model"][key], float("nan"))
    torch.save(state, os.path.join(ctx.tmp, "nan.pt"))


def _list_checkpoint(ctx):
    torch.save([1, 2, 3], os.path.join(ctx.tmp, "list.pt"))


def _bad_option_checkpoint(ctx):
    from utils.checkpoints import default_checkpoint

    state = torch.load(default_checkpoint(), map_location="cpu", weights_only=True)
    state["solver_options"]["iterations"] = -1
    torch.save(state, os.path.join(ctx.tmp, "bad_option.pt"))


def _predictions(ctx, wrong_size=False):
    labels = io.read_labels(os.path.join(ctx.root, "train_graphs.json"))
    out = os.path.join(ctx.tmp, "pred")
    os.makedirs(out)
    for label in labels:
        name = io.pair_name(label)
        nodes = io.read_graph_nodes(os.path.join(ctx.root, label["graph_nodes"]))
        io.write_graph_node_deformations(os.path.join(out, f"{name}_node_translations.bin"),
                                         np.zeros_like(nodes))
        _, h, w = io.read_scene_flow(os.path.join(ctx.root, label["scene_flow"])).shape
        size = (h // 2, w // 2) if wrong_size else (h, w)
        io.write_flow(os.path.join(out, f"{name}_sceneflow.sflow"), np.zeros((3,) + size, np.float32))


def _empty_val(ctx):
    io.write_labels(os.path.join(ctx.root, "empty_graphs.json"), [])


def _a_file(ctx, name="file"):
    open(os.path.join(ctx.tmp, name), "w").write("not a folder")


def _fx_zero(ctx):
    def change(labels):
        labels[0]["intrinsics"]["fx"] = 0
    ctx.edit_labels(change)


def _only_good_pair_written(ctx):
    out = os.path.join(ctx.tmp, "pred")
    written = sorted(f for f in os.listdir(out) if f.endswith((".bin", ".sflow")))
    assert written == sorted([f"{ctx.name(1)}_node_translations.bin", f"{ctx.name(1)}_sceneflow.sflow"])


def _remade(ctx):
    io.read_graph_edges(ctx.path(0, "graph_edges"))   # readable again


def _checkpoints_finite(ctx):
    for folder, _, files in os.walk(os.path.join(ctx.tmp, "ws")):
        for name in files:
            if name.endswith(".pt"):
                from utils.trainer import non_finite_tensor

                state = torch.load(os.path.join(folder, name), weights_only=True)
                assert non_finite_tensor(state) is None, f"{name}: {non_finite_tensor(state)}"


def _gen(*extra):
    return lambda c: ["--dataset-dir", c.root, "--split", "train", "--out", os.path.join(c.tmp, "pred"),
                      "--flow", "dis", "--quiet", *extra]


def _graph_one(*extra, depth=None, out=None):
    return lambda c: ["--depth", depth(c) if depth else c.path(0, "source_depth"),
                      "--intrinsics", os.path.join(c.tmp, "intrinsics.txt"),
                      "--out", out(c) if out else os.path.join(c.tmp, "graphs"), "--name", "x", *extra]


def _train(*extra, val="val", workspace="ws"):
    return lambda c: ["--dataset-dir", c.root, "--train-split", "train", "--val-split", val,
                      "--workspace", os.path.join(c.tmp, workspace), "--experiment", "e",
                      "--max-iterations", "2", "--val-every", "2", *TRAIN_SMALL, *extra]


def _sequence(*extra):
    return lambda c: ["--out", os.path.join(c.tmp, "seq"), "--frames", "2", "--width", "160", "--height", "120",
                      "--spacing", "0.05", *extra]


def _sequence_with_reconstruction(ctx, frames_written=1):
    """A 2-frame sequence in tmp/seq and a reconstruction in tmp/rec of its first frames only."""
    from dataset.synthetic_sequence import generate_sequence, read_ground_truth
    from options import SequenceOptions

    folder = os.path.join(ctx.tmp, "seq")
    generate_sequence(SequenceOptions(out=folder, frames=2, width=160, height=120, spacing=0.05), progress=False)
    faces, vertices, _ = read_ground_truth(folder)
    for t in range(frames_written):
        io.write_ply(os.path.join(ctx.tmp, "rec", "frames", f"{t:06d}.ply"), vertices[t], faces)


def _synthetic(*extra):
    return lambda c: ["--out", os.path.join(c.tmp, "syn"), "--split", "s", "--pairs", "1", "--width", "160",
                      "--height", "120", *extra]


def _viz(*extra):
    return lambda c: ["--dataset-dir", c.root, "--split", "train", "--flow", "dis", "--headless",
                      "--out", os.path.join(c.tmp, "views"), *extra]


CASES = [
    # train.py
    Case("train-lr-nan", "train.py", _train("--learning-rate", "nan"), "--learning-rate nan"),
    Case("train-lr-negative", "train.py", _train("--learning-rate", "-1"), "--learning-rate -1"),
    Case("train-val-every-0", "train.py", _train("--val-every", "0"), "--val-every 0"),
    Case("train-batch-0", "train.py", _train("--batch-size", "0"), "--batch-size 0"),
    Case("train-empty-val", "train.py", _train(val="empty"), "has no pairs", setup=_empty_val,
         check=_checkpoints_finite),
    Case("train-workspace-file", "train.py", _train(workspace="file"), "is a file", setup=_a_file),
    Case("train-init-random", "train.py", _train("--init", "RANDOM"), "not a checkpoint"),
    Case("train-device-bad", "train.py", _train("--device", "gpu"), "--device gpu"),
    Case("train-lr-huge", "train.py", _train("--learning-rate", "1e30", "--max-bad-steps", "1"),
         "non-finite", check=_checkpoints_finite),
    Case("train-truncated-pair-in-worker", "train.py", _train("--num-workers", "1"), "truncated",
         setup=lambda c: _truncate(c, "graph_edges"), check=_checkpoints_finite),
    Case("train-stage-bad", "train.py", _train("--stage", "9_none"), "invalid choice", status=2),
    # generate.py
    Case("gen-iterations-neg", "generate.py", _gen("--iterations", "-1"), "--iterations -1"),
    Case("gen-iterations-0", "generate.py", _gen("--iterations", "0"), "--iterations 0"),
    Case("gen-robust-scale-0", "generate.py", _gen("--robust-scale", "0"), "--robust-scale 0"),
    Case("gen-lm-damping-neg", "generate.py", _gen("--lm-damping", "-1"), "--lm-damping -1"),
    Case("gen-max-depth-nan", "generate.py", _gen("--max-depth", "nan"), "--max-depth nan"),
    Case("gen-limit-neg", "generate.py", _gen("--limit", "-1"), "--limit -1"),
    Case("gen-shard-out-of-range", "generate.py", _gen("--shard", "2", "--num-shards", "2"), "--shard 2"),
    Case("gen-threads-neg", "generate.py", _gen("--threads", "-2"), "--threads -2"),
    Case("gen-limit-text", "generate.py", _gen("--limit", "many"), "--limit", status=2),
    Case("gen-out-file", "generate.py",
         lambda c: _gen()(c)[:4] + ["--out", os.path.join(c.tmp, "file"), "--flow", "dis", "--quiet"],
         "is a file", setup=_a_file),
    Case("gen-dataset-missing", "generate.py",
         lambda c: ["--dataset-dir", os.path.join(c.tmp, "nowhere")] + _gen()(c)[2:], "folder not found"),
    Case("gen-fx-zero", "generate.py", _gen(), "fx", setup=_fx_zero, check=_only_good_pair_written),
    Case("gen-nan-nodes", "generate.py", _gen(), "node positions are not finite", setup=_nan_node,
         check=_only_good_pair_written),
    Case("gen-edge-out-of-range", "generate.py", _gen(), "outside [-1,", setup=_edge_out_of_range,
         check=_only_good_pair_written),
    Case("gen-six-anchors", "generate.py", _gen(), "exactly 4", setup=_six_anchors,
         check=_only_good_pair_written),
    Case("gen-truncated-weights", "generate.py", _gen(), "truncated",
         setup=lambda c: _truncate(c, "pixel_weights"), check=_only_good_pair_written),
    Case("gen-zero-target-depth", "generate.py", _gen(), "no valid depth",
         setup=lambda c: _zero_depth(c, "target_depth"), check=_only_good_pair_written),
    Case("gen-checkpoint-random", "generate.py",
         lambda c: _gen()(c)[:-3] + ["--checkpoint", os.path.join(c.tmp, "random.pt"), "--quiet"],
         "not a checkpoint", setup=_random_checkpoint),
    Case("gen-checkpoint-nan", "generate.py",
         lambda c: _gen()(c)[:-3] + ["--checkpoint", os.path.join(c.tmp, "nan.pt"), "--quiet"],
         "non-finite", setup=_nan_checkpoint),
    Case("gen-checkpoint-not-state-dict", "generate.py",
         lambda c: _gen()(c)[:-3] + ["--checkpoint", os.path.join(c.tmp, "list.pt"), "--quiet"],
         "expected a state dict", setup=_list_checkpoint),
    Case("gen-checkpoint-bad-option", "generate.py",
         lambda c: _gen()(c)[:-3] + ["--checkpoint", os.path.join(c.tmp, "bad_option.pt"), "--quiet"],
         "stored option iterations -1", setup=_bad_option_checkpoint),
    # create_graph_data.py
    Case("graph-coverage-0", "create_graph_data.py", _graph_one("--node-coverage", "0"), "--node-coverage 0",
         setup=_intrinsics_file),
    Case("graph-coverage-neg", "create_graph_data.py", _graph_one("--node-coverage", "-1"),
         "--node-coverage -1", setup=_intrinsics_file),
    Case("graph-coverage-nan", "create_graph_data.py", _graph_one("--node-coverage", "nan"),
         "--node-coverage nan", setup=_intrinsics_file),
    Case("graph-anchors-0", "create_graph_data.py", _graph_one("--num-anchors", "0"), "--num-anchors",
         status=2, setup=_intrinsics_file),
    Case("graph-anchors-6", "create_graph_data.py", _graph_one("--num-anchors", "6"), "--num-anchors",
         status=2, setup=_intrinsics_file),
    Case("graph-neighbors-0", "create_graph_data.py", _graph_one("--num-neighbors", "0"), "--num-neighbors 0",
         setup=_intrinsics_file),
    Case("graph-max-depth-0", "create_graph_data.py", _graph_one("--max-depth", "0"), "--max-depth 0",
         setup=_intrinsics_file),
    Case("graph-depth-unit", "create_graph_data.py",
         _graph_one(depth=lambda c: os.path.join(c.tmp, "depth_tenth_mm.png")), "--depth-scale",
         setup=lambda c: (_intrinsics_file(c), _depth_in_wrong_unit(c))),
    Case("graph-one-pixel-mask", "create_graph_data.py",
         lambda c: _graph_one()(c) + ["--mask", os.path.join(c.tmp, "mask.png")], "mask.png",
         setup=_one_pixel_mask),
    Case("graph-kind-folder-file", "create_graph_data.py", _graph_one(), "pixel_weights is a file",
         setup=_kind_folder_is_file, check=_nothing_written),
    Case("graph-out-file", "create_graph_data.py", _graph_one(out=lambda c: os.path.join(c.tmp, "file")),
         "is a file", setup=lambda c: (_intrinsics_file(c), _a_file(c))),
    Case("graph-split-truncated-remade", "create_graph_data.py",
         lambda c: ["--dataset-dir", c.root, "--split", "train"], "", status=0,
         setup=lambda c: _truncate(c, "graph_edges"), check=_remade),
    Case("graph-split-bad-pair", "create_graph_data.py",
         lambda c: ["--dataset-dir", c.root, "--split", "train", "--overwrite"], "1 pair(s) failed",
         setup=lambda c: _zero_depth(c, "source_depth")),
    # evaluate.py
    Case("eval-wrong-size", "evaluate.py",
         lambda c: ["--dataset-dir", c.root, "--split", "train", "--predictions", os.path.join(c.tmp, "pred"),
                    "--quiet"], "expected the frame's", setup=lambda c: _predictions(c, wrong_size=True)),
    Case("eval-ground-truth-wrong-size", "evaluate.py",
         lambda c: ["--dataset-dir", c.root, "--split", "train", "--predictions", os.path.join(c.tmp, "pred"),
                    "--quiet"], "the source depth",
         setup=lambda c: (_predictions(c), io.write_flow(c.path(0, "scene_flow"),
                                                         np.zeros((3, 60, 80), np.float32)))),
    Case("eval-predictions-missing", "evaluate.py",
         lambda c: ["--dataset-dir", c.root, "--split", "train", "--predictions", os.path.join(c.tmp, "none"),
                    "--quiet"], "folder not found"),
    # example_viz.py
    Case("viz-zero-target-depth", "example_viz.py", _viz(), "no valid depth",
         setup=lambda c: _zero_depth(c, "target_depth")),
    Case("viz-zero-source-depth-own", "example_viz.py",
         lambda c: ["--source-color", c.path(0, "source_color"), "--source-depth", os.path.join(c.tmp, "zero.png"),
                    "--target-color", c.path(0, "target_color"), "--target-depth", c.path(0, "target_depth"),
                    "--intrinsics", os.path.join(c.tmp, "intrinsics.txt"), "--flow", "dis", "--headless",
                    "--out", os.path.join(c.tmp, "views")], "zero.png",
         setup=lambda c: (_intrinsics_file(c), io.write_depth(os.path.join(c.tmp, "zero.png"),
                                                              np.zeros((120, 160), np.float32)))),
    Case("viz-index-out-of-range", "example_viz.py", _viz("--index", "7"), "--index 7"),
    Case("viz-out-file", "example_viz.py",
         lambda c: _viz()(c)[:-2] + ["--out", os.path.join(c.tmp, "file")], "is a file", setup=_a_file),
    # python -m dataset.synthetic
    Case("syn-pairs-0", "-m dataset.synthetic", _synthetic("--pairs", "0"), "--pairs 0"),
    Case("syn-width-10", "-m dataset.synthetic", _synthetic("--width", "10"), "--width 10"),
    Case("syn-out-file", "-m dataset.synthetic",
         lambda c: ["--out", os.path.join(c.tmp, "file"), "--pairs", "1"], "is a file", setup=_a_file),
    Case("syn-real-frames-missing", "-m dataset.synthetic",
         _synthetic("--real-frames", "/nonexistent/frames"), "folder not found"),
    # python -m dataset.synthetic_sequence (and its pair export), evaluate.py --sequence
    Case("seq-frames-0", "-m dataset.synthetic_sequence", _sequence("--frames", "0"), "--frames 0"),
    Case("seq-out-file", "-m dataset.synthetic_sequence",
         lambda c: ["--out", os.path.join(c.tmp, "file")], "is a file", setup=_a_file),
    Case("seq-background-missing", "-m dataset.synthetic_sequence", _sequence("--background", "/nonexistent/bg"),
         "folder not found"),
    Case("seq-other-settings", "-m dataset.synthetic_sequence", _sequence("--seed", "9"), "other settings",
         setup=_sequence_with_reconstruction),
    Case("seq-export-not-a-sequence", "-m dataset.synthetic_sequence.export_pair",
         lambda c: ["--sequence", c.tmp, "--out", os.path.join(c.tmp, "pairs")], "gt.npz"),
    Case("seq-export-target-beyond", "-m dataset.synthetic_sequence.export_pair",
         lambda c: ["--sequence", os.path.join(c.tmp, "seq"), "--target", "5", "--out", os.path.join(c.tmp, "pairs")],
         "--target 5", setup=_sequence_with_reconstruction),
    Case("eval-seq-missing-frame", "evaluate.py",
         lambda c: ["--sequence", os.path.join(c.tmp, "seq"), "--reconstruction", os.path.join(c.tmp, "rec")],
         "000001.ply", setup=_sequence_with_reconstruction),
    Case("eval-seq-without-reconstruction", "evaluate.py", lambda c: ["--sequence", c.tmp],
         "--sequence and --reconstruction go together", status=2),
    # python -m dataset.make_split, python -m utils.checkpoints
    Case("split-out-file", "-m dataset.make_split",
         lambda c: ["--out", os.path.join(c.tmp, "file"), "--split", "s", "--sequence", c.tmp,
                    "--pair", "000000:000001"], "is a file", setup=_a_file),
    Case("split-sequence-missing", "-m dataset.make_split",
         lambda c: ["--out", os.path.join(c.tmp, "new"), "--split", "s", "--sequence",
                    os.path.join(c.tmp, "nowhere"), "--pair", "000000:000001"], "folder not found"),
    Case("release-random-source", "-m utils.checkpoints",
         lambda c: [os.path.join(c.tmp, "random.pt"), os.path.join(c.tmp, "release.pt")], "not a checkpoint",
         setup=_random_checkpoint),
    Case("syn-motion-scale-nan", "-m dataset.synthetic", _synthetic("--motion-scale", "nan"), "--motion-scale"),
]
if cuda_unavailable_reason():
    # Where CUDA cannot run (this CPU machine, or a build without CUDA launchers), asking for it
    # is a one-line error naming the fix, not a traceback at the first solver call.
    CASES.append(Case("gen-device-cuda", "generate.py", lambda c: _gen()(c) + ["--device", "cuda"],
                      "--device cuda: CUDA cannot be used"))


def _run(tool: str, args: List[str]):
    command = [sys.executable] + (tool.split() if tool.startswith("-m ") else [os.path.join(REPO, tool)])
    return subprocess.run(command + args, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=600)


def _error_lines(stderr: str) -> List[str]:
    # Progress bars (tqdm) redraw with carriage returns; they are not messages.
    lines = [line.split("\r")[-1].strip() for line in stderr.splitlines()]
    return [line for line in lines if re.search(r"\berror\b", line, re.IGNORECASE)]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, split, tmp_path):
    root = str(tmp_path / "data")
    shutil.copytree(split, root)
    ctx = Context(root, str(tmp_path))
    if case.setup:
        case.setup(ctx)
    args = [a.replace("RANDOM", os.path.join(ctx.tmp, "random.pt")) for a in case.args(ctx)]
    if "RANDOM" in " ".join(case.args(ctx)):
        _random_checkpoint(ctx)
    result = _run(case.tool, args)
    output = f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, output
    assert result.returncode == case.status, output
    if case.status:
        errors = _error_lines(result.stderr)
        assert len(errors) == 1, output
        assert case.message in errors[0], output
        assert "usage:" not in result.stderr, output
    if case.check:
        case.check(ctx)
