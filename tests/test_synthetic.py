"""Tests of the synthetic data generator (dataset/synthetic/): determinism and resume, the
files against dataset/io.py, exact geometric ground truth, non-trivial motion, graph files
that agree with the scene flow, the real-frame path on the DeepDeform samples, the demo pair."""
import os

import numpy as np
import pytest
import torch

from dataset import io, synthetic
from options import GraphOptions, SyntheticOptions
from tests.conftest import REPO, SEQ017, SEQ258, require
from model import image_proc

WIDTH, HEIGHT = 320, 240
PAIRS = 5  # one per motion family, in the default order


def small_options(**changes) -> SyntheticOptions:
    return SyntheticOptions(**{"width": WIDTH, "height": HEIGHT, **changes})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic"))
    labels = synthetic.generate(out, "train", PAIRS, 7, small_options(), progress=False)
    return out, labels


def files_under(root: str):
    """{relative path: bytes} of every file under root."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, root)] = handle.read()
    return found


def load_pair(root: str, label: dict) -> dict:
    """Every file of a pair, read with the dataset/io.py readers."""
    def path(key):
        return os.path.join(root, label[key])

    return {
        "source_color": io.read_color(path("source_color")),
        "target_color": io.read_color(path("target_color")),
        "source_depth": io.read_depth(path("source_depth")),
        "target_depth": io.read_depth(path("target_depth")),
        "source_mask": io.read_mask(path("source_mask")),
        "optical_flow": io.read_optical_flow(path("optical_flow")),
        "scene_flow": io.read_scene_flow(path("scene_flow")),
        "nodes": io.read_graph_nodes(path("graph_nodes")),
        "edges": io.read_graph_edges(path("graph_edges")),
        "edges_weights": io.read_graph_edges_weights(path("graph_edges_weights")),
        "clusters": io.read_graph_clusters(path("graph_clusters")),
        "node_deformations": io.read_graph_node_deformations(path("graph_node_deformations")),
        "pixel_anchors": io.read_pixel_anchors(path("pixel_anchors")),
        "pixel_weights": io.read_pixel_weights(path("pixel_weights")),
        "intrinsics": io.read_intrinsics(os.path.join(root, os.path.dirname(os.path.dirname(
            label["source_color"])), "intrinsics.txt")),
    }


def first_pair(seed: int, split: str, index: int, options: SyntheticOptions,
               graph_options: GraphOptions = GraphOptions()) -> dict:
    """make_pair with the first usable attempt, as the generator picks it."""
    for attempt in range(synthetic.MAX_ATTEMPTS):
        try:
            return synthetic.make_pair(synthetic.pair_rng(seed, split, index, attempt), options, index,
                                       graph_options=graph_options)
        except (synthetic.SceneError, synthetic.GraphError):
            continue
    raise AssertionError("no usable attempt")


def check_files(root: str, label: dict, width: int, height: int) -> dict:
    pair = load_pair(root, label)
    assert pair["source_color"].shape == pair["target_color"].shape == (height, width, 3)
    assert pair["source_depth"].shape == pair["target_depth"].shape == pair["source_mask"].shape \
        == (height, width)
    assert pair["optical_flow"].shape == (2, height, width)
    assert pair["scene_flow"].shape == (3, height, width)
    num_nodes = pair["nodes"].shape[0]
    assert num_nodes >= 4
    assert pair["edges"].shape == pair["edges_weights"].shape == (num_nodes, 8)
    assert pair["clusters"].shape == (num_nodes, 1)
    assert pair["node_deformations"].shape == (num_nodes, 3)
    assert np.isfinite(pair["node_deformations"]).all()
    assert pair["edges"].max() < num_nodes and pair["pixel_anchors"].max() < num_nodes
    assert pair["pixel_anchors"].shape == pair["pixel_weights"].shape == (height, width, 4)
    for key in ("fx", "fy", "cx", "cy"):
        assert pair["intrinsics"][key] == pytest.approx(label["intrinsics"][key], abs=1e-5)
    valid = np.isfinite(pair["optical_flow"]).all(axis=0)
    assert valid.any()
    assert (np.isfinite(pair["scene_flow"]).all(axis=0) == valid).all(), \
        "scene flow must be valid exactly where optical flow is"
    assert (pair["source_mask"] & (pair["source_depth"] > 0))[valid].all(), \
        "ground truth only on source object pixels with depth"
    anchored = (pair["pixel_anchors"] >= 0).all(axis=2)
    assert not (anchored & ~pair["source_mask"]).any()
    return pair


def check_geometry(pair: dict, intrinsics: dict):
    """Source point + scene flow projects to source pixel + optical flow, and the target depth
    there is the depth of the moved point up to sensor noise. Returns the valid pixels (y, x)
    and the moved points."""
    height, width = pair["source_depth"].shape
    ys, xs = np.nonzero(np.isfinite(pair["optical_flow"]).all(axis=0))
    points = image_proc.backproject_depth(torch.from_numpy(pair["source_depth"]), intrinsics)
    source = points.numpy()[ys, xs].astype(np.float64)
    moved = source + pair["scene_flow"][:, ys, xs].T.astype(np.float64)
    flowed = np.stack((xs, ys), axis=1) + pair["optical_flow"][:, ys, xs].T.astype(np.float64)
    projected = synthetic.project(moved, intrinsics)
    error = np.abs(projected - flowed).max()
    assert error < 1e-3, f"reprojection of the scene flow is off the optical flow by {error:.2e} px"
    assert (flowed >= 0).all() and (flowed[:, 0] <= width - 1).all() and (flowed[:, 1] <= height - 1).all()

    depth = pair["target_depth"].astype(np.float64)
    x0 = np.clip(np.floor(flowed[:, 0]).astype(int), 0, width - 2)
    y0 = np.clip(np.floor(flowed[:, 1]).astype(int), 0, height - 2)
    ax, ay = flowed[:, 0] - x0, flowed[:, 1] - y0
    corners = np.stack((depth[y0, x0], depth[y0, x0 + 1], depth[y0 + 1, x0], depth[y0 + 1, x0 + 1]), 1)
    # Bilinear depth is only meaningful on one surface with all four neighbours measured.
    usable = (corners > 0).all(axis=1) & (np.ptp(corners, axis=1) < 0.05)
    assert usable.mean() > 0.6
    sampled = (1 - ay) * ((1 - ax) * corners[:, 0] + ax * corners[:, 1]) + \
        ay * ((1 - ax) * corners[:, 2] + ax * corners[:, 3])
    residual = np.abs(sampled - moved[:, 2])[usable]
    bound = 4 * synthetic.noise_sigma(moved[usable, 2]) + 0.003
    assert np.median(residual) < 0.005, f"median target depth error {np.median(residual) * 1000:.1f} mm"
    assert (residual < bound).mean() > 0.99, \
        f"{(residual >= bound).mean():.2%} of valid pixels disagree with the target depth"
    return ys, xs, source, moved


# ---------------------------------------------------------------------------------------------


def test_files_load_and_labels_are_complete(dataset):
    root, labels = dataset
    assert io.read_labels(os.path.join(root, "train_graphs.json")) == labels
    assert [label["seq_id"] for label in labels] == [f"seq{i:04d}" for i in range(PAIRS)]
    assert [label["motion"] for label in labels] == list(synthetic.MOTIONS)
    for label in labels:
        assert label["object_id"] in synthetic.SHAPES and label["shape"] == label["object_id"]
        assert (label["source_id"], label["target_id"]) == (synthetic.SOURCE_ID, synthetic.TARGET_ID)
        assert label["graph_nodes"] == (f"train/{label['seq_id']}/graph_nodes/"
                                        f"{label['object_id']}_000000_000001_geodesic_0.05.bin")
        assert label["source_mask"] == f"train/{label['seq_id']}/mask/000000_{label['object_id']}.png"
        check_files(root, label, WIDTH, HEIGHT)


def test_deterministic_resumable_and_independent_of_count(dataset, tmp_path):
    root, _ = dataset
    reference = files_under(root)
    again = str(tmp_path / "again")
    synthetic.generate(again, "train", PAIRS, 7, small_options(), progress=False)
    assert files_under(again) == reference

    # Interrupted run: one pair lost a file, another its record. Finished pairs are kept as
    # they are (not rewritten), the damaged ones are made again, byte for byte.
    kept = os.path.join(again, "train", "seq0000", "depth", "000001.png")
    os.utime(kept, (1, 1))
    os.remove(os.path.join(again, labels_path(root, 2, "scene_flow")))
    os.remove(os.path.join(again, "train", "seq0003", synthetic.PAIR_RECORD))
    synthetic.generate(again, "train", PAIRS, 7, small_options(), progress=False)
    assert files_under(again) == reference
    assert os.stat(kept).st_mtime == 1

    # Pair i does not depend on how many pairs are made.
    fewer = str(tmp_path / "fewer")
    synthetic.generate(fewer, "train", 2, 7, small_options(), progress=False)
    made = files_under(os.path.join(fewer, "train"))
    assert made and all(reference[os.path.join("train", k)] == v for k, v in made.items())


def labels_path(root: str, index: int, key: str) -> str:
    return io.read_labels(os.path.join(root, "train_graphs.json"))[index][key]


def test_ground_truth_is_geometrically_exact(dataset):
    root, labels = dataset
    for label in labels:
        pair = load_pair(root, label)
        check_geometry(pair, label["intrinsics"])


def test_motion_is_non_trivial_and_in_range(dataset):
    root, labels = dataset
    for label in labels:
        pair = load_pair(root, label)
        ys, xs, source, moved = check_geometry(pair, label["intrinsics"])
        flow = np.linalg.norm(pair["optical_flow"][:, ys, xs], axis=0).mean()
        motion = np.linalg.norm(moved - source, axis=1).mean()
        non_rigid = synthetic.rigid_fit_residual(source, moved).mean()
        valid = len(ys) / (pair["source_mask"] & (pair["source_depth"] > 0)).sum()
        print(f"{label['motion']:>6} on {label['object_id']:<8}: mean optical flow {flow:5.1f} px, "
              f"mean 3D motion {motion * 100:4.1f} cm, non-rigid residual {non_rigid * 1000:4.1f} mm, "
              f"valid {valid:.0%}")
        assert 0.01 < motion < 0.3
        assert non_rigid > 0.005, f"{label['motion']}: the motion is (nearly) rigid"
        if label["motion"] == "large":
            scale = WIDTH / 640
            assert 30 * scale <= flow <= 60 * scale


def test_graph_node_deformations_agree_with_scene_flow(dataset):
    """Warping source points with the ground-truth node translations through the pixel anchors
    and weights, x' = x + sum_k w_k d_(a_k), must land near source point + scene flow."""
    root, labels = dataset
    errors = []
    for label in labels:
        pair = load_pair(root, label)
        valid = np.isfinite(pair["scene_flow"]).all(axis=0) & (pair["pixel_anchors"] >= 0).all(axis=2)
        anchors, weights = pair["pixel_anchors"][valid], pair["pixel_weights"][valid]
        warped = (weights[..., None] * pair["node_deformations"][anchors]).sum(axis=1)
        epe = np.linalg.norm(warped - pair["scene_flow"][:, valid].T, axis=1).mean()
        errors.append(epe)
        print(f"{label['motion']:>6}: EPE 3D of the graph warp {epe * 1000:.1f} mm "
              f"over {valid.sum()} pixels, {pair['nodes'].shape[0]} nodes")
        assert epe < 0.02
    print(f"mean EPE 3D of the ground-truth graph warp: {np.mean(errors) * 1000:.1f} mm")


def test_occluded_points_are_invalid():
    """Source points that land inside the target image but get no ground truth are hidden
    there: the target surface is in front of them within a pixel (many are just behind a
    silhouette, so the nearest pixel alone may see past it). Strong twists of closed blobs
    turn parts of the front away; no dropout, so that the occluders have depth."""
    options = small_options(shapes="blob", motions="twist", motion_scale=2.0, depth_noise=0.0,
                            holes=0.0, grazing_angle=90.0)
    hidden_checked = 0
    for index in range(2):
        pair = first_pair(5, "occlusion", index, options)
        everything = np.isfinite(pair["scene_flow_all"]).all(axis=0)
        valid = np.isfinite(pair["optical_flow"]).all(axis=0)
        ys, xs = np.nonzero(everything & ~valid)
        source = image_proc.backproject_depth(torch.from_numpy(pair["source_depth"]),
                                              pair["intrinsics"]).numpy()[ys, xs]
        moved = source.astype(np.float64) + pair["scene_flow_all"][:, ys, xs].T
        uv = synthetic.project(moved, pair["intrinsics"])
        inside = (uv >= 0).all(axis=1) & (uv[:, 0] <= WIDTH - 1) & (uv[:, 1] <= HEIGHT - 1)
        pixel = np.round(uv[inside]).astype(int)
        depth = np.pad(np.where(pair["target_depth"] > 0, pair["target_depth"], np.inf), 1,
                       constant_values=np.inf)
        nearest = np.min([depth[pixel[:, 1] + 1 + dy, pixel[:, 0] + 1 + dx]
                          for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
        hidden_checked += inside.sum()
        assert (nearest < moved[inside, 2] - 0.002).mean() > 0.95
    assert hidden_checked > 200


@pytest.mark.parametrize("sequence, object_id", [(SEQ258, "shirt"), (SEQ017, "foreground")])
def test_real_frames(sequence, object_id, tmp_path):
    """Real frames: seq258 has a mask for frame 000000, seq017 none (foreground by depth)."""
    require(sequence)
    options = small_options(real_frames=sequence)
    frames = synthetic.load_real_frames(sequence, WIDTH, HEIGHT)
    assert len(frames) == 2
    first = frames[0]
    assert first.object_id == object_id
    assert 0.05 < first.mask.mean() < 0.6
    labels = synthetic.generate(str(tmp_path), "real", 2, 0, options, progress=False)
    for label in labels:
        assert label["shape"] == "real" and label["real_frame"] in {f.name for f in frames}
        pair = check_files(str(tmp_path), label, WIDTH, HEIGHT)
        ys, _, _, _ = check_geometry(pair, label["intrinsics"])
        assert len(ys) > 0.02 * WIDTH * HEIGHT
        # The background is the real frame, kept as measured.
        same = (pair["target_depth"] == pair["source_depth"]) & (pair["source_depth"] > 0)
        assert same.mean() > 0.4
        frame = next(f for f in frames if f.name == label["real_frame"])
        assert np.array_equal(pair["source_depth"], frame.depth)


def test_command_line(tmp_path):
    labels = synthetic.main(["--out", str(tmp_path), "--split", "val", "--pairs", "1", "--seed", "3",
                             "--width", "160", "--height", "120", "--motions", "twist",
                             "--shapes", "blob", "--node-coverage", "0.04"])
    assert os.path.isfile(tmp_path / "val_graphs.json")
    (label,) = labels
    assert (label["motion"], label["object_id"]) == ("twist", "blob")
    assert label["graph_nodes"].endswith("blob_000000_000001_geodesic_0.04.bin")
    check_files(str(tmp_path), label, 160, 120)


def test_bad_family_names_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="motion"):
        synthetic.generate(str(tmp_path), "x", 1, 0, small_options(motions="bend,wobble"), progress=False)
    with pytest.raises(ValueError, match="shape"):
        synthetic.generate(str(tmp_path), "x", 1, 0, small_options(shapes="torus"), progress=False)


def test_example_data_demo_pair():
    """example_data/ holds one 640x480 procedural pair made by this generator."""
    root = os.path.join(REPO, "example_data")
    (label,) = io.read_labels(os.path.join(root, "demo_graphs.json"))
    pair = check_files(root, label, 640, 480)
    check_geometry(pair, label["intrinsics"])
    assert label["shape"] in synthetic.SHAPES


def test_graph_options_reach_the_graph():
    options = small_options(motions="rbf")
    coarse = first_pair(0, "g", 0, options, GraphOptions(mode="euclidean", node_coverage=0.08))
    fine = first_pair(0, "g", 0, options)
    assert np.array_equal(coarse["scene_flow"], fine["scene_flow"])
    assert coarse["graph"].num_nodes < fine["graph"].num_nodes
