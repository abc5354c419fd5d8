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

  at::Tensor A_acc = at::zeros({B, dim, dim}, J.options().dtype(at::kDouble));
  at::Tensor b_acc = at::zeros({B, dim}, J.options().dtype(at::kDouble));
  double* A = A_acc.data_ptr<double>();
  double* b = b_acc.data_ptr<double>();

  AT_DISPATCH_FLOATING_TYPES(J.scalar_type(), "assemble_normal_equations_cpu", [&] {
    const scalar_t* Jp = J.data_ptr<scalar_t>();
    const scalar_t* rp = r.data_ptr<scalar_t>();
    DynamicParallelFor<int>(
        total, [] { return 0; },
        [&](int64_t n, int&) {
          const int64_t sample = n / N, i = n % N;
          double* A_rows = A + sample * dim * dim + 6 * i * dim;
          double* b_rows = b + sample * dim + 6 * i;
          for (int64_t e = start[n]; e < start[n + 1]; ++e) {
            const int64_t m = entries[e] / S;
            const int s = static_cast<int>(entries[e] % S);
            const scalar_t* Jm = Jp + m * R * 6 * S;
            for (int t = 0; t < S; ++t) {
              const int64_t nt = idx[m * S + t];
              if (nt < n) continue;  // unused slot (-1) or a lower block, mirrored below
              AddJtJBlock<scalar_t, double>(Jm, R, S, s, t, A_rows + 6 * (nt % N), dim);
            }
            AddJtrBlock<scalar_t, double>(Jm, rp + m * R, R, S, s, b_rows);
          }
        });
  });

  // Mirror the upper triangle onto the lower one (diagonal blocks were computed whole).
  at::parallel_for(0, B * dim, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      double* Ab = A + (row / dim) * dim * dim;
      const int64_t a = row % dim;
      for (int64_t c = 0; c < a; ++c) Ab[a * dim + c] = Ab[c * dim + a];
    }
  });
  return {A_acc.to(J.scalar_type()), b_acc.to(J.scalar_type())};
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
      for (int64_t m = begin; m < end; ++m) {
        const int64_t sample = TermSample(idx + m * S, S, N, m, B * N);
        int64_t local[kMaxSlots];
        for (int s = 0; s < S; ++s) local[s] = idx[m * S + s] < 0 ? -1 : idx[m * S + s] % N;
        if (sample < 0) {  // a term without nodes contributes nothing
          for (int64_t k = 0; k < R * 6 * S; ++k) gJ[m * R * 6 * S + k] = 0;
          for (int k = 0; k < R; ++k) gr[m * R + k] = 0;
          continue;
        }
        TermBackward<scalar_t>(Jp + m * R * 6 * S, rp + m * R, local, sample, R, S, N, gA, gb,
                               gJ + m * R * 6 * S, gr + m * R);
      }
    });
  });
  return {grad_J, grad_r};
}

}  // namespace nnrt
