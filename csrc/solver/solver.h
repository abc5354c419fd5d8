// Normal-equation assembly of the Gauss-Newton solver (DESIGN.md 5.3), never forming J densely.
//
// A problem is a set of M "terms" (a match, or a graph edge). Term m has R residual rows that
// depend on S node slots of 6 unknowns each (3 rotation, 3 translation):
//   J      (M, R, 6*S)  float32/float64  Jacobian block of the term (row r, slot s, unknown p
//                                        at column 6*s + p)
//   r      (M, R)       same dtype       residuals of the term
//   nodes  (M, S)       int64            node of each slot, flattened over the batch as
//                                        sample * num_nodes + node; -1 = unused slot. All used
//                                        slots of a term belong to one sample.
// Output, for B = num_samples and N = num_nodes:
//   A      (B, 6N, 6N)  same dtype       sum_m P_m^T J_m^T J_m P_m   (P_m scatters slots to nodes)
//   b      (B, 6N)      same dtype       sum_m P_m^T J_m^T r_m
// The map (J, r) -> (A, b) is bilinear, so its backward is a gather:
//   grad_J_m = J_m (G_m + G_m^T) + r_m g_m^T,   grad_r_m = J_m g_m,
// where G_m (6S x 6S) and g_m (6S) are grad_A and grad_b gathered at the term's nodes.
//
// CPU: each thread owns a set of node rows of A and adds the 6x6 blocks of those rows from the
// terms touching them (a node -> term index built per call), so there are no races and no
// per-thread copies of A. Blocks are summed in a block-contiguous scratch row first (far fewer
// cache lines touched than A's strided rows), then added to A in double. Only blocks (i, j) with
// j >= i are computed; the lower triangle is mirrored at the end. CUDA: one thread per (term, slot pair)
// with atomicAdd. Both call the per-block functions below.
#pragma once

#include "common.h"

namespace nnrt {

// Most slots a term may have (4 anchors per match; 2 nodes per edge). Bounds the per-term
// scratch of the backward (a 6S x 6S block), which lives in registers / local memory on GPU.
constexpr int kMaxSlots = 4;

// out[p * ld + q] += sum_r J[r][6s + p] * J[r][6t + q]  for p, q in 0..5. The 6x6 block of the
// term is summed over its R rows in scalar_t (in registers), then added to the accumulator.
template <typename scalar_t, typename acc_t>
HOST_DEVICE inline void AddJtJBlock(const scalar_t* J, int R, int S, int s, int t, acc_t* out,
                                    int64_t ld) {
  const int cols = 6 * S;
  scalar_t block[36];
  for (int e = 0; e < 36; ++e) block[e] = 0;
  for (int row = 0; row < R; ++row) {
    const scalar_t* js = J + row * cols + 6 * s;
    const scalar_t* jt = J + row * cols + 6 * t;
    for (int p = 0; p < 6; ++p)
      for (int q = 0; q < 6; ++q) block[6 * p + q] += js[p] * jt[q];
  }
  for (int p = 0; p < 6; ++p)
    for (int q = 0; q < 6; ++q) out[p * ld + q] += static_cast<acc_t>(block[6 * p + q]);
}

// out[p] += sum_r J[r][6s + p] * res[r]  for p in 0..5.
template <typename scalar_t, typename acc_t>
HOST_DEVICE inline void AddJtrBlock(const scalar_t* J, const scalar_t* res, int R, int S, int s,
                                    acc_t* out) {
  const int cols = 6 * S;
  for (int row = 0; row < R; ++row) {
    const acc_t rv = static_cast<acc_t>(res[row]);
    for (int p = 0; p < 6; ++p) out[p] += static_cast<acc_t>(J[row * cols + 6 * s + p]) * rv;
  }
}

// Backward of one term, in two steps so that the CPU launcher can reuse the gathered gradient
// across consecutive terms with the same nodes (neighbouring pixels share their anchors).
// With G = (grad_A + grad_A^T) and g = grad_b gathered at the term's 6S unknowns:
//   grad_J[r][a] = res[r] g[a] + sum_b J[r][b] G[a][b],   grad_r[r] = sum_a J[r][a] g[a].
// `local` is the node index of each slot within its sample, -1 for unused slots (zero gradient).
template <typename scalar_t>
HOST_DEVICE inline void GatherTermGradient(const int64_t* local, int64_t sample, int S, int64_t N,
                                           const scalar_t* grad_A, const scalar_t* grad_b,
                                           scalar_t* G, scalar_t* g) {
  const int cols = 6 * S;
  const int64_t dim = 6 * N;
  const scalar_t* gA = grad_A + sample * dim * dim;
  const scalar_t* gb = grad_b + sample * dim;
  for (int a = 0; a < cols; ++a) {
    const int64_t na = local[a / 6];
    const int64_t ia = 6 * na + a % 6;
    g[a] = na < 0 ? scalar_t(0) : gb[ia];
    for (int b = 0; b < cols; ++b) {
      const int64_t nb = local[b / 6];
      const int64_t ib = 6 * nb + b % 6;
      G[a * cols + b] = (na < 0 || nb < 0) ? scalar_t(0) : gA[ia * dim + ib] + gA[ib * dim + ia];
    }
  }
}

// kS > 0 fixes the slot count at compile time (the CPU launcher's common shapes), so the loops
// unroll; the inner loops are written as axpy (G is symmetric) so that they vectorise without
// reassociating a reduction.
template <typename scalar_t, int kS = 0>
HOST_DEVICE inline void ApplyTermGradient(const scalar_t* J, const scalar_t* res, int R, int S,
                                          const scalar_t* G, const scalar_t* g, scalar_t* grad_J,
                                          scalar_t* grad_r) {
  const int cols = 6 * (kS > 0 ? kS : S);
  for (int row = 0; row < R; ++row) {
    const scalar_t* jr = J + row * cols;
    scalar_t* out = grad_J + row * cols;
    const scalar_t rv = res[row];
    for (int a = 0; a < cols; ++a) out[a] = rv * g[a];
    for (int b = 0; b < cols; ++b) {
      const scalar_t jb = jr[b];
      const scalar_t* Gb = G + b * cols;
      for (int a = 0; a < cols; ++a) out[a] += jb * Gb[a];
    }
    scalar_t gr = 0;
    for (int a = 0; a < cols; ++a) gr += jr[a] * g[a];
    grad_r[row] = gr;
  }
}

std::vector<at::Tensor> AssembleNormalEquationsCpu(const at::Tensor& J, const at::Tensor& r,
                                                   const at::Tensor& nodes, int64_t num_samples,
                                                   int64_t num_nodes);
std::vector<at::Tensor> AssembleNormalEquationsBackwardCpu(const at::Tensor& grad_A,
                                                           const at::Tensor& grad_b,
                                                           const at::Tensor& J, const at::Tensor& r,
                                                           const at::Tensor& nodes,
                                                           int64_t num_nodes);
#ifdef WITH_CUDA
std::vector<at::Tensor> AssembleNormalEquationsCuda(const at::Tensor& J, const at::Tensor& r,
                                                    const at::Tensor& nodes, int64_t num_samples,
                                                    int64_t num_nodes);
std::vector<at::Tensor> AssembleNormalEquationsBackwardCuda(const at::Tensor& grad_A,
                                                            const at::Tensor& grad_b,
                                                            const at::Tensor& J,
                                                            const at::Tensor& r,
                                                            const at::Tensor& nodes,
                                                            int64_t num_nodes);
#endif

inline void CheckAssemblyInputs(const at::Tensor& J, const at::Tensor& r, const at::Tensor& nodes,
                                int64_t num_samples, int64_t num_nodes) {
  NNRT_CHECK_DIM(J, 3);
  NNRT_CHECK_DIM(r, 2);
  NNRT_CHECK_DIM(nodes, 2);
  TORCH_CHECK(J.is_floating_point(), "J must be floating point, found ", J.scalar_type());
  TORCH_CHECK(r.scalar_type() == J.scalar_type(), "r must have J's dtype ", J.scalar_type(),
              ", found ", r.scalar_type());
  NNRT_CHECK_DTYPE(nodes, at::kLong);
  const int64_t M = J.size(0), R = J.size(1), S = nodes.size(1);
  TORCH_CHECK(J.size(2) == 6 * S, "J must be (M, R, 6*S) = (", M, ", ", R, ", ", 6 * S,
              "), found ", J.sizes());
  TORCH_CHECK(r.size(0) == M && r.size(1) == R, "r must be (M, R) = (", M, ", ", R, "), found ",
              r.sizes());
  TORCH_CHECK(nodes.size(0) == M, "nodes must be (M, S) with M = ", M, ", found ", nodes.sizes());
  TORCH_CHECK(num_samples >= 1 && num_nodes >= 1, "num_samples and num_nodes must be >= 1");
  TORCH_CHECK(J.device() == r.device() && J.device() == nodes.device(),
              "J, r and nodes must be on one device");
}

inline std::vector<at::Tensor> AssembleNormalEquations(const at::Tensor& J, const at::Tensor& r,
                                                       const at::Tensor& nodes, int64_t num_samples,
                                                       int64_t num_nodes) {
  CheckAssemblyInputs(J, r, nodes, num_samples, num_nodes);
  if (J.is_cuda()) {
#ifdef WITH_CUDA
    return AssembleNormalEquationsCuda(J.contiguous(), r.contiguous(), nodes.contiguous(),
                                       num_samples, num_nodes);
#else
    NNRT_NO_CUDA("assemble_normal_equations");
#endif
  }
  return AssembleNormalEquationsCpu(J.contiguous(), r.contiguous(), nodes.contiguous(), num_samples,
                                    num_nodes);
}

inline std::vector<at::Tensor> AssembleNormalEquationsBackward(const at::Tensor& grad_A,
                                                               const at::Tensor& grad_b,
                                                               const at::Tensor& J,
                                                               const at::Tensor& r,
                                                               const at::Tensor& nodes,
                                                               int64_t num_nodes) {
  CheckAssemblyInputs(J, r, nodes, grad_A.size(0), num_nodes);
  const int64_t B = grad_A.size(0), dim = 6 * num_nodes;
  TORCH_CHECK(grad_A.dim() == 3 && grad_A.size(1) == dim && grad_A.size(2) == dim,
              "grad_A must be (B, 6N, 6N) with 6N = ", dim, ", found ", grad_A.sizes());
  TORCH_CHECK(grad_b.dim() == 2 && grad_b.size(0) == B && grad_b.size(1) == dim,
              "grad_b must be (B, 6N) = (", B, ", ", dim, "), found ", grad_b.sizes());
  const at::Tensor gA = grad_A.to(J.scalar_type()).contiguous();
  const at::Tensor gb = grad_b.to(J.scalar_type()).contiguous();
  if (J.is_cuda()) {
#ifdef WITH_CUDA
    return AssembleNormalEquationsBackwardCuda(gA, gb, J.contiguous(), r.contiguous(),
                                               nodes.contiguous(), num_nodes);
#else
    NNRT_NO_CUDA("assemble_normal_equations_backward");
#endif
  }
  return AssembleNormalEquationsBackwardCpu(gA, gb, J.contiguous(), r.contiguous(),
                                            nodes.contiguous(), num_nodes);
}

}  // namespace nnrt
