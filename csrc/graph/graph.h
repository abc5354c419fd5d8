// Embedded deformation graph construction (docs/DESIGN.md 5.1).
//
// All ops take and return CPU tensors. The work is graph search on an irregular mesh (Dijkstra,
// greedy sampling), which has no useful GPU formulation at these sizes; it runs once per frame
// as preprocessing. Parallel where the work allows: per-node Dijkstra, per-vertex anchor
// selection, per-point Euclidean k-nearest search.
//
// Shapes and dtypes:
//   vertices       (V, 3)   float32 metres
//   faces          (F, 3)   int32 vertex indices
//   node_vertices  (N,)     int64 index of each node's vertex
//   nodes          (N, 3)   float32 node positions
//   node distances CSR: offsets (N+1,) int64, vertex_ids (nnz,) int32, distances (nnz,) float32;
//                  the entries of node n are offsets[n]..offsets[n+1], in increasing distance
//   edges          (N, K)   int32 neighbour node ids, nearest first, -1 = none
//   edge_distances (N, K)   float32 (0 where no edge)
//   anchors        (P, K)   int32 node ids, nearest first, -1 = none
//   weights        (P, K)   float32 normalised skinning weights (0 where no anchor)
#pragma once

#include <cmath>

#include "common.h"

namespace nnrt {

// Skinning / edge weight of a node at distance d: a Gaussian with sigma = node coverage.
HOST_DEVICE inline float GaussianWeight(float distance, float coverage) {
  return expf(-(distance * distance) / (2.f * coverage * coverage));
}

// Normalises w[0..count) to sum 1; falls back to uniform weights when all underflowed to 0.
HOST_DEVICE inline void NormaliseWeights(float* w, int count) {
  float sum = 0.f;
  for (int i = 0; i < count; ++i) sum += w[i];
  for (int i = 0; i < count; ++i) w[i] = sum > 0.f ? w[i] / sum : 1.f / count;
}

// Drops every face that touches a vertex with fewer than min_neighbors incident faces, repeated
// `iterations` times. Returns (V,) bool: vertices still touched by a face.
at::Tensor ErodeMesh(const at::Tensor& faces, int64_t num_vertices, int64_t iterations,
                     int64_t min_neighbors);

// Greedy sampling in vertex order: a vertex (with mask true) becomes a node unless it lies within
// `coverage` (Euclidean) of an earlier node. Every masked vertex ends within coverage of a node.
// Returns (N,) int64 vertex indices.
at::Tensor SampleNodes(const at::Tensor& vertices, const at::Tensor& mask, double coverage);

// Geodesic distance along the mesh from every node to every vertex within max_distance
// (one bounded Dijkstra per node, nodes in parallel). Returns the CSR described above.
std::vector<at::Tensor> GeodesicNodeDistances(const at::Tensor& vertices, const at::Tensor& faces,
                                              const at::Tensor& node_vertices, double max_distance);

// The K geodesically nearest other nodes of each node, from the CSR. Returns (edges, distances).
std::vector<at::Tensor> GeodesicEdges(const at::Tensor& offsets, const at::Tensor& vertex_ids,
                                      const at::Tensor& distances, const at::Tensor& node_vertices,
                                      int64_t num_vertices, int64_t K);

// The K geodesically nearest valid nodes of every vertex, with Gaussian skinning weights.
// node_valid (N,) bool. Returns (anchors (V, K), weights (V, K)).
std::vector<at::Tensor> GeodesicAnchors(const at::Tensor& offsets, const at::Tensor& vertex_ids,
                                        const at::Tensor& distances, const at::Tensor& node_valid,
                                        int64_t num_vertices, int64_t K, double coverage);

// K nearest nodes by Euclidean distance. For edges, query = nodes and a node never links to
// itself. Returns (ids (P, K) int32, distances (P, K) float32).
std::vector<at::Tensor> EuclideanKnn(const at::Tensor& nodes, const at::Tensor& queries, int64_t K,
                                     bool exclude_self);

// Iteratively invalidates nodes with fewer than min_edges edges to valid nodes (removing a node
// can leave a neighbour short of edges). edges (N, K) int32. Returns (N,) bool.
at::Tensor ValidNodesByEdgeCount(const at::Tensor& edges, int64_t min_edges);

// Connected components of the undirected graph of `edges` restricted to valid nodes.
// Returns (N,) int32 cluster id (0, 1, ... in order of first node; -1 for invalid nodes).
at::Tensor ConnectedComponents(const at::Tensor& edges, const at::Tensor& node_valid);

}  // namespace nnrt
