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
// per-thread copies of A. Only blocks (i, j) with j >= i are computed; the lower triangle is
// mirrored at the end. Accumulation is in double. CUDA: one thread per (term, slot pair)
// with atomicAdd. Both call the per-block functions below.
#pragma once

#include "common.h"

namespace nnrt {

// Most slots a term may have (4 anchors per match; 2 nodes per edge).
constexpr int kMaxSlots = 8;

// out[p * ld + q] += sum_r J[r][6s + p] * J[r][6t + q]  for p, q in 0..5.
template <typename scalar_t, typename acc_t>
HOST_DEVICE inline void AddJtJBlock(const scalar_t* J, int R, int S, int s, int t, acc_t* out,
                                    int64_t ld) {
  const int cols = 6 * S;
  for (int row = 0; row < R; ++row) {
    const scalar_t* js = J + row * cols + 6 * s;
    const scalar_t* jt = J + row * cols + 6 * t;
    for (int p = 0; p < 6; ++p) {
      const acc_t a = static_cast<acc_t>(js[p]);
      for (int q = 0; q < 6; ++q) out[p * ld + q] += a * static_cast<acc_t>(jt[q]);
    }
  }
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

// Gradient of one term: grad_J (R x 6S) and grad_r (R) from grad_A (B, 6N, 6N) and
// grad_b (B, 6N). `local` is the node index within its sample, -1 for unused slots.
template <typename scalar_t>
HOST_DEVICE inline void TermBackward(const scalar_t* J, const scalar_t* res, const int64_t* local,
                                     int64_t sample, int R, int S, int64_t N,
                                     const scalar_t* grad_A, const scalar_t* grad_b,
                                     scalar_t* grad_J, scalar_t* grad_r) {
  const int cols = 6 * S;
  const int64_t dim = 6 * N;
  const scalar_t* gA = grad_A + sample * dim * dim;
  const scalar_t* gb = grad_b + sample * dim;
  for (int row = 0; row < R; ++row) {
    const scalar_t* jr = J + row * cols;
    scalar_t gr = 0;
    for (int s = 0; s < S; ++s) {
      if (local[s] < 0) {
        for (int p = 0; p < 6; ++p) grad_J[row * cols + 6 * s + p] = 0;
        continue;
      }
      const int64_t base_s = 6 * local[s];
      for (int p = 0; p < 6; ++p) {
        // sum over (t, q) of J[row][6t+q] * (G[(s,p),(t,q)] + G[(t,q),(s,p)])
        scalar_t acc = res[row] * gb[base_s + p];
        for (int t = 0; t < S; ++t) {
          if (local[t] < 0) continue;
          const int64_t base_t = 6 * local[t];
          for (int q = 0; q < 6; ++q) {
            acc += jr[6 * t + q] * (gA[(base_s + p) * dim + base_t + q] + gA[(base_t + q) * dim + base_s + p]);
          }
        }
        grad_J[row * cols + 6 * s + p] = acc;
        gr += jr[6 * s + p] * gb[base_s + p];
      }
    }
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
