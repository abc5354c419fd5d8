#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "solver/solver.h"

namespace nnrt {
namespace {

inline int NumBlocks(int64_t n, int threads) {
  return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535));
}

template <typename scalar_t>
__global__ void AssembleBackwardKernel(const scalar_t* __restrict__ grad_A,
                                       const scalar_t* __restrict__ grad_b,
                                       const scalar_t* __restrict__ J,
                                       const scalar_t* __restrict__ r,
                                       const int64_t* __restrict__ nodes, int64_t M, int R, int S,
                                       int64_t N, scalar_t* __restrict__ grad_J,
                                       scalar_t* __restrict__ grad_r) {
  for (int64_t m = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; m < M;
       m += int64_t(blockDim.x) * gridDim.x) {
    int64_t local[kMaxSlots];
    int64_t sample = -1;
    for (int s = 0; s < S; ++s) {
      const int64_t n = nodes[m * S + s];
      local[s] = n < 0 ? -1 : n % N;
      if (n >= 0 && sample < 0) sample = n / N;
    }
    if (sample < 0) {
      for (int k = 0; k < R * 6 * S; ++k) grad_J[m * R * 6 * S + k] = 0;
      for (int k = 0; k < R; ++k) grad_r[m * R + k] = 0;
      continue;
    }
    scalar_t G[36 * kMaxSlots * kMaxSlots];
    scalar_t g[6 * kMaxSlots];
    GatherTermGradient<scalar_t>(local, sample, S, N, grad_A, grad_b, G, g);
    ApplyTermGradient<scalar_t>(J + m * R * 6 * S, r + m * R, R, S, G, g, grad_J + m * R * 6 * S,
                                grad_r + m * R);
  }
}

template <typename scalar_t>
__global__ void StepBackwardKernel(const scalar_t* __restrict__ J, const scalar_t* __restrict__ r,
                                   const int64_t* __restrict__ nodes, int64_t M, int R, int S,
                                   const scalar_t* __restrict__ u, const scalar_t* __restrict__ x,
                                   scalar_t* __restrict__ grad_J, scalar_t* __restrict__ grad_r) {
  for (int64_t m = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; m < M;
       m += int64_t(blockDim.x) * gridDim.x) {
    StepTermBackward<scalar_t>(J + m * R * 6 * S, r + m * R, nodes + m * S, R, S, u, x,
                               grad_J + m * R * 6 * S, grad_r + m * R);
  }
}

template <typename scalar_t>
__global__ void MatchJacobianKernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ w,
                                    const scalar_t* __restrict__ dv, int64_t M, int A,
                                    scalar_t* __restrict__ J) {
  for (int64_t m = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; m < M;
       m += int64_t(blockDim.x) * gridDim.x) {
    MatchJacobianBlock<scalar_t>(q + m * A * 3, w + m * A, dv + m * 5, A, J + m * 18 * A);
  }
}

template <typename scalar_t>
__global__ void MatchJacobianBackwardKernel(const scalar_t* __restrict__ grad_J,
                                            const scalar_t* __restrict__ q,
                                            const scalar_t* __restrict__ w,
                                            const scalar_t* __restrict__ dv, int64_t M, int A,
                                            scalar_t* __restrict__ grad_q,
                                            scalar_t* __restrict__ grad_w,
                                            scalar_t* __restrict__ grad_dv) {
  for (int64_t m = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; m < M;
       m += int64_t(blockDim.x) * gridDim.x) {
    MatchJacobianBlockBackward<scalar_t>(grad_J + m * 18 * A, q + m * A * 3, w + m * A, dv + m * 5, A,
                                    grad_q + m * A * 3, grad_w + m * A, grad_dv + m * 5);
  }
}

}  // namespace

std::vector<at::Tensor> MatchJacobianCuda(const at::Tensor& q, const at::Tensor& w, const at::Tensor& dv) {
  at::cuda::CUDAGuard guard(q.device());
  const int64_t M = q.size(0);
  const int A = static_cast<int>(q.size(1));
  at::Tensor J = at::empty({M, 3, 6 * A}, q.options());
  if (M == 0) return {J};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "match_jacobian_cuda", [&] {
    MatchJacobianKernel<scalar_t><<<NumBlocks(M, 256), 256, 0, stream>>>(
        q.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), M, A,
        J.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {J};
}

std::vector<at::Tensor> MatchJacobianBackwardCuda(const at::Tensor& grad_J, const at::Tensor& q,
                                                  const at::Tensor& w, const at::Tensor& dv) {
  at::cuda::CUDAGuard guard(q.device());
  const int64_t M = q.size(0);
  const int A = static_cast<int>(q.size(1));
  at::Tensor grad_q = at::empty_like(q), grad_w = at::empty_like(w), grad_dv = at::empty_like(dv);
  if (M == 0) return {grad_q, grad_w, grad_dv};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "match_jacobian_backward_cuda", [&] {
    MatchJacobianBackwardKernel<scalar_t><<<NumBlocks(M, 256), 256, 0, stream>>>(
        grad_J.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
        dv.data_ptr<scalar_t>(), M, A, grad_q.data_ptr<scalar_t>(), grad_w.data_ptr<scalar_t>(),
        grad_dv.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_q, grad_w, grad_dv};
}

std::vector<at::Tensor> StepBackwardCuda(const at::Tensor& J, const at::Tensor& r,
                                         const at::Tensor& nodes, const at::Tensor& u,
                                         const at::Tensor& x) {
  at::cuda::CUDAGuard guard(J.device());
  const int64_t M = J.size(0);
  const int R = static_cast<int>(J.size(1)), S = static_cast<int>(nodes.size(1));
  at::Tensor grad_J = at::empty_like(J);
  at::Tensor grad_r = at::empty_like(r);
  if (M == 0) return {grad_J, grad_r};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(J.scalar_type(), "solve_step_backward_cuda", [&] {
    StepBackwardKernel<scalar_t><<<NumBlocks(M, 256), 256, 0, stream>>>(
        J.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), nodes.data_ptr<int64_t>(), M, R, S,
        u.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), grad_J.data_ptr<scalar_t>(),
        grad_r.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_J, grad_r};
}

std::vector<at::Tensor> AssembleNormalEquationsBackwardCuda(const at::Tensor& grad_A,
                                                            const at::Tensor& grad_b,
                                                            const at::Tensor& J,
                                                            const at::Tensor& r,
                                                            const at::Tensor& nodes,
                                                            int64_t num_nodes) {
  at::cuda::CUDAGuard guard(J.device());
  const int64_t M = J.size(0);
  const int R = static_cast<int>(J.size(1)), S = static_cast<int>(nodes.size(1));
  TORCH_CHECK(S <= kMaxSlots, "at most ", kMaxSlots, " slots per term, found ", S);
  at::Tensor grad_J = at::empty_like(J);
  at::Tensor grad_r = at::empty_like(r);
  if (M == 0) return {grad_J, grad_r};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(J.scalar_type(), "assemble_normal_equations_backward_cuda", [&] {
    AssembleBackwardKernel<scalar_t><<<NumBlocks(M, 128), 128, 0, stream>>>(
        grad_A.data_ptr<scalar_t>(), grad_b.data_ptr<scalar_t>(), J.data_ptr<scalar_t>(),
        r.data_ptr<scalar_t>(), nodes.data_ptr<int64_t>(), M, R, S, num_nodes,
        grad_J.data_ptr<scalar_t>(), grad_r.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_J, grad_r};
}

}  // namespace nnrt
