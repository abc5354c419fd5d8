"""build_graph (the csrc/graph ops) against the plain single-threaded reference of
tests/reference/graph_reference.py: identical nodes, edges, edge distances, clusters, anchors and
node deformations; weights equal to float rounding (the geodesic op weighs in float32)."""
import os

import numpy as np
import pytest

from dataset import io
from dataset.graph import GraphError, build_graph
from options import GraphOptions
from tests.conftest import SEQ258, assert_close, require
from tests.reference.graph_reference import build_graph_reference

# cx, cy at half pixels: pixels mirror each other around the centre, so many node distances tie
# exactly and the tie rule (nearest first, then the lower id) is exercised.
INTR = {"fx": 300.0, "fy": 300.0, "cx": 39.5, "cy": 29.5}
MODES = ("geodesic", "euclidean")


def assert_same_graph(ours, reference):
    for name in ("nodes", "node_pixels", "edges", "edges_distances", "clusters", "pixel_anchors"):
        a, b = getattr(ours, name), getattr(reference, name)
        assert a.shape == b.shape, f"{name}: shape {a.shape} != {b.shape}"
        assert np.array_equal(a, b), f"{name}: {int((a != b).sum())} of {a.size} entries differ"
    assert_close(ours.edges_weights, reference.edges_weights, atol=1e-6, rtol=0, what="edges_weights")
    assert_close(ours.pixel_weights, reference.pixel_weights, atol=1e-6, rtol=0, what="pixel_weights")
    assert (ours.node_deformations is None) == (reference.node_deformations is None)
    if ours.node_deformations is not None:
        assert np.array_equal(ours.node_deformations, reference.node_deformations)


def both(depth, intrinsics, mode, mask=None, scene_flow=None, **options):
    options = GraphOptions(mode=mode, **options)
    ours = build_graph(depth, intrinsics, mask=mask, scene_flow=scene_flow, options=options)
    reference = build_graph_reference(depth, intrinsics, mask=mask, scene_flow=scene_flow,
                                      options=options)
    assert_same_graph(ours, reference)
    return ours


def _lateral(height, width, depth=1.0):
    """(H, W) x and y in metres of each pixel's ray at `depth`."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    return depth * (xs - INTR["cx"]) / INTR["fx"], depth * (ys - INTR["cy"]) / INTR["fy"]


@pytest.mark.parametrize("mode", MODES)
def test_plane(mode):
    depth = np.full((60, 80), 1.0, dtype=np.float32)
    graph = both(depth, INTR, mode, node_coverage=0.03)
    assert graph.num_nodes >= 12 and len(np.unique(graph.clusters)) == 1


@pytest.mark.parametrize("mode", MODES)
def test_sphere_cap(mode):
    x, y = _lateral(60, 80)
    radius, centre = 0.12, 1.1   # metres: the cap bulges 12 cm towards the camera
    rho2 = x ** 2 + y ** 2
    depth = np.where(rho2 < (0.9 * radius) ** 2, centre - np.sqrt(np.maximum(radius ** 2 - rho2, 0)), 0)
    graph = both(depth.astype(np.float32), INTR, mode, node_coverage=0.025)
    assert graph.num_nodes >= 10


def _blobs_and_speck():
    """Two discs 20 cm apart in depth and, at the top-left, a small patch (a speck)."""
    x, y = _lateral(60, 80)
    depth = np.zeros((60, 80), dtype=np.float32)
    depth[(x + 0.05) ** 2 + y ** 2 < 0.045 ** 2] = 1.0
    depth[(x - 0.06) ** 2 + y ** 2 < 0.04 ** 2] = 1.2
    depth[2:9, 2:14] = 0.9
    return depth


# Two erosion passes (not 10) so that the speck keeps two nodes.
BLOB_OPTIONS = dict(node_coverage=0.02, erosion_iterations=2)


@pytest.mark.parametrize("mode", MODES)
def test_two_blobs_and_a_speck(mode):
    """Two clusters; geodesically the speck's 2 nodes have too few edges and are removed, so
    every later node is re-indexed."""
    graph = both(_blobs_and_speck(), INTR, mode, **BLOB_OPTIONS)
    if mode == "geodesic":
        assert graph.stats["sampled_nodes"] == graph.num_nodes + 2
        assert len(np.unique(graph.clusters)) == 2
        assert (graph.node_pixels[:, 1] >= 9).all()          # the speck's nodes are gone
        assert (graph.pixel_anchors[2:9, 2:14] == -1).all()


@pytest.mark.parametrize("mode", MODES)
def test_small_clusters_are_removed_as_in_the_reference(mode):
    """With min_edges 1 the speck's 2 nodes pass the edge count; geodesically they form a
    cluster of 2, removed at min_cluster_size 3 and kept at 2."""
    depth = _blobs_and_speck()
    removed = both(depth, INTR, mode, min_edges=1, min_cluster_size=3, **BLOB_OPTIONS)
    kept = both(depth, INTR, mode, min_edges=1, min_cluster_size=2, **BLOB_OPTIONS)
    if mode == "geodesic":
        assert (removed.node_pixels[:, 1] >= 9).all() and len(np.unique(removed.clusters)) == 2
        assert kept.num_nodes == removed.num_nodes + 2 and len(np.unique(kept.clusters)) == 3


@pytest.fixture(scope="module")
def seq258_crop():
    """Rows 290-389, columns 140-299 of the real seq258 source frame: the shirt's lower edge,
    with its mask, scene flow and shifted intrinsics."""
    depth = io.read_depth(require(os.path.join(SEQ258, "depth", "000000.png")))
    mask = io.read_mask(os.path.join(SEQ258, "mask", "000000_shirt.png"))
    intr = io.read_intrinsics(os.path.join(SEQ258, "intrinsics.txt"))
    scene_flow = io.read_scene_flow(os.path.join(SEQ258, "scene_flow", "shirt_000000_000110.sflow"))
    rows, cols = slice(290, 390), slice(140, 300)
    intr = dict(intr, cx=intr["cx"] - cols.start, cy=intr["cy"] - rows.start)
    return depth[rows, cols], mask[rows, cols], intr, scene_flow[:, rows, cols]


@pytest.mark.parametrize("mode", MODES)
def test_seq258_crop(seq258_crop, mode):
    depth, mask, intr, scene_flow = seq258_crop
    graph = both(depth, intr, mode, mask=mask, scene_flow=scene_flow)
    assert graph.num_nodes >= 8
    both(depth, intr, mode, mask=mask, node_coverage=0.03)   # denser: more nodes and ties


def test_both_refuse_a_frame_too_small_for_a_graph():
    tiny = np.zeros((60, 80), np.float32)
    tiny[28:34, 36:44] = 1.0
    with pytest.raises(GraphError, match="too small"):
        build_graph(tiny, INTR)
    with pytest.raises(ValueError, match="too small"):
        build_graph_reference(tiny, INTR)
