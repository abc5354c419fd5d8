// Normal-equation assembly of the Gauss-Newton solver (docs/DESIGN.md 5.3), never forming J densely.
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
// Launch logic (docs/DESIGN.md 2 and 5.3), the same on both devices: every loop body below is a
// HOST_DEVICE function that the CPU launcher's parallel loop and the CUDA kernel both call.
//  1. Per term (TermBlockKeys): check the term (node indices in range, all used slots in one
//     sample) and list the blocks it adds: one key row * T + col (T = B * N flat nodes, row <=
//     col, so only the upper triangle) per unordered slot pair {s <= t} with both slots used.
//  2. The block pattern (BuildBlockPattern, ATen sort/search, any device, once per problem):
//     the sorted union of the keys of every term group plus every diagonal block, and per group
//     the entries (term, slot pair) sorted by block and the used slots sorted by node.
//  3. Per block (AssembleBlockBody): sum the 6x6 products of its entries in their sorted order;
//     per node (AssembleRhsBody): sum J_s^T r of its slots. One writer per output, a fixed order
//     of summation: no atomics, the same A bit for bit on every run and thread count.
//  4. Dense A (BlocksToDenseBody) mirrors the upper blocks; the block-sparse one
//     (BlockMatvecBody) multiplies by both triangles from the upper blocks.
#pragma once

#include <cmath>
#include <sstream>
#include <type_traits>

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
// kR, kS > 0 fix the row and slot counts at compile time (the CPU launcher's common shapes).
template <typename scalar_t, int kR = 0, int kS = 0>
HOST_DEVICE inline void StepTermBackward(const scalar_t* J, const scalar_t* res, const int64_t* nodes,
                                         int R_, int S_, const scalar_t* u, const scalar_t* x,
                                         scalar_t* grad_J, scalar_t* grad_r) {
  const int R = kR > 0 ? kR : R_, S = kS > 0 ? kS : S_;
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

// Jacobian blocks of the data terms of one match (docs/DESIGN.md 5.3). With the derivative of the
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

// The data terms of one match, fused (docs/DESIGN.md 5.3): warp, residuals, robust reweighting
// and Jacobian blocks in one pass, so that the Gauss-Newton loop runs one op per linearisation
// instead of some fifty tensor ops (and their autograd graph). Per match, with A anchors:
//   x (3) the source point;  anchors (A) flat node ids (valid: the solver's selection
//   guarantees it, the CPU launcher checks it);  aw (A) skinning weights w_k;  tp (2) target
//   pixel (u, v);  td target depth;  c correspondence weight;  K (4) fx, fy, cx, cy;
//   g (T, 3) node positions;  R (T, 3, 3), t (T, 3) the current node motions (row-major).
//   q_k = R_k (x - g_k),  X = sum_k w_k (q_k + g_k + t_k),
//   p = (fx X.x / X.z + cx - u, fy X.y / X.z + cy - v)
//   rho = robust root of |p| (1 for none; Cauchy sqrt(1 / (1 + (|p|/s)^2)); Huber sqrt(min(1, s/|p|))),
//         a constant of the linearisation (no gradient), as iteratively reweighted least squares has it
//   cf = sqrt(flow_weight) c rho,  cd = sqrt(depth_weight) c rho
//   res = (cf p.x, cf p.y, cd (X.z - td));  J = MatchJacobianBlock(q, w, dv) with
//   dv = d res / d X = (cf fx / z, -cf fx x / z^2, cf fy / z, -cf fy y / z^2, cd).
enum RobustLoss { kRobustNone = 0, kRobustCauchy = 1, kRobustHuber = 2 };

template <typename scalar_t>
struct MatchTermParams {
  scalar_t sqrt_flow_weight, sqrt_depth_weight, robust_scale;
  int robust;  // RobustLoss
  int A;       // anchors per match
};

// Offsets o (A, 3) = x - g_k, q (A, 3) and X (3) of one match.
template <typename scalar_t>
HOST_DEVICE inline void WarpMatch(const scalar_t* x, const int64_t* anchors, const scalar_t* aw,
                                  const scalar_t* g, const scalar_t* R, const scalar_t* t, int A,
                                  scalar_t* o, scalar_t* q, scalar_t* X) {
  X[0] = X[1] = X[2] = 0;
  for (int k = 0; k < A; ++k) {
    const scalar_t* Rk = R + 9 * anchors[k];
    const scalar_t* tk = t + 3 * anchors[k];
    const scalar_t* gk = g + 3 * anchors[k];
    scalar_t* ok = o + 3 * k;
    for (int i = 0; i < 3; ++i) ok[i] = x[i] - gk[i];
    for (int i = 0; i < 3; ++i) {
      q[3 * k + i] = Rk[3 * i] * ok[0] + Rk[3 * i + 1] * ok[1] + Rk[3 * i + 2] * ok[2];
      X[i] += aw[k] * (q[3 * k + i] + gk[i] + tk[i]);
    }
  }
}

// sqrt in the launch's precision on both devices (sqrtf for float, not a silent double).
HOST_DEVICE inline float ScalarSqrt(float x) { return sqrtf(x); }
HOST_DEVICE inline double ScalarSqrt(double x) { return sqrt(x); }

HOST_DEVICE inline float ScalarSin(float x) { return sinf(x); }
HOST_DEVICE inline double ScalarSin(double x) { return sin(x); }
HOST_DEVICE inline float ScalarCos(float x) { return cosf(x); }
HOST_DEVICE inline double ScalarCos(double x) { return cos(x); }

// The rotation update of one node (once per Gauss-Newton iteration): R' = exp(w) R with
// Rodrigues' formula written as exp(w) = (1 - b t^2) I + a K + b w w^T (K = skew(w), t = |w|,
// K^2 = w w^T - t^2 I), a = sin t / t, b = (1 - cos t) / t^2, Taylor series for t^2 < 1e-8
// (values and gradients stay finite at 0). w (3), R (9) row-major; out (9) = exp(w) R, and E
// (9) = exp(w) when E is not null.
template <typename scalar_t>
HOST_DEVICE inline void So3ExpCoefficients(const scalar_t* w, scalar_t* t2, scalar_t* a, scalar_t* b,
                                           scalar_t* c) {
  const scalar_t theta2 = w[0] * w[0] + w[1] * w[1] + w[2] * w[2];
  *t2 = theta2;
  if (theta2 < scalar_t(1e-8)) {
    *a = scalar_t(1) - theta2 / 6;
    *b = scalar_t(0.5) - theta2 / 24;
    *c = scalar_t(1) / 6 - theta2 / 120;  // (t - sin t) / t^3, the left Jacobian's K^2 term
  } else {
    const scalar_t theta = ScalarSqrt(theta2), s = ScalarSin(theta);
    *a = s / theta;
    *b = (scalar_t(1) - ScalarCos(theta)) / theta2;
    *c = (theta - s) / (theta2 * theta);
  }
}

template <typename scalar_t>
HOST_DEVICE inline void So3Exp(const scalar_t* w, scalar_t t2, scalar_t a, scalar_t b, scalar_t* E) {
  const scalar_t d = scalar_t(1) - b * t2;
  E[0] = d + b * w[0] * w[0];
  E[1] = -a * w[2] + b * w[0] * w[1];
  E[2] = a * w[1] + b * w[0] * w[2];
  E[3] = a * w[2] + b * w[1] * w[0];
  E[4] = d + b * w[1] * w[1];
  E[5] = -a * w[0] + b * w[1] * w[2];
  E[6] = -a * w[1] + b * w[2] * w[0];
  E[7] = a * w[0] + b * w[2] * w[1];
  E[8] = d + b * w[2] * w[2];
}

template <typename scalar_t>
HOST_DEVICE inline void LeftRotateBody(const scalar_t* w, const scalar_t* R, scalar_t* out) {
  scalar_t t2, a, b, c, E[9];
  So3ExpCoefficients(w, &t2, &a, &b, &c);
  So3Exp(w, t2, a, b, E);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j)
      out[3 * i + j] = E[3 * i] * R[j] + E[3 * i + 1] * R[3 + j] + E[3 * i + 2] * R[6 + j];
}

// Backward of LeftRotateBody from G (9) = dL/dR': dL/dR = E^T G, and, perturbing w on the left
// (exp(w + d) = exp(J_l(w) d) exp(w), J_l the left Jacobian of SO(3)), dL/dw = J_l(w)^T m with
// m = vee(M - M^T), M = G R'^T (the axial vector with <M, skew(v)> = m . v), where
// J_l = I + b K + c K^2, c = (t - sin t) / t^3: J_l^T m = m - b (w x m) + c (w x (w x m)).
template <typename scalar_t>
HOST_DEVICE inline void LeftRotateBackwardBody(const scalar_t* w, const scalar_t* R, const scalar_t* G,
                                               scalar_t* grad_w, scalar_t* grad_R) {
  scalar_t t2, a, b, c, E[9], out[9];
  So3ExpCoefficients(w, &t2, &a, &b, &c);
  So3Exp(w, t2, a, b, E);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) {
      out[3 * i + j] = E[3 * i] * R[j] + E[3 * i + 1] * R[3 + j] + E[3 * i + 2] * R[6 + j];
      grad_R[3 * i + j] = E[i] * G[j] + E[3 + i] * G[3 + j] + E[6 + i] * G[6 + j];
    }
  scalar_t M[9];
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j)
      M[3 * i + j] = G[3 * i] * out[3 * j] + G[3 * i + 1] * out[3 * j + 1] + G[3 * i + 2] * out[3 * j + 2];
  const scalar_t m[3] = {M[7] - M[5], M[2] - M[6], M[3] - M[1]};
  const scalar_t wm[3] = {w[1] * m[2] - w[2] * m[1], w[2] * m[0] - w[0] * m[2], w[0] * m[1] - w[1] * m[0]};
  const scalar_t wwm[3] = {w[1] * wm[2] - w[2] * wm[1], w[2] * wm[0] - w[0] * wm[2],
                           w[0] * wm[1] - w[1] * wm[0]};
  for (int k = 0; k < 3; ++k) grad_w[k] = m[k] - b * wm[k] + c * wwm[k];
}

template <typename scalar_t>
HOST_DEVICE inline scalar_t RobustRoot(scalar_t px, scalar_t py, int robust, scalar_t scale) {
  if (robust == kRobustNone) return scalar_t(1);
  const scalar_t e = ScalarSqrt(px * px + py * py);
  if (robust == kRobustCauchy) return ScalarSqrt(scalar_t(1) / (scalar_t(1) + (e / scale) * (e / scale)));
  const scalar_t h = scale / (e > scalar_t(1e-12) ? e : scalar_t(1e-12));
  return ScalarSqrt(h < scalar_t(1) ? h : scalar_t(1));
}

// Forward of one match: res (3), J (3, 6A), root (the robust root rho, saved for the backward),
// and structure (5 + 3A): dv then q, the numbers that with the skinning weights define J (what
// the dense assembly of match terms reads: AssembleDenseMatchRowBody).
template <typename scalar_t>
HOST_DEVICE inline void MatchTermForward(const scalar_t* x, const int64_t* anchors, const scalar_t* aw,
                                         const scalar_t* g, const scalar_t* tp, scalar_t td, scalar_t c,
                                         const scalar_t* K, const scalar_t* R, const scalar_t* t,
                                         const MatchTermParams<scalar_t>& prm, scalar_t* res,
                                         scalar_t* J, scalar_t* root, scalar_t* structure) {
  scalar_t o[3 * kMaxSlots], q[3 * kMaxSlots], X[3];
  WarpMatch(x, anchors, aw, g, R, t, prm.A, o, q, X);
  const scalar_t iz = scalar_t(1) / X[2];
  const scalar_t px = K[0] * X[0] * iz + K[2] - tp[0], py = K[1] * X[1] * iz + K[3] - tp[1];
  const scalar_t rho = RobustRoot(px, py, prm.robust, prm.robust_scale);
  const scalar_t cf = prm.sqrt_flow_weight * c * rho, cd = prm.sqrt_depth_weight * c * rho;
  res[0] = cf * px;
  res[1] = cf * py;
  res[2] = cd * (X[2] - td);
  const scalar_t dv[5] = {cf * K[0] * iz, -cf * K[0] * X[0] * iz * iz, cf * K[1] * iz,
                          -cf * K[1] * X[1] * iz * iz, cd};
  if (J != nullptr) MatchJacobianBlock<scalar_t>(q, aw, dv, prm.A, J);  // null: the structure suffices
  *root = rho;
  for (int k = 0; k < 5; ++k) structure[k] = dv[k];
  for (int k = 0; k < 3 * prm.A; ++k) structure[5 + k] = q[k];
}

// Backward of one match from grad_res (3), grad_J (3, 6A) and grad of the structure (5 + 3A)
// (either of the last two may be null: no gradient): gradients of x (3), tp (2), td, c,
// and per anchor slot (A, 12) the gradient of R_k (9, row-major) and t_k (3), which the
// launchers sum over the anchors of each node. By the chain rule through
// MatchJacobianBlockBackward (grad of q and dv), then dv and res -> (cf, cd, X, tp, td), then
// X -> t_k, q_k and q_k = R_k (x - g_k) -> (R_k, x). The skinning weights, the node positions, the
// intrinsics and the robust root get no gradient.
template <typename scalar_t>
HOST_DEVICE inline void MatchTermBackward(const scalar_t* x, const int64_t* anchors, const scalar_t* aw,
                                          const scalar_t* g, const scalar_t* tp, scalar_t td, scalar_t c,
                                          const scalar_t* K, const scalar_t* R, const scalar_t* t,
                                          const MatchTermParams<scalar_t>& prm, scalar_t rho,
                                          const scalar_t* gres, const scalar_t* gJ, const scalar_t* gS,
                                          scalar_t* g_x,
                                          scalar_t* g_tp, scalar_t* g_td, scalar_t* g_c,
                                          scalar_t* g_slots) {
  const int A = prm.A;
  scalar_t o[3 * kMaxSlots], q[3 * kMaxSlots], X[3];
  WarpMatch(x, anchors, aw, g, R, t, A, o, q, X);
  const scalar_t iz = scalar_t(1) / X[2], iz2 = iz * iz, iz3 = iz2 * iz;
  const scalar_t fx = K[0], fy = K[1];
  const scalar_t px = fx * X[0] * iz + K[2] - tp[0], py = fy * X[1] * iz + K[3] - tp[1];
  const scalar_t cf = prm.sqrt_flow_weight * c * rho, cd = prm.sqrt_depth_weight * c * rho;
  const scalar_t dv[5] = {cf * fx * iz, -cf * fx * X[0] * iz2, cf * fy * iz, -cf * fy * X[1] * iz2, cd};
  scalar_t gq[3 * kMaxSlots], gw[kMaxSlots], gdv[5];
  if (gJ != nullptr) {
    MatchJacobianBlockBackward<scalar_t>(gJ, q, aw, dv, A, gq, gw, gdv);
  } else {
    for (int k = 0; k < 3 * A; ++k) gq[k] = 0;
    for (int k = 0; k < 5; ++k) gdv[k] = 0;
  }
  if (gS != nullptr) {  // the gradient of the structure output (dv, q) adds directly
    for (int k = 0; k < 5; ++k) gdv[k] += gS[k];
    for (int k = 0; k < 3 * A; ++k) gq[k] += gS[5 + k];
  }
  const scalar_t gcf = gres[0] * px + gres[1] * py + gdv[0] * fx * iz - gdv[1] * fx * X[0] * iz2 +
                       gdv[2] * fy * iz - gdv[3] * fy * X[1] * iz2;
  const scalar_t gcd = gres[2] * (X[2] - td) + gdv[4];
  *g_c = rho * (prm.sqrt_flow_weight * gcf + prm.sqrt_depth_weight * gcd);
  g_tp[0] = -cf * gres[0];
  g_tp[1] = -cf * gres[1];
  *g_td = -cd * gres[2];
  const scalar_t gX[3] = {
      cf * fx * (gres[0] * iz - gdv[1] * iz2),
      cf * fy * (gres[1] * iz - gdv[3] * iz2),
      -cf * fx * X[0] * iz2 * gres[0] - cf * fy * X[1] * iz2 * gres[1] + cd * gres[2] -
          cf * fx * iz2 * gdv[0] + 2 * cf * fx * X[0] * iz3 * gdv[1] - cf * fy * iz2 * gdv[2] +
          2 * cf * fy * X[1] * iz3 * gdv[3]};
  g_x[0] = g_x[1] = g_x[2] = 0;
  for (int k = 0; k < A; ++k) {
    const scalar_t* Rk = R + 9 * anchors[k];
    const scalar_t* ok = o + 3 * k;
    scalar_t* gs = g_slots + 12 * k;
    scalar_t gqk[3];
    for (int i = 0; i < 3; ++i) {
      gqk[i] = gq[3 * k + i] + aw[k] * gX[i];
      gs[9 + i] = aw[k] * gX[i];
    }
    for (int j = 0; j < 3; ++j) {
      g_x[j] += Rk[j] * gqk[0] + Rk[3 + j] * gqk[1] + Rk[6 + j] * gqk[2];
      for (int i = 0; i < 3; ++i) gs[3 * i + j] = gqk[i] * ok[j];
    }
  }
}

// The Gauss-Newton step's backward for one match term given by its structure (the
// counterpart of StepTermBackward for J; see AssembleDenseMatchRowBody for the structure).
// StepTermBackward's gradients are those of phi(J) = -(J u_m) . (J x_m + r); with
// J_k = w_k D [Q_k | I], J v = D y(v) where y(v) = sum_k w_k (v_rot,k x q_k + v_trans,k), so
//   grad_r = -D y_u;  with e = D y_x + r:  grad_D = -(e y_u^T + D y_u y_x^T),
//   grad_q_k = w_k (g_u x u_rot,k + g_x x x_rot,k),  g_u = -D^T e,  g_x = -D^T D y_u,
// and grad_dv the entries of grad_D at D's five (MatchJacobianBlock). u, x (B * N * 6) by flat
// node; nodes (A) the match's flat node ids (unused, -1: no contribution). Outputs:
// grad_structure (5 + 3A), grad_r (3).
template <typename scalar_t>
HOST_DEVICE inline void MatchStepBackwardBody(const scalar_t* structure, const scalar_t* w, const scalar_t* r,
                                              const int64_t* nodes, int A, const scalar_t* u,
                                              const scalar_t* x, scalar_t* grad_structure,
                                              scalar_t* grad_r) {
  const scalar_t* dv = structure;
  const scalar_t* q = structure + 5;
  scalar_t yu[3] = {0, 0, 0}, yx[3] = {0, 0, 0};
  for (int k = 0; k < A; ++k) {
    if (nodes[k] < 0) continue;
    const scalar_t* uk = u + 6 * nodes[k];
    const scalar_t* xk = x + 6 * nodes[k];
    const scalar_t* qk = q + 3 * k;
    yu[0] += w[k] * (uk[1] * qk[2] - uk[2] * qk[1] + uk[3]);
    yu[1] += w[k] * (uk[2] * qk[0] - uk[0] * qk[2] + uk[4]);
    yu[2] += w[k] * (uk[0] * qk[1] - uk[1] * qk[0] + uk[5]);
    yx[0] += w[k] * (xk[1] * qk[2] - xk[2] * qk[1] + xk[3]);
    yx[1] += w[k] * (xk[2] * qk[0] - xk[0] * qk[2] + xk[4]);
    yx[2] += w[k] * (xk[0] * qk[1] - xk[1] * qk[0] + xk[5]);
  }
  // D = [[a, 0, b], [0, c, d], [0, 0, e]]
  const scalar_t a = dv[0], b = dv[1], c = dv[2], d = dv[3], e = dv[4];
  const scalar_t Ju[3] = {a * yu[0] + b * yu[2], c * yu[1] + d * yu[2], e * yu[2]};
  const scalar_t ex[3] = {a * yx[0] + b * yx[2] + r[0], c * yx[1] + d * yx[2] + r[1], e * yx[2] + r[2]};
  for (int i = 0; i < 3; ++i) grad_r[i] = -Ju[i];
  // grad_D[i][j] = -(ex_i yu_j + Ju_i yx_j) at (0,0), (0,2), (1,1), (1,2), (2,2)
  grad_structure[0] = -(ex[0] * yu[0] + Ju[0] * yx[0]);
  grad_structure[1] = -(ex[0] * yu[2] + Ju[0] * yx[2]);
  grad_structure[2] = -(ex[1] * yu[1] + Ju[1] * yx[1]);
  grad_structure[3] = -(ex[1] * yu[2] + Ju[1] * yx[2]);
  grad_structure[4] = -(ex[2] * yu[2] + Ju[2] * yx[2]);
  // D^T v = (a v0, c v1, b v0 + d v1 + e v2)
  const scalar_t gu[3] = {-a * ex[0], -c * ex[1], -(b * ex[0] + d * ex[1] + e * ex[2])};
  const scalar_t gx[3] = {-a * Ju[0], -c * Ju[1], -(b * Ju[0] + d * Ju[1] + e * Ju[2])};
  for (int k = 0; k < A; ++k) {
    scalar_t* gq = grad_structure + 5 + 3 * k;
    if (nodes[k] < 0) {
      gq[0] = gq[1] = gq[2] = 0;
      continue;
    }
    const scalar_t* uk = u + 6 * nodes[k];
    const scalar_t* xk = x + 6 * nodes[k];
    gq[0] = w[k] * (gu[1] * uk[2] - gu[2] * uk[1] + gx[1] * xk[2] - gx[2] * xk[1]);
    gq[1] = w[k] * (gu[2] * uk[0] - gu[0] * uk[2] + gx[2] * xk[0] - gx[0] * xk[2]);
    gq[2] = w[k] * (gu[0] * uk[1] - gu[1] * uk[0] + gx[0] * xk[1] - gx[1] * xk[0]);
  }
}

// The as-rigid-as-possible term of one edge i -> j (docs/DESIGN.md 5.3), fused like the data
// terms (one op per linearisation instead of a dozen tensor ops and their autograd graph):
//   v = R_i (g_j - g_i),  res = w (v + g_i + t_i - g_j - t_j)  (3),
//   J = [-w [v]_x, w I, 0, -w I]  (3, 12: slot 0 is node i, slot 1 node j),
// with w = sqrt(arap_weight) * edge weight. R (T, 3, 3) row-major, t (T, 3), g (T, 3).
template <typename scalar_t>
HOST_DEVICE inline void EdgeTermForward(int64_t i, int64_t j, scalar_t w, const scalar_t* g,
                                        const scalar_t* R, const scalar_t* t, scalar_t* res,
                                        scalar_t* J) {
  const scalar_t* Ri = R + 9 * i;
  const scalar_t d[3] = {g[3 * j] - g[3 * i], g[3 * j + 1] - g[3 * i + 1], g[3 * j + 2] - g[3 * i + 2]};
  scalar_t v[3];
  for (int a = 0; a < 3; ++a) v[a] = Ri[3 * a] * d[0] + Ri[3 * a + 1] * d[1] + Ri[3 * a + 2] * d[2];
  for (int a = 0; a < 3; ++a) res[a] = w * (v[a] + g[3 * i + a] + t[3 * i + a] - g[3 * j + a] - t[3 * j + a]);
  // -w [v]_x, row by row: [v]_x = [[0, -v2, v1], [v2, 0, -v0], [-v1, v0, 0]].
  const scalar_t S[3][3] = {{0, w * v[2], -w * v[1]}, {-w * v[2], 0, w * v[0]}, {w * v[1], -w * v[0], 0}};
  for (int a = 0; a < 3; ++a) {
    scalar_t* row = J + 12 * a;
    for (int c = 0; c < 3; ++c) {
      row[c] = S[a][c];
      row[3 + c] = a == c ? w : scalar_t(0);
      row[6 + c] = 0;
      row[9 + c] = a == c ? -w : scalar_t(0);
    }
  }
}

// Backward of one edge from grad_res (3) and grad_J (3, 12): the gradient of R_i (9) and t_i (3)
// into g_slots[0:12], of t_j into g_slots[12:24] (its R_j part is 0), and of w. With v = R_i d:
//   d/dv of the rotation block -w [v]_x: g_v = -w (G21 - G12, G02 - G20, G10 - G01), G its
//   gradient; d/dv of res: w grad_res; then g_{R_i} = g_v d^T, g_{t_i} = w grad_res = -g_{t_j}.
template <typename scalar_t>
HOST_DEVICE inline void EdgeTermBackward(int64_t i, int64_t j, scalar_t w, const scalar_t* g,
                                         const scalar_t* R, const scalar_t* t, const scalar_t* gres,
                                         const scalar_t* gJ, scalar_t* g_slots, scalar_t* g_w) {
  const scalar_t* Ri = R + 9 * i;
  const scalar_t d[3] = {g[3 * j] - g[3 * i], g[3 * j + 1] - g[3 * i + 1], g[3 * j + 2] - g[3 * i + 2]};
  scalar_t v[3];
  for (int a = 0; a < 3; ++a) v[a] = Ri[3 * a] * d[0] + Ri[3 * a + 1] * d[1] + Ri[3 * a + 2] * d[2];
  const scalar_t G[3][3] = {{gJ[0], gJ[1], gJ[2]}, {gJ[12], gJ[13], gJ[14]}, {gJ[24], gJ[25], gJ[26]}};
  const scalar_t gv[3] = {w * (gres[0] - G[2][1] + G[1][2]), w * (gres[1] - G[0][2] + G[2][0]),
                          w * (gres[2] - G[1][0] + G[0][1])};
  for (int a = 0; a < 3; ++a) {
    for (int c = 0; c < 3; ++c) g_slots[3 * a + c] = gv[a] * d[c];
    g_slots[9 + a] = w * gres[a];
    for (int c = 0; c < 3; ++c) g_slots[12 + 3 * a + c] = 0;
    g_slots[21 + a] = -w * gres[a];
  }
  // res and J are linear in w: d/dw = (res / w) . grad_res + (J / w) . grad_J.
  scalar_t gw = 0;
  for (int a = 0; a < 3; ++a) {
    gw += (v[a] + g[3 * i + a] + t[3 * i + a] - g[3 * j + a] - t[3 * j + a]) * gres[a];
    gw += gJ[12 * a + 3 + a] - gJ[12 * a + 9 + a];
  }
  gw += v[2] * (G[0][1] - G[1][0]) + v[1] * (G[2][0] - G[0][2]) + v[0] * (G[1][2] - G[2][1]);
  *g_w = gw;
}

// ---------------------------------------------------------------------------------------------
// Block-sparse assembly (launch logic above). Shapes, for B samples of N nodes, T = B * N:
//   keys         (M, E) int64, E = S (S + 1) / 2: key of the block each slot pair {s <= t} adds
//                (in the order s = 0..S-1, t = s..S-1), -1 when a slot is unused
//   block_row/col (P,) int64 flat node of each stored block, sorted by (row, col), row <= col;
//                every diagonal block (n, n) is stored, so block row_start[n] is (n, n)
//   row_start    (T + 1,) blocks of row n: [row_start[n], row_start[n + 1])
//   col_order    (P,) block ids sorted by column (stable); col_start (T + 1,) its ranges
//   term_blocks  (M, E) block id of each key (-1 for none)
//   entry_order  (Q,) entry ids m * E + k sorted by block; entry_start (P + 1,) their ranges
//   slot_order   (U,) used slot ids m * S + s sorted by node; slot_start (T + 1,) their ranges
//   blocks       (P, 6, 6) upper blocks of A; b (T, 6)

constexpr int kTermOk = 0;
constexpr int kTermNodeOutOfRange = 1;
constexpr int kTermMixedSamples = 2;

HOST_DEVICE inline int NumPairs(int S) { return S * (S + 1) / 2; }

// Slot pair {s <= t} of pair index k (s = 0..S-1, t = s..S-1 in order).
HOST_DEVICE inline void PairOfIndex(int k, int S, int* s, int* t) {
  if (S == 4) {  // the matches' shape, by table (this runs once per block entry)
    constexpr int kFirst[10] = {0, 0, 0, 0, 1, 1, 1, 2, 2, 3};
    constexpr int kSecond[10] = {0, 1, 2, 3, 1, 2, 3, 2, 3, 3};
    *s = kFirst[k];
    *t = kSecond[k];
    return;
  }
  int first = 0;
  while (k >= S - first) {
    k -= S - first;
    ++first;
  }
  *s = first;
  *t = first + k;
}

// Step 1 for term m: returns kTermOk or the error code, and fills keys (E,) (-1 for pairs with an
// unused slot; all -1 when the term is bad). Slots < 0 are unused.
HOST_DEVICE inline int TermBlockKeys(const int64_t* nodes_m, int S, int64_t N, int64_t total,
                                     int64_t* keys) {
  const int E = NumPairs(S);
  for (int k = 0; k < E; ++k) keys[k] = -1;
  int64_t sample = -1;
  for (int s = 0; s < S; ++s) {
    const int64_t n = nodes_m[s];
    if (n < 0) continue;
    if (n >= total) return kTermNodeOutOfRange;
    if (sample < 0) sample = n / N;
    if (n / N != sample) return kTermMixedSamples;
  }
  int k = 0;
  for (int s = 0; s < S; ++s) {
    for (int t = s; t < S; ++t, ++k) {
      const int64_t ns = nodes_m[s], nt = nodes_m[t];
      if (ns < 0 || nt < 0) continue;
      keys[k] = ns <= nt ? ns * total + nt : nt * total + ns;
    }
  }
  return kTermOk;
}

// acc (6x6, row-major) += J_s^T J_t of one term; with `both`, += J_s^T J_t + (J_s^T J_t)^T, so
// that a diagonal block fed by two different slots of one node stays exactly symmetric (a + b
// and b + a round alike).
template <typename scalar_t, int kR = 0, int kS = 0>
HOST_DEVICE inline void AccumulatePairBlock(const scalar_t* Jm, int R, int S, int s, int t,
                                            bool both, scalar_t* acc) {
  const int RR = kR > 0 ? kR : R, cols = 6 * (kS > 0 ? kS : S);
  if (!both) {
    for (int row = 0; row < RR; ++row) {
      const scalar_t* js = Jm + row * cols + 6 * s;
      const scalar_t* jt = Jm + row * cols + 6 * t;
      for (int p = 0; p < 6; ++p) {
        const scalar_t a = js[p];
        for (int q = 0; q < 6; ++q) acc[6 * p + q] += a * jt[q];
      }
    }
    return;
  }
  scalar_t X[36];
  for (int e = 0; e < 36; ++e) X[e] = 0;
  for (int row = 0; row < RR; ++row) {
    const scalar_t* js = Jm + row * cols + 6 * s;
    const scalar_t* jt = Jm + row * cols + 6 * t;
    for (int p = 0; p < 6; ++p)
      for (int q = 0; q < 6; ++q) X[6 * p + q] += js[p] * jt[q];
  }
  for (int p = 0; p < 6; ++p)
    for (int q = 0; q < 6; ++q) acc[6 * p + q] += X[6 * p + q] + X[6 * q + p];
}

// Step 3, block p: blocks[p] = sum over its entries (term m, pair k = {s <= t}) of J_a^T J_b,
// with a the slot of the lower node (the block is (node_a, node_b), node_a <= node_b), or
// J_s^T J_t + J_t^T J_s when both slots hold the block's node. `accumulate` adds to blocks[p]
// (the next term group) instead of overwriting it.
template <typename scalar_t, int kR = 0, int kS = 0>
HOST_DEVICE inline void AssembleBlockBody(int64_t p, const scalar_t* J, int R, int S,
                                          const int64_t* nodes, const int64_t* entry_order,
                                          const int64_t* entry_start, bool accumulate,
                                          scalar_t* blocks) {
  const int SS = kS > 0 ? kS : S, RR = kR > 0 ? kR : R, E = NumPairs(SS);
  scalar_t acc[36];
  for (int e = 0; e < 36; ++e) acc[e] = 0;
  for (int64_t e = entry_start[p]; e < entry_start[p + 1]; ++e) {
    const int64_t id = entry_order[e], m = id / E;
    int s, t;
    PairOfIndex(static_cast<int>(id % E), SS, &s, &t);
    const int64_t ns = nodes[m * SS + s], nt = nodes[m * SS + t];
    const scalar_t* Jm = J + m * RR * 6 * SS;
    if (ns == nt && s != t) {
      AccumulatePairBlock<scalar_t, kR, kS>(Jm, RR, SS, s, t, true, acc);
    } else if (ns > nt) {
      AccumulatePairBlock<scalar_t, kR, kS>(Jm, RR, SS, t, s, false, acc);
    } else {
      AccumulatePairBlock<scalar_t, kR, kS>(Jm, RR, SS, s, t, false, acc);
    }
  }
  scalar_t* out = blocks + 36 * p;
  for (int e = 0; e < 36; ++e) out[e] = accumulate ? out[e] + acc[e] : acc[e];
}

// Step 3, node n: b[n] = sum over the used slots (term m, slot s) at n of J_s^T r_m; every used
// slot adds its part, whichever other slots of the term are unused.
template <typename scalar_t, int kR = 0, int kS = 0>
HOST_DEVICE inline void AssembleRhsBody(int64_t n, const scalar_t* J, const scalar_t* r, int R,
                                        int S, const int64_t* slot_order, const int64_t* slot_start,
                                        bool accumulate, scalar_t* b) {
  const int SS = kS > 0 ? kS : S, RR = kR > 0 ? kR : R;
  scalar_t acc[6] = {0, 0, 0, 0, 0, 0};
  for (int64_t e = slot_start[n]; e < slot_start[n + 1]; ++e) {
    const int64_t id = slot_order[e], m = id / SS;
    AddJtrBlock<scalar_t, scalar_t>(J + m * RR * 6 * SS, r + m * RR, RR, SS,
                                    static_cast<int>(id % SS), acc);
  }
  for (int p = 0; p < 6; ++p) b[6 * n + p] = accumulate ? b[6 * n + p] + acc[p] : acc[p];
}

// out[p * ld + q] += (J_s^T J_t)[p][q], as AddJtJBlock; with the row count kR known at compile
// time written out row by row of the output (a 6-vector sum of kR scaled rows of J_t), which
// the compiler vectorises where AddJtJBlock's 36 scalar sums it does not.
template <typename scalar_t, int kR>
HOST_DEVICE inline void AddRowPairBlock(const scalar_t* Jm, int R, int S, int s, int t, scalar_t* out,
                                        int64_t ld) {
  if (kR == 0) {
    AddJtJBlock<scalar_t, scalar_t>(Jm, R, S, s, t, out, ld);
    return;
  }
  for (int p = 0; p < 6; ++p) {
    scalar_t v[6] = {0, 0, 0, 0, 0, 0};
    for (int row = 0; row < kR; ++row) {
      const scalar_t a = Jm[row * 6 * S + 6 * s + p];
      const scalar_t* jt = Jm + row * 6 * S + 6 * t;
      for (int q = 0; q < 6; ++q) v[q] += a * jt[q];
    }
    for (int q = 0; q < 6; ++q) out[p * ld + q] += v[q];
  }
}

// The dense solver's assembly (graphs up to --sparse-min-nodes), without the block pattern:
// node n (flat, sample * N + local) owns rows 6 local .. 6 local + 5 of its sample's A (B, 6N, 6N)
// and sums, over its used slots (term m, slot s; slot lists by node, ascending ids), J_s^T J_t
// into the block (n, node of t) for every slot t of m whose node is >= n, and J_s^T r_m into b.
// Only the upper block triangle is summed (a pair of distinct nodes once, from the lower node's
// row; the diagonal block whole: every ordered slot pair at n); after the last group,
// MirrorDenseRowBody copies it below the diagonal. One writer per row and a fixed order: the
// same A on every run and thread count, as the block assembly's. A must be zero (or hold an
// earlier group's sums) in the upper blocks.
template <typename scalar_t, int kR = 0, int kS = 0>
HOST_DEVICE inline void AssembleDenseRowBody(int64_t n, const scalar_t* J, const scalar_t* r, int R,
                                             int S, const int64_t* nodes, const int64_t* slot_order,
                                             const int64_t* slot_start, int64_t N, bool accumulate,
                                             scalar_t* A, scalar_t* b) {
  const int SS = kS > 0 ? kS : S, RR = kR > 0 ? kR : R;
  const int64_t sample = n / N, D = 6 * N;
  scalar_t* strip = A + sample * D * D + 6 * (n - sample * N) * D;  // row 6 local, column 0
  scalar_t rhs[6] = {0, 0, 0, 0, 0, 0};
  scalar_t diagonal[36];  // the block (n, n), which every slot at n feeds: summed in registers
  for (int e = 0; e < 36; ++e) diagonal[e] = 0;
  for (int64_t e = slot_start[n]; e < slot_start[n + 1]; ++e) {
    const int64_t id = slot_order[e], m = id / SS;
    const int s = static_cast<int>(id % SS);
    const scalar_t* Jm = J + m * RR * 6 * SS;
    AddJtrBlock<scalar_t, scalar_t>(Jm, r + m * RR, RR, SS, s, rhs);
    for (int t = 0; t < SS; ++t) {
      const int64_t nt = nodes[m * SS + t];
      if (nt == n)
        AddRowPairBlock<scalar_t, kR>(Jm, RR, SS, s, t, diagonal, 6);
      else if (nt > n)
        AddRowPairBlock<scalar_t, kR>(Jm, RR, SS, s, t, strip + 6 * (nt - sample * N), D);
    }
  }
  scalar_t* own = strip + 6 * (n - sample * N);
  for (int p = 0; p < 6; ++p)
    for (int q = 0; q < 6; ++q) own[p * D + q] += diagonal[6 * p + q];
  for (int p = 0; p < 6; ++p) b[6 * n + p] = accumulate ? b[6 * n + p] + rhs[p] : rhs[p];
}

// The dense assembly of the match terms from their structure instead of J (AssembleDenseRowBody
// with the same ownership, order and output): MatchTermForward's dv (5) and q (3A) per match and
// the skinning weights w (A). With D from dv (MatchJacobianBlock), M = D^T D (symmetric) and
// Q_k = [q_k]_x^T, the block of anchor k is J_k = w_k D [Q_k | I], so
//   J_s^T J_t = w_s w_t [[Q_s^T M Q_t, Q_s^T M], [M Q_t, M]]
//             = w_s w_t [[-[q_s]_x N_t, -N_s^T], [-N_t, M]],  N_k = M [q_k]_x (row i: M_i x q_k),
//   J_s^T r   = w_s [q_s x D^T r; D^T r]:
// about half the arithmetic of the product of two 3 x 6 blocks, and a quarter of J's reads.
template <typename scalar_t>
HOST_DEVICE inline void MatchNormalMatrix(const scalar_t* dv, scalar_t* M) {
  const scalar_t a = dv[0], b = dv[1], c = dv[2], d = dv[3], e = dv[4];
  M[0] = a * a;  M[1] = 0;      M[2] = a * b;
  M[3] = 0;      M[4] = c * c;  M[5] = c * d;
  M[6] = a * b;  M[7] = c * d;  M[8] = b * b + d * d + e * e;
}

template <typename scalar_t>
HOST_DEVICE inline void MatrixCrossRows(const scalar_t* M, const scalar_t* q, scalar_t* Nq) {
  for (int i = 0; i < 3; ++i) {
    const scalar_t* m = M + 3 * i;
    Nq[3 * i] = m[1] * q[2] - m[2] * q[1];
    Nq[3 * i + 1] = m[2] * q[0] - m[0] * q[2];
    Nq[3 * i + 2] = m[0] * q[1] - m[1] * q[0];
  }
}

// out[p * ld + q] += (J_s^T J_t)[p][q] from the structure (see above); Ns = N_s.
template <typename scalar_t>
HOST_DEVICE inline void AddMatchPairBlock(const scalar_t* M, const scalar_t* qs, const scalar_t* Ns,
                                          const scalar_t* qt, scalar_t wst, scalar_t* out, int64_t ld) {
  scalar_t Nt[9];
  MatrixCrossRows(M, qt, Nt);
  for (int j = 0; j < 3; ++j) {  // column j of -[q_s]_x N_t is -(q_s x N_t[:, j])
    const scalar_t c0 = Nt[j], c1 = Nt[3 + j], c2 = Nt[6 + j];
    out[j] -= wst * (qs[1] * c2 - qs[2] * c1);
    out[ld + j] -= wst * (qs[2] * c0 - qs[0] * c2);
    out[2 * ld + j] -= wst * (qs[0] * c1 - qs[1] * c0);
  }
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) {
      out[i * ld + 3 + j] -= wst * Ns[3 * j + i];
      out[(3 + i) * ld + j] -= wst * Nt[3 * i + j];
      out[(3 + i) * ld + 3 + j] += wst * M[3 * i + j];
    }
}

// structure (M, 5 + 3A), w (M, A), r (M, 3); nodes, slot lists, A and b as AssembleDenseRowBody's.
template <typename scalar_t, int kA = 0>
HOST_DEVICE inline void AssembleDenseMatchRowBody(int64_t n, const scalar_t* structure, const scalar_t* w,
                                                  const scalar_t* r, int A_, const int64_t* nodes,
                                                  const int64_t* slot_order, const int64_t* slot_start,
                                                  int64_t N, bool accumulate, scalar_t* A, scalar_t* b) {
  const int SA = kA > 0 ? kA : A_;
  const int64_t sample = n / N, D = 6 * N;
  scalar_t* strip = A + sample * D * D + 6 * (n - sample * N) * D;  // row 6 local, column 0
  scalar_t rhs[6] = {0, 0, 0, 0, 0, 0};
  scalar_t diagonal[36];
  for (int e = 0; e < 36; ++e) diagonal[e] = 0;
  for (int64_t e = slot_start[n]; e < slot_start[n + 1]; ++e) {
    const int64_t id = slot_order[e], m = id / SA;
    const int s = static_cast<int>(id % SA);
    const scalar_t* st = structure + m * (5 + 3 * SA);
    const scalar_t* q = st + 5;
    const scalar_t* wm = w + m * SA;
    const scalar_t* rm = r + 3 * m;
    scalar_t M[9], Ns[9];
    MatchNormalMatrix(st, M);
    MatrixCrossRows(M, q + 3 * s, Ns);
    const scalar_t Dr[3] = {st[0] * rm[0], st[2] * rm[1], st[1] * rm[0] + st[3] * rm[1] + st[4] * rm[2]};
    const scalar_t* qs = q + 3 * s;
    const scalar_t ws = wm[s];
    rhs[0] += ws * (qs[1] * Dr[2] - qs[2] * Dr[1]);
    rhs[1] += ws * (qs[2] * Dr[0] - qs[0] * Dr[2]);
    rhs[2] += ws * (qs[0] * Dr[1] - qs[1] * Dr[0]);
    for (int k = 0; k < 3; ++k) rhs[3 + k] += ws * Dr[k];
    for (int t = 0; t < SA; ++t) {
      const int64_t nt = nodes[m * SA + t];
      if (nt == n)
        AddMatchPairBlock(M, qs, Ns, q + 3 * t, ws * wm[t], diagonal, 6);
      else if (nt > n)
        AddMatchPairBlock(M, qs, Ns, q + 3 * t, ws * wm[t], strip + 6 * (nt - sample * N), D);
    }
  }
  scalar_t* own = strip + 6 * (n - sample * N);
  for (int p = 0; p < 6; ++p)
    for (int q = 0; q < 6; ++q) own[p * D + q] += diagonal[6 * p + q];
  for (int p = 0; p < 6; ++p) b[6 * n + p] = accumulate ? b[6 * n + p] + rhs[p] : rhs[p];
}

// The lower triangle of the rows of node n from the upper blocks of the rows above (after the
// last group's AssembleDenseRowBody, in a separate pass: those rows belong to other nodes):
// A[6n + p][6c + q] = A[6c + q][6n + p] for every column of the sample left of row 6n + p's
// diagonal. A is then exactly symmetric, as the factorisation wants it.
template <typename scalar_t>
HOST_DEVICE inline void MirrorDenseRowBody(int64_t n, int64_t N, scalar_t* A) {
  const int64_t sample = n / N, local = n - sample * N, D = 6 * N;
  scalar_t* Ab = A + sample * D * D;
  // Block by block: row q of the upper block (c, n) holds 6 contiguous values, which become
  // column q of the block (n, c); the 6 rows written stay in cache across the sweep over c.
  for (int64_t c = 0; c <= local; ++c)
    for (int q = 0; q < 6; ++q) {
      const scalar_t* src = Ab + (6 * c + q) * D + 6 * local;
      scalar_t* dst = Ab + 6 * local * D + 6 * c + q;
      for (int p = c < local ? 0 : q + 1; p < 6; ++p) dst[p * D] = src[p];
    }
}

// Backward of step 3 for term m. With H (6S x 6S) the gradient of the term's own contributions
// (H[a][b] = grad of block (node_a, node_b) for the pairs the term adds, both orientations
// folded into one as in the forward) and g = grad_b at its slots, the term's part of the
// energy-like sum <grad_blocks, blocks> + <grad_b, b> is  sum_rows J_r^T H J_r + r g^T J_r, so
//   grad_J_r = (H + H^T) J_r + r_r g,   grad_r = J_r g   (ApplyTermGradient).
template <typename scalar_t, int kS = 0>
HOST_DEVICE inline void SparseTermGradientBody(int64_t m, const scalar_t* J, const scalar_t* r,
                                               int R, int S, const int64_t* nodes,
                                               const int64_t* term_blocks,
                                               const scalar_t* grad_blocks,
                                               const scalar_t* grad_b, scalar_t* grad_J,
                                               scalar_t* grad_r) {
  const int SS = kS > 0 ? kS : S, cols = 6 * SS, E = NumPairs(SS);
  scalar_t H[36 * kMaxSlots * kMaxSlots];
  scalar_t g[6 * kMaxSlots];
  for (int e = 0; e < cols * cols; ++e) H[e] = 0;
  const int64_t* nm = nodes + m * SS;
  for (int k = 0; k < E; ++k) {
    const int64_t id = term_blocks[m * E + k];
    if (id < 0) continue;
    int s, t;
    PairOfIndex(k, SS, &s, &t);
    const scalar_t* gp = grad_blocks + 36 * id;
    const bool both = nm[s] == nm[t] && s != t;
    if (nm[s] > nm[t]) {
      const int tmp = s;
      s = t;
      t = tmp;
    }
    for (int p = 0; p < 6; ++p)
      for (int q = 0; q < 6; ++q)
        H[(6 * s + p) * cols + 6 * t + q] += both ? gp[6 * p + q] + gp[6 * q + p] : gp[6 * p + q];
  }
  scalar_t G[36 * kMaxSlots * kMaxSlots];
  for (int a = 0; a < cols; ++a)
    for (int c = 0; c < cols; ++c) G[a * cols + c] = H[a * cols + c] + H[c * cols + a];
  for (int a = 0; a < cols; ++a) g[a] = nm[a / 6] < 0 ? scalar_t(0) : grad_b[6 * nm[a / 6] + a % 6];
  ApplyTermGradient<scalar_t, kS>(J + m * R * cols, r + m * R, R, SS, G, g, grad_J + m * R * cols,
                                  grad_r + m * R);
}

// Step 4, dense: block p written to A (B, 6N, 6N) at (row, col) and, off the diagonal, its
// transpose at (col, row). Each entry of A has one writer.
template <typename scalar_t>
HOST_DEVICE inline void BlocksToDenseBody(int64_t p, const scalar_t* blocks, const int64_t* block_row,
                                          const int64_t* block_col, int64_t N, scalar_t* A) {
  const int64_t dim = 6 * N, row = block_row[p], col = block_col[p];
  const int64_t i = row % N, j = col % N;
  scalar_t* Ab = A + (row / N) * dim * dim;
  const scalar_t* blk = blocks + 36 * p;
  for (int a = 0; a < 6; ++a)
    for (int c = 0; c < 6; ++c) {
      Ab[(6 * i + a) * dim + 6 * j + c] = blk[6 * a + c];
      if (i != j) Ab[(6 * j + c) * dim + 6 * i + a] = blk[6 * a + c];
    }
}

// Step 4, block-sparse: y[n] = sum_j A_nj x_j from the upper blocks: the blocks of row n as
// stored, and the blocks of column n (rows < n) transposed.
template <typename scalar_t>
HOST_DEVICE inline void BlockMatvecBody(int64_t n, const scalar_t* blocks, const int64_t* block_row,
                                        const int64_t* block_col, const int64_t* row_start,
                                        const int64_t* col_order, const int64_t* col_start,
                                        const scalar_t* x, scalar_t* y) {
  scalar_t acc[6] = {0, 0, 0, 0, 0, 0};
  for (int64_t p = row_start[n]; p < row_start[n + 1]; ++p) {
    const scalar_t* blk = blocks + 36 * p;
    const scalar_t* xc = x + 6 * block_col[p];
    for (int a = 0; a < 6; ++a)
      for (int c = 0; c < 6; ++c) acc[a] += blk[6 * a + c] * xc[c];
  }
  for (int64_t e = col_start[n]; e < col_start[n + 1]; ++e) {
    const int64_t p = col_order[e];
    if (block_row[p] == n) continue;  // the diagonal block, done above
    const scalar_t* blk = blocks + 36 * p;
    const scalar_t* xr = x + 6 * block_row[p];
    for (int c = 0; c < 6; ++c)
      for (int a = 0; a < 6; ++a) acc[a] += blk[6 * c + a] * xr[c];
  }
  for (int a = 0; a < 6; ++a) y[6 * n + a] = acc[a];
}

// CPU launchers: calls run(rows, slots) with the term shape as std::integral_constant when it is
// one of the solver's two (matches: 3 rows x 4 anchors; edges: 3 rows x 2 nodes), so that the
// loop bodies unroll their small products; with 0, 0 (sizes read at run time) otherwise.
template <typename Run>
inline void DispatchTermShape(int R, int S, Run run) {
  using Three = std::integral_constant<int, 3>;
  if (R == 3 && S == 4) {
    run(Three{}, std::integral_constant<int, 4>{});
  } else if (R == 3 && S == 2) {
    run(Three{}, std::integral_constant<int, 2>{});
  } else {
    run(std::integral_constant<int, 0>{}, std::integral_constant<int, 0>{});
  }
}

// Launchers (block_sparse_cpu.cpp, block_sparse_cuda.cu); the dispatching wrappers follow.
std::vector<at::Tensor> BuildBlockPatternCpu(const std::vector<at::Tensor>& nodes_list,
                                             const std::vector<at::Tensor>& keys, int64_t num_samples,
                                             int64_t num_nodes);
std::vector<at::Tensor> TermBlockKeysCpu(const at::Tensor& nodes, int64_t num_nodes, int64_t total);
std::vector<at::Tensor> SlotListsCpu(const at::Tensor& nodes, int64_t T);
at::Tensor AssembleBlocksCpu(const at::Tensor& J, const at::Tensor& r, const at::Tensor& nodes,
                             const at::Tensor& entry_order, const at::Tensor& entry_start,
                             const at::Tensor& slot_order, const at::Tensor& slot_start,
                             at::Tensor blocks, at::Tensor b, bool accumulate);
std::vector<at::Tensor> AssembleBlocksBackwardCpu(const at::Tensor& grad_blocks, const at::Tensor& grad_b,
                                                  const at::Tensor& J, const at::Tensor& r,
                                                  const at::Tensor& nodes, const at::Tensor& term_blocks);
at::Tensor BlocksToDenseCpu(const at::Tensor& blocks, const at::Tensor& block_row,
                            const at::Tensor& block_col, int64_t num_samples, int64_t num_nodes);
void AssembleDenseCpu(const at::Tensor& J, const at::Tensor& r, const at::Tensor& nodes,
                      const at::Tensor& slot_order, const at::Tensor& slot_start, at::Tensor A,
                      at::Tensor b, bool accumulate, bool finish);
bool HasLapackFactor();
at::Tensor FactorUpperInPlaceCpu(at::Tensor A);
void AssembleDenseMatchCpu(const at::Tensor& structure, const at::Tensor& w, const at::Tensor& r,
                           const at::Tensor& nodes, const at::Tensor& slot_order, const at::Tensor& slot_start,
                           at::Tensor A, at::Tensor b, bool accumulate, bool finish);
at::Tensor BlockMatvecCpu(const at::Tensor& blocks, const at::Tensor& block_row,
                          const at::Tensor& block_col, const at::Tensor& row_start,
                          const at::Tensor& col_order, const at::Tensor& col_start, const at::Tensor& x);
#ifdef WITH_CUDA
std::vector<at::Tensor> TermBlockKeysCuda(const at::Tensor& nodes, int64_t num_nodes, int64_t total);
at::Tensor AssembleBlocksCuda(const at::Tensor& J, const at::Tensor& r, const at::Tensor& nodes,
                              const at::Tensor& entry_order, const at::Tensor& entry_start,
                              const at::Tensor& slot_order, const at::Tensor& slot_start,
                              at::Tensor blocks, at::Tensor b, bool accumulate);
std::vector<at::Tensor> AssembleBlocksBackwardCuda(const at::Tensor& grad_blocks, const at::Tensor& grad_b,
                                                   const at::Tensor& J, const at::Tensor& r,
                                                   const at::Tensor& nodes, const at::Tensor& term_blocks);
at::Tensor BlocksToDenseCuda(const at::Tensor& blocks, const at::Tensor& block_row,
                             const at::Tensor& block_col, int64_t num_samples, int64_t num_nodes);
void AssembleDenseCuda(const at::Tensor& J, const at::Tensor& r, const at::Tensor& nodes,
                       const at::Tensor& slot_order, const at::Tensor& slot_start, at::Tensor A,
                       at::Tensor b, bool accumulate, bool finish);
void AssembleDenseMatchCuda(const at::Tensor& structure, const at::Tensor& w, const at::Tensor& r,
                            const at::Tensor& nodes, const at::Tensor& slot_order, const at::Tensor& slot_start,
                            at::Tensor A, at::Tensor b, bool accumulate, bool finish);
at::Tensor BlockMatvecCuda(const at::Tensor& blocks, const at::Tensor& block_row,
                           const at::Tensor& block_col, const at::Tensor& row_start,
                           const at::Tensor& col_order, const at::Tensor& col_start, const at::Tensor& x);
#endif

// Inputs of the fused match terms, in this order (shapes in MatchTermForward's comment, over M):
//   x (M, 3), anchors (M, A) int64, aw (M, A), g (T, 3), tp (M, 2), td (M), c (M), K (M, 4),
//   R (T, 3, 3), t (T, 3); forward outputs res (M, 3), J (M, 3, 6A), root (M); backward outputs
//   g_x (M, 3), g_tp (M, 2), g_td (M), g_c (M), g_nodes (T, 12): per node the gradient of R
//   (9, row-major) and t (3), the per-slot gradients of MatchTermBackward summed over the slots.
struct MatchTermInputs {
  at::Tensor x, anchors, aw, g, tp, td, c, K, R, t;
};
std::vector<at::Tensor> MatchTermsCpu(const MatchTermInputs& in, const MatchTermParams<double>& prm,
                                      bool jacobian);
std::vector<at::Tensor> MatchTermsBackwardCpu(const MatchTermInputs& in, const MatchTermParams<double>& prm,
                                              const at::Tensor& root, const at::Tensor& grad_res,
                                              const at::Tensor& grad_J, const at::Tensor& grad_structure);
std::vector<at::Tensor> MatchStepBackwardCpu(const at::Tensor& structure, const at::Tensor& w,
                                             const at::Tensor& r, const at::Tensor& nodes, const at::Tensor& u,
                                             const at::Tensor& x);
// Edge terms: edges (E, 2) int64 flat (i, j), w (E), g (T, 3), R (T, 3, 3), t (T, 3) -> res (E, 3),
// J (E, 3, 12); backward -> g_nodes (T, 12) (R 9, t 3 per node, summed over both slots), g_w (E).
at::Tensor LeftRotateCpu(const at::Tensor& w, const at::Tensor& R);
std::vector<at::Tensor> LeftRotateBackwardCpu(const at::Tensor& w, const at::Tensor& R, const at::Tensor& G);
std::vector<at::Tensor> EdgeTermsCpu(const at::Tensor& edges, const at::Tensor& w, const at::Tensor& g,
                                     const at::Tensor& R, const at::Tensor& t);
std::vector<at::Tensor> EdgeTermsBackwardCpu(const at::Tensor& edges, const at::Tensor& w,
                                             const at::Tensor& g, const at::Tensor& R,
                                             const at::Tensor& t, const at::Tensor& grad_res,
                                             const at::Tensor& grad_J);
#ifdef WITH_CUDA
at::Tensor LeftRotateCuda(const at::Tensor& w, const at::Tensor& R);
std::vector<at::Tensor> LeftRotateBackwardCuda(const at::Tensor& w, const at::Tensor& R, const at::Tensor& G);
std::vector<at::Tensor> EdgeTermsCuda(const at::Tensor& edges, const at::Tensor& w, const at::Tensor& g,
                                      const at::Tensor& R, const at::Tensor& t);
std::vector<at::Tensor> EdgeTermsBackwardCuda(const at::Tensor& edges, const at::Tensor& w,
                                              const at::Tensor& g, const at::Tensor& R,
                                              const at::Tensor& t, const at::Tensor& grad_res,
                                              const at::Tensor& grad_J);
std::vector<at::Tensor> MatchTermsCuda(const MatchTermInputs& in, const MatchTermParams<double>& prm,
                                       bool jacobian);
std::vector<at::Tensor> MatchTermsBackwardCuda(const MatchTermInputs& in, const MatchTermParams<double>& prm,
                                               const at::Tensor& root, const at::Tensor& grad_res,
                                               const at::Tensor& grad_J, const at::Tensor& grad_structure);
std::vector<at::Tensor> MatchStepBackwardCuda(const at::Tensor& structure, const at::Tensor& w,
                                              const at::Tensor& r, const at::Tensor& nodes, const at::Tensor& u,
                                              const at::Tensor& x);
#endif

std::vector<at::Tensor> StepBackwardCpu(const at::Tensor& J, const at::Tensor& r,
                                        const at::Tensor& nodes, const at::Tensor& u,
                                        const at::Tensor& x);
#ifdef WITH_CUDA
std::vector<at::Tensor> StepBackwardCuda(const at::Tensor& J, const at::Tensor& r,
                                         const at::Tensor& nodes, const at::Tensor& u,
                                         const at::Tensor& x);
#endif

std::vector<at::Tensor> AssembleNormalEquationsBackwardCpu(const at::Tensor& grad_A,
                                                           const at::Tensor& grad_b,
                                                           const at::Tensor& J, const at::Tensor& r,
                                                           const at::Tensor& nodes,
                                                           int64_t num_nodes);
#ifdef WITH_CUDA
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

// Step 1 on the tensor's device: keys (M, E); a bad term is a one-line error naming it (on a GPU
// this reads the per-term codes back: one synchronisation, once per problem).
inline at::Tensor CheckedTermBlockKeys(const at::Tensor& nodes, int64_t num_samples, int64_t num_nodes) {
  NNRT_CHECK_DIM(nodes, 2);
  NNRT_CHECK_DTYPE(nodes, at::kLong);
  TORCH_CHECK(num_samples >= 1 && num_nodes >= 1, "num_samples and num_nodes must be >= 1");
  TORCH_CHECK(nodes.size(1) >= 1 && nodes.size(1) <= kMaxSlots, "1 to ", kMaxSlots,
              " slots per term, found ", nodes.size(1));
  const int64_t total = num_samples * num_nodes;
  const at::Tensor idx = nodes.contiguous();
  std::vector<at::Tensor> out;
  if (idx.is_cuda()) {
#ifdef WITH_CUDA
    out = TermBlockKeysCuda(idx, num_nodes, total);
#else
    NNRT_NO_CUDA("term_block_keys");
#endif
  } else {
    out = TermBlockKeysCpu(idx, num_nodes, total);
  }
  const at::Tensor bad = at::nonzero(out[1]).flatten();
  if (bad.numel() > 0) {
    const int64_t m = bad[0].item<int64_t>();
    const int code = out[1][m].item<int>();
    const at::Tensor row = idx[m].cpu();
    const int64_t* n = row.data_ptr<int64_t>();
    std::ostringstream slots;
    for (int64_t s = 0; s < row.numel(); ++s) slots << (s ? ", " : "") << n[s];
    TORCH_CHECK(code != kTermNodeOutOfRange, "term ", m, " (nodes ", slots.str(), "): a node outside [0, ",
                total, ")");
    TORCH_CHECK(false, "term ", m, " (nodes ", slots.str(), ") mixes samples (", num_nodes,
                " nodes per sample)");
  }
  return out[0];
}

// The used slots of one term group by node, by sorting with ATen (any device): slot_order,
// slot_start (bounds: 0..T).
inline std::vector<at::Tensor> SlotListsSorted(const at::Tensor& nodes, const at::Tensor& bounds) {
  const at::Tensor n = nodes.contiguous().flatten();
  const at::Tensor used = at::nonzero(n >= 0).flatten();
  const at::Tensor by_node = std::get<1>(at::sort(n.index_select(0, used), true, 0, false));
  const at::Tensor slot_order = used.index_select(0, by_node);
  return {slot_order, at::searchsorted(n.index_select(0, slot_order), bounds)};
}

// Step 2 by sorting with ATen (any device; what a GPU runs): the block pattern of the term groups
// `nodes_list` (each (M_g, S_g) as above). Returns block_row, block_col, row_start, col_order,
// col_start, then per group term_blocks, entry_order, entry_start, slot_order, slot_start.
inline std::vector<at::Tensor> BuildBlockPatternSorted(const std::vector<at::Tensor>& nodes_list,
                                                       int64_t num_samples, int64_t num_nodes) {
  TORCH_CHECK(!nodes_list.empty(), "build_block_pattern needs at least one term group");
  const int64_t total = num_samples * num_nodes;
  const auto opts = nodes_list[0].options().dtype(at::kLong);
  const at::Tensor flat_nodes = at::arange(total, opts);
  const at::Tensor bounds = at::arange(total + 1, opts);
  std::vector<at::Tensor> keys, used_keys;
  used_keys.push_back(flat_nodes * total + flat_nodes);  // every diagonal block
  for (const at::Tensor& nodes : nodes_list) {
    TORCH_CHECK(nodes.device() == nodes_list[0].device(), "term groups must be on one device");
    keys.push_back(CheckedTermBlockKeys(nodes, num_samples, num_nodes));
    const at::Tensor k = keys.back().flatten();
    used_keys.push_back(k.masked_select(k >= 0));
  }
  const at::Tensor block_keys = std::get<0>(at::_unique(at::cat(used_keys), /*sorted=*/true));
  const at::Tensor block_row = at::div(block_keys, total, "floor");
  const at::Tensor block_col = block_keys - block_row * total;
  const at::Tensor row_start = at::searchsorted(block_row, bounds);
  const at::Tensor col_order = std::get<1>(at::sort(block_col, /*stable=*/true, 0, false));
  const at::Tensor col_start = at::searchsorted(block_col.index_select(0, col_order), bounds);
  const at::Tensor block_bounds = at::arange(block_keys.numel() + 1, opts);
  std::vector<at::Tensor> out = {block_row, block_col, row_start, col_order, col_start};
  for (size_t g = 0; g < nodes_list.size(); ++g) {
    const at::Tensor k = keys[g].flatten();
    const at::Tensor valid = k >= 0;
    const at::Tensor found = at::searchsorted(block_keys, k);
    out.push_back(at::where(valid, found, at::full_like(found, -1)).view(keys[g].sizes()));
    const at::Tensor ids = at::nonzero(valid).flatten();
    const at::Tensor by_block = std::get<1>(at::sort(found.index_select(0, ids), true, 0, false));
    const at::Tensor entry_order = ids.index_select(0, by_block);
    out.push_back(entry_order);
    out.push_back(at::searchsorted(found.index_select(0, entry_order), block_bounds));
    const std::vector<at::Tensor> slots = SlotListsSorted(nodes_list[g], bounds);
    out.insert(out.end(), slots.begin(), slots.end());
  }
  return out;
}

// The used slots of term groups by node: per group slot_order (the slots m * S + s with a node,
// by node, ids ascending) and slot_start (T + 1), BuildBlockPattern's last two tensors without
// the blocks: all the dense assembly (AssembleDense) needs. The terms are checked as there.
inline std::vector<at::Tensor> BuildSlotLists(const std::vector<at::Tensor>& nodes_list,
                                              int64_t num_samples, int64_t num_nodes) {
  const int64_t total = num_samples * num_nodes;
  std::vector<at::Tensor> out;
  for (const at::Tensor& nodes : nodes_list) {
    CheckedTermBlockKeys(nodes, num_samples, num_nodes);
    const std::vector<at::Tensor> slots =
        nodes.is_cuda() ? SlotListsSorted(nodes, at::arange(total + 1, nodes.options().dtype(at::kLong)))
                        : SlotListsCpu(nodes, total);
    out.insert(out.end(), slots.begin(), slots.end());
  }
  return out;
}

// Step 2, the same tensors: on the CPU by counting sorts over the nodes (BuildBlockPatternCpu,
// several times faster than sorting 64-bit keys), elsewhere BuildBlockPatternSorted. Both give
// the same pattern (a test compares them).
inline std::vector<at::Tensor> BuildBlockPattern(const std::vector<at::Tensor>& nodes_list,
                                                 int64_t num_samples, int64_t num_nodes) {
  TORCH_CHECK(!nodes_list.empty(), "build_block_pattern needs at least one term group");
  if (nodes_list[0].is_cuda()) return BuildBlockPatternSorted(nodes_list, num_samples, num_nodes);
  std::vector<at::Tensor> keys;
  for (const at::Tensor& nodes : nodes_list) {
    TORCH_CHECK(!nodes.is_cuda(), "term groups must be on one device");
    keys.push_back(CheckedTermBlockKeys(nodes, num_samples, num_nodes));
  }
  return BuildBlockPatternCpu(nodes_list, keys, num_samples, num_nodes);
}

// Step 3 for one term group: blocks (P, 6, 6) and b (T, 6), written (or added to, with
// accumulate) in place and returned. The pattern tensors are the group's from BuildBlockPattern.
inline std::vector<at::Tensor> AssembleBlocks(const at::Tensor& J, const at::Tensor& r,
                                              const at::Tensor& nodes, const at::Tensor& entry_order,
                                              const at::Tensor& entry_start,
                                              const at::Tensor& slot_order,
                                              const at::Tensor& slot_start, at::Tensor blocks,
                                              at::Tensor b, bool accumulate) {
  CheckAssemblyInputs(J, r, nodes, 1, 1);
  TORCH_CHECK(nodes.size(1) <= kMaxSlots, "at most ", kMaxSlots, " slots per term, found ", nodes.size(1));
  TORCH_CHECK(blocks.dim() == 3 && blocks.size(1) == 6 && blocks.size(2) == 6 &&
                  blocks.is_contiguous() && blocks.scalar_type() == J.scalar_type(),
              "blocks must be contiguous (P, 6, 6) of J's dtype, found ", blocks.sizes());
  TORCH_CHECK(entry_start.numel() == blocks.size(0) + 1, "entry_start must have P + 1 = ",
              blocks.size(0) + 1, " entries, found ", entry_start.numel());
  TORCH_CHECK(b.dim() == 2 && b.size(1) == 6 && b.is_contiguous() && b.scalar_type() == J.scalar_type() &&
                  slot_start.numel() == b.size(0) + 1,
              "b must be contiguous (T, 6) of J's dtype with slot_start (T + 1), found ", b.sizes(),
              " and ", slot_start.sizes());
  if (J.is_cuda()) {
#ifdef WITH_CUDA
    AssembleBlocksCuda(J.contiguous(), r.contiguous(), nodes.contiguous(), entry_order.contiguous(),
                       entry_start.contiguous(), slot_order.contiguous(), slot_start.contiguous(),
                       blocks, b, accumulate);
#else
    NNRT_NO_CUDA("assemble_blocks");
#endif
  } else {
    AssembleBlocksCpu(J.contiguous(), r.contiguous(), nodes.contiguous(), entry_order.contiguous(),
                      entry_start.contiguous(), slot_order.contiguous(), slot_start.contiguous(),
                      blocks, b, accumulate);
  }
  return {blocks, b};
}

// The dense assembly's outputs and slot lists: A (B, 6N, 6N) and b (B, 6N) contiguous, of the
// terms' dtype; slot_start (B N + 1).
inline void CheckDenseOutputs(const at::Tensor& A, const at::Tensor& b, const at::Tensor& slot_start,
                              at::ScalarType dtype) {
  TORCH_CHECK(A.dim() == 3 && A.size(1) == A.size(2) && A.size(1) % 6 == 0 && A.is_contiguous() &&
                  A.scalar_type() == dtype,
              "A must be contiguous (B, 6N, 6N) of the terms' dtype, found ", A.sizes(), " ", A.scalar_type());
  TORCH_CHECK(b.dim() == 2 && b.size(0) == A.size(0) && b.size(1) == A.size(1) && b.is_contiguous() &&
                  b.scalar_type() == dtype,
              "b must be contiguous (B, 6N) of the terms' dtype, found ", b.sizes(), " for A ", A.sizes());
  TORCH_CHECK(slot_start.numel() == A.size(0) * (A.size(1) / 6) + 1, "slot_start must have B N + 1 = ",
              A.size(0) * (A.size(1) / 6) + 1, " entries, found ", slot_start.numel());
}

// The dense solver's assembly of one term group (AssembleDenseRowBody): adds the group's upper
// blocks to A (B, 6N, 6N) (zero there, or holding the earlier groups' sums) and writes (or, with
// accumulate, adds to) b (B, 6N); with finish (the last group), mirrors the upper triangle
// into the lower one (MirrorDenseRowBody). slot_order / slot_start: the group's used slots
// (m * S + s) by node, ids ascending, as BuildBlockPattern's. Returns A.
inline at::Tensor AssembleDense(const at::Tensor& J, const at::Tensor& r, const at::Tensor& nodes,
                                const at::Tensor& slot_order, const at::Tensor& slot_start,
                                at::Tensor A, at::Tensor b, bool accumulate, bool finish) {
  CheckAssemblyInputs(J, r, nodes, 1, 1);
  TORCH_CHECK(nodes.size(1) <= kMaxSlots, "at most ", kMaxSlots, " slots per term, found ", nodes.size(1));
  CheckDenseOutputs(A, b, slot_start, J.scalar_type());
  if (J.is_cuda()) {
#ifdef WITH_CUDA
    AssembleDenseCuda(J.contiguous(), r.contiguous(), nodes.contiguous(), slot_order.contiguous(),
                      slot_start.contiguous(), A, b, accumulate, finish);
#else
    NNRT_NO_CUDA("assemble_dense");
#endif
  } else {
    AssembleDenseCpu(J.contiguous(), r.contiguous(), nodes.contiguous(), slot_order.contiguous(),
                     slot_start.contiguous(), A, b, accumulate, finish);
  }
  return A;
}

// A group of match terms given by their structure: structure (M, 5 + 3A), w (M, A), r (M, 3),
// nodes (M, A) int64, one floating dtype.
inline void CheckMatchStructure(const at::Tensor& structure, const at::Tensor& w, const at::Tensor& r,
                                const at::Tensor& nodes) {
  TORCH_CHECK(nodes.dim() == 2 && nodes.size(1) >= 1 && nodes.size(1) <= kMaxSlots &&
                  nodes.scalar_type() == at::kLong,
              "nodes must be (M, A) int64 with 1 <= A <= ", kMaxSlots, ", found ", nodes.sizes());
  const int64_t M = nodes.size(0), An = nodes.size(1);
  TORCH_CHECK(structure.sizes() == at::IntArrayRef({M, 5 + 3 * An}) && w.sizes() == nodes.sizes() &&
                  r.sizes() == at::IntArrayRef({M, 3}),
              "structure (M, 5 + 3A), weights (M, A) and residuals (M, 3) expected for nodes ", nodes.sizes(),
              ", found ", structure.sizes(), ", ", w.sizes(), ", ", r.sizes());
  TORCH_CHECK(structure.is_floating_point() && w.scalar_type() == structure.scalar_type() &&
                  r.scalar_type() == structure.scalar_type(),
              "structure, weights and residuals must share one floating dtype");
}

// AssembleDense for a group of match terms given by their structure (AssembleDenseMatchRowBody):
// structure (M, 5 + 3A) from match_terms, w (M, A) the skinning weights, r (M, 3) the
// residuals, nodes (M, A) flat node ids (all used); the rest as AssembleDense.
inline at::Tensor AssembleDenseMatch(const at::Tensor& structure, const at::Tensor& w, const at::Tensor& r,
                                     const at::Tensor& nodes, const at::Tensor& slot_order,
                                     const at::Tensor& slot_start, at::Tensor A, at::Tensor b, bool accumulate,
                                     bool finish) {
  CheckMatchStructure(structure, w, r, nodes);
  CheckDenseOutputs(A, b, slot_start, structure.scalar_type());
  if (structure.is_cuda()) {
#ifdef WITH_CUDA
    AssembleDenseMatchCuda(structure.contiguous(), w.contiguous(), r.contiguous(), nodes.contiguous(),
                           slot_order.contiguous(), slot_start.contiguous(), A, b, accumulate, finish);
#else
    NNRT_NO_CUDA("assemble_dense_match");
#endif
  } else {
    AssembleDenseMatchCpu(structure.contiguous(), w.contiguous(), r.contiguous(), nodes.contiguous(),
                          slot_order.contiguous(), slot_start.contiguous(), A, b, accumulate, finish);
  }
  return A;
}

// Cholesky factorisation in place of A (B, D, D) float32/float64, contiguous, on the CPU:
// reads the upper triangle (row-major) of each sample's symmetric matrix and overwrites it with
// U, A = U^T U; the strictly lower triangle is neither read nor written. Returns info (B,)
// int64: 0, or k > 0 when the leading minor of order k is not positive definite (the factor is
// then incomplete). Only where HasLapackFactor() (LAPACK's potrf found in the process; see
// factor_cpu.cpp); elsewhere, and on a GPU, torch.linalg.cholesky_ex does the factorisation.
inline at::Tensor FactorUpperInPlace(at::Tensor A) {
  TORCH_CHECK(A.dim() == 3 && A.size(1) == A.size(2) && A.is_contiguous() &&
                  (A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble),
              "A must be a contiguous (B, D, D) float32/float64 tensor, found ", A.sizes(), " ",
              A.scalar_type());
  TORCH_CHECK(!A.is_cuda(), "factor_upper_ runs on the CPU only (a GPU uses torch.linalg.cholesky_ex)");
  TORCH_CHECK(HasLapackFactor(), "factor_upper_: no LAPACK potrf in this process (check has_lapack_factor())");
  TORCH_CHECK(A.size(1) <= INT32_MAX, "A is too large for LAPACK: ", A.size(1));
  return FactorUpperInPlaceCpu(A);
}

// Backward of AssembleBlocks: (grad_J, grad_r) from grad_blocks (P, 6, 6) and grad_b (T, 6).
inline std::vector<at::Tensor> AssembleBlocksBackward(const at::Tensor& grad_blocks,
                                                      const at::Tensor& grad_b, const at::Tensor& J,
                                                      const at::Tensor& r, const at::Tensor& nodes,
                                                      const at::Tensor& term_blocks) {
  CheckAssemblyInputs(J, r, nodes, 1, 1);
  TORCH_CHECK(nodes.size(1) <= kMaxSlots, "at most ", kMaxSlots, " slots per term, found ", nodes.size(1));
  TORCH_CHECK(term_blocks.dim() == 2 && term_blocks.size(0) == J.size(0) &&
                  term_blocks.size(1) == NumPairs(static_cast<int>(nodes.size(1))),
              "term_blocks must be (M, S (S + 1) / 2), found ", term_blocks.sizes());
  const at::Tensor gB = grad_blocks.to(J.scalar_type()).contiguous();
  const at::Tensor gb = grad_b.to(J.scalar_type()).contiguous();
  if (J.is_cuda()) {
#ifdef WITH_CUDA
    return AssembleBlocksBackwardCuda(gB, gb, J.contiguous(), r.contiguous(), nodes.contiguous(),
                                      term_blocks.contiguous());
#else
    NNRT_NO_CUDA("assemble_blocks_backward");
#endif
  }
  return AssembleBlocksBackwardCpu(gB, gb, J.contiguous(), r.contiguous(), nodes.contiguous(),
                                   term_blocks.contiguous());
}

// Step 4, dense: A (B, 6N, 6N) from the upper blocks, both triangles.
inline at::Tensor BlocksToDense(const at::Tensor& blocks, const at::Tensor& block_row,
                                const at::Tensor& block_col, int64_t num_samples, int64_t num_nodes) {
  TORCH_CHECK(blocks.dim() == 3 && blocks.size(1) == 6 && blocks.size(2) == 6 &&
                  block_row.numel() == blocks.size(0) && block_col.numel() == blocks.size(0),
              "blocks must be (P, 6, 6) with P rows and columns, found ", blocks.sizes());
  if (blocks.is_cuda()) {
#ifdef WITH_CUDA
    return BlocksToDenseCuda(blocks.contiguous(), block_row.contiguous(), block_col.contiguous(),
                             num_samples, num_nodes);
#else
    NNRT_NO_CUDA("blocks_to_dense");
#endif
  }
  return BlocksToDenseCpu(blocks.contiguous(), block_row.contiguous(), block_col.contiguous(),
                          num_samples, num_nodes);
}

// Step 4, block-sparse: y (T, 6) = A x for x (T, 6).
inline at::Tensor BlockMatvec(const at::Tensor& blocks, const at::Tensor& block_row,
                              const at::Tensor& block_col, const at::Tensor& row_start,
                              const at::Tensor& col_order, const at::Tensor& col_start,
                              const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == 6 && x.size(0) + 1 == row_start.numel() &&
                  x.scalar_type() == blocks.scalar_type(),
              "x must be (T, 6) of the blocks' dtype with T + 1 = ", row_start.numel(), ", found ",
              x.sizes());
  if (blocks.is_cuda()) {
#ifdef WITH_CUDA
    return BlockMatvecCuda(blocks.contiguous(), block_row, block_col, row_start, col_order,
                           col_start, x.contiguous());
#else
    NNRT_NO_CUDA("block_matvec");
#endif
  }
  return BlockMatvecCpu(blocks.contiguous(), block_row, block_col, row_start, col_order, col_start,
                        x.contiguous());
}

// Dense A (B, 6N, 6N) and b (B, 6N) of one term group: steps 1-4 in one call (the solver builds
// the pattern once per problem instead and calls the steps itself).
inline std::vector<at::Tensor> AssembleNormalEquations(const at::Tensor& J, const at::Tensor& r,
                                                       const at::Tensor& nodes, int64_t num_samples,
                                                       int64_t num_nodes) {
  CheckAssemblyInputs(J, r, nodes, num_samples, num_nodes);
  const std::vector<at::Tensor> pattern = BuildBlockPattern({nodes}, num_samples, num_nodes);
  const int64_t total = num_samples * num_nodes;
  at::Tensor blocks = at::empty({pattern[0].numel(), 6, 6}, J.options());
  at::Tensor b = at::empty({total, 6}, J.options());
  AssembleBlocks(J, r, nodes, pattern[6], pattern[7], pattern[8], pattern[9], blocks, b, false);
  return {BlocksToDense(blocks, pattern[0], pattern[1], num_samples, num_nodes),
          b.view({num_samples, 6 * num_nodes})};
}

inline std::vector<at::Tensor> AssembleNormalEquationsBackward(const at::Tensor& grad_A,
                                                               const at::Tensor& grad_b,
                                                               const at::Tensor& J,
                                                               const at::Tensor& r,
                                                               const at::Tensor& nodes,
                                                               int64_t num_nodes) {
  CheckAssemblyInputs(J, r, nodes, grad_A.size(0), num_nodes);
  CheckedTermBlockKeys(nodes, grad_A.size(0), num_nodes);  // the input checks, the same on both devices
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
  const int64_t B = u.size(0), N = u.size(1) / 6;
  if (!J.is_cuda()) {
    // The checks of the pattern's (every node in range, one sample per term) as one cheap scan;
    // only a bad term pays for CheckedTermBlockKeys, which names it.
    const at::Tensor idx = nodes.contiguous();
    const int64_t* n = idx.data_ptr<int64_t>();
    const int64_t S = idx.size(1);
    bool ok = true;
    for (int64_t m = 0; m < idx.size(0) && ok; ++m) {
      int64_t sample = -1;
      for (int64_t s = 0; s < S && ok; ++s) {
        const int64_t node = n[m * S + s];
        if (node < -1 || node >= B * N) ok = false;
        else if (node >= 0 && sample < 0) sample = node / N;
        else if (node >= 0 && node / N != sample) ok = false;
      }
    }
    if (!ok) CheckedTermBlockKeys(nodes, B, N);
    TORCH_CHECK(ok, "solve_step_backward: invalid term nodes");
  }
  if (J.is_cuda()) {
#ifdef WITH_CUDA
    CheckedTermBlockKeys(nodes, B, N);  // the same checks, on the device
    return StepBackwardCuda(J.contiguous(), r.contiguous(), nodes.contiguous(), uu, xx);
#else
    NNRT_NO_CUDA("solve_step_backward");
#endif
  }
  return StepBackwardCpu(J.contiguous(), r.contiguous(), nodes.contiguous(), uu, xx);
}

}  // namespace nnrt

namespace nnrt {

inline MatchTermInputs CheckMatchTermInputs(const at::Tensor& x, const at::Tensor& anchors,
                                            const at::Tensor& aw, const at::Tensor& g,
                                            const at::Tensor& tp, const at::Tensor& td,
                                            const at::Tensor& c, const at::Tensor& K,
                                            const at::Tensor& R, const at::Tensor& t) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == 3, "source points must be (M, 3), found ", x.sizes());
  TORCH_CHECK(anchors.dim() == 2 && anchors.size(0) == x.size(0) && anchors.scalar_type() == at::kLong,
              "anchors must be (M, A) int64 with M = ", x.size(0), ", found ", anchors.sizes(), " ",
              anchors.scalar_type());
  const int64_t M = x.size(0), A = anchors.size(1);
  TORCH_CHECK(A >= 1 && A <= kMaxSlots, "1 to ", kMaxSlots, " anchors per match, found ", A);
  TORCH_CHECK(aw.sizes() == at::IntArrayRef({M, A}), "anchor weights must be (", M, ", ", A,
              "), found ", aw.sizes());
  TORCH_CHECK(tp.sizes() == at::IntArrayRef({M, 2}), "target pixels must be (", M, ", 2), found ",
              tp.sizes());
  TORCH_CHECK(td.sizes() == at::IntArrayRef({M}) && c.sizes() == at::IntArrayRef({M}),
              "target depth and weights must be (", M, "), found ", td.sizes(), " and ", c.sizes());
  TORCH_CHECK(K.sizes() == at::IntArrayRef({M, 4}), "intrinsics must be (", M, ", 4), found ", K.sizes());
  TORCH_CHECK(R.dim() == 3 && R.size(1) == 3 && R.size(2) == 3 && t.dim() == 2 && t.size(1) == 3 &&
                  t.size(0) == R.size(0) && g.sizes() == t.sizes(),
              "node positions (T, 3), rotations (T, 3, 3) and translations (T, 3) expected, found ",
              g.sizes(), ", ", R.sizes(), " and ", t.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(x.is_floating_point(), "source points must be floating point, found ", dtype);
  for (const at::Tensor* v : {&aw, &g, &tp, &td, &c, &K, &R, &t})
    TORCH_CHECK(v->scalar_type() == dtype, "match term inputs must share one dtype: ", dtype,
                " and ", v->scalar_type());
  return {x.contiguous(), anchors.contiguous(), aw.contiguous(), g.contiguous(), tp.contiguous(),
          td.contiguous(), c.contiguous(), K.contiguous(), R.contiguous(), t.contiguous()};
}

inline MatchTermParams<double> MakeMatchTermParams(double flow_weight, double depth_weight,
                                                   int64_t robust, double robust_scale, int64_t A) {
  TORCH_CHECK(flow_weight >= 0 && depth_weight >= 0, "term weights must be >= 0, found ",
              flow_weight, " and ", depth_weight);
  TORCH_CHECK(robust >= kRobustNone && robust <= kRobustHuber, "robust loss code 0-2, found ", robust);
  TORCH_CHECK(robust == kRobustNone || robust_scale > 0, "robust scale must be > 0, found ", robust_scale);
  return {std::sqrt(flow_weight), std::sqrt(depth_weight), robust_scale, static_cast<int>(robust),
          static_cast<int>(A)};
}

// (res (M, 3), J (M, 3, 6A), root (M), structure (M, 5 + 3A)) of the data terms; inputs as
// MatchTermInputs. Without jacobian, J is empty (0, 3, 6A): the structure defines it.
inline std::vector<at::Tensor> MatchTerms(const at::Tensor& x, const at::Tensor& anchors,
                                          const at::Tensor& aw, const at::Tensor& g,
                                          const at::Tensor& tp, const at::Tensor& td,
                                          const at::Tensor& c, const at::Tensor& K,
                                          const at::Tensor& R, const at::Tensor& t, double flow_weight,
                                          double depth_weight, int64_t robust, double robust_scale,
                                          bool jacobian) {
  const MatchTermInputs in = CheckMatchTermInputs(x, anchors, aw, g, tp, td, c, K, R, t);
  const auto prm = MakeMatchTermParams(flow_weight, depth_weight, robust, robust_scale, anchors.size(1));
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    return MatchTermsCuda(in, prm, jacobian);
#else
    NNRT_NO_CUDA("match_terms");
#endif
  }
  return MatchTermsCpu(in, prm, jacobian);
}

// (g_x, g_tp, g_td, g_c, g_nodes (T, 12)) from grad_res (M, 3), grad_J (M, 3, 6A) and
// grad_structure (M, 5 + 3A); either of the last two may be empty (numel 0: no gradient).
inline std::vector<at::Tensor> MatchTermsBackward(
    const at::Tensor& x, const at::Tensor& anchors, const at::Tensor& aw, const at::Tensor& g,
    const at::Tensor& tp, const at::Tensor& td, const at::Tensor& c, const at::Tensor& K,
    const at::Tensor& R, const at::Tensor& t, double flow_weight, double depth_weight, int64_t robust,
    double robust_scale, const at::Tensor& root, const at::Tensor& grad_res, const at::Tensor& grad_J,
    const at::Tensor& grad_structure) {
  const MatchTermInputs in = CheckMatchTermInputs(x, anchors, aw, g, tp, td, c, K, R, t);
  const auto prm = MakeMatchTermParams(flow_weight, depth_weight, robust, robust_scale, anchors.size(1));
  const int64_t M = x.size(0), A = anchors.size(1);
  TORCH_CHECK(root.sizes() == at::IntArrayRef({M}) && grad_res.sizes() == at::IntArrayRef({M, 3}) &&
                  (grad_J.numel() == 0 || grad_J.sizes() == at::IntArrayRef({M, 3, 6 * A})) &&
                  (grad_structure.numel() == 0 || grad_structure.sizes() == at::IntArrayRef({M, 5 + 3 * A})),
              "root (M), grad_res (M, 3), grad_J (M, 3, 6A) or empty, grad_structure (M, 5 + 3A) or empty "
              "expected, found ", root.sizes(), ", ", grad_res.sizes(), ", ", grad_J.sizes(), ", ",
              grad_structure.sizes());
  const auto dtype = x.scalar_type();
  const at::Tensor rr = root.to(dtype).contiguous(), gr = grad_res.to(dtype).contiguous(),
                   gJ = grad_J.to(dtype).contiguous(), gS = grad_structure.to(dtype).contiguous();
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    return MatchTermsBackwardCuda(in, prm, rr, gr, gJ, gS);
#else
    NNRT_NO_CUDA("match_terms_backward");
#endif
  }
  return MatchTermsBackwardCpu(in, prm, rr, gr, gJ, gS);
}

// The step's backward for a group of match terms given by their structure (MatchStepBackwardBody):
// structure (M, 5 + 3A), w (M, A), r (M, 3), nodes (M, A) flat node ids (-1: unused), u and x
// (B, 6N). Returns (grad_structure (M, 5 + 3A), grad_r (M, 3)).
inline std::vector<at::Tensor> MatchStepBackward(const at::Tensor& structure, const at::Tensor& w,
                                                 const at::Tensor& r, const at::Tensor& nodes,
                                                 const at::Tensor& u, const at::Tensor& x) {
  CheckMatchStructure(structure, w, r, nodes);
  TORCH_CHECK(u.dim() == 2 && u.sizes() == x.sizes() && u.size(1) % 6 == 0,
              "u and x must be (B, 6N) alike, found ", u.sizes(), " and ", x.sizes());
  const int64_t M = nodes.size(0);
  const auto dtype = structure.scalar_type();
  const int64_t total = u.size(0) * (u.size(1) / 6);
  if (M > 0) {
    const at::Tensor lo = nodes.min(), hi = nodes.max();
    TORCH_CHECK(lo.item<int64_t>() >= -1 && hi.item<int64_t>() < total, "match_step_backward: node ids must lie in [-1, ",
                total, "), found [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
  }
  const at::Tensor uu = u.to(dtype).contiguous(), xx = x.to(dtype).contiguous();
  if (structure.is_cuda()) {
#ifdef WITH_CUDA
    return MatchStepBackwardCuda(structure.contiguous(), w.contiguous(), r.contiguous(), nodes.contiguous(), uu,
                                 xx);
#else
    NNRT_NO_CUDA("match_step_backward");
#endif
  }
  return MatchStepBackwardCpu(structure.contiguous(), w.contiguous(), r.contiguous(), nodes.contiguous(), uu, xx);
}

inline void CheckEdgeTermInputs(const at::Tensor& edges, const at::Tensor& w, const at::Tensor& g,
                                const at::Tensor& R, const at::Tensor& t) {
  TORCH_CHECK(edges.dim() == 2 && edges.size(1) == 2 && edges.scalar_type() == at::kLong,
              "edges must be (E, 2) int64, found ", edges.sizes(), " ", edges.scalar_type());
  TORCH_CHECK(w.sizes() == at::IntArrayRef({edges.size(0)}), "edge weights must be (", edges.size(0),
              "), found ", w.sizes());
  TORCH_CHECK(R.dim() == 3 && R.size(1) == 3 && R.size(2) == 3 && t.dim() == 2 && t.size(1) == 3 &&
                  t.size(0) == R.size(0) && g.sizes() == t.sizes(),
              "node positions (T, 3), rotations (T, 3, 3) and translations (T, 3) expected, found ",
              g.sizes(), ", ", R.sizes(), " and ", t.sizes());
  TORCH_CHECK(w.is_floating_point() && g.scalar_type() == w.scalar_type() &&
                  R.scalar_type() == w.scalar_type() && t.scalar_type() == w.scalar_type(),
              "edge term inputs must share one floating dtype");
}

// (res (E, 3), J (E, 3, 12)) of the ARAP terms of edges (i, j) with weights w (already
// sqrt(arap_weight) * edge weight).
inline std::vector<at::Tensor> EdgeTerms(const at::Tensor& edges, const at::Tensor& w, const at::Tensor& g,
                                         const at::Tensor& R, const at::Tensor& t) {
  CheckEdgeTermInputs(edges, w, g, R, t);
  if (w.is_cuda()) {
#ifdef WITH_CUDA
    return EdgeTermsCuda(edges.contiguous(), w.contiguous(), g.contiguous(), R.contiguous(), t.contiguous());
#else
    NNRT_NO_CUDA("edge_terms");
#endif
  }
  return EdgeTermsCpu(edges.contiguous(), w.contiguous(), g.contiguous(), R.contiguous(), t.contiguous());
}

// (g_nodes (T, 12), g_w (E)) from grad_res (E, 3), grad_J (E, 3, 12).
inline std::vector<at::Tensor> EdgeTermsBackward(const at::Tensor& edges, const at::Tensor& w,
                                                 const at::Tensor& g, const at::Tensor& R,
                                                 const at::Tensor& t, const at::Tensor& grad_res,
                                                 const at::Tensor& grad_J) {
  CheckEdgeTermInputs(edges, w, g, R, t);
  const int64_t E = edges.size(0);
  TORCH_CHECK(grad_res.sizes() == at::IntArrayRef({E, 3}) && grad_J.sizes() == at::IntArrayRef({E, 3, 12}),
              "grad_res (E, 3) and grad_J (E, 3, 12) expected, found ", grad_res.sizes(), " and ",
              grad_J.sizes());
  const at::Tensor gr = grad_res.to(w.scalar_type()).contiguous(), gJ = grad_J.to(w.scalar_type()).contiguous();
  if (w.is_cuda()) {
#ifdef WITH_CUDA
    return EdgeTermsBackwardCuda(edges.contiguous(), w.contiguous(), g.contiguous(), R.contiguous(),
                                 t.contiguous(), gr, gJ);
#else
    NNRT_NO_CUDA("edge_terms_backward");
#endif
  }
  return EdgeTermsBackwardCpu(edges.contiguous(), w.contiguous(), g.contiguous(), R.contiguous(),
                              t.contiguous(), gr, gJ);
}

// exp(w) R of T rotations (LeftRotateBody): w (T, 3), R (T, 3, 3), one floating dtype. Returns
// R' (T, 3, 3).
inline void CheckLeftRotateInputs(const at::Tensor& w, const at::Tensor& R) {
  TORCH_CHECK(w.dim() == 2 && w.size(1) == 3 && R.dim() == 3 && R.size(0) == w.size(0) && R.size(1) == 3 &&
                  R.size(2) == 3,
              "left_rotate: w (T, 3) and R (T, 3, 3) expected, found ", w.sizes(), " and ", R.sizes());
  TORCH_CHECK(w.is_floating_point() && R.scalar_type() == w.scalar_type() && R.device() == w.device(),
              "left_rotate: w and R must share one floating dtype and device");
}

inline at::Tensor LeftRotate(const at::Tensor& w, const at::Tensor& R) {
  CheckLeftRotateInputs(w, R);
  if (w.is_cuda()) {
#ifdef WITH_CUDA
    return LeftRotateCuda(w.contiguous(), R.contiguous());
#else
    NNRT_NO_CUDA("left_rotate");
#endif
  }
  return LeftRotateCpu(w.contiguous(), R.contiguous());
}

// (grad_w (T, 3), grad_R (T, 3, 3)) of LeftRotate from G = dL/dR' (T, 3, 3) (LeftRotateBackwardBody).
inline std::vector<at::Tensor> LeftRotateBackward(const at::Tensor& w, const at::Tensor& R, const at::Tensor& G) {
  CheckLeftRotateInputs(w, R);
  TORCH_CHECK(G.sizes() == R.sizes(), "left_rotate_backward: grad (T, 3, 3) expected, found ", G.sizes());
  const at::Tensor g = G.to(w.scalar_type()).contiguous();
  if (w.is_cuda()) {
#ifdef WITH_CUDA
    return LeftRotateBackwardCuda(w.contiguous(), R.contiguous(), g);
#else
    NNRT_NO_CUDA("left_rotate_backward");
#endif
  }
  return LeftRotateBackwardCpu(w.contiguous(), R.contiguous(), g);
}

}  // namespace nnrt
