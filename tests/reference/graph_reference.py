"""Deformation graph construction written out plainly: one thread, Python loops, numpy, heapq.

It runs the algorithm of dataset.graph.build_graph (over the csrc/graph ops) step by step, so
that the two can be compared and timed against each other:

1. back-projection of the (masked) depth to camera points;
2. a mesh from pixel connectivity: per 2x2 pixel block the triangles (00, 01, 10) and
   (11, 10, 01) (00 = pixel (x, y), 01 = (x, y+1), 10 = (x+1, y)) when their corners are valid
   and their edges at most `max_triangle_edge` long; vertices are the pixels that a triangle
   touches, in row-major pixel order;
3. erosion: each pass drops every face touching a vertex with fewer than
   `erosion_min_neighbors` incident faces (counted at the start of the pass);
4. node sampling in vertex order: a kept vertex becomes a node unless an earlier node lies
   within `node_coverage` (Euclidean);
5. edges: the `num_neighbors` nearest other nodes, geodesically (Dijkstra along the mesh
   edges, cut off at the influence radius) or in straight lines; nearest first, ties to the
   lower node id;
6. clean-up: nodes with fewer than `min_edges` edges to kept nodes are removed until none is
   left; connected components (edges taken as undirected) numbered in order of their first
   node; components of fewer than `min_cluster_size` nodes removed; nodes re-indexed in order;
7. every vertex's `num_anchors` nearest kept nodes (same distance and tie rule as the edges)
   with Gaussian weights exp(-d^2 / (2 coverage^2)) normalised per vertex, and edge weights the
   same way over each node's remaining edges;
8. with a scene flow, a node's deformation is the scene flow at its pixel.

Arithmetic is float32 where the ops compute in float32 (points, triangle edge lengths, the
coverage test, path lengths summed edge by edge), so that the cut-offs and exact ties fall the
same way and nodes, edges, edge distances, clusters and anchors come out identical. Weights are
computed in float64 here (the geodesic op uses float32 expf), so they agree to float rounding.

Settling order: the op takes a node's edges in the order Dijkstra settles vertices, which for
positive edge lengths is increasing (distance, vertex id); node ids increase with vertex ids, so
this is the (distance, node id) order used here. Distinct valid pixels back-project to distinct
points, so no mesh edge has length 0.
"""
import heapq
from collections import deque
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from options import GraphOptions

f32 = np.float32


@dataclass
class ReferenceGraph:
    nodes: np.ndarray             # (N, 3) float32
    edges: np.ndarray             # (N, K) int32, -1 = none
    edges_weights: np.ndarray     # (N, K) float32
    edges_distances: np.ndarray   # (N, K) float32
    clusters: np.ndarray          # (N, 1) int32
    pixel_anchors: np.ndarray     # (H, W, A) int32, -1 = none
    pixel_weights: np.ndarray     # (H, W, A) float32
    node_pixels: np.ndarray       # (N, 2) int32 (x, y)
    node_deformations: Optional[np.ndarray] = None  # (N, 3) float32


def backproject(depth: np.ndarray, intrinsics: Dict[str, float], max_depth: float) -> np.ndarray:
    """(H, W) float32 depth -> (H, W, 3) float32 points; invalid depth -> (0, 0, 0)."""
    height, width = depth.shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    z = depth.astype(np.float32)
    valid = (z > 0) & (z <= f32(max_depth))
    x = z * (xs - f32(intrinsics["cx"])) / f32(intrinsics["fx"])
    y = z * (ys - f32(intrinsics["cy"])) / f32(intrinsics["fy"])
    return np.where(valid[..., None], np.stack((x, y, z), axis=-1), f32(0))


def _length(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean length of a - b over the last axis, float32 summed x, y, z in that order."""
    d = a - b
    return np.sqrt(d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1] + d[..., 2] * d[..., 2])


def mesh_from_points(points: np.ndarray, max_edge: float):
    """(H, W, 3) points -> vertices (V, 3) float32, pixels (V, 2) int32 (x, y), faces (F, 3)."""
    valid = points[..., 2] > 0
    max_edge = f32(max_edge)
    # Corners of each 2x2 block as (H-1, W-1) views: 00 = (x, y), 01 = (x, y+1), 10 = (x+1, y).
    c00, c01 = (slice(0, -1), slice(0, -1)), (slice(1, None), slice(0, -1))
    c10, c11 = (slice(0, -1), slice(1, None)), (slice(1, None), slice(1, None))

    def triangle(a, b, c):   # (H-1, W-1) bool: the block's triangle a, b, c is kept
        return (valid[a] & valid[b] & valid[c] & (_length(points[a], points[b]) <= max_edge)
                & (_length(points[a], points[c]) <= max_edge)
                & (_length(points[b], points[c]) <= max_edge))

    kept = np.stack((triangle(c00, c01, c10), triangle(c11, c10, c01)), axis=-1)
    face_pixels = []   # corners as (row, column), faces in row-major block order
    for y, x, t in zip(*np.nonzero(kept)):
        face_pixels.append(((y, x), (y + 1, x), (y, x + 1)) if t == 0 else
                           ((y + 1, x + 1), (y, x + 1), (y + 1, x)))
    used = sorted({p for face in face_pixels for p in face})   # row-major pixel order
    vertex_of = {p: i for i, p in enumerate(used)}
    faces = np.array([[vertex_of[p] for p in face] for face in face_pixels], dtype=np.int32)
    vertices = np.array([points[p] for p in used], dtype=np.float32).reshape(-1, 3)
    pixels = np.array([(x, y) for y, x in used], dtype=np.int32).reshape(-1, 2)
    return vertices, pixels, faces.reshape(-1, 3)


def erode(faces: np.ndarray, num_vertices: int, iterations: int, min_neighbors: int) -> np.ndarray:
    """(V,) bool: vertices still touched by a face after the erosion passes."""
    alive = np.ones(len(faces), dtype=bool)
    for _ in range(iterations):
        incidence = np.bincount(faces[alive].ravel(), minlength=num_vertices)
        alive &= (incidence[faces] >= min_neighbors).all(axis=1)
    kept = np.zeros(num_vertices, dtype=bool)
    kept[faces[alive].ravel()] = True
    return kept


def sample_nodes(vertices: np.ndarray, kept: np.ndarray, coverage: float) -> List[int]:
    """Vertex ids of the nodes: greedy in vertex order, each checked against every earlier node."""
    coverage2 = f32(coverage * coverage)
    nodes: List[int] = []
    for i in np.flatnonzero(kept):
        if nodes:
            d = vertices[i] - vertices[nodes]
            if ((d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2]) <= coverage2).any():
                continue
        nodes.append(int(i))
    return nodes


def mesh_adjacency(vertices: np.ndarray, faces: np.ndarray):
    """Per vertex, the list of (neighbour, float32 edge length) over the mesh's undirected edges."""
    neighbours = [set() for _ in range(len(vertices))]
    for a, b, c in faces.tolist():
        neighbours[a].update((b, c))
        neighbours[b].update((a, c))
        neighbours[c].update((a, b))
    return [[(w, _length(vertices[u], vertices[w])) for w in sorted(ws)]
            for u, ws in enumerate(neighbours)]


def dijkstra(adjacency, source: int, limit: float) -> Dict[int, np.float32]:
    """Geodesic distance (float32, summed edge by edge) from `source` to every vertex within
    `limit` along the mesh: textbook Dijkstra with a binary heap and lazy deletion."""
    limit = f32(limit)
    best = {source: f32(0)}
    settled: Dict[int, np.float32] = {}
    heap = [(f32(0), source)]
    while heap:
        d, u = heapq.heappop(heap)
        if u in settled:
            continue
        settled[u] = d
        for w, length in adjacency[u]:
            nd = d + length
            if nd <= limit and (w not in best or nd < best[w]):
                best[w] = nd
                heapq.heappush(heap, (nd, w))
    return settled


def nearest(candidates, k: int):
    """The k smallest (distance, id) pairs: nearest first, ties to the lower id."""
    return sorted(candidates)[:k]


def gaussian_weights(distances: List[float], coverage: float) -> List[float]:
    """exp(-d^2 / (2 coverage^2)) normalised to sum 1 (uniform if all underflow)."""
    w = [np.exp(-float(d) ** 2 / (2 * coverage ** 2)) for d in distances]
    total = sum(w)
    return [x / total if total > 0 else 1 / len(w) for x in w]


def remove_weak_nodes(edges: List[List[int]], min_edges: int) -> List[bool]:
    """Removes nodes with fewer than min_edges edges to remaining nodes until none is left."""
    valid = [True] * len(edges)
    changed = True
    while changed:
        counts = [sum(valid[m] for m in row) for row in edges]
        changed = False
        for n in range(len(edges)):
            if valid[n] and counts[n] < min_edges:
                valid[n] = False
                changed = True
    return valid


def components(edges: List[List[int]], valid: List[bool]) -> List[int]:
    """Cluster id per node (-1 if invalid): breadth-first search over undirected valid edges,
    clusters numbered in order of their lowest node."""
    undirected = [set() for _ in edges]
    for n, row in enumerate(edges):
        for m in row:
            if valid[n] and valid[m]:
                undirected[n].add(m)
                undirected[m].add(n)
    cluster = [-1] * len(edges)
    count = 0
    for start in range(len(edges)):
        if not valid[start] or cluster[start] >= 0:
            continue
        cluster[start] = count
        queue = deque([start])
        while queue:
            for m in undirected[queue.popleft()]:
                if cluster[m] < 0:
                    cluster[m] = count
                    queue.append(m)
        count += 1
    return cluster


def build_graph_reference(depth: np.ndarray, intrinsics: Dict[str, float],
                          mask: Optional[np.ndarray] = None,
                          scene_flow: Optional[np.ndarray] = None,
                          options: GraphOptions = GraphOptions()) -> ReferenceGraph:
    """The graph of build_graph, computed the slow, plain way. depth (H, W) metres, mask (H, W)
    bool, scene_flow (3, H, W) (pixels without a finite scene flow get no vertex).
    Raises ValueError when fewer than 4 nodes result."""
    depth = np.array(depth, dtype=np.float32)
    depth[~np.isfinite(depth)] = 0
    if mask is not None:
        depth[~mask.astype(bool)] = 0
    if scene_flow is not None:
        depth[~np.isfinite(scene_flow).all(axis=0)] = 0
    height, width = depth.shape
    K, A, coverage = options.num_neighbors, options.num_anchors, options.node_coverage

    points = backproject(depth, intrinsics, options.max_depth)
    vertices, pixels, faces = mesh_from_points(points, options.max_triangle_edge)
    kept = erode(faces, len(vertices), options.erosion_iterations, options.erosion_min_neighbors)
    node_vertex = sample_nodes(vertices, kept, coverage)
    N = len(node_vertex)
    if N < 4:
        raise ValueError(f"object too small: {N} node(s) sampled")

    # node_dist[n]: vertex -> ranking distance from node n. Geodesic: the path length, only
    # within the influence radius. Euclidean: the float32 squared distance, to every vertex; the
    # op ranks by it and takes the root only for the output (two distinct squares can round to
    # the same root, which would change the ties).
    geodesic = options.mode == "geodesic"
    if geodesic:
        adjacency = mesh_adjacency(vertices, faces)
        node_dist = [dijkstra(adjacency, v, options.influence_radius) for v in node_vertex]
    else:
        node_dist = []
        for v in node_vertex:
            d = vertices - vertices[v]
            squared = d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2]
            node_dist.append(dict(enumerate(squared)))

    def metres(rank_distance):
        return rank_distance if geodesic else np.sqrt(rank_distance)

    edges, edge_dist = [], []
    for n in range(N):
        near = nearest([(node_dist[n][node_vertex[m]], m) for m in range(N)
                        if m != n and node_vertex[m] in node_dist[n]], K)
        edges.append([m for _, m in near])
        edge_dist.append([metres(d) for d, _ in near])

    valid = remove_weak_nodes(edges, options.min_edges)
    cluster = components(edges, valid)
    sizes = np.bincount([c for c in cluster if c >= 0], minlength=1)
    valid = [v and sizes[c] >= options.min_cluster_size for v, c in zip(valid, cluster)]
    cluster = components(edges, valid)
    kept_nodes = [n for n in range(N) if valid[n]]
    if len(kept_nodes) < 4:
        raise ValueError(f"object too small: {len(kept_nodes)} node(s) left after clean-up")
    new_id = {old: new for new, old in enumerate(kept_nodes)}

    out_edges = np.full((len(kept_nodes), K), -1, dtype=np.int32)
    out_dist = np.zeros((len(kept_nodes), K), dtype=np.float32)
    out_weights = np.zeros((len(kept_nodes), K), dtype=np.float32)
    for new, old in enumerate(kept_nodes):
        row = [(new_id[m], d) for m, d in zip(edges[old], edge_dist[old]) if valid[m]]
        out_edges[new, :len(row)] = [m for m, _ in row]
        out_dist[new, :len(row)] = [d for _, d in row]
        out_weights[new, :len(row)] = gaussian_weights([d for _, d in row], coverage)

    # Each vertex's A nearest kept nodes, ids already re-indexed (same order as the old ids).
    candidates = [[] for _ in range(len(vertices))]
    for old in kept_nodes:
        for v, d in node_dist[old].items():
            candidates[v].append((d, new_id[old]))
    pixel_anchors = np.full((height, width, A), -1, dtype=np.int32)
    pixel_weights = np.zeros((height, width, A), dtype=np.float32)
    for v, found in enumerate(candidates):
        near = nearest(found, A)
        if not near:
            continue
        distances = [metres(d) for d, _ in near]
        x, y = pixels[v]
        pixel_anchors[y, x, :len(near)] = [n for _, n in near]
        pixel_weights[y, x, :len(near)] = gaussian_weights(distances, coverage)

    node_pixels = pixels[[node_vertex[n] for n in kept_nodes]].reshape(-1, 2)
    deformations = None
    if scene_flow is not None:
        deformations = scene_flow[:, node_pixels[:, 1], node_pixels[:, 0]].T.astype(np.float32)
    return ReferenceGraph(
        nodes=vertices[[node_vertex[n] for n in kept_nodes]].reshape(-1, 3), edges=out_edges,
        edges_weights=out_weights, edges_distances=out_dist,
        clusters=np.array([cluster[n] for n in kept_nodes], dtype=np.int32).reshape(-1, 1),
        pixel_anchors=pixel_anchors, pixel_weights=pixel_weights, node_pixels=node_pixels,
        node_deformations=deformations)
