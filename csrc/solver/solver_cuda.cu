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
__global__ void MatchTermsKernel(const int64_t* __restrict__ anchors, const scalar_t* __restrict__ x,
                                 const scalar_t* __restrict__ aw, const scalar_t* __restrict__ g,
                                 const scalar_t* __restrict__ tp, const scalar_t* __restrict__ td,
                                 const scalar_t* __restrict__ c, const scalar_t* __restrict__ K,
                                 const scalar_t* __restrict__ R, const scalar_t* __restrict__ t,
                                 MatchTermParams<scalar_t> p, int64_t M, scalar_t* __restrict__ res,
                                 scalar_t* __restrict__ J, scalar_t* __restrict__ root,
                                 scalar_t* __restrict__ structure) {
  const int A = p.A;
  for (int64_t m = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; m < M;
       m += int64_t(blockDim.x) * gridDim.x) {
    MatchTermForward<scalar_t>(x + m * 3, anchors + m * A, aw + m * A, g, tp + m * 2, td[m], c[m],
                               K + m * 4, R, t, p, res + m * 3, J ? J + m * 18 * A : nullptr, root + m,
                               structure + m * (5 + 3 * A));
  }
}

template <typename scalar_t>
__global__ void MatchTermsBackwardKernel(
    const int64_t* __restrict__ anchors, const scalar_t* __restrict__ x, const scalar_t* __restrict__ aw,
    const scalar_t* __restrict__ g, const scalar_t* __restrict__ tp, const scalar_t* __restrict__ td,
    const scalar_t* __restrict__ c, const scalar_t* __restrict__ K, const scalar_t* __restrict__ R,
    const scalar_t* __restrict__ t, MatchTermParams<scalar_t> p, int64_t M,
    const scalar_t* __restrict__ root, const scalar_t* __restrict__ gr, const scalar_t* __restrict__ gJ,
    const scalar_t* __restrict__ gS, scalar_t* __restrict__ gx, scalar_t* __restrict__ gtp, scalar_t* __restrict__ gtd,
    scalar_t* __restrict__ gc, scalar_t* __restrict__ gs) {
  const int A = p.A;
  for (int64_t m = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; m < M;
       m += int64_t(blockDim.x) * gridDim.x) {
    MatchTermBackward<scalar_t>(x + m * 3, anchors + m * A, aw + m * A, g, tp + m * 2, td[m], c[m],
                                K + m * 4, R, t, p, root[m], gr + m * 3, gJ ? gJ + m * 18 * A : nullptr,
                                gS ? gS + m * (5 + 3 * A) : nullptr, gx + m * 3,
                                gtp + m * 2, gtd + m, gc + m, gs + m * 12 * A);
  }
}

template <typename scalar_t>
__global__ void EdgeTermsKernel(const int64_t* __restrict__ edges, const scalar_t* __restrict__ w,
                                const scalar_t* __restrict__ g, const scalar_t* __restrict__ R,
                                const scalar_t* __restrict__ t, int64_t E, scalar_t* __restrict__ res,
                                scalar_t* __restrict__ J) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < E;
       e += int64_t(blockDim.x) * gridDim.x) {
    EdgeTermForward<scalar_t>(edges[2 * e], edges[2 * e + 1], w[e], g, R, t, res + 3 * e, J + 36 * e);
  }
}

template <typename scalar_t>
__global__ void EdgeTermsBackwardKernel(const int64_t* __restrict__ edges, const scalar_t* __restrict__ w,
                                        const scalar_t* __restrict__ g, const scalar_t* __restrict__ R,
                                        const scalar_t* __restrict__ t, int64_t E,
                                        const scalar_t* __restrict__ gr, const scalar_t* __restrict__ gJ,
                                        scalar_t* __restrict__ gs, scalar_t* __restrict__ gw) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < E;
       e += int64_t(blockDim.x) * gridDim.x) {
    EdgeTermBackward<scalar_t>(edges[2 * e], edges[2 * e + 1], w[e], g, R, t, gr + 3 * e, gJ + 36 * e,
                               gs + 24 * e, gw + e);
  }
}

template <typename scalar_t>
__global__ void MatchStepBackwardKernel(const scalar_t* __restrict__ structure, const scalar_t* __restrict__ w,
                                        const scalar_t* __restrict__ r, const int64_t* __restrict__ nodes, int A,
                                        const scalar_t* __restrict__ u, const scalar_t* __restrict__ x, int64_t M,
                                        scalar_t* __restrict__ gs, scalar_t* __restrict__ gr) {
  for (int64_t m = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; m < M;
       m += int64_t(blockDim.x) * gridDim.x) {
    MatchStepBackwardBody<scalar_t>(structure + m * (5 + 3 * A), w + m * A, r + 3 * m, nodes + m * A, A, u, x,
                                    gs + m * (5 + 3 * A), gr + 3 * m);
  }
}

template <typename scalar_t>
__global__ void LeftRotateKernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ R, int64_t T,
                                 scalar_t* __restrict__ out) {
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < T;
       n += int64_t(blockDim.x) * gridDim.x) {
    LeftRotateBody<scalar_t>(w + 3 * n, R + 9 * n, out + 9 * n);
  }
}

template <typename scalar_t>
__global__ void LeftRotateBackwardKernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ R,
                                         const scalar_t* __restrict__ G, int64_t T,
                                         scalar_t* __restrict__ grad_w, scalar_t* __restrict__ grad_R) {
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < T;
       n += int64_t(blockDim.x) * gridDim.x) {
    LeftRotateBackwardBody<scalar_t>(w + 3 * n, R + 9 * n, G + 9 * n, grad_w + 3 * n, grad_R + 9 * n);
  }
}

template <typename scalar_t>
MatchTermParams<scalar_t> CastParams(const MatchTermParams<double>& prm) {
  return {static_cast<scalar_t>(prm.sqrt_flow_weight), static_cast<scalar_t>(prm.sqrt_depth_weight),
          static_cast<scalar_t>(prm.robust_scale), prm.robust, prm.A};
}

}  // namespace

std::vector<at::Tensor> MatchTermsCuda(const MatchTermInputs& in, const MatchTermParams<double>& prm,
                                       bool jacobian) {
  at::cuda::CUDAGuard guard(in.x.device());
  const int64_t M = in.x.size(0);
  const int A = prm.A;
  at::Tensor res = at::empty({M, 3}, in.x.options());
  at::Tensor J = at::empty({jacobian ? M : 0, 3, 6 * A}, in.x.options());
  at::Tensor root = at::empty({M}, in.x.options());
  at::Tensor structure = at::empty({M, 5 + 3 * A}, in.x.options());
  if (M == 0) return {res, J, root, structure};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "match_terms_cuda", [&] {
    MatchTermsKernel<scalar_t><<<NumBlocks(M, 256), 256, 0, stream>>>(
        in.anchors.data_ptr<int64_t>(), in.x.data_ptr<scalar_t>(), in.aw.data_ptr<scalar_t>(),
        in.g.data_ptr<scalar_t>(), in.tp.data_ptr<scalar_t>(), in.td.data_ptr<scalar_t>(),
        in.c.data_ptr<scalar_t>(), in.K.data_ptr<scalar_t>(), in.R.data_ptr<scalar_t>(),
        in.t.data_ptr<scalar_t>(), CastParams<scalar_t>(prm), M, res.data_ptr<scalar_t>(),
        jacobian ? J.data_ptr<scalar_t>() : nullptr, root.data_ptr<scalar_t>(), structure.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {res, J, root, structure};
}

std::vector<at::Tensor> MatchTermsBackwardCuda(const MatchTermInputs& in, const MatchTermParams<double>& prm,
                                               const at::Tensor& root, const at::Tensor& grad_res,
                                               const at::Tensor& grad_J, const at::Tensor& grad_structure) {
  at::cuda::CUDAGuard guard(in.x.device());
  const int64_t M = in.x.size(0);
  const int A = prm.A;
  at::Tensor g_x = at::empty_like(in.x), g_tp = at::empty_like(in.tp), g_td = at::empty_like(in.td),
             g_c = at::empty_like(in.c), g_slots = at::empty({M, A, 12}, in.x.options());
  if (M == 0) return {g_x, g_tp, g_td, g_c, at::zeros({in.R.size(0), 12}, in.x.options())};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "match_terms_backward_cuda", [&] {
    MatchTermsBackwardKernel<scalar_t><<<NumBlocks(M, 256), 256, 0, stream>>>(
        in.anchors.data_ptr<int64_t>(), in.x.data_ptr<scalar_t>(), in.aw.data_ptr<scalar_t>(),
        in.g.data_ptr<scalar_t>(), in.tp.data_ptr<scalar_t>(), in.td.data_ptr<scalar_t>(),
        in.c.data_ptr<scalar_t>(), in.K.data_ptr<scalar_t>(), in.R.data_ptr<scalar_t>(),
        in.t.data_ptr<scalar_t>(), CastParams<scalar_t>(prm), M, root.data_ptr<scalar_t>(),
        grad_res.data_ptr<scalar_t>(), grad_J.numel() ? grad_J.data_ptr<scalar_t>() : nullptr,
        grad_structure.numel() ? grad_structure.data_ptr<scalar_t>() : nullptr, g_x.data_ptr<scalar_t>(),
        g_tp.data_ptr<scalar_t>(), g_td.data_ptr<scalar_t>(), g_c.data_ptr<scalar_t>(),
        g_slots.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Slots -> nodes (atomic adds: the order of the sums, not the values, may vary between runs).
  at::Tensor g_nodes = at::zeros({in.R.size(0), 12}, in.x.options())
                           .index_add_(0, in.anchors.reshape({-1}), g_slots.reshape({-1, 12}));
  return {g_x, g_tp, g_td, g_c, g_nodes};
}

std::vector<at::Tensor> EdgeTermsCuda(const at::Tensor& edges, const at::Tensor& w, const at::Tensor& g,
                                      const at::Tensor& R, const at::Tensor& t) {
  at::cuda::CUDAGuard guard(w.device());
  const int64_t E = edges.size(0);
  at::Tensor res = at::empty({E, 3}, w.options()), J = at::empty({E, 3, 12}, w.options());
  if (E == 0) return {res, J};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "edge_terms_cuda", [&] {
    EdgeTermsKernel<scalar_t><<<NumBlocks(E, 256), 256, 0, stream>>>(
        edges.data_ptr<int64_t>(), w.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), R.data_ptr<scalar_t>(),
        t.data_ptr<scalar_t>(), E, res.data_ptr<scalar_t>(), J.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {res, J};
}

std::vector<at::Tensor> EdgeTermsBackwardCuda(const at::Tensor& edges, const at::Tensor& w,
                                              const at::Tensor& g, const at::Tensor& R,
                                              const at::Tensor& t, const at::Tensor& grad_res,
                                              const at::Tensor& grad_J) {
  at::cuda::CUDAGuard guard(w.device());
  const int64_t E = edges.size(0);
  at::Tensor g_slots = at::empty({E, 2, 12}, w.options()), g_w = at::empty_like(w);
  at::Tensor g_nodes = at::zeros({R.size(0), 12}, w.options());
  if (E == 0) return {g_nodes, g_w};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "edge_terms_backward_cuda", [&] {
    EdgeTermsBackwardKernel<scalar_t><<<NumBlocks(E, 256), 256, 0, stream>>>(
        edges.data_ptr<int64_t>(), w.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), R.data_ptr<scalar_t>(),
        t.data_ptr<scalar_t>(), E, grad_res.data_ptr<scalar_t>(), grad_J.data_ptr<scalar_t>(),
        g_slots.data_ptr<scalar_t>(), g_w.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  g_nodes.index_add_(0, edges.reshape({-1}), g_slots.reshape({-1, 12}));
  return {g_nodes, g_w};
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

at::Tensor LeftRotateCuda(const at::Tensor& w, const at::Tensor& R) {
  at::cuda::CUDAGuard guard(w.device());
  const int64_t T = w.size(0);
  at::Tensor out = at::empty_like(R);
  if (T == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "left_rotate_cuda", [&] {
    LeftRotateKernel<scalar_t><<<NumBlocks(T, 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        w.data_ptr<scalar_t>(), R.data_ptr<scalar_t>(), T, out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::vector<at::Tensor> LeftRotateBackwardCuda(const at::Tensor& w, const at::Tensor& R, const at::Tensor& G) {
  at::cuda::CUDAGuard guard(w.device());
  const int64_t T = w.size(0);
  at::Tensor grad_w = at::empty_like(w), grad_R = at::empty_like(R);
  if (T == 0) return {grad_w, grad_R};
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "left_rotate_backward_cuda", [&] {
    LeftRotateBackwardKernel<scalar_t><<<NumBlocks(T, 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        w.data_ptr<scalar_t>(), R.data_ptr<scalar_t>(), G.data_ptr<scalar_t>(), T, grad_w.data_ptr<scalar_t>(),
        grad_R.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_w, grad_R};
}

std::vector<at::Tensor> MatchStepBackwardCuda(const at::Tensor& structure, const at::Tensor& w,
                                              const at::Tensor& r, const at::Tensor& nodes, const at::Tensor& u,
                                              const at::Tensor& x) {
  at::cuda::CUDAGuard guard(structure.device());
  const int64_t M = nodes.size(0);
  const int A = static_cast<int>(nodes.size(1));
  at::Tensor grad_structure = at::empty_like(structure), grad_r = at::empty_like(r);
  if (M == 0) return {grad_structure, grad_r};
  AT_DISPATCH_FLOATING_TYPES(structure.scalar_type(), "match_step_backward_cuda", [&] {
    MatchStepBackwardKernel<scalar_t><<<NumBlocks(M, 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        structure.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), nodes.data_ptr<int64_t>(),
        A, u.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), M, grad_structure.data_ptr<scalar_t>(),
        grad_r.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_structure, grad_r};
}

}  // namespace nnrt
