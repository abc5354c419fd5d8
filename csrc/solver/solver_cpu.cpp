#include <algorithm>
#include <type_traits>
#include <vector>

#include "solver/solver.h"

namespace nnrt {
namespace {

// Sample of term m (from its first used slot); checks that all used slots share it.
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

std::vector<at::Tensor> AssembleNormalEquationsCpu(const at::Tensor& J, const at::Tensor& r,
                                                   const at::Tensor& nodes, int64_t num_samples,
                                                   int64_t num_nodes) {
  const int64_t M = J.size(0);
  const int R = static_cast<int>(J.size(1)), S = static_cast<int>(nodes.size(1));
  TORCH_CHECK(S <= kMaxSlots, "at most ", kMaxSlots, " slots per term, found ", S);
  const int64_t N = num_nodes, B = num_samples, dim = 6 * N, total = B * N;
  const int64_t* idx = nodes.data_ptr<int64_t>();

  // node -> (term, slot) lists, counting sort over the used slots.
  std::vector<int64_t> start(total + 1, 0);
  for (int64_t m = 0; m < M; ++m) {
    TermSample(idx + m * S, S, N, m, total);
    for (int s = 0; s < S; ++s)
      if (idx[m * S + s] >= 0) ++start[idx[m * S + s] + 1];
  }
  for (int64_t n = 0; n < total; ++n) start[n + 1] += start[n];
  std::vector<int64_t> entries(start[total]);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t m = 0; m < M; ++m)
      for (int s = 0; s < S; ++s)
        if (idx[m * S + s] >= 0) entries[fill[idx[m * S + s]]++] = m * S + s;
  }

  at::Tensor A_out = at::zeros({B, dim, dim}, J.options());
  at::Tensor b_out = at::zeros({B, dim}, J.options());

  AT_DISPATCH_FLOATING_TYPES(J.scalar_type(), "assemble_normal_equations_cpu", [&] {
    scalar_t* A = A_out.data_ptr<scalar_t>();
    scalar_t* b = b_out.data_ptr<scalar_t>();
    const scalar_t* Jp = J.data_ptr<scalar_t>();
    const scalar_t* rp = r.data_ptr<scalar_t>();
    // The row owner of node n adds, for every (term, slot s) at n, the blocks (n, node of t),
    // first into `scratch` (the 6 x 6N block row of node n, one contiguous 6x6 block per node).
    struct Workspace {
      std::vector<scalar_t> scratch;
      std::vector<uint8_t> touched;
      std::vector<int64_t> touched_list;
    };
    auto assemble = [&](auto rows, auto slots) {
      constexpr int kR = decltype(rows)::value, kS = decltype(slots)::value;
      const int RR = kR > 0 ? kR : R, SS = kS > 0 ? kS : S;
      DynamicParallelFor<Workspace>(
          total, [&] { return Workspace{std::vector<scalar_t>(36 * N, 0), std::vector<uint8_t>(N, 0), {}}; },
          [&](int64_t n, Workspace& ws) {
            const int64_t sample = n / N, i = n % N;
            scalar_t* A_rows = A + sample * dim * dim + 6 * i * dim;
            scalar_t* b_rows = b + sample * dim + 6 * i;
            for (int64_t e = start[n]; e < start[n + 1]; ++e) {
              const int64_t m = entries[e] / SS;
              const int s = static_cast<int>(entries[e] % SS);
              const scalar_t* Jm = Jp + m * RR * 6 * SS;
              for (int t = 0; t < SS; ++t) {
                const int64_t nt = idx[m * SS + t];
                if (nt < n) continue;  // unused slot (-1) or a lower block, mirrored below
                const int64_t j = nt % N;
                if (!ws.touched[j]) {
                  ws.touched[j] = 1;
                  ws.touched_list.push_back(j);
                }
                AddJtJBlock<scalar_t, scalar_t>(Jm, RR, SS, s, t, ws.scratch.data() + 36 * j, 6);
              }
              AddJtrBlock<scalar_t, scalar_t>(Jm, rp + m * RR, RR, SS, s, b_rows);
            }
            for (int64_t j : ws.touched_list) {
              scalar_t* block = ws.scratch.data() + 36 * j;
              for (int p = 0; p < 6; ++p)
                for (int q = 0; q < 6; ++q) A_rows[p * dim + 6 * j + q] += block[6 * p + q];
              std::fill(block, block + 36, scalar_t(0));
              ws.touched[j] = 0;
            }
            ws.touched_list.clear();
          });
    };
    // Compile-time sizes for the two shapes the solver uses (matches: 3 rows x 4 anchors,
    // edges: 3 rows x 2 nodes) let the compiler unroll and vectorise the 6x6 block products.
    using Any = std::integral_constant<int, 0>;
    using Three = std::integral_constant<int, 3>;
    if (R == 3 && S == 4) {
      assemble(Three{}, std::integral_constant<int, 4>{});
    } else if (R == 3 && S == 2) {
      assemble(Three{}, std::integral_constant<int, 2>{});
    } else {
      assemble(Any{}, Any{});
    }

    // Mirror the upper triangle onto the lower one (diagonal blocks were computed whole).
    at::parallel_for(0, B * dim, 64, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        scalar_t* Ab = A + (row / dim) * dim * dim;
        const int64_t a = row % dim;
        for (int64_t c = 0; c < a; ++c) Ab[a * dim + c] = Ab[c * dim + a];
      }
    });
  });
  return {A_out, b_out};
}

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
    TORCH_CHECK(idx[k] < total, "term ", k / S, ": node ", idx[k], " outside [0, ", total, ")");
  AT_DISPATCH_FLOATING_TYPES(J.scalar_type(), "solve_step_backward_cpu", [&] {
    const scalar_t* Jp = J.data_ptr<scalar_t>();
    const scalar_t* rp = r.data_ptr<scalar_t>();
    const scalar_t* up = u.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* gJ = grad_J.data_ptr<scalar_t>();
    scalar_t* gr = grad_r.data_ptr<scalar_t>();
    at::parallel_for(0, M, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m)
        StepTermBackward<scalar_t>(Jp + m * R * 6 * S, rp + m * R, idx + m * S, R, S, up, xp,
                                   gJ + m * R * 6 * S, gr + m * R);
    });
  });
  return {grad_J, grad_r};
}

std::vector<at::Tensor> MatchJacobianCpu(const at::Tensor& q, const at::Tensor& w, const at::Tensor& dv) {
  const int64_t M = q.size(0);
  const int A = static_cast<int>(q.size(1));
  at::Tensor J = at::empty({M, 3, 6 * A}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "match_jacobian_cpu", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* dp = dv.data_ptr<scalar_t>();
    scalar_t* Jp = J.data_ptr<scalar_t>();
    at::parallel_for(0, M, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m)
        MatchJacobianBlock<scalar_t>(qp + m * A * 3, wp + m * A, dp + m * 5, A, Jp + m * 18 * A);
    });
  });
  return {J};
}

std::vector<at::Tensor> MatchJacobianBackwardCpu(const at::Tensor& grad_J, const at::Tensor& q,
                                                 const at::Tensor& w, const at::Tensor& dv) {
  const int64_t M = q.size(0);
  const int A = static_cast<int>(q.size(1));
  at::Tensor grad_q = at::empty_like(q), grad_w = at::empty_like(w), grad_dv = at::empty_like(dv);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "match_jacobian_backward_cpu", [&] {
    const scalar_t* gJ = grad_J.data_ptr<scalar_t>();
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* dp = dv.data_ptr<scalar_t>();
    scalar_t* gq = grad_q.data_ptr<scalar_t>();
    scalar_t* gw = grad_w.data_ptr<scalar_t>();
    scalar_t* gd = grad_dv.data_ptr<scalar_t>();
    at::parallel_for(0, M, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m)
        MatchJacobianBlockBackward<scalar_t>(gJ + m * 18 * A, qp + m * A * 3, wp + m * A, dp + m * 5, A,
                                        gq + m * A * 3, gw + m * A, gd + m * 5);
    });
  });
  return {grad_q, grad_w, grad_dv};
}

}  // namespace nnrt
