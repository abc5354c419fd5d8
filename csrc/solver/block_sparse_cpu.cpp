// CPU launchers of the block-sparse assembly (csrc/solver/solver.h, "Launch logic"): parallel
// loops over terms, blocks or nodes, each iteration one call of the header's loop body.
#include <algorithm>
#include <vector>

#include "solver/solver.h"

namespace nnrt {

std::vector<at::Tensor> TermBlockKeysCpu(const at::Tensor& nodes, int64_t num_nodes, int64_t total) {
  const int64_t M = nodes.size(0);
  const int S = static_cast<int>(nodes.size(1)), E = NumPairs(S);
  at::Tensor keys = at::empty({M, E}, nodes.options());
  at::Tensor codes = at::empty({M}, nodes.options().dtype(at::kInt));
  const int64_t* idx = nodes.data_ptr<int64_t>();
  int64_t* kp = keys.data_ptr<int64_t>();
  int* cp = codes.data_ptr<int>();
  at::parallel_for(0, M, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) cp[m] = TermBlockKeys(idx + m * S, S, num_nodes, total, kp + m * E);
  });
  return {keys, codes};
}

at::Tensor AssembleBlocksCpu(const at::Tensor& J, const at::Tensor& r, const at::Tensor& nodes,
                             const at::Tensor& entry_order, const at::Tensor& entry_start,
                             const at::Tensor& slot_order, const at::Tensor& slot_start,
                             at::Tensor blocks, at::Tensor b, bool accumulate) {
  const int R = static_cast<int>(J.size(1)), S = static_cast<int>(nodes.size(1));
  const int64_t P = blocks.size(0), T = b.size(0);
  const int64_t* idx = nodes.data_ptr<int64_t>();
  const int64_t* eo = entry_order.data_ptr<int64_t>();
  const int64_t* es = entry_start.data_ptr<int64_t>();
  const int64_t* so = slot_order.data_ptr<int64_t>();
  const int64_t* ss = slot_start.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(J.scalar_type(), "assemble_blocks_cpu", [&] {
    const scalar_t* Jp = J.data_ptr<scalar_t>();
    const scalar_t* rp = r.data_ptr<scalar_t>();
    scalar_t* Bp = blocks.data_ptr<scalar_t>();
    scalar_t* bp = b.data_ptr<scalar_t>();
    auto run = [&](auto rows, auto slots) {
      constexpr int kR = decltype(rows)::value, kS = decltype(slots)::value;
      at::parallel_for(0, P, 64, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p)
          AssembleBlockBody<scalar_t, kR, kS>(p, Jp, R, S, idx, eo, es, accumulate, Bp);
      });
      at::parallel_for(0, T, 256, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n)
          AssembleRhsBody<scalar_t, kR, kS>(n, Jp, rp, R, S, so, ss, accumulate, bp);
      });
    };
    DispatchTermShape(R, S, run);  // unrolled 6x6 products for the solver's two shapes
  });
  return blocks;
}

std::vector<at::Tensor> AssembleBlocksBackwardCpu(const at::Tensor& grad_blocks, const at::Tensor& grad_b,
                                                  const at::Tensor& J, const at::Tensor& r,
                                                  const at::Tensor& nodes, const at::Tensor& term_blocks) {
  const int64_t M = J.size(0);
  const int R = static_cast<int>(J.size(1)), S = static_cast<int>(nodes.size(1));
  at::Tensor grad_J = at::empty_like(J);
  at::Tensor grad_r = at::empty_like(r);
  const int64_t* idx = nodes.data_ptr<int64_t>();
  const int64_t* tb = term_blocks.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(J.scalar_type(), "assemble_blocks_backward_cpu", [&] {
    const scalar_t* Jp = J.data_ptr<scalar_t>();
    const scalar_t* rp = r.data_ptr<scalar_t>();
    const scalar_t* gB = grad_blocks.data_ptr<scalar_t>();
    const scalar_t* gb = grad_b.data_ptr<scalar_t>();
    scalar_t* gJ = grad_J.data_ptr<scalar_t>();
    scalar_t* gr = grad_r.data_ptr<scalar_t>();
    at::parallel_for(0, M, 256, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m)
        SparseTermGradientBody<scalar_t>(m, Jp, rp, R, S, idx, tb, gB, gb, gJ, gr);
    });
  });
  return {grad_J, grad_r};
}

at::Tensor BlocksToDenseCpu(const at::Tensor& blocks, const at::Tensor& block_row,
                            const at::Tensor& block_col, int64_t num_samples, int64_t num_nodes) {
  const int64_t P = blocks.size(0), dim = 6 * num_nodes;
  at::Tensor A = at::zeros({num_samples, dim, dim}, blocks.options());
  const int64_t* br = block_row.data_ptr<int64_t>();
  const int64_t* bc = block_col.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(blocks.scalar_type(), "blocks_to_dense_cpu", [&] {
    const scalar_t* Bp = blocks.data_ptr<scalar_t>();
    scalar_t* Ap = A.data_ptr<scalar_t>();
    at::parallel_for(0, P, 256, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) BlocksToDenseBody<scalar_t>(p, Bp, br, bc, num_nodes, Ap);
    });
  });
  return A;
}

namespace {

// at::parallel_for hands each thread an equal count of items; the rows of the dense assembly
// differ in cost (a node's slot count; the mirror's row length), so they are split into
// `parts` runs of consecutive rows of about equal cost instead: bounds (parts + 1), where
// cost_before(n) is the (non-decreasing) cost of rows [0, n). Each row still has one owner.
template <typename F>
std::vector<int64_t> BalancedRows(int64_t T, int64_t parts, F cost_before) {
  std::vector<int64_t> bounds(parts + 1, T);
  bounds[0] = 0;
  const double total = static_cast<double>(cost_before(T));
  for (int64_t k = 1, n = 0; k < parts; ++k) {
    while (n < T && cost_before(n) < total * k / parts) ++n;
    bounds[k] = n;
  }
  return bounds;
}

template <typename Body>
void ForBalancedRows(const std::vector<int64_t>& bounds, Body body) {
  at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k)
      for (int64_t n = bounds[k]; n < bounds[k + 1]; ++n) body(n);
  });
}

// Rows of the dense assembly split among the threads by their cost: the 6x6 products a row
// sums, one per slot at its node and slot of the same term at a node >= its own. Counting by
// slots alone would hand the low node ids (which own most of their pairs) to the first thread:
// with 4 anchors they cost up to 4x the high ones.
std::vector<int64_t> RowsByProducts(const int64_t* idx, int S, const int64_t* so, const int64_t* ss, int64_t T,
                                    int64_t parts) {
  std::vector<int64_t> products_before(T + 1, 0);
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      int64_t count = 0;
      for (int64_t e = ss[n]; e < ss[n + 1]; ++e) {
        const int64_t m = so[e] / S;
        for (int t = 0; t < S; ++t) count += idx[m * S + t] >= n;
      }
      products_before[n + 1] = count + 1;  // + 1: the row's own bookkeeping
    }
  });
  for (int64_t n = 0; n < T; ++n) products_before[n + 1] += products_before[n];
  return BalancedRows(T, parts, [&](int64_t n) { return products_before[n]; });
}

// The lower triangle from the upper one (MirrorDenseRowBody) after a sample's last group. Row n
// of a sample copies its n + 1 blocks: the cost of rows [0, n) grows as n^2.
template <typename scalar_t>
void MirrorDense(int64_t N, int64_t T, int64_t parts, scalar_t* Ap) {
  const auto before = [&](int64_t n) {
    const int64_t full = n / N, rest = n % N;
    return full * N * (N + 1) / 2 + rest * (rest + 1) / 2;
  };
  ForBalancedRows(BalancedRows(T, parts, before), [&](int64_t n) { MirrorDenseRowBody<scalar_t>(n, N, Ap); });
}

// What both dense assemblies read of a term group's slot lists, and their rows' split.
struct DenseRows {
  int S;
  int64_t N, T, parts;
  const int64_t *idx, *so, *ss;
  std::vector<int64_t> rows;

  DenseRows(const at::Tensor& nodes, const at::Tensor& slot_order, const at::Tensor& slot_start,
            const at::Tensor& A)
      : S(static_cast<int>(nodes.size(1))), N(A.size(1) / 6), T(A.size(0) * N),
        parts(4 * static_cast<int64_t>(at::get_num_threads())), idx(nodes.data_ptr<int64_t>()),
        so(slot_order.data_ptr<int64_t>()), ss(slot_start.data_ptr<int64_t>()),
        rows(RowsByProducts(idx, S, so, ss, T, parts)) {}
};

}  // namespace

void AssembleDenseCpu(const at::Tensor& J, const at::Tensor& r, const at::Tensor& nodes,
                      const at::Tensor& slot_order, const at::Tensor& slot_start, at::Tensor A,
                      at::Tensor b, bool accumulate, bool finish) {
  const int R = static_cast<int>(J.size(1));
  const DenseRows d(nodes, slot_order, slot_start, A);
  const int S = d.S;
  const int64_t N = d.N, *idx = d.idx, *so = d.so, *ss = d.ss;
  AT_DISPATCH_FLOATING_TYPES(J.scalar_type(), "assemble_dense_cpu", [&] {
    const scalar_t* Jp = J.data_ptr<scalar_t>();
    const scalar_t* rp = r.data_ptr<scalar_t>();
    scalar_t* Ap = A.data_ptr<scalar_t>();
    scalar_t* bp = b.data_ptr<scalar_t>();
    auto run = [&](auto row_count, auto slots) {
      constexpr int kR = decltype(row_count)::value, kS = decltype(slots)::value;
      ForBalancedRows(d.rows, [&](int64_t n) {
        AssembleDenseRowBody<scalar_t, kR, kS>(n, Jp, rp, R, S, idx, so, ss, N, accumulate, Ap, bp);
      });
    };
    DispatchTermShape(R, S, run);
    if (finish) MirrorDense<scalar_t>(N, d.T, d.parts, Ap);
  });
}

void AssembleDenseMatchCpu(const at::Tensor& structure, const at::Tensor& w, const at::Tensor& r,
                           const at::Tensor& nodes, const at::Tensor& slot_order, const at::Tensor& slot_start,
                           at::Tensor A, at::Tensor b, bool accumulate, bool finish) {
  const DenseRows d(nodes, slot_order, slot_start, A);
  const int S = d.S;
  const int64_t N = d.N, *idx = d.idx, *so = d.so, *ss = d.ss;
  AT_DISPATCH_FLOATING_TYPES(structure.scalar_type(), "assemble_dense_match_cpu", [&] {
    const scalar_t* sp = structure.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* rp = r.data_ptr<scalar_t>();
    scalar_t* Ap = A.data_ptr<scalar_t>();
    scalar_t* bp = b.data_ptr<scalar_t>();
    if (S == 4) {  // the solver's anchors: the slot loop unrolled
      ForBalancedRows(d.rows, [&](int64_t n) {
        AssembleDenseMatchRowBody<scalar_t, 4>(n, sp, wp, rp, S, idx, so, ss, N, accumulate, Ap, bp);
      });
    } else {
      ForBalancedRows(d.rows, [&](int64_t n) {
        AssembleDenseMatchRowBody<scalar_t>(n, sp, wp, rp, S, idx, so, ss, N, accumulate, Ap, bp);
      });
    }
    if (finish) MirrorDense<scalar_t>(N, d.T, d.parts, Ap);
  });
}

at::Tensor BlockMatvecCpu(const at::Tensor& blocks, const at::Tensor& block_row,
                          const at::Tensor& block_col, const at::Tensor& row_start,
                          const at::Tensor& col_order, const at::Tensor& col_start, const at::Tensor& x) {
  const int64_t T = x.size(0);
  at::Tensor y = at::empty_like(x);
  const int64_t* br = block_row.data_ptr<int64_t>();
  const int64_t* bc = block_col.data_ptr<int64_t>();
  const int64_t* rs = row_start.data_ptr<int64_t>();
  const int64_t* co = col_order.data_ptr<int64_t>();
  const int64_t* cs = col_start.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(blocks.scalar_type(), "block_matvec_cpu", [&] {
    const scalar_t* Bp = blocks.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, T, 256, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) BlockMatvecBody<scalar_t>(n, Bp, br, bc, rs, co, cs, xp, yp);
    });
  });
  return y;
}

}  // namespace nnrt

namespace nnrt {

// Step 2 on the CPU (see BuildBlockPattern): counting sorts over the T flat nodes instead of
// sorting 64-bit keys. Items (group, entry id) are bucketed by the block's row node in the order
// groups, then entry ids, then sorted by column within a row (stable, so the entries of a block
// keep that order, as the sort by key does).
std::vector<at::Tensor> BuildBlockPatternCpu(const std::vector<at::Tensor>& nodes_list,
                                             const std::vector<at::Tensor>& keys, int64_t num_samples,
                                             int64_t num_nodes) {
  const int64_t T = num_samples * num_nodes;
  const auto opts = at::TensorOptions().dtype(at::kLong);
  const size_t G = nodes_list.size();
  struct Item {
    int64_t col;
    int64_t id;     // entry id m * E + k within its group; -1 for the diagonal block
    int32_t group;
    int32_t pad;
  };
  // Every item (the diagonal block of each node first, then every valid key of each group, in
  // order) sorted by (row, col), stably, by two counting sorts: first by column, then by row (a
  // radix sort over the nodes, O(items + T), where sorting each row was O(items log items)).
  std::vector<int64_t> item_row;
  std::vector<Item> unsorted;
  {
    int64_t count = T;
    for (size_t g = 0; g < G; ++g) {
      const int64_t* k = keys[g].data_ptr<int64_t>();
      for (int64_t e = 0; e < keys[g].numel(); ++e) count += k[e] >= 0;
    }
    unsorted.reserve(count);
    item_row.reserve(count);
    for (int64_t n = 0; n < T; ++n) {
      unsorted.push_back(Item{n, -1, -1, 0});
      item_row.push_back(n);
    }
    for (size_t g = 0; g < G; ++g) {
      const int64_t* k = keys[g].data_ptr<int64_t>();
      for (int64_t e = 0; e < keys[g].numel(); ++e)
        if (k[e] >= 0) {
          unsorted.push_back(Item{k[e] % T, e, static_cast<int32_t>(g), 0});
          item_row.push_back(k[e] / T);
        }
    }
  }
  const int64_t num_items = static_cast<int64_t>(unsorted.size());
  std::vector<int64_t> by_col(num_items);  // item indices sorted by column
  {
    std::vector<int64_t> fill(T + 1, 0);
    for (const Item& item : unsorted) ++fill[item.col + 1];
    for (int64_t n = 0; n < T; ++n) fill[n + 1] += fill[n];
    for (int64_t i = 0; i < num_items; ++i) by_col[fill[unsorted[i].col]++] = i;
  }
  std::vector<int64_t> start(T + 1, 0);
  for (int64_t i = 0; i < num_items; ++i) ++start[item_row[i] + 1];
  for (int64_t n = 0; n < T; ++n) start[n + 1] += start[n];
  std::vector<Item> items(num_items);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i : by_col) items[fill[item_row[i]]++] = unsorted[i];
  }
  // Count each row's distinct columns (blocks).
  std::vector<int64_t> row_blocks(T, 0);
  for (int64_t n = 0; n < T; ++n) {
    int64_t count = 0;
    for (int64_t i = start[n]; i < start[n + 1]; ++i)
      if (i == start[n] || items[i].col != items[i - 1].col) ++count;
    row_blocks[n] = count;
  }
  at::Tensor row_start = at::empty({T + 1}, opts);
  int64_t* rs = row_start.data_ptr<int64_t>();
  rs[0] = 0;
  for (int64_t n = 0; n < T; ++n) rs[n + 1] = rs[n] + row_blocks[n];
  const int64_t P = rs[T];
  at::Tensor block_row = at::empty({P}, opts), block_col = at::empty({P}, opts);
  int64_t* br = block_row.data_ptr<int64_t>();
  int64_t* bc = block_col.data_ptr<int64_t>();
  std::vector<at::Tensor> term_blocks, entry_start, entry_order;
  std::vector<int64_t*> tb(G), es(G);
  for (size_t g = 0; g < G; ++g) {
    term_blocks.push_back(at::full(keys[g].sizes(), -1, opts));
    entry_start.push_back(at::zeros({P + 1}, opts));
    tb[g] = term_blocks[g].data_ptr<int64_t>();
    es[g] = entry_start[g].data_ptr<int64_t>();
  }
  for (int64_t n = 0, p = -1; n < T; ++n) {
    for (int64_t i = start[n]; i < start[n + 1]; ++i) {
      const Item& item = items[i];
      if (i == start[n] || item.col != items[i - 1].col) {
        ++p;
        br[p] = n;
        bc[p] = item.col;
      }
      if (item.group >= 0) {
        tb[item.group][item.id] = p;
        ++es[item.group][p + 1];
      }
    }
  }
  std::vector<at::Tensor> out = {block_row, block_col, row_start};
  // Blocks by column (stable in block order).
  {
    at::Tensor col_start = at::zeros({T + 1}, opts), col_order = at::empty({P}, opts);
    int64_t* cs = col_start.data_ptr<int64_t>();
    int64_t* co = col_order.data_ptr<int64_t>();
    for (int64_t p = 0; p < P; ++p) ++cs[bc[p] + 1];
    for (int64_t n = 0; n < T; ++n) cs[n + 1] += cs[n];
    std::vector<int64_t> fill(cs, cs + T);
    for (int64_t p = 0; p < P; ++p) co[fill[bc[p]]++] = p;
    out.push_back(col_order);
    out.push_back(col_start);
  }
  for (size_t g = 0; g < G; ++g) {
    for (int64_t p = 0; p < P; ++p) es[g][p + 1] += es[g][p];
    entry_order.push_back(at::empty({es[g][P]}, opts));
    int64_t* eo = entry_order[g].data_ptr<int64_t>();
    std::vector<int64_t> fill(es[g], es[g] + P);
    // Entry ids ascending within each block: the rows' stable order already holds them so.
    for (int64_t i = 0; i < start[T]; ++i) {
      const Item& item = items[i];
      if (item.group == static_cast<int32_t>(g)) eo[fill[tb[g][item.id]]++] = item.id;
    }
    out.push_back(term_blocks[g]);
    out.push_back(entry_order[g]);
    out.push_back(entry_start[g]);
    const std::vector<at::Tensor> slots = SlotListsCpu(nodes_list[g], T);
    out.insert(out.end(), slots.begin(), slots.end());
  }
  return out;
}

// Used slots by node, ids ascending: one counting sort over the T flat nodes.
std::vector<at::Tensor> SlotListsCpu(const at::Tensor& nodes_in, int64_t T) {
  const at::Tensor nodes = nodes_in.contiguous();
  const auto opts = at::TensorOptions().dtype(at::kLong);
  const int64_t* idx = nodes.data_ptr<int64_t>();
  at::Tensor slot_start = at::zeros({T + 1}, opts);
  int64_t* ss = slot_start.data_ptr<int64_t>();
  for (int64_t e = 0; e < nodes.numel(); ++e)
    if (idx[e] >= 0) ++ss[idx[e] + 1];
  for (int64_t n = 0; n < T; ++n) ss[n + 1] += ss[n];
  at::Tensor slot_order = at::empty({ss[T]}, opts);
  int64_t* so = slot_order.data_ptr<int64_t>();
  std::vector<int64_t> fill(ss, ss + T);
  for (int64_t e = 0; e < nodes.numel(); ++e)
    if (idx[e] >= 0) so[fill[idx[e]]++] = e;
  return {slot_order, slot_start};
}

}  // namespace nnrt
