"""File formats: round trips, an independent reader, the real samples, and clear errors."""
import json
import os
import struct

import numpy as np
import pytest

from dataset import io
from tests.conftest import SEQ017, SEQ258, require

RNG = np.random.default_rng(0)


def _flow(c, h=5, w=7):
    flow = RNG.standard_normal((c, h, w)).astype(np.float32)
    flow[:, 1, 2] = -np.inf
    return flow


@pytest.mark.parametrize("suffix,channels", [(".oflow", 2), (".sflow", 3), (".flo", 2)])
def test_flow_round_trip(tmp_path, suffix, channels):
    flow = _flow(channels)
    path = tmp_path / f"x{suffix}"
    io.write_flow(path, flow)
    np.testing.assert_array_equal(io.read_flow(path), flow)


def test_graph_binaries_round_trip(tmp_path):
    nodes = RNG.standard_normal((9, 3)).astype(np.float32)
    edges = RNG.integers(-1, 9, (9, 8)).astype(np.int32)
    weights = RNG.random((9, 8)).astype(np.float32)
    clusters = RNG.integers(0, 3, (9, 1)).astype(np.int32)
    anchors = RNG.integers(-1, 9, (4, 6, 4)).astype(np.int32)
    pixel_weights = RNG.random((4, 6, 4)).astype(np.float32)
    cases = [(io.write_graph_nodes, io.read_graph_nodes, nodes),
             (io.write_graph_node_deformations, io.read_graph_node_deformations, nodes),
             (io.write_graph_edges, io.read_graph_edges, edges),
             (io.write_graph_edges_weights, io.read_graph_edges_weights, weights),
             (io.write_graph_clusters, io.read_graph_clusters, clusters),
             (io.write_pixel_anchors, io.read_pixel_anchors, anchors),
             (io.write_pixel_weights, io.read_pixel_weights, pixel_weights)]
    for i, (write, read, array) in enumerate(cases):
        path = tmp_path / f"{i}.bin"
        write(path, array)
        out = read(path)
        assert out.dtype == array.dtype
        np.testing.assert_array_equal(out, array)


def test_independent_reader_of_the_official_layouts(tmp_path):
    """What we write is what a struct-based reader of docs/DESIGN.md 4 reads."""
    anchors = RNG.integers(-1, 50, (3, 4, 4)).astype(np.int32)
    edges = RNG.integers(-1, 9, (9, 8)).astype(np.int32)
    flow = _flow(3, 2, 3)
    io.write_pixel_anchors(tmp_path / "a.bin", anchors)
    io.write_graph_edges(tmp_path / "e.bin", edges)
    io.write_flow(tmp_path / "f.sflow", flow)
    data = (tmp_path / "a.bin").read_bytes()
    c, w, h = struct.unpack("<III", data[:12])
    assert (c, w, h) == (4, 4, 3)
    assert struct.unpack(f"<{h * w * c}i", data[12:]) == tuple(anchors.reshape(-1))
    data = (tmp_path / "e.bin").read_bytes()
    n, k = struct.unpack("<II", data[:8])
    assert (n, k) == (9, 8) and struct.unpack(f"<{n * k}i", data[8:]) == tuple(edges.reshape(-1))
    data = (tmp_path / "f.sflow").read_bytes()
    w, h, c = struct.unpack("<III", data[:12])
    assert (w, h, c) == (3, 2, 3)
    np.testing.assert_array_equal(np.array(struct.unpack(f"<{c * h * w}f", data[12:]), np.float32),
                                  flow.reshape(-1))


def test_images_intrinsics_and_labels_round_trip(tmp_path):
    depth = RNG.uniform(0.5, 3.0, (6, 8)).astype(np.float32)
    depth[0, 0] = 0
    depth[1, 1] = np.nan
    io.write_depth(tmp_path / "d.png", depth)
    out = io.read_depth(tmp_path / "d.png")
    assert out[0, 0] == 0 and out[1, 1] == 0
    valid = np.isfinite(depth) & (depth > 0)
    assert np.abs(out[valid] - depth[valid]).max() <= 0.0005 + 1e-7
    rgb = RNG.integers(0, 256, (6, 8, 3)).astype(np.uint8)
    io.write_color(tmp_path / "c.png", rgb)
    np.testing.assert_array_equal(io.read_color(tmp_path / "c.png"), rgb)
    mask = RNG.random((6, 8)) > 0.5
    io.write_mask(tmp_path / "m.png", mask)
    np.testing.assert_array_equal(io.read_mask(tmp_path / "m.png"), mask)
    intr = {"fx": 575.5, "fy": 577.25, "cx": 323.125, "cy": 236.5}
    io.write_intrinsics(tmp_path / "i.txt", intr)
    assert io.read_intrinsics(tmp_path / "i.txt") == pytest.approx(intr)
    label = {k: f"seq/{k}.bin" for k in io.LABEL_PATH_KEYS}
    label.update(seq_id="seq000", object_id="shirt", source_id="000000", target_id="000110",
                 intrinsics=intr)
    io.write_labels(tmp_path / "l.json", [label])
    assert io.read_labels(tmp_path / "l.json") == [label]
    assert io.pair_name(label) == "seq000_shirt_000000_000110"


def test_real_samples_load():
    name = "5dbd7c9104df0300f329f294_shirt_000300_000600_geodesic_0.05.bin"
    nodes = io.read_graph_nodes(require(os.path.join(SEQ017, "graph_nodes", name)))
    edges = io.read_graph_edges(os.path.join(SEQ017, "graph_edges", name))
    weights = io.read_graph_edges_weights(os.path.join(SEQ017, "graph_edges_weights", name))
    clusters = io.read_graph_clusters(os.path.join(SEQ017, "graph_clusters", name))
    assert nodes.shape == (109, 3) and edges.shape == (109, 8) and clusters.shape == (109, 1)
    assert weights.shape == (109, 8) and np.all((edges >= -1) & (edges < 109))
    assert np.allclose(weights.sum(axis=1), 1, atol=1e-5)
    flow = io.read_optical_flow(require(os.path.join(SEQ258, "optical_flow", "shirt_000000_000110.oflow")))
    scene = io.read_scene_flow(os.path.join(SEQ258, "scene_flow", "shirt_000000_000110.sflow"))
    assert flow.shape == (2, 480, 640) and scene.shape == (3, 480, 640)
    assert np.isfinite(flow).all(axis=0).sum() == 54688
    assert np.isfinite(scene).all(axis=0).sum() == 54688
    depth = io.read_depth(os.path.join(SEQ258, "depth", "000000.png"))
    assert depth.shape == (480, 640) and 0.5 < np.median(depth[depth > 0]) < 3
    intr = io.read_intrinsics(os.path.join(SEQ258, "intrinsics.txt"))
    assert intr["fx"] == pytest.approx(575.548) and intr["cy"] == pytest.approx(236.417)
    assert io.read_color(os.path.join(SEQ258, "color", "000000.jpg")).shape == (480, 640, 3)
    mask = io.read_mask(os.path.join(SEQ258, "mask", "000000_shirt.png"))
    assert 0 < mask.mean() < 1


@pytest.mark.parametrize("kind,writer,reader,array", [
    ("nodes", io.write_graph_nodes, io.read_graph_nodes, np.zeros((5, 3), np.float32)),
    ("edges", io.write_graph_edges, io.read_graph_edges, np.zeros((5, 8), np.int32)),
    ("anchors", io.write_pixel_anchors, io.read_pixel_anchors, np.zeros((4, 4, 4), np.int32)),
    ("flow", io.write_flow, io.read_flow, np.zeros((2, 4, 4), np.float32)),
])
def test_truncated_file_names_file_and_sizes(tmp_path, kind, writer, reader, array):
    path = tmp_path / (kind + (".oflow" if kind == "flow" else ".bin"))
    writer(path, array)
    data = path.read_bytes()
    path.write_bytes(data[:-6])
    with pytest.raises(io.FormatError) as error:
        reader(path)
    message = str(error.value)
    assert str(path) in message and str(len(data)) in message and str(len(data) - 6) in message
    assert "truncated" in message
    path.write_bytes(data[:3])
    with pytest.raises(io.FormatError, match="header"):
        reader(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(io.FormatError, match="not found"):
        io.read_depth(tmp_path / "none.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(io.FormatError, match="not a readable image"):
        io.read_depth(tmp_path / "bad.png")
    import cv2
    cv2.imwrite(str(tmp_path / "u8.png"), np.zeros((4, 4), np.uint8))
    with pytest.raises(io.FormatError, match="uint16"):
        io.read_depth(tmp_path / "u8.png")
    (tmp_path / "i.txt").write_text("1 0\n0 1\n")
    with pytest.raises(io.FormatError, match="4x4"):
        io.read_intrinsics(tmp_path / "i.txt")
    (tmp_path / "l.json").write_text(json.dumps([{"seq_id": "s"}]))
    with pytest.raises(io.FormatError, match="missing keys"):
        io.read_labels(tmp_path / "l.json")
    io.write_flow(tmp_path / "x.oflow", np.zeros((3, 2, 2), np.float32))
    with pytest.raises(io.FormatError, match="expected 2 flow channels, found 3"):
        io.read_optical_flow(tmp_path / "x.oflow")


def test_atomic_write_leaves_no_half_file(tmp_path):
    from dataset.fileio import atomic_open

    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as handle:
            handle.write(b"new but incomplete")
            raise RuntimeError("interrupted")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]
