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
// cache lines touched than A's strided rows), then added to A. Only blocks (i, j) with j >= i
// are computed; the lower triangle is mirrored at the end. CUDA: one thread per (term, slot pair)
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

// Backward of one term through a whole damped Gauss-Newton step x = -A^-1 b. There the
// gradients of A and b are rank one per sample: with u = A^-1 grad_x (one more solve with the
// Cholesky factor), grad_A = -u x^T and grad_b = -u, so the gather above collapses to
//   grad_J = -[(J u_m) x_m^T + (J x_m + r) u_m^T],   grad_r = -J u_m,
// with u_m, x_m the entries of u and x at the term's 6S unknowns (0 for unused slots): 4 small
// products per term instead of a 6S x 6S block, and no dense grad_A at all.
// u, x: (B, 6N) flattened; nodes: flat sample * N + node indices as above.
template <typename scalar_t>
HOST_DEVICE inline void StepTermBackward(const scalar_t* J, const scalar_t* res, const int64_t* nodes,
                                         int R, int S, const scalar_t* u, const scalar_t* x,
                                         scalar_t* grad_J, scalar_t* grad_r) {
  const int cols = 6 * S;
  scalar_t um[6 * kMaxSlots], xm[6 * kMaxSlots];
  for (int a = 0; a < cols; ++a) {
    const int64_t n = nodes[a / 6];
    um[a] = n < 0 ? scalar_t(0) : u[6 * n + a % 6];
    xm[a] = n < 0 ? scalar_t(0) : x[6 * n + a % 6];
  }
  for (int row = 0; row < R; ++row) {
    const scalar_t* jr = J + row * cols;
    scalar_t ju = 0, jx = 0;
    for (int a = 0; a < cols; ++a) {
      ju += jr[a] * um[a];
      jx += jr[a] * xm[a];
    }
    const scalar_t c = jx + res[row];
    for (int a = 0; a < cols; ++a) grad_J[row * cols + a] = -(ju * xm[a] + c * um[a]);
    grad_r[row] = -ju;
  }
}

// Jacobian blocks of the data terms of one match (DESIGN.md 5.3). With the derivative of the
// residuals (flow x, flow y, depth) w.r.t. the warped point written
//   D = [[a, 0, b], [0, c, d], [0, 0, e]]   (dv = (a, b, c, d, e)),
// and q_k = R_k (x - g_k) the rotated offset of anchor k with skinning weight w_k, row i of the
// block of anchor k is w_k [q_k x D_i, D_i] (left-multiplied rotation increment, then the
// translation increment). J: (R = 3, 6A), column 6k + p.
template <typename scalar_t>
HOST_DEVICE inline void MatchJacobianBlock(const scalar_t* q, const scalar_t* w, const scalar_t* dv,
                                      int A, scalar_t* J) {
  const scalar_t D[3][3] = {{dv[0], 0, dv[1]}, {0, dv[2], dv[3]}, {0, 0, dv[4]}};
  const int cols = 6 * A;
  for (int k = 0; k < A; ++k) {
    const scalar_t* qk = q + 3 * k;
    for (int i = 0; i < 3; ++i) {
      scalar_t* out = J + i * cols + 6 * k;
      out[0] = w[k] * (qk[1] * D[i][2] - qk[2] * D[i][1]);
      out[1] = w[k] * (qk[2] * D[i][0] - qk[0] * D[i][2]);
      out[2] = w[k] * (qk[0] * D[i][1] - qk[1] * D[i][0]);
      out[3] = w[k] * D[i][0];
      out[4] = w[k] * D[i][1];
      out[5] = w[k] * D[i][2];
    }
  }
}

// Backward of MatchJacobianBlock for one match: grad_q (A, 3), grad_w (A), grad_dv (5) from grad_J.
// With g = grad of row i's rotation part and h of its translation part:
//   d/dq_k  w (q_k x D_i).g = w (D_i x g);   d/dD_i = w (g x q_k) + w h;
//   d/dw_k = (q_k x D_i).g + D_i.h.
template <typename scalar_t>
HOST_DEVICE inline void MatchJacobianBlockBackward(const scalar_t* grad_J, const scalar_t* q,
                                              const scalar_t* w, const scalar_t* dv, int A,
                                              scalar_t* grad_q, scalar_t* grad_w,
                                              scalar_t* grad_dv) {
  const scalar_t D[3][3] = {{dv[0], 0, dv[1]}, {0, dv[2], dv[3]}, {0, 0, dv[4]}};
  scalar_t gD[3][3] = {{0, 0, 0}, {0, 0, 0}, {0, 0, 0}};
  const int cols = 6 * A;
  for (int k = 0; k < A; ++k) {
    const scalar_t* qk = q + 3 * k;
    scalar_t gq[3] = {0, 0, 0}, gw = 0;
    for (int i = 0; i < 3; ++i) {
      const scalar_t* g = grad_J + i * cols + 6 * k;
      const scalar_t* h = g + 3;
      const scalar_t* d = D[i];
      gq[0] += w[k] * (d[1] * g[2] - d[2] * g[1]);
      gq[1] += w[k] * (d[2] * g[0] - d[0] * g[2]);
      gq[2] += w[k] * (d[0] * g[1] - d[1] * g[0]);
      gD[i][0] += w[k] * (g[1] * qk[2] - g[2] * qk[1] + h[0]);
      gD[i][1] += w[k] * (g[2] * qk[0] - g[0] * qk[2] + h[1]);
      gD[i][2] += w[k] * (g[0] * qk[1] - g[1] * qk[0] + h[2]);
      gw += (qk[1] * d[2] - qk[2] * d[1]) * g[0] + (qk[2] * d[0] - qk[0] * d[2]) * g[1] +
            (qk[0] * d[1] - qk[1] * d[0]) * g[2] + d[0] * h[0] + d[1] * h[1] + d[2] * h[2];
    }
    for (int j = 0; j < 3; ++j) grad_q[3 * k + j] = gq[j];
    grad_w[k] = gw;
  }
  grad_dv[0] = gD[0][0];
  grad_dv[1] = gD[0][2];
  grad_dv[2] = gD[1][1];
  grad_dv[3] = gD[1][2];
  grad_dv[4] = gD[2][2];
}

std::vector<at::Tensor> MatchJacobianCpu(const at::Tensor& q, const at::Tensor& w, const at::Tensor& dv);
std::vector<at::Tensor> MatchJacobianBackwardCpu(const at::Tensor& grad_J, const at::Tensor& q,
                                                 const at::Tensor& w, const at::Tensor& dv);
#ifdef WITH_CUDA
std::vector<at::Tensor> MatchJacobianCuda(const at::Tensor& q, const at::Tensor& w, const at::Tensor& dv);
std::vector<at::Tensor> MatchJacobianBackwardCuda(const at::Tensor& grad_J, const at::Tensor& q,
                                                  const at::Tensor& w, const at::Tensor& dv);
#endif

std::vector<at::Tensor> StepBackwardCpu(const at::Tensor& J, const at::Tensor& r,
                                        const at::Tensor& nodes, const at::Tensor& u,
                                        const at::Tensor& x);
#ifdef WITH_CUDA
std::vector<at::Tensor> StepBackwardCuda(const at::Tensor& J, const at::Tensor& r,
                                         const at::Tensor& nodes, const at::Tensor& u,
                                         const at::Tensor& x);
#endif

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

namespace nnrt {

inline std::vector<at::Tensor> StepBackward(const at::Tensor& J, const at::Tensor& r,
                                            const at::Tensor& nodes, const at::Tensor& u,
                                            const at::Tensor& x) {
  TORCH_CHECK(u.dim() == 2 && u.sizes() == x.sizes() && u.size(1) % 6 == 0,
              "u and x must be (B, 6N) alike, found ", u.sizes(), " and ", x.sizes());
  CheckAssemblyInputs(J, r, nodes, u.size(0), u.size(1) / 6);
  TORCH_CHECK(nodes.size(1) <= kMaxSlots, "at most ", kMaxSlots, " slots per term, found ", nodes.size(1));
  const at::Tensor uu = u.to(J.scalar_type()).contiguous(), xx = x.to(J.scalar_type()).contiguous();
  if (J.is_cuda()) {
#ifdef WITH_CUDA
    return StepBackwardCuda(J.contiguous(), r.contiguous(), nodes.contiguous(), uu, xx);
#else
    NNRT_NO_CUDA("solve_step_backward");
#endif
  }
  return StepBackwardCpu(J.contiguous(), r.contiguous(), nodes.contiguous(), uu, xx);
}

}  // namespace nnrt

namespace nnrt {

inline void CheckMatchJacobianInputs(const at::Tensor& q, const at::Tensor& w, const at::Tensor& dv) {
  TORCH_CHECK(q.dim() == 3 && q.size(2) == 3, "q must be (M, A, 3), found ", q.sizes());
  TORCH_CHECK(w.dim() == 2 && w.size(0) == q.size(0) && w.size(1) == q.size(1),
              "w must be (M, A) = (", q.size(0), ", ", q.size(1), "), found ", w.sizes());
  TORCH_CHECK(dv.dim() == 2 && dv.size(0) == q.size(0) && dv.size(1) == 5,
              "dv must be (M, 5), found ", dv.sizes());
  TORCH_CHECK(q.size(1) <= kMaxSlots, "at most ", kMaxSlots, " anchors, found ", q.size(1));
  TORCH_CHECK(q.is_floating_point() && w.scalar_type() == q.scalar_type() &&
                  dv.scalar_type() == q.scalar_type(), "q, w and dv must share a floating dtype");
}

// J (M, 3, 6A) from q (M, A, 3), w (M, A), dv (M, 5).
inline std::vector<at::Tensor> MatchJacobian(const at::Tensor& q, const at::Tensor& w, const at::Tensor& dv) {
  CheckMatchJacobianInputs(q, w, dv);
  if (q.is_cuda()) {
#ifdef WITH_CUDA
    return MatchJacobianCuda(q.contiguous(), w.contiguous(), dv.contiguous());
#else
    NNRT_NO_CUDA("match_jacobian");
#endif
  }
  return MatchJacobianCpu(q.contiguous(), w.contiguous(), dv.contiguous());
}

// (grad_q (M, A, 3), grad_w (M, A), grad_dv (M, 5)) from grad_J (M, 3, 6A).
inline std::vector<at::Tensor> MatchJacobianBackward(const at::Tensor& grad_J, const at::Tensor& q,
                                                     const at::Tensor& w, const at::Tensor& dv) {
  CheckMatchJacobianInputs(q, w, dv);
  TORCH_CHECK(grad_J.dim() == 3 && grad_J.size(0) == q.size(0) && grad_J.size(1) == 3 &&
                  grad_J.size(2) == 6 * q.size(1), "grad_J must be (M, 3, 6A), found ", grad_J.sizes());
  const at::Tensor g = grad_J.to(q.scalar_type()).contiguous();
  if (q.is_cuda()) {
#ifdef WITH_CUDA
    return MatchJacobianBackwardCuda(g, q.contiguous(), w.contiguous(), dv.contiguous());
#else
    NNRT_NO_CUDA("match_jacobian_backward");
#endif
  }
  return MatchJacobianBackwardCpu(g, q.contiguous(), w.contiguous(), dv.contiguous());
}

}  // namespace nnrt
