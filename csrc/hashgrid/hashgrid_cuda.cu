#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "hashgrid/hashgrid.h"

namespace nnrt {
namespace {

struct AtomicAdd {
  template <typename scalar_t>
  __device__ void operator()(scalar_t* p, scalar_t v) const { atomicAdd(p, v); }
};

// One thread per (level, point), level-major (i = l * N + n): neighbouring threads look up
// neighbouring points in the same level's table, and the levels are passed by value so that
// their constants sit in the kernel's parameter space.
template <int D, int F, typename scalar_t>
__global__ void HashGridForwardKernel(const scalar_t* __restrict__ x,
                                      const scalar_t* __restrict__ table,
                                      const HashGridLevels levels, int64_t N, int64_t S,
                                      scalar_t* __restrict__ out) {
  const int64_t L = levels.num_levels;
  const uint32_t mask = static_cast<uint32_t>(S - 1);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < L * N;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t l = i / N, n = i - l * N;
    hashgrid_forward_point<D, F, scalar_t>(x + n * D, levels.level[l], mask, table + l * S * F,
                                           out + (n * L + l) * F);
  }
}

// Table gradient and input gradient (either pointer may be null) accumulated with atomicAdd.
template <int D, int F, typename scalar_t>
__global__ void HashGridBackwardKernel(const scalar_t* __restrict__ grad_out,
                                       const scalar_t* __restrict__ x,
                                       const scalar_t* __restrict__ table,
                                       const HashGridLevels levels, int64_t N, int64_t S,
                                       scalar_t* __restrict__ grad_table,
                                       scalar_t* __restrict__ grad_x) {
  const int64_t L = levels.num_levels;
  const uint32_t mask = static_cast<uint32_t>(S - 1);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < L * N;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t l = i / N, n = i - l * N;
    const HashGridLevel level = levels.level[l];
    HashGridCell<D, scalar_t> cell;
    hashgrid_locate<D, scalar_t>(x + n * D, level, mask, cell);
    const scalar_t* g = grad_out + (n * L + l) * F;
    if (grad_table != nullptr)
      hashgrid_scatter_grad<D, F, scalar_t>(cell, g, grad_table + l * S * F, AtomicAdd());
    if (grad_x != nullptr) {
      scalar_t gx[D];
      hashgrid_input_grad<D, F, scalar_t>(cell, level.resolution, table + l * S * F, g, gx);
#pragma unroll
      for (int d = 0; d < D; ++d) atomicAdd(grad_x + n * D + d, gx[d]);
    }
  }
}

inline int NumBlocks(int64_t n, int threads) {
  return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535));
}

constexpr int kThreads = 256;

}  // namespace

at::Tensor HashGridForwardCuda(const at::Tensor& x, const at::Tensor& table,
                               const HashGridLevels& levels) {
  at::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), L = table.size(0), S = table.size(1), F = table.size(2);
  at::Tensor out = at::empty({N, L * F}, x.options());
  if (N == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hashgrid_forward_cuda", [&] {
    hashgrid_dispatch(x.size(1), F, [&](auto d_tag, auto f_tag) {
      constexpr int kD = decltype(d_tag)::value, kF = decltype(f_tag)::value;
      HashGridForwardKernel<kD, kF, scalar_t><<<NumBlocks(L * N, kThreads), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(), levels, N, S,
          out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::vector<at::Tensor> HashGridBackwardCuda(const at::Tensor& grad_out, const at::Tensor& x,
                                             const at::Tensor& table, const HashGridLevels& levels,
                                             bool need_table_grad, bool need_input_grad) {
  at::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), L = table.size(0), S = table.size(1), F = table.size(2);
  at::Tensor grad_table, grad_x;
  if (need_table_grad) grad_table = at::zeros_like(table);
  if (need_input_grad) grad_x = at::zeros_like(x);
  if (N == 0 || (!need_table_grad && !need_input_grad)) return {grad_table, grad_x};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hashgrid_backward_cuda", [&] {
    hashgrid_dispatch(x.size(1), F, [&](auto d_tag, auto f_tag) {
      constexpr int kD = decltype(d_tag)::value, kF = decltype(f_tag)::value;
      HashGridBackwardKernel<kD, kF, scalar_t><<<NumBlocks(L * N, kThreads), kThreads, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(),
          levels, N, S, need_table_grad ? grad_table.data_ptr<scalar_t>() : nullptr,
          need_input_grad ? grad_x.data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_table, grad_x};
}

}  // namespace nnrt
