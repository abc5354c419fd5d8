// CUDA launchers of the block-sparse assembly (csrc/solver/solver.h, "Launch logic"): one thread
// per term, block or node, each running the header's loop body, exactly as the CPU loop does.
// One writer per output and a fixed summation order: the results do not depend on thread order.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "solver/solver.h"

namespace nnrt {
namespace {

inline int Blocks(int64_t n, int threads) {
  return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535));
}

#define NNRT_GRID_LOOP(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(blockDim.x) * gridDim.x)

__global__ void TermBlockKeysKernel(const int64_t* __restrict__ nodes, int64_t M, int S, int64_t N,
                                    int64_t total, int64_t* __restrict__ keys, int* __restrict__ codes) {
  const int E = NumPairs(S);
  NNRT_GRID_LOOP(m, M) { codes[m] = TermBlockKeys(nodes + m * S, S, N, total, keys + m * E); }
}

template <typename scalar_t>
__global__ void AssembleBlocksKernel(const scalar_t* __restrict__ J, int R, int S,
                                     const int64_t* __restrict__ nodes,
                                     const int64_t* __restrict__ entry_order,
                                     const int64_t* __restrict__ entry_start, int64_t P,
                                     bool accumulate, scalar_t* __restrict__ blocks) {
  NNRT_GRID_LOOP(p, P) {
    AssembleBlockBody<scalar_t>(p, J, R, S, nodes, entry_order, entry_start, accumulate, blocks);
  }
}

template <typename scalar_t>
__global__ void AssembleRhsKernel(const scalar_t* __restrict__ J, const scalar_t* __restrict__ r,
                                  int R, int S, const int64_t* __restrict__ slot_order,
                                  const int64_t* __restrict__ slot_start, int64_t T, bool accumulate,
                                  scalar_t* __restrict__ b) {
  NNRT_GRID_LOOP(n, T) { AssembleRhsBody<scalar_t>(n, J, r, R, S, slot_order, slot_start, accumulate, b); }
}

template <typename scalar_t>
__global__ void AssembleBlocksBackwardKernel(const scalar_t* __restrict__ grad_blocks,
                                             const scalar_t* __restrict__ grad_b,
                                             const scalar_t* __restrict__ J,
                                             const scalar_t* __restrict__ r, int64_t M, int R, int S,
                                             const int64_t* __restrict__ nodes,
                                             const int64_t* __restrict__ term_blocks,
                                             scalar_t* __restrict__ grad_J, scalar_t* __restrict__ grad_r) {
  NNRT_GRID_LOOP(m, M) {
    SparseTermGradientBody<scalar_t>(m, J, r, R, S, nodes, term_blocks, grad_blocks, grad_b, grad_J, grad_r);
  }
}

template <typename scalar_t>
__global__ void BlocksToDenseKernel(const scalar_t* __restrict__ blocks,
                                    const int64_t* __restrict__ block_row,
                                    const int64_t* __restrict__ block_col, int64_t P, int64_t N,
                                    scalar_t* __restrict__ A) {
  NNRT_GRID_LOOP(p, P) { BlocksToDenseBody<scalar_t>(p, blocks, block_row, block_col, N, A); }
}

template <typename scalar_t>
__global__ void AssembleDenseKernel(const scalar_t* __restrict__ J, const scalar_t* __restrict__ r, int R,
                                    int S, const int64_t* __restrict__ nodes,
                                    const int64_t* __restrict__ slot_order,
                                    const int64_t* __restrict__ slot_start, int64_t N, int64_t T,
                                    bool accumulate, scalar_t* __restrict__ A, scalar_t* __restrict__ b) {
  NNRT_GRID_LOOP(n, T) {
    AssembleDenseRowBody<scalar_t>(n, J, r, R, S, nodes, slot_order, slot_start, N, accumulate, A, b);
  }
}

template <typename scalar_t>
__global__ void AssembleDenseMatchKernel(const scalar_t* __restrict__ structure, const scalar_t* __restrict__ w,
                                         const scalar_t* __restrict__ r, int A_, const int64_t* __restrict__ nodes,
                                         const int64_t* __restrict__ slot_order,
                                         const int64_t* __restrict__ slot_start, int64_t N, int64_t T,
                                         bool accumulate, scalar_t* __restrict__ A, scalar_t* __restrict__ b) {
  NNRT_GRID_LOOP(n, T) {
    AssembleDenseMatchRowBody<scalar_t>(n, structure, w, r, A_, nodes, slot_order, slot_start, N, accumulate, A, b);
  }
}

template <typename scalar_t>
__global__ void MirrorDenseKernel(int64_t N, int64_t T, scalar_t* __restrict__ A) {
  NNRT_GRID_LOOP(n, T) { MirrorDenseRowBody<scalar_t>(n, N, A); }
}

template <typename scalar_t>
__global__ void BlockMatvecKernel(const scalar_t* __restrict__ blocks,
                                  const int64_t* __restrict__ block_row,
                                  const int64_t* __restrict__ block_col,
                                  const int64_t* __restrict__ row_start,
                                  const int64_t* __restrict__ col_order,
                                  const int64_t* __restrict__ col_start, const scalar_t* __restrict__ x,
                                  int64_t T, scalar_t* __restrict__ y) {
  NNRT_GRID_LOOP(n, T) { BlockMatvecBody<scalar_t>(n, blocks, block_row, block_col, row_start, col_order, col_start, x, y); }
}

}  // namespace

std::vector<at::Tensor> TermBlockKeysCuda(const at::Tensor& nodes, int64_t num_nodes, int64_t total) {
  at::cuda::CUDAGuard guard(nodes.device());
  const int64_t M = nodes.size(0);
  const int S = static_cast<int>(nodes.size(1));
  at::Tensor keys = at::empty({M, NumPairs(S)}, nodes.options());
  at::Tensor codes = at::empty({M}, nodes.options().dtype(at::kInt));
  if (M == 0) return {keys, codes};
  TermBlockKeysKernel<<<Blocks(M, 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      nodes.data_ptr<int64_t>(), M, S, num_nodes, total, keys.data_ptr<int64_t>(), codes.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {keys, codes};
}

at::Tensor AssembleBlocksCuda(const at::Tensor& J, const at::Tensor& r, const at::Tensor& nodes,
                              const at::Tensor& entry_order, const at::Tensor& entry_start,
                              const at::Tensor& slot_order, const at::Tensor& slot_start,
                              at::Tensor blocks, at::Tensor b, bool accumulate) {
  at::cuda::CUDAGuard guard(J.device());
  const int R = static_cast<int>(J.size(1)), S = static_cast<int>(nodes.size(1));
  const int64_t P = blocks.size(0), T = b.size(0);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(J.scalar_type(), "assemble_blocks_cuda", [&] {
    if (P > 0)
      AssembleBlocksKernel<scalar_t><<<Blocks(P, 128), 128, 0, stream>>>(
          J.data_ptr<scalar_t>(), R, S, nodes.data_ptr<int64_t>(), entry_order.data_ptr<int64_t>(),
          entry_start.data_ptr<int64_t>(), P, accumulate, blocks.data_ptr<scalar_t>());
    if (T > 0)
      AssembleRhsKernel<scalar_t><<<Blocks(T, 128), 128, 0, stream>>>(
          J.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), R, S, slot_order.data_ptr<int64_t>(),
          slot_start.data_ptr<int64_t>(), T, accumulate, b.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return blocks;
}

std::vector<at::Tensor> AssembleBlocksBackwardCuda(const at::Tensor& grad_blocks, const at::Tensor& grad_b,
                                                   const at::Tensor& J, const at::Tensor& r,
                                                   const at::Tensor& nodes, const at::Tensor& term_blocks) {
  at::cuda::CUDAGuard guard(J.device());
  const int64_t M = J.size(0);
  const int R = static_cast<int>(J.size(1)), S = static_cast<int>(nodes.size(1));
  at::Tensor grad_J = at::empty_like(J);
  at::Tensor grad_r = at::empty_like(r);
  if (M == 0) return {grad_J, grad_r};
  AT_DISPATCH_FLOATING_TYPES(J.scalar_type(), "assemble_blocks_backward_cuda", [&] {
    AssembleBlocksBackwardKernel<scalar_t><<<Blocks(M, 128), 128, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad_blocks.data_ptr<scalar_t>(), grad_b.data_ptr<scalar_t>(), J.data_ptr<scalar_t>(),
        r.data_ptr<scalar_t>(), M, R, S, nodes.data_ptr<int64_t>(), term_blocks.data_ptr<int64_t>(),
        grad_J.data_ptr<scalar_t>(), grad_r.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_J, grad_r};
}

at::Tensor BlocksToDenseCuda(const at::Tensor& blocks, const at::Tensor& block_row,
                             const at::Tensor& block_col, int64_t num_samples, int64_t num_nodes) {
  at::cuda::CUDAGuard guard(blocks.device());
  const int64_t P = blocks.size(0), dim = 6 * num_nodes;
  at::Tensor A = at::zeros({num_samples, dim, dim}, blocks.options());
  if (P == 0) return A;
  AT_DISPATCH_FLOATING_TYPES(blocks.scalar_type(), "blocks_to_dense_cuda", [&] {
    BlocksToDenseKernel<scalar_t><<<Blocks(P, 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        blocks.data_ptr<scalar_t>(), block_row.data_ptr<int64_t>(), block_col.data_ptr<int64_t>(), P,
        num_nodes, A.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return A;
}

void AssembleDenseCuda(const at::Tensor& J, const at::Tensor& r, const at::Tensor& nodes,
                       const at::Tensor& slot_order, const at::Tensor& slot_start, at::Tensor A,
                       at::Tensor b, bool accumulate, bool finish) {
  at::cuda::CUDAGuard guard(J.device());
  const int R = static_cast<int>(J.size(1)), S = static_cast<int>(nodes.size(1));
  const int64_t N = A.size(1) / 6, T = A.size(0) * N;
  if (T == 0) return;
  AT_DISPATCH_FLOATING_TYPES(J.scalar_type(), "assemble_dense_cuda", [&] {
    AssembleDenseKernel<scalar_t><<<Blocks(T, 64), 64, 0, at::cuda::getCurrentCUDAStream()>>>(
        J.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), R, S, nodes.data_ptr<int64_t>(),
        slot_order.data_ptr<int64_t>(), slot_start.data_ptr<int64_t>(), N, T, accumulate,
        A.data_ptr<scalar_t>(), b.data_ptr<scalar_t>());
    if (finish)
      MirrorDenseKernel<scalar_t><<<Blocks(T, 64), 64, 0, at::cuda::getCurrentCUDAStream()>>>(
          N, T, A.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void AssembleDenseMatchCuda(const at::Tensor& structure, const at::Tensor& w, const at::Tensor& r,
                            const at::Tensor& nodes, const at::Tensor& slot_order, const at::Tensor& slot_start,
                            at::Tensor A, at::Tensor b, bool accumulate, bool finish) {
  at::cuda::CUDAGuard guard(structure.device());
  const int S = static_cast<int>(nodes.size(1));
  const int64_t N = A.size(1) / 6, T = A.size(0) * N;
  if (T == 0) return;
  AT_DISPATCH_FLOATING_TYPES(structure.scalar_type(), "assemble_dense_match_cuda", [&] {
    AssembleDenseMatchKernel<scalar_t><<<Blocks(T, 64), 64, 0, at::cuda::getCurrentCUDAStream()>>>(
        structure.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), S,
        nodes.data_ptr<int64_t>(), slot_order.data_ptr<int64_t>(), slot_start.data_ptr<int64_t>(), N, T,
        accumulate, A.data_ptr<scalar_t>(), b.data_ptr<scalar_t>());
    if (finish)
      MirrorDenseKernel<scalar_t><<<Blocks(T, 64), 64, 0, at::cuda::getCurrentCUDAStream()>>>(
          N, T, A.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor BlockMatvecCuda(const at::Tensor& blocks, const at::Tensor& block_row,
                           const at::Tensor& block_col, const at::Tensor& row_start,
                           const at::Tensor& col_order, const at::Tensor& col_start, const at::Tensor& x) {
  at::cuda::CUDAGuard guard(blocks.device());
  const int64_t T = x.size(0);
  at::Tensor y = at::empty_like(x);
  if (T == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(blocks.scalar_type(), "block_matvec_cuda", [&] {
    BlockMatvecKernel<scalar_t><<<Blocks(T, 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        blocks.data_ptr<scalar_t>(), block_row.data_ptr<int64_t>(), block_col.data_ptr<int64_t>(),
        row_start.data_ptr<int64_t>(), col_order.data_ptr<int64_t>(), col_start.data_ptr<int64_t>(),
        x.data_ptr<scalar_t>(), T, y.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace nnrt
