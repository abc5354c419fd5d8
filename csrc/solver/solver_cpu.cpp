#include <algorithm>
#include <vector>

#include "solver/solver.h"

namespace nnrt {
namespace {

// Sample of term m (from its first used slot); the checks repeat TermBlockKeys's (which the
// dispatching wrapper runs first), so that this loop never reads outside grad_A.
inline int64_t TermSample(const int64_t* nodes_m, int S, int64_t N, int64_t m, int64_t total) {
  int64_t sample = -1;
  for (int s = 0; s < S; ++s) {
    const int64_t n = nodes_m[s];
    if (n < 0) continue;
    TORCH_CHECK(n < total, "term ", m, " slot ", s, ": node ", n, " outside [0, ", total, ")");
    if (sample < 0) sample = n / N;
    TORCH_CHECK(n / N == sample, "term ", m, " mixes samples ", sample, " and ", n / N);
  }
  return sample;
}

}  // namespace

std::vector<at::Tensor> AssembleNormalEquationsBackwardCpu(const at::Tensor& grad_A,
                                                           const at::Tensor& grad_b,
                                                           const at::Tensor& J, const at::Tensor& r,
                                                           const at::Tensor& nodes,
                                                           int64_t num_nodes) {
  const int64_t M = J.size(0), B = grad_A.size(0), N = num_nodes;
  const int R = static_cast<int>(J.size(1)), S = static_cast<int>(nodes.size(1));
  TORCH_CHECK(S <= kMaxSlots, "at most ", kMaxSlots, " slots per term, found ", S);
  at::Tensor grad_J = at::empty_like(J);
  at::Tensor grad_r = at::empty_like(r);
  const int64_t* idx = nodes.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(J.scalar_type(), "assemble_normal_equations_backward_cpu", [&] {
    const scalar_t* Jp = J.data_ptr<scalar_t>();
    const scalar_t* rp = r.data_ptr<scalar_t>();
    const scalar_t* gA = grad_A.data_ptr<scalar_t>();
    const scalar_t* gb = grad_b.data_ptr<scalar_t>();
    scalar_t* gJ = grad_J.data_ptr<scalar_t>();
    scalar_t* gr = grad_r.data_ptr<scalar_t>();
    at::parallel_for(0, M, 256, [&](int64_t begin, int64_t end) {
      scalar_t G[36 * kMaxSlots * kMaxSlots];
      scalar_t g[6 * kMaxSlots];
      int64_t last_local[kMaxSlots];
      int64_t last_sample = -1;
      for (int64_t m = begin; m < end; ++m) {
        const int64_t sample = TermSample(idx + m * S, S, N, m, B * N);
        int64_t local[kMaxSlots];
        for (int s = 0; s < S; ++s) local[s] = idx[m * S + s] < 0 ? -1 : idx[m * S + s] % N;
        if (sample < 0) {  // a term without nodes contributes nothing
          for (int64_t k = 0; k < R * 6 * S; ++k) gJ[m * R * 6 * S + k] = 0;
          for (int k = 0; k < R; ++k) gr[m * R + k] = 0;
          continue;
        }
        // Consecutive terms (neighbouring pixels) mostly share their nodes: gather once.
        if (sample != last_sample || !std::equal(local, local + S, last_local)) {
          GatherTermGradient<scalar_t>(local, sample, S, N, gA, gb, G, g);
          last_sample = sample;
          std::copy(local, local + S, last_local);
        }
        if (S == 4) {
          ApplyTermGradient<scalar_t, 4>(Jp + m * R * 6 * S, rp + m * R, R, S, G, g,
                                         gJ + m * R * 6 * S, gr + m * R);
        } else if (S == 2) {
          ApplyTermGradient<scalar_t, 2>(Jp + m * R * 6 * S, rp + m * R, R, S, G, g,
                                         gJ + m * R * 6 * S, gr + m * R);
        } else {
          ApplyTermGradient<scalar_t>(Jp + m * R * 6 * S, rp + m * R, R, S, G, g,
                                      gJ + m * R * 6 * S, gr + m * R);
        }
      }
    });
  });
  return {grad_J, grad_r};
}

std::vector<at::Tensor> StepBackwardCpu(const at::Tensor& J, const at::Tensor& r,
                                        const at::Tensor& nodes, const at::Tensor& u,
                                        const at::Tensor& x) {
  const int64_t M = J.size(0);
  const int R = static_cast<int>(J.size(1)), S = static_cast<int>(nodes.size(1));
  const int64_t total = u.numel() / 6;
  at::Tensor grad_J = at::empty_like(J);
  at::Tensor grad_r = at::empty_like(r);
  const int64_t* idx = nodes.data_ptr<int64_t>();
  for (int64_t k = 0; k < M * S; ++k)
    TORCH_CHECK(idx[k] >= -1 && idx[k] < total, "term ", k / S, ": node ", idx[k], " outside [0, ",
                total, ")");
  AT_DISPATCH_FLOATING_TYPES(J.scalar_type(), "solve_step_backward_cpu", [&] {
    const scalar_t* Jp = J.data_ptr<scalar_t>();
    const scalar_t* rp = r.data_ptr<scalar_t>();
    const scalar_t* up = u.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* gJ = grad_J.data_ptr<scalar_t>();
    scalar_t* gr = grad_r.data_ptr<scalar_t>();
    auto run = [&](auto rows, auto slots) {
      constexpr int kR = decltype(rows)::value, kS = decltype(slots)::value;
      at::parallel_for(0, M, 1024, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m)
          StepTermBackward<scalar_t, kR, kS>(Jp + m * R * 6 * S, rp + m * R, idx + m * S, R, S, up, xp,
                                             gJ + m * R * 6 * S, gr + m * R);
      });
    };
    DispatchTermShape(R, S, run);
  });
  return {grad_J, grad_r};
}

namespace {

template <typename scalar_t>
MatchTermParams<scalar_t> CastParams(const MatchTermParams<double>& prm) {
  return {static_cast<scalar_t>(prm.sqrt_flow_weight), static_cast<scalar_t>(prm.sqrt_depth_weight),
          static_cast<scalar_t>(prm.robust_scale), prm.robust, prm.A};
}

// The anchors (or edge ends) index the motions directly: check them here (the CUDA kernels
// trust the caller).
inline void CheckAnchors(const int64_t* anchors, int64_t m, int A, int64_t T, const char* term = "match",
                         const char* slot = "anchor") {
  for (int k = 0; k < A; ++k)
    TORCH_CHECK(anchors[k] >= 0 && anchors[k] < T, term, " ", m, " ", slot, " ", k, ": node ",
                anchors[k], " outside [0, ", T, ")");
}

}  // namespace

std::vector<at::Tensor> MatchTermsCpu(const MatchTermInputs& in, const MatchTermParams<double>& prm,
                                      bool jacobian) {
  const int64_t M = in.x.size(0), T = in.R.size(0);
  const int A = prm.A;
  at::Tensor res = at::empty({M, 3}, in.x.options());
  at::Tensor J = at::empty({jacobian ? M : 0, 3, 6 * A}, in.x.options());
  at::Tensor root = at::empty({M}, in.x.options());
  at::Tensor structure = at::empty({M, 5 + 3 * A}, in.x.options());
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "match_terms_cpu", [&] {
    const auto p = CastParams<scalar_t>(prm);
    const int64_t* an = in.anchors.data_ptr<int64_t>();
    const scalar_t *x = in.x.data_ptr<scalar_t>(), *aw = in.aw.data_ptr<scalar_t>(),
                   *g = in.g.data_ptr<scalar_t>(), *tp = in.tp.data_ptr<scalar_t>(),
                   *td = in.td.data_ptr<scalar_t>(), *c = in.c.data_ptr<scalar_t>(),
                   *K = in.K.data_ptr<scalar_t>(), *R = in.R.data_ptr<scalar_t>(),
                   *t = in.t.data_ptr<scalar_t>();
    scalar_t *rp = res.data_ptr<scalar_t>(), *Jp = jacobian ? J.data_ptr<scalar_t>() : nullptr,
             *rootp = root.data_ptr<scalar_t>(), *sp = structure.data_ptr<scalar_t>();
    at::parallel_for(0, M, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        CheckAnchors(an + m * A, m, A, T);
        MatchTermForward<scalar_t>(x + m * 3, an + m * A, aw + m * A, g, tp + m * 2, td[m], c[m],
                                   K + m * 4, R, t, p, rp + m * 3, Jp ? Jp + m * 18 * A : nullptr, rootp + m,
                                   sp + m * (5 + 3 * A));
      }
    });
  });
  return {res, J, root, structure};
}

std::vector<at::Tensor> MatchTermsBackwardCpu(const MatchTermInputs& in, const MatchTermParams<double>& prm,
                                              const at::Tensor& root, const at::Tensor& grad_res,
                                              const at::Tensor& grad_J, const at::Tensor& grad_structure) {
  const int64_t M = in.x.size(0), T = in.R.size(0);
  const int A = prm.A;
  at::Tensor g_x = at::empty_like(in.x), g_tp = at::empty_like(in.tp), g_td = at::empty_like(in.td),
             g_c = at::empty_like(in.c), g_slots = at::empty({M, A, 12}, in.x.options());
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "match_terms_backward_cpu", [&] {
    const auto p = CastParams<scalar_t>(prm);
    const int64_t* an = in.anchors.data_ptr<int64_t>();
    const scalar_t *x = in.x.data_ptr<scalar_t>(), *aw = in.aw.data_ptr<scalar_t>(),
                   *g = in.g.data_ptr<scalar_t>(), *tp = in.tp.data_ptr<scalar_t>(),
                   *td = in.td.data_ptr<scalar_t>(), *c = in.c.data_ptr<scalar_t>(),
                   *K = in.K.data_ptr<scalar_t>(), *R = in.R.data_ptr<scalar_t>(),
                   *t = in.t.data_ptr<scalar_t>(), *rootp = root.data_ptr<scalar_t>(),
                   *gr = grad_res.data_ptr<scalar_t>(),
                   *gJ = grad_J.numel() ? grad_J.data_ptr<scalar_t>() : nullptr,
                   *gS = grad_structure.numel() ? grad_structure.data_ptr<scalar_t>() : nullptr;
    scalar_t *gx = g_x.data_ptr<scalar_t>(), *gtp = g_tp.data_ptr<scalar_t>(),
             *gtd = g_td.data_ptr<scalar_t>(), *gc = g_c.data_ptr<scalar_t>(),
             *gs = g_slots.data_ptr<scalar_t>();
    at::parallel_for(0, M, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        CheckAnchors(an + m * A, m, A, T);
        MatchTermBackward<scalar_t>(x + m * 3, an + m * A, aw + m * A, g, tp + m * 2, td[m], c[m],
                                    K + m * 4, R, t, p, rootp[m], gr + m * 3, gJ ? gJ + m * 18 * A : nullptr,
                                    gS ? gS + m * (5 + 3 * A) : nullptr, gx + m * 3, gtp + m * 2, gtd + m, gc + m, gs + m * 12 * A);
      }
    });
  });
  // Slots -> nodes in match order, serially: deterministic, and cheaper than a threaded
  // scatter for the few (M * A) x 12 values.
  at::Tensor g_nodes = at::zeros({T, 12}, in.x.options());
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "match_terms_node_sum_cpu", [&] {
    const int64_t* an = in.anchors.data_ptr<int64_t>();
    const scalar_t* gs = g_slots.data_ptr<scalar_t>();
    scalar_t* gn = g_nodes.data_ptr<scalar_t>();
    for (int64_t e = 0; e < M * A; ++e)
      for (int i = 0; i < 12; ++i) gn[12 * an[e] + i] += gs[12 * e + i];
  });
  return {g_x, g_tp, g_td, g_c, g_nodes};
}

std::vector<at::Tensor> EdgeTermsCpu(const at::Tensor& edges, const at::Tensor& w, const at::Tensor& g,
                                     const at::Tensor& R, const at::Tensor& t) {
  const int64_t E = edges.size(0), T = R.size(0);
  at::Tensor res = at::empty({E, 3}, w.options()), J = at::empty({E, 3, 12}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "edge_terms_cpu", [&] {
    const int64_t* ed = edges.data_ptr<int64_t>();
    const scalar_t *wp = w.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>(), *Rp = R.data_ptr<scalar_t>(),
                   *tp = t.data_ptr<scalar_t>();
    scalar_t *rp = res.data_ptr<scalar_t>(), *Jp = J.data_ptr<scalar_t>();
    at::parallel_for(0, E, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        CheckAnchors(ed + 2 * e, e, 2, T, "edge", "end");
        EdgeTermForward<scalar_t>(ed[2 * e], ed[2 * e + 1], wp[e], gp, Rp, tp, rp + 3 * e, Jp + 36 * e);
      }
    });
  });
  return {res, J};
}

std::vector<at::Tensor> EdgeTermsBackwardCpu(const at::Tensor& edges, const at::Tensor& w,
                                             const at::Tensor& g, const at::Tensor& R,
                                             const at::Tensor& t, const at::Tensor& grad_res,
                                             const at::Tensor& grad_J) {
  const int64_t E = edges.size(0), T = R.size(0);
  at::Tensor g_slots = at::empty({E, 2, 12}, w.options()), g_w = at::empty_like(w);
  at::Tensor g_nodes = at::zeros({T, 12}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "edge_terms_backward_cpu", [&] {
    const int64_t* ed = edges.data_ptr<int64_t>();
    const scalar_t *wp = w.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>(), *Rp = R.data_ptr<scalar_t>(),
                   *tp = t.data_ptr<scalar_t>(), *gr = grad_res.data_ptr<scalar_t>(),
                   *gJ = grad_J.data_ptr<scalar_t>();
    scalar_t *gs = g_slots.data_ptr<scalar_t>(), *gwp = g_w.data_ptr<scalar_t>(), *gn = g_nodes.data_ptr<scalar_t>();
    at::parallel_for(0, E, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        CheckAnchors(ed + 2 * e, e, 2, T, "edge", "end");
        EdgeTermBackward<scalar_t>(ed[2 * e], ed[2 * e + 1], wp[e], gp, Rp, tp, gr + 3 * e, gJ + 36 * e,
                                   gs + 24 * e, gwp + e);
      }
    });
    for (int64_t e = 0; e < 2 * E; ++e)  // slots -> nodes, serially (deterministic)
      for (int c = 0; c < 12; ++c) gn[12 * ed[e] + c] += gs[12 * e + c];
  });
  return {g_nodes, g_w};
}

at::Tensor LeftRotateCpu(const at::Tensor& w, const at::Tensor& R) {
  const int64_t T = w.size(0);
  at::Tensor out = at::empty_like(R);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "left_rotate_cpu", [&] {
    const scalar_t *wp = w.data_ptr<scalar_t>(), *Rp = R.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) LeftRotateBody<scalar_t>(wp + 3 * n, Rp + 9 * n, op + 9 * n);
    });
  });
  return out;
}

std::vector<at::Tensor> LeftRotateBackwardCpu(const at::Tensor& w, const at::Tensor& R, const at::Tensor& G) {
  const int64_t T = w.size(0);
  at::Tensor grad_w = at::empty_like(w), grad_R = at::empty_like(R);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "left_rotate_backward_cpu", [&] {
    const scalar_t *wp = w.data_ptr<scalar_t>(), *Rp = R.data_ptr<scalar_t>(), *Gp = G.data_ptr<scalar_t>();
    scalar_t *gw = grad_w.data_ptr<scalar_t>(), *gR = grad_R.data_ptr<scalar_t>();
    at::parallel_for(0, T, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n)
        LeftRotateBackwardBody<scalar_t>(wp + 3 * n, Rp + 9 * n, Gp + 9 * n, gw + 3 * n, gR + 9 * n);
    });
  });
  return {grad_w, grad_R};
}

std::vector<at::Tensor> MatchStepBackwardCpu(const at::Tensor& structure, const at::Tensor& w,
                                             const at::Tensor& r, const at::Tensor& nodes, const at::Tensor& u,
                                             const at::Tensor& x) {
  const int64_t M = nodes.size(0);
  const int A = static_cast<int>(nodes.size(1));
  at::Tensor grad_structure = at::empty_like(structure), grad_r = at::empty_like(r);
  AT_DISPATCH_FLOATING_TYPES(structure.scalar_type(), "match_step_backward_cpu", [&] {
    const scalar_t *sp = structure.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>(), *rp = r.data_ptr<scalar_t>(),
                   *up = u.data_ptr<scalar_t>(), *xp = x.data_ptr<scalar_t>();
    const int64_t* np = nodes.data_ptr<int64_t>();
    scalar_t *gs = grad_structure.data_ptr<scalar_t>(), *gr = grad_r.data_ptr<scalar_t>();
    at::parallel_for(0, M, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m)
        MatchStepBackwardBody<scalar_t>(sp + m * (5 + 3 * A), wp + m * A, rp + 3 * m, np + m * A, A, up, xp,
                                        gs + m * (5 + 3 * A), gr + 3 * m);
    });
  });
  return {grad_structure, grad_r};
}

}  // namespace nnrt
