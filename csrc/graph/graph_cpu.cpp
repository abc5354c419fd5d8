#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <atomic>
#include <functional>
#include <limits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "graph/graph.h"

namespace nnrt {
namespace {

void CheckVertices(const at::Tensor& vertices) {
  NNRT_CHECK_CPU(vertices);
  NNRT_CHECK_DTYPE(vertices, at::kFloat);
  NNRT_CHECK_CONTIGUOUS(vertices);
  TORCH_CHECK(vertices.dim() == 2 && vertices.size(1) == 3, "vertices must be (V, 3), found ",
              vertices.sizes());
}

void CheckFaces(const at::Tensor& faces, int64_t num_vertices) {
  NNRT_CHECK_CPU(faces);
  NNRT_CHECK_DTYPE(faces, at::kInt);
  NNRT_CHECK_CONTIGUOUS(faces);
  TORCH_CHECK(faces.dim() == 2 && faces.size(1) == 3, "faces must be (F, 3), found ", faces.sizes());
  if (faces.numel() > 0) {
    TORCH_CHECK(faces.min().item<int32_t>() >= 0 && faces.max().item<int32_t>() < num_vertices,
                "faces index outside [0, ", num_vertices, ")");
  }
}

void CheckCsr(const at::Tensor& offsets, const at::Tensor& vertex_ids, const at::Tensor& distances) {
  NNRT_CHECK_CPU(offsets);
  NNRT_CHECK_DTYPE(offsets, at::kLong);
  NNRT_CHECK_DTYPE(vertex_ids, at::kInt);
  NNRT_CHECK_DTYPE(distances, at::kFloat);
  NNRT_CHECK_CONTIGUOUS(offsets);
  NNRT_CHECK_CONTIGUOUS(vertex_ids);
  NNRT_CHECK_CONTIGUOUS(distances);
  TORCH_CHECK(vertex_ids.numel() == distances.numel(), "vertex_ids and distances differ in length");
}

void CheckEdges(const at::Tensor& edges) {
  NNRT_CHECK_CPU(edges);
  NNRT_CHECK_DTYPE(edges, at::kInt);
  NNRT_CHECK_CONTIGUOUS(edges);
  NNRT_CHECK_DIM(edges, 2);
  if (edges.numel() > 0) {
    TORCH_CHECK(edges.min().item<int32_t>() >= -1 && edges.max().item<int32_t>() < edges.size(0),
                "edges index outside [-1, ", edges.size(0), ")");
  }
}

// Undirected vertex adjacency of a triangle mesh in CSR form, with edge lengths.
struct MeshAdjacency {
  std::vector<int64_t> offsets;
  std::vector<int32_t> neighbours;
  std::vector<float> lengths;
};

MeshAdjacency BuildAdjacency(const float* v, const int32_t* f, int64_t V, int64_t F) {
  std::vector<int64_t> count(V + 1, 0);
  for (int64_t i = 0; i < 3 * F; ++i) count[f[i] + 1] += 2;
  for (int64_t i = 0; i < V; ++i) count[i + 1] += count[i];
  std::vector<int32_t> raw(count[V]);
  std::vector<int64_t> fill(count.begin(), count.end() - 1);
  for (int64_t t = 0; t < F; ++t) {
    const int32_t* tri = f + 3 * t;
    for (int k = 0; k < 3; ++k) {
      raw[fill[tri[k]]++] = tri[(k + 1) % 3];
      raw[fill[tri[k]]++] = tri[(k + 2) % 3];
    }
  }
  // Sort and de-duplicate each vertex's list (an interior edge is shared by two faces).
  std::vector<int64_t> unique_count(V + 1, 0);
  at::parallel_for(0, V, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      auto first = raw.begin() + count[i], last = raw.begin() + count[i + 1];
      std::sort(first, last);
      unique_count[i + 1] = std::unique(first, last) - first;
    }
  });
  MeshAdjacency adj;
  adj.offsets.assign(V + 1, 0);
  for (int64_t i = 0; i < V; ++i) adj.offsets[i + 1] = adj.offsets[i] + unique_count[i + 1];
  adj.neighbours.resize(adj.offsets[V]);
  adj.lengths.resize(adj.offsets[V]);
  at::parallel_for(0, V, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t k = 0; k < unique_count[i + 1]; ++k) {
        const int32_t j = raw[count[i] + k];
        const float d0 = v[3 * i] - v[3 * j], d1 = v[3 * i + 1] - v[3 * j + 1],
                    d2 = v[3 * i + 2] - v[3 * j + 2];
        adj.neighbours[adj.offsets[i] + k] = j;
        adj.lengths[adj.offsets[i] + k] = std::sqrt(d0 * d0 + d1 * d1 + d2 * d2);
      }
    }
  });
  return adj;
}

// Per-thread Dijkstra state; `dist` is reset only where a search touched it.
struct DijkstraWorkspace {
  std::vector<float> dist;
  std::vector<int32_t> touched;
  std::vector<std::pair<float, int32_t>> heap;
};

// Inserts (id, d) into the ascending lists ids/ds of capacity K (ties: lower id first).
inline void InsertTopK(int32_t* ids, float* ds, int K, int32_t id, float d) {
  if (ids[K - 1] >= 0 && (d > ds[K - 1] || (d == ds[K - 1] && id > ids[K - 1]))) return;
  int pos = K - 1;
  while (pos > 0 && (ids[pos - 1] < 0 || d < ds[pos - 1] || (d == ds[pos - 1] && id < ids[pos - 1]))) {
    ids[pos] = ids[pos - 1];
    ds[pos] = ds[pos - 1];
    --pos;
  }
  ids[pos] = id;
  ds[pos] = d;
}

}  // namespace

at::Tensor ErodeMesh(const at::Tensor& faces, int64_t num_vertices, int64_t iterations,
                     int64_t min_neighbors) {
  CheckFaces(faces, num_vertices);
  const int64_t F = faces.size(0);
  const int32_t* f = faces.data_ptr<int32_t>();
  std::vector<uint8_t> alive(F, 1);
  std::vector<int32_t> incidence(num_vertices);
  for (int64_t it = 0; it < iterations; ++it) {
    std::fill(incidence.begin(), incidence.end(), 0);
    for (int64_t t = 0; t < F; ++t)
      if (alive[t])
        for (int k = 0; k < 3; ++k) ++incidence[f[3 * t + k]];
    // Every face is judged on the counts from the start of the pass.
    for (int64_t t = 0; t < F; ++t)
      if (alive[t] && (incidence[f[3 * t]] < min_neighbors || incidence[f[3 * t + 1]] < min_neighbors ||
                       incidence[f[3 * t + 2]] < min_neighbors))
        alive[t] = 0;
  }
  at::Tensor kept = at::zeros({num_vertices}, faces.options().dtype(at::kBool));
  bool* out = kept.data_ptr<bool>();
  for (int64_t t = 0; t < F; ++t)
    if (alive[t])
      for (int k = 0; k < 3; ++k) out[f[3 * t + k]] = true;
  return kept;
}

at::Tensor SampleNodes(const at::Tensor& vertices, const at::Tensor& mask, double coverage) {
  CheckVertices(vertices);
  NNRT_CHECK_DTYPE(mask, at::kBool);
  TORCH_CHECK(mask.dim() == 1 && mask.size(0) == vertices.size(0), "mask must be (V,) = (",
              vertices.size(0), ",), found ", mask.sizes());
  TORCH_CHECK(coverage > 0, "node coverage must be positive, found ", coverage);
  const at::Tensor m = mask.contiguous();
  const float* v = vertices.data_ptr<float>();
  const bool* keep = m.data_ptr<bool>();
  const int64_t V = vertices.size(0);
  const float c2 = static_cast<float>(coverage * coverage);
  const float inv_cell = static_cast<float>(1.0 / coverage);

  // Nodes are bucketed in a uniform grid of cell size `coverage`, so only the 27 cells around a
  // vertex need checking; the result is identical to checking every earlier node.
  struct CellHash {
    size_t operator()(const std::array<int32_t, 3>& c) const {
      return (static_cast<size_t>(c[0]) * 73856093u) ^ (static_cast<size_t>(c[1]) * 19349663u) ^
             (static_cast<size_t>(c[2]) * 83492791u);
    }
  };
  std::unordered_map<std::array<int32_t, 3>, std::vector<int64_t>, CellHash> grid;
  std::vector<int64_t> nodes;
  for (int64_t i = 0; i < V; ++i) {
    if (!keep[i]) continue;
    const float* p = v + 3 * i;
    const std::array<int32_t, 3> cell = {static_cast<int32_t>(std::floor(p[0] * inv_cell)),
                                         static_cast<int32_t>(std::floor(p[1] * inv_cell)),
                                         static_cast<int32_t>(std::floor(p[2] * inv_cell))};
    bool covered = false;
    for (int dz = -1; dz <= 1 && !covered; ++dz)
      for (int dy = -1; dy <= 1 && !covered; ++dy)
        for (int dx = -1; dx <= 1 && !covered; ++dx) {
          auto it = grid.find({cell[0] + dx, cell[1] + dy, cell[2] + dz});
          if (it == grid.end()) continue;
          for (int64_t n : it->second) {
            const float* q = v + 3 * n;
            const float d0 = p[0] - q[0], d1 = p[1] - q[1], d2 = p[2] - q[2];
            if (d0 * d0 + d1 * d1 + d2 * d2 <= c2) {
              covered = true;
              break;
            }
          }
        }
    if (!covered) {
      nodes.push_back(i);
      grid[cell].push_back(i);
    }
  }
  return at::tensor(nodes, vertices.options().dtype(at::kLong));
}

std::vector<at::Tensor> GeodesicNodeDistances(const at::Tensor& vertices, const at::Tensor& faces,
                                              const at::Tensor& node_vertices, double max_distance) {
  CheckVertices(vertices);
  const int64_t V = vertices.size(0);
  CheckFaces(faces, V);
  NNRT_CHECK_DTYPE(node_vertices, at::kLong);
  NNRT_CHECK_DIM(node_vertices, 1);
  const at::Tensor nv = node_vertices.contiguous();
  const int64_t N = nv.size(0);
  const int64_t* node_v = nv.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(node_v[n] >= 0 && node_v[n] < V, "node ", n, " has vertex ", node_v[n],
                " outside [0, ", V, ")");

  const MeshAdjacency adj = BuildAdjacency(vertices.data_ptr<float>(), faces.data_ptr<int32_t>(), V,
                                           faces.size(0));
  const float limit = static_cast<float>(max_distance);
  std::vector<std::vector<std::pair<int32_t, float>>> settled(N);
  using Entry = std::pair<float, int32_t>;

  DynamicParallelFor<DijkstraWorkspace>(
      N,
      [&] {
        DijkstraWorkspace ws;
        ws.dist.assign(V, std::numeric_limits<float>::infinity());
        return ws;
      },
      [&](int64_t n, DijkstraWorkspace& ws) {
        auto& out = settled[n];
        auto& heap = ws.heap;
        const int32_t source = static_cast<int32_t>(node_v[n]);
        ws.dist[source] = 0.f;
        ws.touched.push_back(source);
        heap.emplace_back(0.f, source);
        while (!heap.empty()) {
          std::pop_heap(heap.begin(), heap.end(), std::greater<Entry>());
          const auto [d, u] = heap.back();
          heap.pop_back();
          if (d > ws.dist[u]) continue;  // stale entry: u was reached by a shorter path
          out.emplace_back(u, d);
          for (int64_t e = adj.offsets[u]; e < adj.offsets[u + 1]; ++e) {
            const int32_t w = adj.neighbours[e];
            const float nd = d + adj.lengths[e];
            if (nd <= limit && nd < ws.dist[w]) {
              if (ws.dist[w] == std::numeric_limits<float>::infinity()) ws.touched.push_back(w);
              ws.dist[w] = nd;
              heap.emplace_back(nd, w);
              std::push_heap(heap.begin(), heap.end(), std::greater<Entry>());
            }
          }
        }
        for (int32_t t : ws.touched) ws.dist[t] = std::numeric_limits<float>::infinity();
        ws.touched.clear();
      });

  at::Tensor offsets = at::empty({N + 1}, nv.options());
  int64_t* off = offsets.data_ptr<int64_t>();
  off[0] = 0;
  for (int64_t n = 0; n < N; ++n) off[n + 1] = off[n] + static_cast<int64_t>(settled[n].size());
  at::Tensor ids = at::empty({off[N]}, nv.options().dtype(at::kInt));
  at::Tensor dists = at::empty({off[N]}, vertices.options());
  int32_t* id_ptr = ids.data_ptr<int32_t>();
  float* d_ptr = dists.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (size_t k = 0; k < settled[n].size(); ++k) {
        id_ptr[off[n] + k] = settled[n][k].first;
        d_ptr[off[n] + k] = settled[n][k].second;
      }
  });
  return {offsets, ids, dists};
}

std::vector<at::Tensor> GeodesicEdges(const at::Tensor& offsets, const at::Tensor& vertex_ids,
                                      const at::Tensor& distances, const at::Tensor& node_vertices,
                                      int64_t num_vertices, int64_t K) {
  CheckCsr(offsets, vertex_ids, distances);
  TORCH_CHECK(K > 0, "K must be positive");
  const at::Tensor nv = node_vertices.contiguous();
  const int64_t N = nv.size(0);
  TORCH_CHECK(offsets.size(0) == N + 1, "offsets must have N+1 = ", N + 1, " entries");
  std::vector<int32_t> node_of_vertex(num_vertices, -1);
  const int64_t* node_v = nv.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) node_of_vertex[node_v[n]] = static_cast<int32_t>(n);

  at::Tensor edges = at::full({N, K}, -1, offsets.options().dtype(at::kInt));
  at::Tensor edge_d = at::zeros({N, K}, distances.options());
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int32_t* ids = vertex_ids.data_ptr<int32_t>();
  const float* ds = distances.data_ptr<float>();
  int32_t* e = edges.data_ptr<int32_t>();
  float* ed = edge_d.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      int64_t found = 0;
      // Entries are in settling order, i.e. increasing distance.
      for (int64_t i = off[n]; i < off[n + 1] && found < K; ++i) {
        const int32_t m = node_of_vertex[ids[i]];
        if (m < 0 || m == n) continue;
        e[n * K + found] = m;
        ed[n * K + found] = ds[i];
        ++found;
      }
    }
  });
  return {edges, edge_d};
}

std::vector<at::Tensor> GeodesicAnchors(const at::Tensor& offsets, const at::Tensor& vertex_ids,
                                        const at::Tensor& distances, const at::Tensor& node_valid,
                                        int64_t num_vertices, int64_t K, double coverage) {
  CheckCsr(offsets, vertex_ids, distances);
  NNRT_CHECK_DTYPE(node_valid, at::kBool);
  TORCH_CHECK(K > 0, "K must be positive");
  const int64_t N = offsets.size(0) - 1;
  TORCH_CHECK(node_valid.numel() == N, "node_valid must have N = ", N, " entries");
  const at::Tensor valid_t = node_valid.contiguous();
  const bool* valid = valid_t.data_ptr<bool>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int32_t* ids = vertex_ids.data_ptr<int32_t>();
  const float* ds = distances.data_ptr<float>();

  // Transpose the node -> vertex lists into vertex -> (node, distance) lists (counting sort).
  std::vector<int64_t> vstart(num_vertices + 1, 0);
  for (int64_t n = 0; n < N; ++n)
    if (valid[n])
      for (int64_t i = off[n]; i < off[n + 1]; ++i) ++vstart[ids[i] + 1];
  for (int64_t v = 0; v < num_vertices; ++v) vstart[v + 1] += vstart[v];
  std::vector<int32_t> cand_node(vstart[num_vertices]);
  std::vector<float> cand_d(vstart[num_vertices]);
  {
    std::vector<int64_t> fill(vstart.begin(), vstart.end() - 1);
    for (int64_t n = 0; n < N; ++n)
      if (valid[n])
        for (int64_t i = off[n]; i < off[n + 1]; ++i) {
          const int64_t slot = fill[ids[i]]++;
          cand_node[slot] = static_cast<int32_t>(n);
          cand_d[slot] = ds[i];
        }
  }

  at::Tensor anchors = at::full({num_vertices, K}, -1, offsets.options().dtype(at::kInt));
  at::Tensor weights = at::zeros({num_vertices, K}, distances.options());
  int32_t* a = anchors.data_ptr<int32_t>();
  float* w = weights.data_ptr<float>();
  const float cov = static_cast<float>(coverage);
  at::parallel_for(0, num_vertices, 2048, [&](int64_t begin, int64_t end) {
    std::vector<float> top_d(K);
    for (int64_t v = begin; v < end; ++v) {
      int32_t* av = a + v * K;
      for (int64_t i = vstart[v]; i < vstart[v + 1]; ++i)
        InsertTopK(av, top_d.data(), static_cast<int>(K), cand_node[i], cand_d[i]);
      int count = 0;
      while (count < K && av[count] >= 0) {
        w[v * K + count] = GaussianWeight(top_d[count], cov);
        ++count;
      }
      if (count > 0) NormaliseWeights(w + v * K, count);
    }
  });
  return {anchors, weights};
}

std::vector<at::Tensor> EuclideanKnn(const at::Tensor& nodes, const at::Tensor& queries, int64_t K,
                                     bool exclude_self) {
  CheckVertices(nodes);
  CheckVertices(queries);
  TORCH_CHECK(K > 0, "K must be positive");
  const int64_t N = nodes.size(0), P = queries.size(0);
  TORCH_CHECK(!exclude_self || N == P, "exclude_self needs queries == nodes");
  at::Tensor ids = at::full({P, K}, -1, nodes.options().dtype(at::kInt));
  at::Tensor dist = at::zeros({P, K}, nodes.options());
  const float* g = nodes.data_ptr<float>();
  const float* q = queries.data_ptr<float>();
  int32_t* out_id = ids.data_ptr<int32_t>();
  float* out_d = dist.data_ptr<float>();
  at::parallel_for(0, P, 256, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t n = 0; n < N; ++n) {
        if (exclude_self && n == p) continue;
        const float d0 = q[3 * p] - g[3 * n], d1 = q[3 * p + 1] - g[3 * n + 1],
                    d2 = q[3 * p + 2] - g[3 * n + 2];
        // Squared distance while searching; the square root is taken once at the end.
        InsertTopK(out_id + p * K, out_d + p * K, static_cast<int>(K), static_cast<int32_t>(n),
                   d0 * d0 + d1 * d1 + d2 * d2);
      }
      for (int64_t k = 0; k < K; ++k) out_d[p * K + k] = std::sqrt(out_d[p * K + k]);
    }
  });
  return {ids, dist};
}

at::Tensor ValidNodesByEdgeCount(const at::Tensor& edges, int64_t min_edges) {
  CheckEdges(edges);
  const int64_t N = edges.size(0), K = edges.size(1);
  const int32_t* e = edges.data_ptr<int32_t>();
  at::Tensor valid_t = at::ones({N}, edges.options().dtype(at::kBool));
  bool* valid = valid_t.data_ptr<bool>();
  for (bool changed = true; changed;) {
    changed = false;
    for (int64_t n = 0; n < N; ++n) {
      if (!valid[n]) continue;
      int64_t count = 0;
      for (int64_t k = 0; k < K; ++k) count += (e[n * K + k] >= 0 && valid[e[n * K + k]]);
      if (count < min_edges) {
        valid[n] = false;
        changed = true;
      }
    }
  }
  return valid_t;
}

at::Tensor ConnectedComponents(const at::Tensor& edges, const at::Tensor& node_valid) {
  CheckEdges(edges);
  NNRT_CHECK_DTYPE(node_valid, at::kBool);
  const int64_t N = edges.size(0), K = edges.size(1);
  TORCH_CHECK(node_valid.numel() == N, "node_valid must have N = ", N, " entries");
  const at::Tensor valid_t = node_valid.contiguous();
  const bool* valid = valid_t.data_ptr<bool>();
  const int32_t* e = edges.data_ptr<int32_t>();
  // Union-find with path halving; edges are directed k-NN links, so union both ways.
  std::vector<int64_t> parent(N);
  for (int64_t n = 0; n < N; ++n) parent[n] = n;
  std::function<int64_t(int64_t)> find = [&](int64_t x) {
    while (parent[x] != x) x = parent[x] = parent[parent[x]];
    return x;
  };
  for (int64_t n = 0; n < N; ++n) {
    if (!valid[n]) continue;
    for (int64_t k = 0; k < K; ++k) {
      const int32_t m = e[n * K + k];
      if (m < 0 || !valid[m]) continue;
      const int64_t a = find(n), b = find(m);
      if (a != b) parent[std::max(a, b)] = std::min(a, b);
    }
  }
  at::Tensor cluster = at::full({N}, -1, edges.options());
  int32_t* c = cluster.data_ptr<int32_t>();
  std::vector<int32_t> label(N, -1);
  int32_t next = 0;
  for (int64_t n = 0; n < N; ++n) {
    if (!valid[n]) continue;
    const int64_t r = find(n);
    if (label[r] < 0) label[r] = next++;
    c[n] = label[r];
  }
  return cluster;
}

}  // namespace nnrt
