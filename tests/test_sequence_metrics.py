"""Tests of the sequence scorer (utils/sequence_metrics.py, evaluate.py --sequence): its figures
agree with an independent brute-force implementation on held-back sequences, the ground truth
scores 0, the static first-frame surface scores an error that grows with the motion, and bad
reconstructions are refused naming the file."""
import csv
import os
import re

import cv2
import numpy as np
import pytest

import evaluate
from dataset import io
from dataset.synthetic_sequence import generate_sequence, read_ground_truth
from options import SequenceOptions
from tests.reference import sequence_metrics_reference as reference
from utils.sequence_metrics import score

FRAMES = 4
NUMBER = r"(-?[0-9.]+|nan)"
SUMMARY = (rf"Deformation error \(mm\): {NUMBER}", rf"Deformation error, last frame \(mm\): {NUMBER}",
           rf"Deformation error, last frame, seen / hidden there \(mm\): {NUMBER} / {NUMBER}",
           rf"Drift \(mm/frame\): {NUMBER}", rf"Accuracy \(mm\): {NUMBER}", rf"Completeness: {NUMBER}",
           rf"Chamfer \(mm\): {NUMBER}")


def coarse(out, **changes) -> SequenceOptions:
    """A sequence with a 4 cm mesh (a few hundred vertices), small enough for brute force."""
    return SequenceOptions(**{"out": str(out), "frames": FRAMES, "seed": 11, "width": 160, "height": 120,
                              "size": 0.4, "spacing": 0.04, "speed": 4.0, **changes})


@pytest.fixture(scope="module")
def held_back(tmp_path_factory):
    root = tmp_path_factory.mktemp("held_back")
    folders = {}
    for shape, seed in (("cloth", 21), ("blob", 22)):
        options = coarse(root / shape, object=shape, seed=seed, detail=True)
        generate_sequence(options, progress=False)
        folders[shape] = options.out
    return folders


def static_reconstruction(faces, truth, visible):
    """The first frame's visible surface, never moved: (T, M, 3) vertices and its faces."""
    keep = visible[0][faces].all(axis=1)
    used = np.flatnonzero(visible[0])
    new_id = np.full(visible.shape[1], -1)
    new_id[used] = np.arange(used.size)
    return np.repeat(truth[:1, used], truth.shape[0], axis=0), new_id[faces[keep]]


def perturbed_reconstruction(faces, truth, rng):
    """Another topology: a random 80 % of the faces (compacted), jittered by 3 mm, drifting by a
    growing offset, plus a few stray vertices far from the surface."""
    keep = faces[rng.uniform(size=faces.shape[0]) < 0.8]
    used = np.unique(keep)
    new_id = np.full(truth.shape[1], -1)
    new_id[used] = np.arange(used.size)
    vertices = truth[:, used] + rng.normal(0, 0.003, (truth.shape[0], used.size, 3))
    vertices += np.arange(truth.shape[0])[:, None, None] * np.array([0.002, -0.001, 0.003])
    stray = truth[:, :5] + np.array([0.0, 0.0, 0.05])
    return np.concatenate([vertices, stray], axis=1), new_id[keep]


def write_reconstruction(folder, vertices, faces):
    for t in range(vertices.shape[0]):
        io.write_ply(os.path.join(folder, "frames", f"{t:06d}.ply"), vertices[t], faces)


def assert_agrees(faces, truth, visible, recon, frame_ids=None):
    ours = score(faces, truth, visible, recon, frame_ids)
    theirs = reference.score(faces, truth, visible, recon, frame_ids=frame_ids)
    assert ours.matched == theirs["matched"]
    for name in ("deformation_error", "deformation_error_last", "drift", "accuracy", "chamfer"):
        np.testing.assert_allclose(getattr(ours, name), theirs[name], atol=1e-6, err_msg=name)
    np.testing.assert_allclose(ours.completeness, theirs["completeness"], atol=1e-12)
    np.testing.assert_allclose(ours.per_frame["deformation_error_mm"] / 1000, theirs["per_frame_deformation"],
                               atol=1e-6)
    np.testing.assert_allclose(ours.per_frame["accuracy_mm"] / 1000, theirs["per_frame_accuracy"], atol=1e-6)
    for name, key in (("deformation_error_seen_mm", "per_frame_seen"), ("deformation_error_hidden_mm",
                                                                         "per_frame_hidden")):
        np.testing.assert_allclose(ours.per_frame[name] / 1000, theirs[key], atol=1e-6, err_msg=name)
    return ours


def test_closest_point_reference_is_right():
    # The brute-force reference itself: points above a triangle's inside, beyond its edges and
    # beyond its corners.
    a, b, c = np.array([[0.0, 0, 0]]), np.array([[1.0, 0, 0]]), np.array([[0.0, 1, 0]])
    queries = np.array([[0.2, 0.2, 0.5], [0.5, -1.0, 0.0], [2.0, -1.0, 0.0], [1.0, 1.0, 0.0], [-1, -1, 1.0]])
    expected = np.array([[0.2, 0.2, 0], [0.5, 0, 0], [1, 0, 0], [0.5, 0.5, 0], [0, 0, 0]])
    np.testing.assert_allclose(reference.closest_on_triangles(queries, a, b, c)[:, 0], expected, atol=1e-12)


@pytest.mark.parametrize("shape", ["cloth", "blob"])
def test_scores_agree_with_the_reference(held_back, shape):
    faces, truth, visible = read_ground_truth(held_back[shape])
    truth = truth.astype(np.float64)
    rng = np.random.default_rng(5)
    ground_truth = assert_agrees(faces, truth, visible, truth)
    assert ground_truth.deformation_error < 1e-6 and ground_truth.accuracy < 1e-6
    assert ground_truth.chamfer < 1e-6 and ground_truth.completeness == 1.0
    static = assert_agrees(faces, truth, visible, *static_reconstruction(faces, truth, visible)[:1])
    assert static.deformation_error > 0.005
    recon, _ = perturbed_reconstruction(faces, truth, rng)
    perturbed = assert_agrees(faces, truth, visible, recon)
    assert 0 < perturbed.completeness < 1 and perturbed.drift > 0


def test_static_error_grows_with_the_motion(tmp_path):
    errors = []
    for scale in (0.5, 1.0):
        options = coarse(tmp_path / f"scale{scale}", object="cloth", motion_scale=scale, frames=6)
        generate_sequence(options, progress=False)
        faces, truth, visible = read_ground_truth(options.out)
        recon, _ = static_reconstruction(faces, truth.astype(np.float64), visible)
        scores = score(faces, truth.astype(np.float64), visible, recon)
        per_frame = scores.per_frame["deformation_error_mm"]
        assert per_frame[0] < 1e-3 and per_frame[-1] > per_frame[1] > per_frame[0]
        assert scores.drift > 0
        errors.append(scores.deformation_error)
    assert errors[1] > 1.5 * errors[0]


def run_evaluate(capsys, sequence, reconstruction, *extra):
    code = evaluate.main(["--sequence", sequence, "--reconstruction", reconstruction, *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_evaluate_command_writes_lines_csv_and_plot(tmp_path, capsys, held_back):
    sequence = held_back["blob"]
    faces, truth, visible = read_ground_truth(sequence)
    out = str(tmp_path / "static")
    recon, recon_faces = static_reconstruction(faces, truth, visible)
    write_reconstruction(out, recon, recon_faces)
    code, text, _ = run_evaluate(capsys, sequence, out)
    assert code == 0
    last = text.strip().splitlines()[-len(SUMMARY):]
    for line, pattern in zip(last, SUMMARY):
        assert re.fullmatch(pattern, line), line
    expected = score(faces, truth.astype(np.float64), visible, recon.astype(np.float32).astype(np.float64))
    assert float(last[0].split(": ")[1]) == pytest.approx(expected.deformation_error * 1000, abs=1e-3)
    with open(os.path.join(out, "evaluation_sequence.csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["frame"]) for row in rows] == list(range(FRAMES))
    assert float(rows[-1]["deformation_error_mm"]) == pytest.approx(float(last[1].split(": ")[1]), abs=1e-3)
    image = cv2.imread(os.path.join(out, "evaluation_sequence.png"))
    assert image is not None and image.std() > 10

    write_reconstruction(str(tmp_path / "gt"), truth, faces)
    code, text, _ = run_evaluate(capsys, sequence, str(tmp_path / "gt"))
    assert code == 0 and text.strip().splitlines()[-1] == "Chamfer (mm): 0.000"


def test_evaluate_scores_the_frames_a_run_has(tmp_path, capsys, held_back):
    """A run of fuse.py --frames 1:4 (recorded in OUT/fusion_options.json) or 0:4:2 (said by
    --frames) is scored on those frames, the first as the reference, the drift per input frame;
    the seen / hidden split agrees with the reference."""
    import json
    sequence = held_back["blob"]
    faces, truth, visible = read_ground_truth(sequence)
    truth = truth.astype(np.float64)
    rng = np.random.default_rng(3)
    recon, recon_faces = perturbed_reconstruction(faces, truth, rng)
    for ids, spec, recorded in (([1, 2, 3], "1:4", True), ([0, 2], "0:4:2", False)):
        out = str(tmp_path / "_".join(map(str, ids)))
        for t in ids:
            io.write_ply(os.path.join(out, "frames", f"{t:06d}.ply"), recon[t], recon_faces)
        if recorded:
            with open(os.path.join(out, "fusion_options.json"), "w") as handle:
                json.dump({"fusion": {"frames": spec}}, handle)
        else:
            code, _, err = run_evaluate(capsys, sequence, out)      # every frame expected: 000001 missing
            assert code == 1 and os.path.join(out, "frames", "000001.ply") in err
        code, text, _ = run_evaluate(capsys, sequence, out, *([] if recorded else ["--frames", spec]))
        assert code == 0, text
        expected = assert_agrees(faces, truth[ids], visible[ids], recon[ids].astype(np.float32).astype(np.float64),
                                 ids)
        assert float(text.strip().splitlines()[-len(SUMMARY)].split(": ")[1]) == pytest.approx(
            expected.deformation_error * 1000, abs=1e-3)
        with open(os.path.join(out, "evaluation_sequence.csv")) as handle:
            assert [int(row["frame"]) for row in csv.DictReader(handle)] == ids
    code, _, err = run_evaluate(capsys, sequence, out, "--frames", "9:")
    assert code == 1 and "--frames 9:" in err
    # The split: the hidden part of the perturbed run is scored apart from the seen part.
    scores = score(faces, truth, visible, recon)
    hidden = scores.per_frame["hidden_matched_vertices"]
    assert hidden[0] == 0 and np.isnan(scores.per_frame["deformation_error_hidden_mm"][0])
    assert hidden[-1] > 0 and np.isfinite(scores.per_frame["deformation_error_hidden_mm"][-1])


def test_evaluate_refuses_bad_reconstructions(tmp_path, capsys, held_back):
    sequence = held_back["cloth"]
    faces, truth, _ = read_ground_truth(sequence)
    cases = {}
    missing = str(tmp_path / "missing")
    write_reconstruction(missing, truth, faces)
    os.remove(os.path.join(missing, "frames", "000002.ply"))
    cases["missing"] = (missing, "000002.ply", "not found")
    topology = str(tmp_path / "topology")
    write_reconstruction(topology, truth, faces)
    io.write_ply(os.path.join(topology, "frames", "000001.ply"), truth[1], faces[:-1])
    cases["topology"] = (topology, "000001.ply", "another topology")
    nan = str(tmp_path / "nan")
    broken = truth.copy()
    broken[3, 7] = np.nan
    write_reconstruction(nan, broken, faces)
    cases["non-finite"] = (nan, "000003.ply", "non-finite")
    for folder, name, words in cases.values():
        code, _, err = run_evaluate(capsys, sequence, folder)
        assert code == 1
        assert os.path.join(folder, "frames", name) in err and words in err
    with pytest.raises(SystemExit):
        evaluate.main(["--sequence", sequence])
    capsys.readouterr()


def test_ply_round_trip_other_writers_and_bad_files(tmp_path):
    import open3d as o3d

    rng = np.random.default_rng(0)
    vertices = rng.normal(size=(30, 3)).astype(np.float32)
    faces = rng.integers(0, 30, (40, 3))
    path = str(tmp_path / "mesh.ply")
    io.write_ply(path, vertices, faces)
    back, back_faces = io.read_ply(path)
    np.testing.assert_array_equal(back, vertices)
    np.testing.assert_array_equal(back_faces, faces)
    # Files other tools write: Open3D binary with normals, and ASCII.
    sphere = o3d.geometry.TriangleMesh.create_sphere(0.1)
    sphere.compute_vertex_normals()
    for ascii_ in (False, True):
        other = str(tmp_path / f"open3d_{ascii_}.ply")
        o3d.io.write_triangle_mesh(other, sphere, write_ascii=ascii_)
        read_vertices, read_faces = io.read_ply(other)
        np.testing.assert_allclose(read_vertices, np.asarray(sphere.vertices), atol=1e-6)
        np.testing.assert_array_equal(read_faces, np.asarray(sphere.triangles))
    with open(path, "rb") as handle:
        data = handle.read()
    truncated = str(tmp_path / "truncated.ply")
    with open(truncated, "wb") as handle:
        handle.write(data[:-7])
    with pytest.raises(io.FormatError, match="truncated.ply.*truncated"):
        io.read_ply(truncated)
    quads = str(tmp_path / "quads.ply")
    with open(quads, "w") as handle:
        handle.write("ply\nformat ascii 1.0\nelement vertex 4\nproperty float x\nproperty float y\n"
                     "property float z\nelement face 1\nproperty list uchar int vertex_indices\nend_header\n"
                     "0 0 0\n1 0 0\n1 1 0\n0 1 0\n4 0 1 2 3\n")
    with pytest.raises(io.FormatError, match="quads.ply: faces must be triangles"):
        io.read_ply(quads)
    with pytest.raises(io.FormatError, match="nothing.ply: PLY mesh file not found"):
        io.read_ply(str(tmp_path / "nothing.ply"))
