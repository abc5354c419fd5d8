#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "hashgrid/hashgrid.h"

namespace nnrt {
namespace {

// The lookups are random reads (and, in backward, read-modify-writes) in a table level of a few
// MB, so cache and TLB misses cost as much as the arithmetic. Measured on the 4D / 16-level /
// 2^19-row benchmark (benchmarks/bench_hashgrid.py, 2 threads):
// - points are visited level by level in blocks of up to kBlock points, so that one level's rows
//   stay in cache while many points are looked up in it. Point by point over all levels was
//   ~1.7x slower in forward, and blocks of 512 / 1024 / 4096 points about 2x / 1.5x / 1.1x
//   slower than blocks of 16384;
// - each point's cell is located kAhead points before it is used and its rows are prefetched
//   then, so that the misses of several points overlap; this cut the forward time by a third.
constexpr int64_t kBlock = 16384;
constexpr int64_t kAhead = 8;
constexpr int64_t kRing = 16;  // power of two > kAhead

// Work items (point blocks or levels) are handed out dynamically (DynamicParallelFor). They cost
// about the same, so on an idle machine this matches a static split; on a shared one a static
// split waits for whichever thread the OS deschedules (measured: same medians, smaller maxima).
struct NoWorkspace {};
inline NoWorkspace MakeNoWorkspace() { return {}; }

// Points per block: kBlock, or smaller so that a few blocks per thread keep all threads busy.
inline int64_t PointBlock(int64_t N) {
  const int64_t per_thread = N / (4 * std::max(1, at::get_num_threads()));
  return std::min(kBlock, std::max<int64_t>(256, per_thread));
}

// Asks the kernel to back a fresh, untouched tensor with 2 MB pages where it can (transparent
// huge pages in "madvise" mode, the common default). The table gradient is tens of MB, written
// everywhere once (zeroing) and then at random: with 4 KB pages, page faults and TLB misses took
// ~18% of the table pass. Purely advisory: without THP, or on other systems, nothing changes.
void AdviseHugePages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = end & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

struct PlainAdd {
  template <typename scalar_t>
  void operator()(scalar_t* p, scalar_t v) const { *p += v; }
};

template <int kWrite, int D, int F, typename scalar_t>
inline void PrefetchRows(const HashGridCell<D, scalar_t>& cell, const scalar_t* level_base) {
  // A row is F <= 8 values, aligned to its size, so it lies in one 64-byte line.
  for (int k = 0; k < (1 << D); ++k)
    __builtin_prefetch(level_base + static_cast<size_t>(cell.row[k]) * F, kWrite, 3);
}

// Calls body(n, cell) for n in [begin, end) at one level. Cells are located kAhead points early
// and handed to prefetch(cell) then, so that the rows are in cache when body uses them.
template <int D, typename scalar_t, typename Prefetch, typename Body>
inline void ForEachCell(const scalar_t* x, const HashGridLevel& level, uint32_t mask,
                        int64_t begin, int64_t end, Prefetch prefetch, Body body) {
  HashGridCell<D, scalar_t> ring[kRing];
  auto locate = [&](int64_t n) {
    HashGridCell<D, scalar_t>& cell = ring[n & (kRing - 1)];
    hashgrid_locate<D, scalar_t>(x + n * D, level, mask, cell);
    prefetch(cell);
  };
  int64_t ahead = begin;
  for (; ahead < std::min(end, begin + kAhead); ++ahead) locate(ahead);
  for (int64_t n = begin; n < end; ++n) {
    if (ahead < end) locate(ahead++);
    body(n, ring[n & (kRing - 1)]);
  }
}

template <int D, int F, typename scalar_t>
void ForwardCpu(const scalar_t* x, const scalar_t* table, const HashGridLevels& levels, int64_t N,
                int64_t S, scalar_t* out) {
  const int L = levels.num_levels;
  const uint32_t mask = static_cast<uint32_t>(S - 1);
  const int64_t block_size = PointBlock(N);
  DynamicParallelFor<NoWorkspace>((N + block_size - 1) / block_size, MakeNoWorkspace,
                                  [&](int64_t block, NoWorkspace&) {
    const int64_t b0 = block * block_size, b1 = std::min(N, b0 + block_size);
    for (int l = 0; l < L; ++l) {
      const scalar_t* table_level = table + l * S * F;
      ForEachCell<D, scalar_t>(
          x, levels.level[l], mask, b0, b1,
          [&](const HashGridCell<D, scalar_t>& cell) {
            PrefetchRows<0, D, F, scalar_t>(cell, table_level);
          },
          [&](int64_t n, const HashGridCell<D, scalar_t>& cell) {
            hashgrid_interpolate<D, F, scalar_t>(cell, table_level, out + (n * L + l) * F);
          });
    }
  });
}

// Table gradient: one thread owns whole levels, so every table row is summed in point order by
// a single thread, without races and independently of the thread count (at most L threads work).
// grad_out_levels is grad_out level-major, (L, N, F): a level's pass over all points then reads
// N * F contiguous values instead of F values out of every (L * F)-wide row.
template <int D, int F, typename scalar_t>
void BackwardTableCpu(const scalar_t* grad_out_levels, const scalar_t* x,
                      const HashGridLevels& levels, int64_t N, int64_t S, scalar_t* grad_table) {
  const int L = levels.num_levels;
  const uint32_t mask = static_cast<uint32_t>(S - 1);
  DynamicParallelFor<NoWorkspace>(L, MakeNoWorkspace, [&](int64_t l, NoWorkspace&) {
    scalar_t* grad_level = grad_table + l * S * F;
    // Zeroed here rather than by at::zeros: the owning thread touches its level just before
    // scattering into it, in parallel and while it is hot in cache.
    std::memset(grad_level, 0, sizeof(scalar_t) * S * F);
    ForEachCell<D, scalar_t>(
        x, levels.level[l], mask, 0, N,
        [&](const HashGridCell<D, scalar_t>& cell) {
          PrefetchRows<1, D, F, scalar_t>(cell, grad_level);
        },
        [&](int64_t n, const HashGridCell<D, scalar_t>& cell) {
          hashgrid_scatter_grad<D, F, scalar_t>(cell, grad_out_levels + (l * N + n) * F,
                                                grad_level, PlainAdd());
        });
  });
}

// Input gradient: threads own points, and each point's levels are summed in level order.
template <int D, int F, typename scalar_t>
void BackwardInputCpu(const scalar_t* grad_out, const scalar_t* x, const scalar_t* table,
                      const HashGridLevels& levels, int64_t N, int64_t S, scalar_t* grad_x) {
  const int L = levels.num_levels;
  const uint32_t mask = static_cast<uint32_t>(S - 1);
  const int64_t block_size = PointBlock(N);
  DynamicParallelFor<NoWorkspace>((N + block_size - 1) / block_size, MakeNoWorkspace,
                                  [&](int64_t block, NoWorkspace&) {
    const int64_t b0 = block * block_size, b1 = std::min(N, b0 + block_size);
    std::fill(grad_x + b0 * D, grad_x + b1 * D, scalar_t(0));
    for (int l = 0; l < L; ++l) {
      const HashGridLevel level = levels.level[l];
      const scalar_t* table_level = table + l * S * F;
      ForEachCell<D, scalar_t>(
          x, level, mask, b0, b1,
          [&](const HashGridCell<D, scalar_t>& cell) {
            PrefetchRows<0, D, F, scalar_t>(cell, table_level);
          },
          [&](int64_t n, const HashGridCell<D, scalar_t>& cell) {
            scalar_t gx[D];
            hashgrid_input_grad<D, F, scalar_t>(cell, level.resolution, table_level,
                                                grad_out + (n * L + l) * F, gx);
            for (int d = 0; d < D; ++d) grad_x[n * D + d] += gx[d];
          });
    }
  });
}

}  // namespace

at::Tensor HashGridForwardCpu(const at::Tensor& x, const at::Tensor& table,
                              const HashGridLevels& levels) {
  const int64_t N = x.size(0), L = table.size(0), S = table.size(1), F = table.size(2);
  at::Tensor out = at::empty({N, L * F}, x.options());
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hashgrid_forward_cpu", [&] {
    hashgrid_dispatch(x.size(1), F, [&](auto d_tag, auto f_tag) {
      ForwardCpu<decltype(d_tag)::value, decltype(f_tag)::value, scalar_t>(
          x.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(), levels, N, S,
          out.data_ptr<scalar_t>());
    });
  });
  return out;
}

std::vector<at::Tensor> HashGridBackwardCpu(const at::Tensor& grad_out, const at::Tensor& x,
                                            const at::Tensor& table, const HashGridLevels& levels,
                                            bool need_table_grad, bool need_input_grad) {
  const int64_t N = x.size(0), L = table.size(0), S = table.size(1), F = table.size(2);
  at::Tensor grad_table, grad_x;
  if (need_table_grad) {
    grad_table = at::empty_like(table);
    AdviseHugePages(grad_table);
  }
  if (need_input_grad) grad_x = at::empty_like(x);
  if (!need_table_grad && !need_input_grad) return {grad_table, grad_x};
  if (N == 0) {
    if (need_table_grad) grad_table.zero_();
    return {grad_table, grad_x};
  }
  // Two passes when both gradients are needed: one over levels for the table, one over points
  // for the input. Fusing them (per-level input gradients in an (L, N, D) buffer, summed
  // afterwards) was ~15% slower: twice the working set per thread, plus the buffer.
  at::Tensor grad_out_levels;
  if (need_table_grad)
    grad_out_levels = grad_out.view({N, L, F}).transpose(0, 1).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hashgrid_backward_cpu", [&] {
    hashgrid_dispatch(x.size(1), F, [&](auto d_tag, auto f_tag) {
      constexpr int kD = decltype(d_tag)::value, kF = decltype(f_tag)::value;
      const scalar_t* g = grad_out.data_ptr<scalar_t>();
      const scalar_t* xp = x.data_ptr<scalar_t>();
      if (need_table_grad)
        BackwardTableCpu<kD, kF, scalar_t>(grad_out_levels.data_ptr<scalar_t>(), xp, levels, N, S,
                                           grad_table.data_ptr<scalar_t>());
      if (need_input_grad)
        BackwardInputCpu<kD, kF, scalar_t>(g, xp, table.data_ptr<scalar_t>(), levels, N, S,
                                           grad_x.data_ptr<scalar_t>());
    });
  });
  return {grad_table, grad_x};
}

}  // namespace nnrt
