"""Embedded deformation graph of a depth frame (docs/DESIGN.md 5.1), over the csrc/graph ops.

    graph = build_graph(depth_m, intrinsics, mask=mask, scene_flow=scene_flow)
    graph.save(out_dir, name)        # DIR/<kind>/NAME.bin in the DeepDeform formats

Steps: back-projection -> mesh from pixel connectivity -> erosion -> node sampling -> geodesic
(Dijkstra along the mesh, or Euclidean) edges -> removal of nodes with too few edges and of
small clusters, with consistent re-indexing -> pixel anchors and skinning weights -> (with a
scene flow) ground-truth node deformations.
"""
import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from dataset import io
from options import GraphOptions
from model import image_proc
from model.ext import C

# Anchors per pixel of the pixel_anchors / pixel_weights formats, which the solver needs.
NUM_ANCHORS = 4
READERS = {"graph_nodes": io.read_graph_nodes, "graph_edges": io.read_graph_edges,
           "graph_edges_weights": io.read_graph_edges_weights, "graph_clusters": io.read_graph_clusters,
           "pixel_anchors": io.read_pixel_anchors, "pixel_weights": io.read_pixel_weights,
           "graph_node_deformations": io.read_graph_node_deformations}


class GraphError(ValueError):
    """The frame cannot carry a deformation graph (no valid depth, object too small, ...)."""


@dataclass
class DeformationGraph:
    nodes: np.ndarray                # (N, 3) float32 node positions, metres
    edges: np.ndarray                # (N, K) int32 neighbour ids, nearest first, -1 = none
    edges_weights: np.ndarray        # (N, K) float32, normalised per node
    edges_distances: np.ndarray      # (N, K) float32, metres (geodesic or Euclidean)
    clusters: np.ndarray             # (N, 1) int32 connected-component id
    pixel_anchors: np.ndarray        # (H, W, A) int32 node ids, nearest first, -1 = none
    pixel_weights: np.ndarray        # (H, W, A) float32 skinning weights
    node_pixels: np.ndarray          # (N, 2) int32 pixel (x, y) of each node's vertex
    node_deformations: Optional[np.ndarray] = None  # (N, 3) float32, from a scene flow
    timings: Dict[str, float] = field(default_factory=dict)  # seconds per step
    stats: Dict[str, int] = field(default_factory=dict)

    @property
    def num_nodes(self) -> int:
        return int(self.nodes.shape[0])

    def save(self, out_dir: str, name: str) -> Dict[str, str]:
        """Writes DIR/<kind>/NAME.bin for every kind (node deformations only when known)."""
        return self.save_to({kind: os.path.join(out_dir, kind, name + ".bin") for kind in io.GRAPH_KINDS})

    def save_to(self, paths: Dict[str, str]) -> Dict[str, str]:
        """Writes every kind to paths[kind] (a DeepDeform label's graph paths); node deformations
        only when known. All or nothing: the files are written into a temporary folder and moved
        into place only when every one is written and every destination folder exists, so a
        failure leaves no partial set behind. Returns the paths written."""
        check_graph(self.nodes, self.edges, self.edges_weights, self.clusters, self.pixel_anchors,
                    self.pixel_weights, self.node_deformations)
        arrays = {"graph_nodes": (io.write_graph_nodes, self.nodes),
                  "graph_edges": (io.write_graph_edges, self.edges),
                  "graph_edges_weights": (io.write_graph_edges_weights, self.edges_weights),
                  "graph_clusters": (io.write_graph_clusters, self.clusters),
                  "pixel_anchors": (io.write_pixel_anchors, self.pixel_anchors),
                  "pixel_weights": (io.write_pixel_weights, self.pixel_weights)}
        if self.node_deformations is not None:
            arrays["graph_node_deformations"] = (io.write_graph_node_deformations, self.node_deformations)
        paths = {kind: os.fspath(paths[kind]) for kind in arrays}
        for path in paths.values():
            folder = os.path.dirname(os.path.abspath(path))
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as error:
                raise GraphError(f"{path}: cannot make its folder ({error.strerror}: {error.filename})") from error
            if os.path.isdir(path):
                raise GraphError(f"{path}: is a folder, cannot write the graph file there")
        staging_root = os.path.dirname(os.path.abspath(paths["graph_nodes"]))
        staging = tempfile.mkdtemp(prefix=".graph.", suffix=".tmp", dir=staging_root)
        moved = []
        try:
            for kind, (write, array) in arrays.items():
                write(os.path.join(staging, kind), array)
            for kind, path in paths.items():
                os.replace(os.path.join(staging, kind), path)
                moved.append(path)
        except BaseException:
            for path in moved:   # a half-moved set is worse than none
                with contextlib.suppress(OSError):
                    os.remove(path)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return paths


def check_graph(nodes: np.ndarray, edges: np.ndarray, edges_weights: np.ndarray,
                clusters: np.ndarray, pixel_anchors: np.ndarray, pixel_weights: np.ndarray,
                node_deformations: Optional[np.ndarray] = None,
                paths: Optional[Dict[str, str]] = None) -> None:
    """Refuses a graph the solver cannot use, with GraphError naming the file (paths[kind]) and
    what is wrong: at least one node, finite node positions and weights, edge and anchor indices
    in [-1, N), 4 anchors per pixel, one row per node in every node file, matching anchor and
    weight images. Shapes: nodes (N, 3); edges, edges_weights (N, K); clusters (N,) or (N, 1);
    pixel_anchors, pixel_weights (H, W, 4); node_deformations (N, 3) (may hold non-finite rows:
    nodes without ground truth)."""
    paths = paths or {}

    def fail(kind: str, message: str):
        raise GraphError(f"{paths.get(kind, kind)}: {message}")

    num_nodes = nodes.shape[0]
    if num_nodes == 0:
        fail("graph_nodes", "the graph has no nodes")
    bad = ~np.isfinite(nodes).all(axis=1)
    if bad.any():
        fail("graph_nodes", f"{int(bad.sum())} of {num_nodes} node positions are not finite "
                            f"(first: node {int(np.argmax(bad))})")
    for kind, array in (("graph_edges", edges), ("graph_edges_weights", edges_weights),
                        ("graph_clusters", clusters), ("graph_node_deformations", node_deformations)):
        if array is not None and array.shape[0] != num_nodes:
            fail(kind, f"{array.shape[0]} rows, but the graph has {num_nodes} nodes "
                       f"({paths.get('graph_nodes', 'graph_nodes')})")
    if edges.shape != edges_weights.shape:
        fail("graph_edges_weights", f"shape {edges_weights.shape} differs from the edges' {edges.shape}")
    for kind, ids in (("graph_edges", edges), ("pixel_anchors", pixel_anchors)):
        out = (ids < -1) | (ids >= num_nodes)
        if out.any():
            fail(kind, f"{int(out.sum())} index(es) outside [-1, {num_nodes}) for a graph of "
                       f"{num_nodes} nodes (first: {int(ids[out].flat[0])}; -1 = none)")
    if not np.isfinite(edges_weights).all():
        fail("graph_edges_weights", "edge weights are not all finite")
    if (clusters < 0).any():
        fail("graph_clusters", "negative cluster id(s)")
    if pixel_anchors.ndim != 3 or pixel_anchors.shape[2] != NUM_ANCHORS:
        fail("pixel_anchors", f"{pixel_anchors.shape[-1]} anchors per pixel; the format and the "
                              f"solver hold exactly {NUM_ANCHORS}")
    if pixel_weights.shape != pixel_anchors.shape:
        fail("pixel_weights", f"shape {pixel_weights.shape} differs from the anchors' {pixel_anchors.shape}")
    if not np.isfinite(pixel_weights).all():
        fail("pixel_weights", "skinning weights are not all finite")


def read_graph(paths: Dict[str, str]) -> Dict[str, np.ndarray]:
    """Reads and checks (`check_graph`) the graph files paths[kind] for the kinds of io.GRAPH_KINDS
    present in `paths`; returns kind -> array. Raises FormatError or GraphError naming the file."""
    arrays = {kind: READERS[kind](path) for kind, path in paths.items() if kind in READERS}
    check_graph(arrays["graph_nodes"], arrays["graph_edges"], arrays["graph_edges_weights"],
                arrays["graph_clusters"], arrays["pixel_anchors"], arrays["pixel_weights"],
                arrays.get("graph_node_deformations"), paths)
    return arrays


def gaussian_weights(distances: np.ndarray, valid: np.ndarray, coverage: float) -> np.ndarray:
    """exp(-d^2 / (2 coverage^2)) over the valid entries of each row, normalised per row."""
    weights = np.where(valid, np.exp(-distances.astype(np.float64) ** 2 / (2 * coverage ** 2)), 0.0)
    sums = weights.sum(axis=1, keepdims=True)
    counts = valid.sum(axis=1, keepdims=True)
    uniform = np.where(valid, 1.0 / np.maximum(counts, 1), 0.0)
    return np.where(sums > 0, weights / np.where(sums > 0, sums, 1), uniform).astype(np.float32)


def _compact_rows(ids: np.ndarray, distances: np.ndarray, keep: np.ndarray):
    """Moves the kept entries of each row to its front (order preserved), -1 / 0 after them."""
    order = np.argsort(~keep, axis=1, kind="stable")
    ids = np.take_along_axis(np.where(keep, ids, -1), order, axis=1)
    distances = np.take_along_axis(np.where(keep, distances, 0), order, axis=1)
    return ids.astype(np.int32), distances.astype(np.float32)


def build_graph(depth: np.ndarray, intrinsics: Dict[str, float], mask: Optional[np.ndarray] = None,
                scene_flow: Optional[np.ndarray] = None,
                options: GraphOptions = GraphOptions()) -> DeformationGraph:
    """Builds the deformation graph of a depth frame.

    depth (H, W) metres (<= 0 or non-finite = invalid); mask (H, W) bool, the object; scene_flow
    (3, H, W) metres, non-finite = unknown: pixels without scene flow get no vertex, so that every
    node has a ground-truth deformation (as the reference does).
    Raises GraphError when the frame cannot carry a graph of at least 4 nodes.
    """
    timings: Dict[str, float] = {}
    start = tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        timings[name] = now - tick
        tick = now

    depth = np.array(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise GraphError(f"depth must be (H, W), found shape {depth.shape}")
    height, width = depth.shape
    depth[~np.isfinite(depth)] = 0
    if mask is not None:
        if mask.shape != depth.shape:
            raise GraphError(f"mask shape {mask.shape} differs from depth shape {depth.shape}")
        depth[~mask.astype(bool)] = 0
    if scene_flow is not None:
        if scene_flow.shape != (3, height, width):
            raise GraphError(f"scene flow must be (3, {height}, {width}), found {scene_flow.shape}")
        depth[~np.isfinite(scene_flow).all(axis=0)] = 0
    valid_depth = (depth > 0) & (depth <= options.max_depth)
    if not valid_depth.any():
        raise GraphError("no valid depth" + (" inside the mask" if mask is not None else ""))

    points = image_proc.backproject_depth(torch.from_numpy(depth), intrinsics, options.max_depth)
    lap("backproject")
    vertices, vertex_pixels, faces = C.mesh_from_depth(points, options.max_triangle_edge)
    num_vertices = vertices.shape[0]
    lap("mesh")
    if faces.shape[0] == 0:
        raise GraphError("the valid depth forms no mesh (isolated pixels or depth jumps "
                         f"> {options.max_triangle_edge} m everywhere)")
    kept = C.erode_mesh(faces, num_vertices, options.erosion_iterations, options.erosion_min_neighbors)
    lap("erode")
    node_vertices = C.sample_nodes(vertices, kept, options.node_coverage)
    nodes = vertices[node_vertices]
    lap("sample")
    if node_vertices.numel() < 4:
        raise GraphError(f"object too small: {node_vertices.numel()} node(s) sampled at coverage "
                         f"{options.node_coverage} m after erosion, at least 4 needed")

    csr = None
    if options.mode == "geodesic":
        csr = C.geodesic_node_distances(vertices, faces, node_vertices, options.influence_radius)
        edges, edge_distances = C.geodesic_edges(*csr, node_vertices, num_vertices, options.num_neighbors)
    else:
        edges, edge_distances = C.euclidean_knn(nodes, nodes, options.num_neighbors, True)
    lap("edges")

    valid = C.valid_nodes_by_edge_count(edges, options.min_edges)
    clusters = C.connected_components(edges, valid)
    sizes = torch.bincount(clusters[valid].long(), minlength=1)
    small = valid & (sizes[clusters.clamp(min=0).long()] < options.min_cluster_size)
    if small.any():
        valid &= ~small
        clusters = C.connected_components(edges, valid)
    num_valid = int(valid.sum())
    lap("cleanup")
    if num_valid < 4:
        raise GraphError(f"object too small: {num_valid} node(s) left after removing nodes with "
                         f"fewer than {options.min_edges} edges and clusters of fewer than "
                         f"{options.min_cluster_size} nodes, at least 4 needed")

    # Consistent re-indexing: old node id -> new id (or -1), applied to edges and anchors.
    valid_np = valid.numpy()
    new_id = np.full(valid_np.shape[0] + 1, -1, dtype=np.int64)  # last slot maps -1 to -1
    new_id[:-1][valid_np] = np.arange(num_valid)

    if options.mode == "geodesic":
        anchors, anchor_weights = C.geodesic_anchors(*csr, valid, num_vertices, options.num_anchors,
                                                     options.node_coverage)
        anchors = new_id[anchors.numpy()]
        anchor_weights = anchor_weights.numpy()
    else:
        # Nodes are passed already compacted, so these ids are the new ones.
        anchors, anchor_distances = C.euclidean_knn(nodes[valid].contiguous(), vertices,
                                                    options.num_anchors, False)
        anchors = anchors.numpy()
        anchor_weights = gaussian_weights(anchor_distances.numpy(), anchors >= 0, options.node_coverage)
    pixel_anchors = np.full((height, width, options.num_anchors), -1, dtype=np.int32)
    pixel_weights = np.zeros((height, width, options.num_anchors), dtype=np.float32)
    px = vertex_pixels.numpy()
    pixel_anchors[px[:, 1], px[:, 0]] = anchors
    pixel_weights[px[:, 1], px[:, 0]] = anchor_weights
    lap("anchors")

    edges_np = edges.numpy()[valid_np]
    remapped = new_id[edges_np]
    out_edges, out_distances = _compact_rows(remapped, edge_distances.numpy()[valid_np], remapped >= 0)
    out_weights = gaussian_weights(out_distances, out_edges >= 0, options.node_coverage)
    node_pixels = px[node_vertices.numpy()[valid_np]]
    node_deformations = None
    if scene_flow is not None:
        node_deformations = np.ascontiguousarray(
            scene_flow[:, node_pixels[:, 1], node_pixels[:, 0]].T.astype(np.float32))
    lap("reindex")
    timings["total"] = time.perf_counter() - start

    return DeformationGraph(
        nodes=nodes.numpy()[valid_np], edges=out_edges, edges_weights=out_weights,
        edges_distances=out_distances, clusters=clusters.numpy()[valid_np].reshape(-1, 1),
        pixel_anchors=pixel_anchors, pixel_weights=pixel_weights, node_pixels=node_pixels,
        node_deformations=node_deformations, timings=timings,
        stats={"vertices": num_vertices, "faces": int(faces.shape[0]),
               "kept_vertices": int(kept.sum()), "sampled_nodes": int(node_vertices.numel()),
               "nodes": num_valid, "valid_depth_pixels": int(valid_depth.sum()),
               "anchored_pixels": int((pixel_anchors >= 0).all(axis=2).sum())},
    )


def graph_for_files(depth_path, intrinsics, mask_path=None, scene_flow_path=None,
                    options: GraphOptions = GraphOptions()) -> DeformationGraph:
    """build_graph on files: the depth, optional mask and scene flow; errors name the file (and
    the mask, when the object it cuts out is what fails)."""
    depth = io.read_depth(depth_path, options.depth_scale)
    mask = io.read_mask(mask_path) if mask_path else None
    scene_flow = io.read_scene_flow(scene_flow_path) if scene_flow_path else None
    if mask is not None and mask.shape != depth.shape:
        raise GraphError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]}, depth "
                         f"{depth_path} is {depth.shape[1]}x{depth.shape[0]}")
    if mask is not None and not mask.any():
        raise GraphError(f"{mask_path}: the mask is empty")
    if scene_flow is not None and scene_flow.shape[1:] != depth.shape:
        raise GraphError(f"{scene_flow_path}: scene flow is {scene_flow.shape[2]}x{scene_flow.shape[1]}, "
                         f"depth {depth_path} is {depth.shape[1]}x{depth.shape[0]}")
    if mask is not None and not (mask & (depth > 0)).any():
        raise GraphError(f"{mask_path}: no valid depth of {depth_path} inside the mask "
                         f"({int(mask.sum())} pixels)")
    # The object's depth tells the unit; a far background must not.
    io.check_depth(depth, depth_path, options.max_depth, mask=mask, scale=options.depth_scale,
                   hint="--depth-scale (or --max-depth)")
    try:
        return build_graph(depth, intrinsics, mask=mask, scene_flow=scene_flow, options=options)
    except GraphError as error:
        where = depth_path if mask is None else \
            f"{depth_path} within the mask {mask_path} ({int(mask.sum())} pixels)"
        raise GraphError(f"{where}: {error}") from error


def source_mask_path(root: str, label: dict) -> Optional[str]:
    """The label's source mask, or <sequence>/mask/<source>_<object>.png when present, or None."""
    if "source_mask" in label:
        return os.path.join(root, label["source_mask"])
    sequence = os.path.dirname(os.path.dirname(os.path.join(root, label["source_depth"])))
    path = os.path.join(sequence, "mask", f"{label['source_id']}_{label['object_id']}.png")
    return path if os.path.isfile(path) else None


def graph_output_problem(out_dir: str) -> Optional[str]:
    """Why DIR/<kind>/ folders for a graph set cannot be written under `out_dir`, or None."""
    for kind in io.GRAPH_KINDS:
        folder = os.path.join(out_dir, kind)
        if os.path.exists(folder) and not os.path.isdir(folder):
            return f"{folder} is a file, not a folder"
        if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
            return f"{folder} cannot be written"
    return None


def existing_graph_problem(root: str, label: dict, kinds) -> Optional[str]:
    """Why the existing graph files of a label are not done (missing, unreadable, failing
    `check_graph`), or None when they are complete and usable."""
    paths = {k: os.path.join(root, label[k]) for k in kinds}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        return "missing " + missing[0]
    try:
        read_graph(paths)
    except (GraphError, io.FormatError) as error:
        return str(error)
    return None


def run_split(root: str, split: str, options: GraphOptions, overwrite: bool,
              log=tqdm.write) -> Tuple[int, Dict[str, str]]:
    """Makes the graph files of every pair of the split that lacks them (or whose files are
    truncated or fail `check_graph`: remade, with a message). A pair that fails is listed and the
    rest still run. Returns (how many pairs were made, {pair name: why it failed})."""
    labels_file = io.labels_path(root, split)
    labels = io.read_labels(labels_file)
    built, failed = 0, {}
    for label in tqdm(labels, desc=f"graphs {split}"):
        name = io.pair_name(label)
        kinds = [k for k in io.GRAPH_KINDS if k in label]
        if not overwrite:
            problem = existing_graph_problem(root, label, kinds)
            if problem is None:
                continue
            if not problem.startswith("missing "):
                log(f"pair {name}: remaking its graph: {problem}")
        scene_flow = os.path.join(root, label["scene_flow"]) if "scene_flow" in label else None
        try:
            intrinsics = io.label_intrinsics(label, labels_file)
            graph = graph_for_files(os.path.join(root, label["source_depth"]), intrinsics,
                                    source_mask_path(root, label), scene_flow, options)
            graph.save_to({k: os.path.join(root, label[k]) for k in kinds})
        except (GraphError, io.FormatError) as error:
            failed[name] = f"pair {name}: {error}"
            log(f"pair {name} failed: {error}")
            continue
        built += 1
    return built, failed
