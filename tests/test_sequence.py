"""Tests of the synthetic sequence generator (dataset/synthetic_sequence/): the layout, exact
ground truth (frame 0 is the rest mesh, visible vertices lie on the rendered depth within the
sensor's noise, hidden ones behind it), determinism, resume and extension, the pair export."""
import json
import os
import shutil

import cv2
import numpy as np
import pytest

from dataset import io
from dataset.synthetic import noise_sigma, project, vertex_normals
from dataset.synthetic_sequence import (SequenceError, build_scene, deform, export_pair, generate_sequence,
                                        read_ground_truth)
from dataset.synthetic_sequence.objects import PHOTOS, make_texture, texture_images
from dataset.synthetic_sequence.pair_export import main as export_main
from dataset.synthetic_sequence.sequence import main as sequence_main
from options import GraphOptions, PairExportOptions, SequenceOptions

FRAMES = 5
# Small and quick: 160x120 and a 1 cm mesh; the motion runs 4x faster so that 5 frames move.
SMALL = dict(width=160, height=120, spacing=0.01, speed=4.0)


def small(out, **changes) -> SequenceOptions:
    return SequenceOptions(**{"out": str(out), "frames": FRAMES, "seed": 3, **SMALL, **changes})


@pytest.fixture(scope="module")
def sequences(tmp_path_factory):
    root = tmp_path_factory.mktemp("sequences")
    made = {}
    for shape in ("cloth", "blob"):
        options = small(root / shape, object=shape, detail=shape == "blob")
        generate_sequence(options, progress=False)
        made[shape] = options
    return made


def test_layout_is_deepdeform_sequence_plus_gt(sequences):
    for shape, options in sequences.items():
        folder = options.out
        names = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files)
        expected = sorted([f"color/{t:06d}.jpg" for t in range(FRAMES)] + [f"depth/{t:06d}.png" for t in range(FRAMES)]
                          + [f"mask/{t:06d}_{shape}.png" for t in range(FRAMES)]
                          + ["intrinsics.txt", "gt/gt.npz", "gt/mesh.ply", "gt/motion.json"])
        assert names == expected
        with np.load(os.path.join(folder, "gt", "gt.npz")) as data:
            assert sorted(data.files) == ["faces", "vertices", "visible"]
            faces, vertices, visible = data["faces"], data["vertices"], data["visible"]
        assert faces.dtype == np.int32 and faces.ndim == 2 and faces.shape[1] == 3
        assert vertices.dtype == np.float32 and vertices.shape[0] == FRAMES and vertices.shape[2] == 3
        assert visible.dtype == bool and visible.shape == vertices.shape[:2]
        assert faces.min() == 0 and faces.max() == vertices.shape[1] - 1
        ply_vertices, ply_faces = io.read_ply(os.path.join(folder, "gt", "mesh.ply"))
        np.testing.assert_array_equal(ply_vertices, vertices[0])
        np.testing.assert_array_equal(ply_faces, faces)
        depth = io.read_depth(os.path.join(folder, "depth", "000000.png"))
        assert depth.shape == (options.height, options.width)
        assert io.read_color(os.path.join(folder, "color", "000000.jpg")).shape == (options.height, options.width, 3)
        with open(os.path.join(folder, "gt", "motion.json")) as handle:
            record = json.load(handle)
        assert record["settings"]["sequence"]["object"] == shape
        assert set(record["motion"]["components"]) == {"bend", "twist", "bulge", "turn", "drift"}
        assert ("wrinkles" in record["motion"]) == (shape == "blob")


def test_blob_is_closed_and_welded(sequences):
    faces, _, _ = read_ground_truth(sequences["blob"].out)
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert (counts == 2).all()     # every edge has two faces: no seam, no boundary


def test_frame_zero_is_the_rest_mesh_and_the_motion_moves(sequences):
    for options in sequences.values():
        scene = build_scene(options)
        x = scene.mesh.vertices
        np.testing.assert_array_equal(deform(scene.motion, x, scene.normals, 0), x)
        _, vertices, _ = read_ground_truth(options.out)
        rest = (x @ scene.orientation.T + scene.centre)[scene.gt_ids]
        np.testing.assert_allclose(vertices[0], rest, atol=1e-6)
        motion = np.linalg.norm(vertices[-1] - vertices[0], axis=1)
        assert motion.mean() > 0.01            # centimetres in 5 frames at --speed 4
        steps = np.linalg.norm(np.diff(vertices, axis=0), axis=2).max(axis=1)
        assert steps.max() < 0.1               # and smooth: no vertex jumps


def test_visible_vertices_lie_on_the_rendered_depth(sequences):
    for shape, options in sequences.items():
        faces, vertices, visible = read_ground_truth(options.out)
        intrinsics = io.read_intrinsics(os.path.join(options.out, "intrinsics.txt"))
        for t in range(FRAMES):
            depth = io.read_depth(os.path.join(options.out, "depth", f"{t:06d}.png"))
            mask = io.read_mask(os.path.join(options.out, "mask", f"{t:06d}_{shape}.png"))
            points = vertices[t].astype(np.float64)
            px = np.round(project(points, intrinsics)).astype(int)
            inside = (px[:, 0] >= 0) & (px[:, 0] < options.width) & (px[:, 1] >= 0) & (px[:, 1] < options.height)
            assert visible[t].sum() > 50
            assert not (visible[t] & ~inside).any()
            seen = visible[t]
            stored = depth[px[seen, 1], px[seen, 0]]
            # On the rim a vertex may round to the pixel beside the object's last one.
            near_mask = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
            assert near_mask[px[seen, 1], px[seen, 0]].mean() > 0.98
            usable = stored > 0
            assert usable.mean() > 0.5     # holes, edge and grazing-angle dropout
            # A vertex projects between pixel centres, so the pixel sees the surface up to half a
            # pixel diagonal away: on surface facing the camera (|cos| > 0.7, slope <= 1) that
            # moves the depth by at most 0.71 pixel widths, on top of 4 sigma of sensor noise
            # and half a millimetre of quantisation.
            normals = vertex_normals(points, faces.astype(np.int64))
            cosine = np.abs((normals * points).sum(1)) / np.linalg.norm(points, axis=1)
            facing = usable & (cosine[seen] > 0.7)
            z = points[seen, 2][facing]
            bound = 4 * noise_sigma(z) + 0.71 * z / intrinsics["fx"] + 0.0005
            close = np.abs(stored[facing] - z) < bound
            assert facing.sum() > 50 and close.mean() > 0.97, (shape, t, close.mean())
            # Hidden vertices inside the image lie behind what the camera saw.
            hidden = ~visible[t] & inside
            if hidden.sum() > 50:
                behind = depth[px[hidden, 1], px[hidden, 0]]
                valid = behind > 0
                assert np.mean(behind[valid] < points[hidden, 2][valid] - 0.002) > 0.9


def test_turn_brings_unseen_surface_into_view(tmp_path):
    # Over 40 frames the body turns by 50-80 degrees: vertices hidden in frame 0 come into view.
    options = SequenceOptions(out=str(tmp_path / "turn"), frames=40, seed=1, width=160, height=120, spacing=0.02,
                              object="blob", motion="turn")
    generate_sequence(options, progress=False)
    _, _, visible = read_ground_truth(options.out)
    newly_seen = (visible[1:] & ~visible[0]).any(axis=0).sum()
    assert newly_seen > 0.1 * visible.shape[1]


def test_deterministic_resumable_and_extendable(tmp_path, sequences):
    reference = sequences["cloth"]
    again = small(tmp_path / "again", object="cloth")
    summary = generate_sequence(again, progress=False)
    assert summary["written"] == FRAMES

    def files(folder):
        return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
                for d, _, names in os.walk(folder) for f in names}
    first = files(reference.out)
    assert files(again.out) == first

    os.remove(os.path.join(again.out, "color", "000003.jpg"))
    os.remove(os.path.join(again.out, "gt", "gt.npz"))
    summary = generate_sequence(again, progress=False)
    assert summary["written"] == 1 and summary["skipped"] == FRAMES - 1
    assert files(again.out) == first

    longer = small(tmp_path / "again", object="cloth", frames=FRAMES + 2)
    assert generate_sequence(longer, progress=False)["written"] == 2
    _, extended, _ = read_ground_truth(again.out)
    _, original, _ = read_ground_truth(reference.out)
    np.testing.assert_array_equal(extended[:FRAMES], original)
    shorter = small(tmp_path / "again", object="cloth", frames=3)
    generate_sequence(shorter, progress=False)
    assert sorted(os.listdir(os.path.join(again.out, "color"))) == ["000000.jpg", "000001.jpg", "000002.jpg"]

    other = small(tmp_path / "other", object="cloth", seed=4)
    generate_sequence(other, progress=False)
    assert files(other.out)["color/000000.jpg"] != first["color/000000.jpg"]
    with pytest.raises(SequenceError, match="other settings.*seed"):
        generate_sequence(small(tmp_path / "other", object="cloth", seed=5), progress=False)


def test_command_line_and_bad_input(tmp_path, capsys):
    out = tmp_path / "cli"
    sequence_main(["--out", str(out), "--frames", "2", "--width", "160", "--height", "120", "--spacing", "0.02",
                   "--object", "blob", "--no-detail"])
    assert "wrote 2 frames" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown motion families.*wobble"):
        sequence_main(["--out", str(tmp_path / "x"), "--motion", "bend,wobble"])
    with pytest.raises(SystemExit, match="no texture images"):
        sequence_main(["--out", str(tmp_path / "y"), "--textures", str(tmp_path)])


def test_textures_and_real_background(tmp_path):
    textures = tmp_path / "textures"
    textures.mkdir()
    sample = "/work/shared/deepdeform_samples/train/seq258"
    real = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "example_data")
    background = sample if os.path.isdir(sample) else real
    image_folder = os.path.join(background, "color")
    if not os.path.isdir(image_folder):
        pytest.skip("no real RGB-D frame on this machine")
    shutil.copy(os.path.join(image_folder, sorted(os.listdir(image_folder))[0]), textures / "photo.jpg")
    options = small(tmp_path / "real", frames=2, textures=str(textures), background=background)
    summary = generate_sequence(options, progress=False)
    assert summary["sources"]["texture"] == "photo.jpg"
    assert summary["sources"]["background"].startswith(background)
    _, vertices, visible = read_ground_truth(options.out)
    assert visible[0].mean() > 0.5


def test_export_pair_has_exact_flow(tmp_path, sequences):
    options = sequences["blob"]
    out = tmp_path / "pairs"
    label = export_pair(PairExportOptions(sequence=options.out, source=0, target=3, out=str(out), index=2),
                        GraphOptions())
    export_main(["--sequence", options.out, "--source", "1", "--target", "2", "--out", str(out), "--index", "0"])
    labels = io.read_labels(io.labels_path(str(out), "val"))
    assert [other["seq_id"] for other in labels] == ["seq0000", "seq0002"]
    with open(os.path.join(options.out, "color", "000003.jpg"), "rb") as a, \
            open(os.path.join(out, label["target_color"]), "rb") as b:
        assert a.read() == b.read()
    depth = io.read_depth(os.path.join(out, label["source_depth"]))
    target_depth = io.read_depth(os.path.join(out, label["target_depth"]))
    flow = io.read_optical_flow(os.path.join(out, label["optical_flow"]))
    scene_flow = io.read_scene_flow(os.path.join(out, label["scene_flow"]))
    intr = label["intrinsics"]
    valid = np.isfinite(flow).all(axis=0)
    assert valid.sum() > 100
    ys, xs = np.nonzero(valid)
    z = depth[ys, xs]
    source = np.stack(((xs - intr["cx"]) * z / intr["fx"], (ys - intr["cy"]) * z / intr["fy"], z), axis=1)
    moved = source + scene_flow[:, ys, xs].T
    uv = project(moved.astype(np.float64), intr)
    np.testing.assert_allclose(uv, np.stack((xs, ys), axis=1) + flow[:, ys, xs].T, atol=1e-3)
    # The moved points lie on the target's depth within noise where it is measured.
    px = np.round(uv).astype(int)
    stored = target_depth[px[:, 1], px[:, 0]]
    usable = stored > 0
    close = np.abs(stored[usable] - moved[usable, 2]) < 4 * noise_sigma(moved[usable, 2]) + 0.006
    assert close.mean() > 0.9
    nodes = io.read_graph_nodes(os.path.join(out, label["graph_nodes"]))
    deformations = io.read_graph_node_deformations(os.path.join(out, label["graph_node_deformations"]))
    assert nodes.shape == deformations.shape and nodes.shape[0] >= 4
    with pytest.raises(SequenceError, match="--target 9 is not a frame"):
        export_pair(PairExportOptions(sequence=options.out, source=0, target=9, out=str(out)), GraphOptions())


def test_photo_textures_are_asked_for_never_implied():
    """The texture source is the options', not what is installed (a seed makes the same
    sequence on every machine): procedural by default, scikit-image's photographs on request."""
    assert texture_images(None) == []
    assert texture_images(None, photos=True) == PHOTOS
    texture, source = make_texture(np.random.default_rng(0), 32, 48, [])
    assert texture.shape == (32, 48, 3) and source == "procedural"
    try:
        import skimage  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="scikit-image"):
            make_texture(np.random.default_rng(0), 32, 48, PHOTOS)
    else:
        texture, source = make_texture(np.random.default_rng(0), 32, 48, PHOTOS)
        assert texture.shape == (32, 48, 3) and "scikit-image" in source
