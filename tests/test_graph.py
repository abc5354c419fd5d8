"""Deformation graph: the real seq258 frame, invariants, geodesic vs Euclidean, clean-up, errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dataset import io
from options import GraphOptions
from tests.conftest import REPO, SEQ258, require
from model import image_proc
from model.ext import C
from dataset.graph import GraphError, build_graph

INTR = {"fx": 300.0, "fy": 300.0, "cx": 79.5, "cy": 59.5}


@pytest.fixture(scope="module")
def seq258():
    depth = io.read_depth(require(os.path.join(SEQ258, "depth", "000000.png")))
    mask = io.read_mask(os.path.join(SEQ258, "mask", "000000_shirt.png"))
    intr = io.read_intrinsics(os.path.join(SEQ258, "intrinsics.txt"))
    scene_flow = io.read_scene_flow(os.path.join(SEQ258, "scene_flow", "shirt_000000_000110.sflow"))
    return depth, mask, intr, scene_flow


def _check_invariants(graph, depth, intr, options, kept_points=None):
    N, K = graph.edges.shape
    assert graph.nodes.shape == (N, 3) and K == options.num_neighbors
    # edges: in range, no self-loops, no repeats, -1 only at the end of a row
    e = graph.edges
    assert ((e >= -1) & (e < N)).all()
    assert not (e == np.arange(N)[:, None]).any()
    for row in e:
        valid = row[row >= 0]
        assert len(set(valid.tolist())) == len(valid) and (row[len(valid):] == -1).all()
        assert len(valid) >= options.min_edges
    w = graph.edges_weights
    assert np.allclose(w.sum(axis=1), 1, atol=1e-5) and (w[e < 0] == 0).all()
    # anchors: in range, weights sum to 1 where anchored, 0 elsewhere
    a, pw = graph.pixel_anchors, graph.pixel_weights
    assert ((a >= -1) & (a < N)).all()
    anchored = (a >= 0).any(axis=2)
    assert np.allclose(pw[anchored].sum(axis=1), 1, atol=1e-5) and (pw[~anchored] == 0).all()
    # nodes lie on the surface: each is the back-projected point of its pixel
    points = image_proc.backproject_depth(torch.from_numpy(depth), intr, options.max_depth).numpy()
    px = graph.node_pixels
    np.testing.assert_allclose(graph.nodes, points[px[:, 1], px[:, 0]], atol=1e-6)
    # clusters: 0..C-1, every cluster has enough nodes
    sizes = np.bincount(graph.clusters[:, 0])
    assert (sizes >= options.min_cluster_size).all()
    if kept_points is not None:
        # every kept (non-eroded) vertex lies within the node coverage of a node (Euclidean)
        d = torch.cdist(torch.from_numpy(kept_points), torch.from_numpy(graph.nodes)).min(dim=1).values
        assert float(d.max()) <= options.node_coverage + 1e-6


def _kept_vertices(depth, intr, mask, options):
    d = depth.copy()
    d[~mask] = 0
    points = image_proc.backproject_depth(torch.from_numpy(d), intr, options.max_depth)
    vertices, _, faces = C.mesh_from_depth(points, options.max_triangle_edge)
    kept = C.erode_mesh(faces, vertices.shape[0], options.erosion_iterations, options.erosion_min_neighbors)
    return vertices[kept].numpy()


def test_seq258_graph_matches_the_reference_size_and_anchoring(seq258):
    depth, mask, intr, scene_flow = seq258
    options = GraphOptions()
    graph = build_graph(depth, intr, mask=mask, options=options)
    assert 83 <= graph.num_nodes <= 125, graph.num_nodes      # the reference makes 104
    object_pixels = (mask & (depth > 0) & (depth <= options.max_depth)).sum()
    anchored = (graph.pixel_anchors >= 0).all(axis=2).sum() / object_pixels
    assert anchored >= 0.90, anchored                          # the reference anchors 92.3%
    _check_invariants(graph, np.where(mask, depth, 0), intr, options,
                      _kept_vertices(depth, intr, mask, options))
    # geodesic edge lengths are never shorter than the straight line between the nodes
    e = graph.edges
    rows, cols = np.nonzero(e >= 0)
    straight = np.linalg.norm(graph.nodes[rows] - graph.nodes[e[rows, cols]], axis=1)
    assert (graph.edges_distances[rows, cols] >= straight - 1e-5).all()


def test_seq258_node_deformations_come_from_the_scene_flow(seq258):
    depth, mask, intr, scene_flow = seq258
    graph = build_graph(depth, intr, mask=mask, scene_flow=scene_flow)
    assert np.isfinite(graph.node_deformations).all()
    px = graph.node_pixels
    np.testing.assert_array_equal(graph.node_deformations, scene_flow[:, px[:, 1], px[:, 0]].T)
    again = build_graph(depth, intr, mask=mask, scene_flow=scene_flow)
    np.testing.assert_array_equal(graph.pixel_anchors, again.pixel_anchors)   # deterministic


def _step_depth(gap):
    """Left half at 1.0 m, right half `gap` farther: a depth edge splits the mesh in two."""
    depth = np.full((120, 160), 1.0, dtype=np.float32)
    depth[:, 80:] += gap
    return depth


def test_flat_plane_geodesic_equals_euclidean():
    depth = np.full((120, 160), 1.0, dtype=np.float32)
    geodesic = build_graph(depth, INTR, options=GraphOptions(node_coverage=0.03))
    rows, cols = np.nonzero(geodesic.edges >= 0)
    straight = np.linalg.norm(geodesic.nodes[rows] - geodesic.nodes[geodesic.edges[rows, cols]], axis=1)
    # Along the pixel mesh (edges right, down and one diagonal) a path is never shorter than the
    # straight line and at most sqrt(2) longer (across the missing diagonal), typically close.
    ratio = geodesic.edges_distances[rows, cols] / straight
    assert (ratio >= 1 - 1e-5).all() and (ratio <= 2 ** 0.5 + 1e-4).all(), (ratio.min(), ratio.max())
    assert np.median(ratio) < 1.1


def test_geodesic_edges_and_anchors_do_not_cross_a_depth_edge():
    depth = _step_depth(0.07)   # 7 cm: beyond the 5 cm triangle limit, within 2 x coverage
    options = GraphOptions(node_coverage=0.05)
    geodesic = build_graph(depth, INTR, options=options)
    euclidean = build_graph(depth, INTR, options=GraphOptions(node_coverage=0.05, mode="euclidean"))
    for graph in (geodesic, euclidean):
        _check_invariants(graph, depth, INTR, options)
    side = lambda g: g.node_pixels[:, 0] >= 80  # noqa: E731
    def crossing_edges(g):
        rows, cols = np.nonzero(g.edges >= 0)
        return int((side(g)[rows] != side(g)[g.edges[rows, cols]]).sum())
    assert crossing_edges(geodesic) == 0 and crossing_edges(euclidean) > 0
    assert len(np.unique(geodesic.clusters)) == 2
    def crossing_anchors(g):
        a = g.pixel_anchors
        x = np.broadcast_to(np.arange(160)[None, :, None], a.shape)
        has = a >= 0
        return int((side(g)[a[has]] != (x[has] >= 80)).sum())
    assert crossing_anchors(geodesic) == 0 and crossing_anchors(euclidean) > 0


def test_small_clusters_are_removed_and_ids_stay_consistent():
    depth = np.full((120, 160), 1.0, dtype=np.float32)
    depth[:, 100:] = 0
    depth[50:58, 130:138] = 1.5      # a small patch 50 cm behind: too small a cluster
    options = GraphOptions(node_coverage=0.03)
    graph = build_graph(depth, INTR, options=options)
    _check_invariants(graph, depth, INTR, options)
    assert (graph.node_pixels[:, 0] < 100).all()           # no node left on the patch
    assert (graph.pixel_anchors[50:58, 130:138] == -1).all()  # nor anchors there
    assert len(np.unique(graph.clusters)) == 1


def test_bad_frames_raise_clear_errors():
    with pytest.raises(GraphError, match="no valid depth"):
        build_graph(np.zeros((40, 40), np.float32), INTR)
    with pytest.raises(GraphError, match="inside the mask"):
        build_graph(np.ones((40, 40), np.float32), INTR, mask=np.zeros((40, 40), bool))
    tiny = np.zeros((120, 160), np.float32)
    tiny[60:64, 80:84] = 1.0
    with pytest.raises(GraphError, match="too small"):
        build_graph(tiny, INTR)
    with pytest.raises(GraphError, match="mask shape"):
        build_graph(np.ones((40, 40), np.float32), INTR, mask=np.ones((30, 40), bool))


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "create_graph_data.py"), *args],
                          capture_output=True, text=True, cwd=REPO)


def test_create_graph_data_cli(tmp_path, seq258):
    S = SEQ258
    result = _cli("--depth", os.path.join(S, "depth", "000000.png"), "--intrinsics",
                  os.path.join(S, "intrinsics.txt"), "--mask", os.path.join(S, "mask", "000000_shirt.png"),
                  "--scene-flow", os.path.join(S, "scene_flow", "shirt_000000_000110.sflow"),
                  "--out", str(tmp_path), "--name", "pair")
    assert result.returncode == 0, result.stderr
    for kind in ("graph_nodes", "graph_edges", "graph_edges_weights", "graph_clusters",
                 "pixel_anchors", "pixel_weights", "graph_node_deformations"):
        assert (tmp_path / kind / "pair.bin").is_file()
    nodes = io.read_graph_nodes(tmp_path / "graph_nodes" / "pair.bin")
    assert nodes.shape[0] == io.read_graph_node_deformations(tmp_path / "graph_node_deformations" / "pair.bin").shape[0]
    # no mask and no scene flow: custom data
    result = _cli("--depth", os.path.join(S, "depth", "000000.png"), "--intrinsics",
                  os.path.join(S, "intrinsics.txt"), "--out", str(tmp_path / "plain"), "--name", "p")
    assert result.returncode == 0 and not (tmp_path / "plain" / "graph_node_deformations").exists()
    # bad input: one line, no traceback, non-zero status
    for args, text in ((("--depth", str(tmp_path / "none.png"), "--intrinsics", os.path.join(S, "intrinsics.txt")), "not found"),):
        result = _cli(*args, "--out", str(tmp_path), "--name", "x")
        assert result.returncode == 1 and text in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    empty = tmp_path / "empty.png"
    io.write_mask(empty, np.zeros((480, 640), bool))
    result = _cli("--depth", os.path.join(S, "depth", "000000.png"), "--intrinsics",
                  os.path.join(S, "intrinsics.txt"), "--mask", str(empty), "--out", str(tmp_path), "--name", "x")
    assert result.returncode == 1 and "empty" in result.stderr and "Traceback" not in result.stderr
