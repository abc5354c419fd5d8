// CPU launchers of the block-sparse assembly (csrc/solver/solver.h, "Launch logic"): parallel
// loops over terms, blocks or nodes, each iteration one call of the header's loop body.
#include <type_traits>
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
    // Compile-time sizes for the solver's two shapes (matches: 3 rows x 4 anchors, edges: 3 rows
    // x 2 nodes) let the compiler unroll the 6x6 products.
    using Any = std::integral_constant<int, 0>;
    using Three = std::integral_constant<int, 3>;
    if (R == 3 && S == 4) {
      run(Three{}, std::integral_constant<int, 4>{});
    } else if (R == 3 && S == 2) {
      run(Three{}, std::integral_constant<int, 2>{});
    } else {
      run(Any{}, Any{});
    }
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
