"""The DeepDeform reader, generate.py and evaluate.py on a small synthetic split."""
import filecmp
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from dataset import io
from dataset.deepdeform import DatasetError, DeepDeformDataset, collate, rotate_target
from tests.conftest import REPO, small_synthetic_split
from model.image_proc import backproject_depth
from dataset.io import prediction_paths
from utils.metrics import evaluation_mask


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return small_synthetic_split(tmp_path_factory, "synthetic", 3, 7)


def _run(script, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], capture_output=True,
                          text=True, cwd=REPO)


def test_reader_items_and_collate(split):
    dataset = DeepDeformDataset(split, "test")
    item = dataset[0]
    H, W = 240, 320
    assert item["source_color"].shape == (3, H, W) and item["source_points"].shape == (3, H, W)
    assert item["pixel_anchors"].shape == (H, W, 4) and item["nodes"].shape[0] == item["num_nodes"]
    assert item["optical_flow"].shape == (2, H, W) and torch.isnan(item["optical_flow"]).any()
    batch = collate([dataset[0], dataset[1]])
    N = max(dataset[0]["num_nodes"], dataset[1]["num_nodes"])
    assert batch["nodes"].shape == (2, N, 3) and batch["edges"].shape[1] == N
    small = int(batch["num_nodes"].argmin())
    assert (batch["edges"][small, batch["num_nodes"][small]:] == -1).all()


def test_reader_errors_name_pair_and_file(split, tmp_path):
    root = str(tmp_path / "copy")
    shutil.copytree(split, root)
    dataset = DeepDeformDataset(root, "test")
    os.remove(os.path.join(root, dataset.labels[1]["pixel_weights"]))
    with pytest.raises(DatasetError) as error:
        dataset[1]
    assert dataset.name(1) in str(error.value) and "pixel_weights" in str(error.value)
    del dataset.labels[0]["graph_edges"]
    with pytest.raises(DatasetError, match="no key 'graph_edges'"):
        dataset[0]
    labels = io.read_labels(os.path.join(root, "test_graphs.json"))
    for label in labels:
        del label["scene_flow"]
    io.write_labels(os.path.join(root, "nogt_graphs.json"), labels)
    assert "scene_flow" not in DeepDeformDataset(root, "nogt")[0]          # a test split: fine
    with pytest.raises(DatasetError, match="no ground truth"):
        DeepDeformDataset(root, "nogt", require_ground_truth=True)


def test_rotation_augmentation_keeps_ground_truth_consistent(split):
    dataset = DeepDeformDataset(split, "test")
    label = dataset.labels[0]
    intr = label["intrinsics"]
    item = {"source_depth": io.read_depth(dataset.path(0, "source_depth")),
            "target_depth": io.read_depth(dataset.path(0, "target_depth")),
            "target_color": io.read_color(dataset.path(0, "target_color")),
            "optical_flow": io.read_optical_flow(dataset.path(0, "optical_flow")),
            "scene_flow": io.read_scene_flow(dataset.path(0, "scene_flow")),
            "nodes": io.read_graph_nodes(dataset.path(0, "graph_nodes")),
            "node_deformations": io.read_graph_node_deformations(dataset.path(0, "graph_node_deformations"))}
    rotate_target(item, intr, np.radians(12.0))
    points = backproject_depth(torch.from_numpy(item["source_depth"]), intr).numpy()
    valid = np.isfinite(item["optical_flow"]).all(0) & np.isfinite(item["scene_flow"]).all(0)
    moved = points[valid] + item["scene_flow"][:, valid].T
    u = intr["fx"] * moved[:, 0] / moved[:, 2] + intr["cx"]
    v = intr["fy"] * moved[:, 1] / moved[:, 2] + intr["cy"]
    ys, xs = np.nonzero(valid)
    assert np.abs(u - (xs + item["optical_flow"][0, valid])).max() < 1e-2
    assert np.abs(v - (ys + item["optical_flow"][1, valid])).max() < 1e-2


def _write_predictions(dataset, out, scale_gt: float):
    """Predictions scale_gt x the ground truth (0 = no motion, 1 = exact)."""
    os.makedirs(out, exist_ok=True)
    for i, label in enumerate(dataset.labels):
        t_path, f_path = prediction_paths(out, dataset.name(i))
        io.write_graph_node_deformations(t_path, scale_gt * io.read_graph_node_deformations(dataset.path(i, "graph_node_deformations")))
        flow = io.read_scene_flow(dataset.path(i, "scene_flow"))
        io.write_flow(f_path, np.where(np.isfinite(flow), scale_gt * np.nan_to_num(flow), -np.inf).astype(np.float32))


def test_evaluate_known_predictions(split, tmp_path):
    dataset = DeepDeformDataset(split, "test")
    _write_predictions(dataset, tmp_path / "exact", 1.0)
    result = _run("evaluate.py", "--dataset-dir", split, "--split", "test", "--predictions", str(tmp_path / "exact"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["Graph Error 3D (mm): 0.000", "EPE 3D (mm): 0.000"]
    _write_predictions(dataset, tmp_path / "zero", 0.0)
    result = _run("evaluate.py", "--dataset-dir", split, "--split", "test", "--predictions", str(tmp_path / "zero"), "--quiet")
    # Independent computation: the mean motion over the evaluated pixels and nodes, pooled.
    node_norms, pixel_norms = [], []
    for i in range(len(dataset)):
        node_norms.append(np.linalg.norm(io.read_graph_node_deformations(dataset.path(i, "graph_node_deformations")), axis=1))
        flow = io.read_scene_flow(dataset.path(i, "scene_flow"))
        mask = evaluation_mask(flow, io.read_depth(dataset.path(i, "source_depth")),
                               io.read_pixel_anchors(dataset.path(i, "pixel_anchors")))
        pixel_norms.append(np.linalg.norm(flow[:, mask].astype(np.float64), axis=0))
    expected = (1000 * np.concatenate(node_norms).mean(), 1000 * np.concatenate(pixel_norms).mean())
    assert result.stdout.splitlines() == [f"Graph Error 3D (mm): {expected[0]:.3f}", f"EPE 3D (mm): {expected[1]:.3f}"]
    assert os.path.isfile(tmp_path / "zero" / "evaluation_test.csv")
    assert os.path.isfile(tmp_path / "zero" / "evaluation_test.txt")


def test_evaluate_accepts_reference_448_row_predictions(split, tmp_path):
    """A prediction with fewer rows is compared with the centre rows of the ground truth."""
    dataset = DeepDeformDataset(split, "test")
    _write_predictions(dataset, tmp_path / "p", 1.0)
    for i in range(len(dataset)):
        _, f_path = prediction_paths(str(tmp_path / "p"), dataset.name(i))
        io.write_flow(f_path, io.read_scene_flow(f_path)[:, 16:224])
    result = _run("evaluate.py", "--dataset-dir", split, "--split", "test", "--predictions", str(tmp_path / "p"), "--quiet")
    assert result.returncode == 0 and "EPE 3D (mm): 0.000" in result.stdout


def test_evaluate_lists_every_bad_prediction(split, tmp_path):
    dataset = DeepDeformDataset(split, "test")
    out = tmp_path / "bad"
    _write_predictions(dataset, out, 1.0)
    t0, f0 = prediction_paths(str(out), dataset.name(0))
    t1, f1 = prediction_paths(str(out), dataset.name(1))
    t2, _ = prediction_paths(str(out), dataset.name(2))
    os.remove(f0)
    with open(f1, "r+b") as handle:
        handle.truncate(100)
    io.write_graph_node_deformations(t2, np.zeros((3, 3), np.float32))
    result = _run("evaluate.py", "--dataset-dir", split, "--split", "test", "--predictions", str(out), "--quiet")
    assert result.returncode == 1 and "Graph Error" not in result.stdout
    assert "3 missing or malformed" in result.stderr
    for text in (f0, f1, "truncated", "node translations"):
        assert str(text) in result.stderr


def test_generate_then_evaluate_resume_and_shards(split, tmp_path):
    full, shards = str(tmp_path / "full"), str(tmp_path / "shards")
    result = _run("generate.py", "--dataset-dir", split, "--split", "test", "--out", full, "--flow", "gt", "--quiet")
    assert result.returncode == 0, result.stderr
    for shard in ("0", "1"):
        result = _run("generate.py", "--dataset-dir", split, "--split", "test", "--out", shards,
                      "--flow", "gt", "--shard", shard, "--num-shards", "2", "--quiet")
        assert result.returncode == 0, result.stderr
    names = [f for f in sorted(os.listdir(full)) if not f.startswith("generate_")]
    assert len(names) == 6
    assert filecmp.cmpfiles(full, shards, names, shallow=False)[0] == names
    # resume: only the missing pair is redone, and identically
    t_path, f_path = prediction_paths(full, DeepDeformDataset(split, "test").name(1))
    kept = open(f_path, "rb").read()
    os.remove(f_path)
    result = _run("generate.py", "--dataset-dir", split, "--split", "test", "--out", full, "--flow", "gt")
    assert "1 pair(s) written, 2 already done" in result.stdout
    assert open(f_path, "rb").read() == kept
    result = _run("evaluate.py", "--dataset-dir", split, "--split", "test", "--predictions", full, "--quiet")
    assert result.returncode == 0
    epe = float(result.stdout.splitlines()[1].split(":")[1])
    assert 0 < epe < 10, result.stdout
    # --flow dis needs no ground truth and no checkpoint
    result = _run("generate.py", "--dataset-dir", split, "--split", "test", "--out", str(tmp_path / "dis"), "--flow", "dis", "--quiet")
    assert result.returncode == 0, result.stderr


def test_generate_refuses_gt_flow_without_ground_truth(split, tmp_path):
    labels = io.read_labels(os.path.join(split, "test_graphs.json"))
    for label in labels:
        for key in ("optical_flow", "scene_flow", "graph_node_deformations"):
            label.pop(key)
    root = tmp_path / "nogt"
    root.mkdir()
    io.write_labels(os.path.join(split, "nogt_graphs.json"), labels)
    result = _run("generate.py", "--dataset-dir", split, "--split", "nogt", "--out", str(tmp_path / "p"), "--flow", "gt")
    os.remove(os.path.join(split, "nogt_graphs.json"))
    assert result.returncode == 2 and "needs ground-truth optical flow" in result.stderr
