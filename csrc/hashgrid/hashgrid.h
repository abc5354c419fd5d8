// Multiresolution hash encoding of 3D and 4D points (docs/DESIGN.md 5.7; Mueller et al. 2022, as used
// by the Instant-NK residual deformer on (x, y, z, t)).
//
// Shapes and dtypes (D = input dimension 3 or 4, L levels, S = 2^T table rows per level,
// F features per level, N points):
//   x            (N, D)        float32/float64, coordinates in [0, 1]^D
//   table        (L, S, F)     same dtype as x; S a power of two; F in {1, 2, 4, 8}
//   resolutions  L ints        cells per axis of each level, 1 <= res <= 2^24
//   out          (N, L * F)    same dtype as x; out[n, l * F + f] is feature f of level l
//   grad_out     (N, L * F)    gradient of the loss w.r.t. out
//   grad_table   (L, S, F)     gradient w.r.t. table (rows no point touches are 0)
//   grad_x       (N, D)        gradient w.r.t. x
//
// Grid convention: level l with resolution R has R cells per axis and grid points 0..R; a
// coordinate x_d maps to position p_d = x_d * R. The cell is c_d = min(floor(p_d), R - 1) (so
// x_d = 1 lies in the last cell with fraction 1, and corners stay within 0..R) and the fraction
// is p_d - c_d. The output is the multilinear interpolation of the table rows of the 2^D cell
// corners; corner k (0 <= k < 2^D) uses c_d + bit d of k in dimension d.
//
// Table rows: a level whose dense grid of (R + 1)^D points fits in S rows indexes the grid point
// (g_0, ..., g_{D-1}) densely as sum_d g_d * (R + 1)^d; other levels use the spatial hash
// (XOR_d g_d * pi_d) mod S with pi = (1, 2654435761, 805459861, 3674653429), in uint32
// arithmetic. Rows of a dense level beyond (R + 1)^D are never used.
//
// Coordinates outside [0, 1] are clamped to [0, 1] and get zero gradient in that dimension (the
// gradient of a clamp); on the boundary itself (0 or 1) the one-sided gradient of the edge cell
// is used. A NaN coordinate propagates through the weights: the point's output row, its table
// gradient contributions and the gradient of its other coordinates are NaN (the NaN coordinate's
// own gradient is 0), while the lookup uses cell 0, so no input reads or writes outside the table.
//
// Backward on CPU: the table gradient is partitioned by level, so each level's rows are summed
// by one thread in point order, and the input gradient by point, each point summing its levels
// in level order: both are deterministic, race-free and independent of the thread count (the
// table pass uses at most L threads). The CUDA launcher uses atomicAdd for both (exact up to the
// order of float additions).
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include "common.h"

namespace nnrt {

// Full unrolling of the corner and feature loops (their bounds are template constants) lets the
// compiler keep cells, weights and accumulators in registers.
#ifdef __CUDACC__
#define NNRT_UNROLL _Pragma("unroll")
#else
#define NNRT_UNROLL _Pragma("GCC unroll 16")
#endif

constexpr int kHashGridMaxLevels = 64;
constexpr int64_t kHashGridMaxResolution = int64_t(1) << 24;  // positions stay exact in float32
constexpr int64_t kHashGridMaxTableSize = int64_t(1) << 30;   // row indices fit in uint32

// Lookup constants of one level, computed once on the host. `multiplier[d]` is (R + 1)^d for a
// dense level (corner contributions are summed) and the hash prime for a hashed level (they are
// XOR-ed), so both index schemes share one per-dimension product.
struct HashGridLevel {
  int32_t resolution;
  int32_t hashed;
  uint32_t multiplier[4];
};

// Fixed-size so that the CUDA launcher can pass all levels by value as a kernel argument.
struct HashGridLevels {
  int32_t num_levels;
  HashGridLevel level[kHashGridMaxLevels];
};

// The 2^D corners of the cell that contains one point at one level.
template <int D, typename scalar_t>
struct HashGridCell {
  uint32_t row[1 << D];   // table row of corner k
  scalar_t weight[D][2];  // weight[d][b]: factor of a corner whose bit d is b (1 - frac, frac)
  bool inside[D];         // x_d in [0, 1]: otherwise the clamp zeroes the gradient
};

template <int D, typename scalar_t>
HOST_DEVICE inline void hashgrid_locate(const scalar_t* x, const HashGridLevel& level,
                                        uint32_t row_mask, HashGridCell<D, scalar_t>& cell) {
  static_assert(D >= 1 && D <= 4, "hash grid supports 1 to 4 input dimensions");
  const int32_t res = level.resolution;
  uint32_t part[D][2];
  NNRT_UNROLL
  for (int d = 0; d < D; ++d) {
    const scalar_t xd = x[d];
    cell.inside[d] = xd >= scalar_t(0) && xd <= scalar_t(1);
    // Written so that NaN takes the `0` branch: the cell index must stay in range.
    const scalar_t xc = xd > scalar_t(1) ? scalar_t(1) : (xd >= scalar_t(0) ? xd : scalar_t(0));
    const scalar_t pos = xc * scalar_t(res);
    int32_t c = static_cast<int32_t>(pos);  // pos >= 0, so truncation is floor
    c = c < res - 1 ? c : res - 1;
    scalar_t frac = pos - scalar_t(c);
    if (xd != xd) frac = xd;  // NaN in, NaN out
    cell.weight[d][0] = scalar_t(1) - frac;
    cell.weight[d][1] = frac;
    part[d][0] = static_cast<uint32_t>(c) * level.multiplier[d];
    part[d][1] = static_cast<uint32_t>(c + 1) * level.multiplier[d];
  }
  if (level.hashed) {
    NNRT_UNROLL
    for (int k = 0; k < (1 << D); ++k) {
      uint32_t h = part[0][k & 1];
      NNRT_UNROLL
      for (int d = 1; d < D; ++d) h ^= part[d][(k >> d) & 1];
      cell.row[k] = h & row_mask;
    }
  } else {
    NNRT_UNROLL
    for (int k = 0; k < (1 << D); ++k) {
      uint32_t r = part[0][k & 1];
      NNRT_UNROLL
      for (int d = 1; d < D; ++d) r += part[d][(k >> d) & 1];
      cell.row[k] = r;
    }
  }
}

// Multilinear weight of every corner, multiplied in dimension order (as the reference does).
// Corners share their leading factors, so after unrolling the compiler can compute each prefix
// product once (4 + 8 + 16 products in 4D). Written without in-place updates of w, which kept
// nvcc from holding w in registers (it went to local memory).
template <int D, typename scalar_t>
HOST_DEVICE inline void hashgrid_corner_weights(const HashGridCell<D, scalar_t>& cell,
                                                scalar_t* w /* 2^D */) {
  NNRT_UNROLL
  for (int k = 0; k < (1 << D); ++k) {
    scalar_t p = cell.weight[0][k & 1];
    NNRT_UNROLL
    for (int d = 1; d < D; ++d) p *= cell.weight[d][(k >> d) & 1];
    w[k] = p;
  }
}

// Interpolated features of one cell: table_level (S, F) -> out (F).
template <int D, int F, typename scalar_t>
HOST_DEVICE inline void hashgrid_interpolate(const HashGridCell<D, scalar_t>& cell,
                                             const scalar_t* table_level, scalar_t* out) {
  scalar_t w[1 << D];
  hashgrid_corner_weights<D, scalar_t>(cell, w);
  scalar_t acc[F];
  NNRT_UNROLL
  for (int f = 0; f < F; ++f) acc[f] = scalar_t(0);
  NNRT_UNROLL
  for (int k = 0; k < (1 << D); ++k) {
    const scalar_t* row = table_level + static_cast<size_t>(cell.row[k]) * F;
    NNRT_UNROLL
    for (int f = 0; f < F; ++f) acc[f] += w[k] * row[f];
  }
  NNRT_UNROLL
  for (int f = 0; f < F; ++f) out[f] = acc[f];
}

// Table gradient of one cell: adds w_k * grad_out (F) to the row of every corner k of
// grad_table_level (S, F) through add(pointer, value): a plain += on CPU, atomicAdd on CUDA.
template <int D, int F, typename scalar_t, typename AddFn>
HOST_DEVICE inline void hashgrid_scatter_grad(const HashGridCell<D, scalar_t>& cell,
                                              const scalar_t* grad_out,
                                              scalar_t* grad_table_level, AddFn add) {
  scalar_t w[1 << D];
  hashgrid_corner_weights<D, scalar_t>(cell, w);
  scalar_t g[F];
  NNRT_UNROLL
  for (int f = 0; f < F; ++f) g[f] = grad_out[f];
  NNRT_UNROLL
  for (int k = 0; k < (1 << D); ++k) {
    scalar_t* row = grad_table_level + static_cast<size_t>(cell.row[k]) * F;
    NNRT_UNROLL
    for (int f = 0; f < F; ++f) add(row + f, w[k] * g[f]);
  }
}

// Input gradient of one cell at a level of resolution R: grad_x (D) = d loss / d x from this
// level, given grad_out (F). With v_k = <grad_out, table row of corner k>,
//   d loss / d x_d = R * (multilinear interpolation over the other D - 1 dimensions of
//                         v_{k with bit d set} - v_{k with bit d clear}),
// which is the derivative of the interpolation in dimension d; zero where the clamp is active.
// Interpolating the differences (2^D - 2 products per dimension) instead of summing
// (D - 1)-fold weight products over the 2^D corners takes 14 instead of 48 products per
// dimension in 4D.
template <int D, int F, typename scalar_t>
HOST_DEVICE inline void hashgrid_input_grad(const HashGridCell<D, scalar_t>& cell,
                                            int32_t resolution, const scalar_t* table_level,
                                            const scalar_t* grad_out, scalar_t* grad_x) {
  scalar_t v[1 << D];
  NNRT_UNROLL
  for (int k = 0; k < (1 << D); ++k) {
    const scalar_t* row = table_level + static_cast<size_t>(cell.row[k]) * F;
    scalar_t s = scalar_t(0);
    NNRT_UNROLL
    for (int f = 0; f < F; ++f) s += grad_out[f] * row[f];
    v[k] = s;
  }
  const scalar_t res = scalar_t(resolution);
  NNRT_UNROLL
  for (int d = 0; d < D; ++d) {
    // u[j]: j enumerates the other dimensions in increasing order (bit m of j is dimension m
    // for m < d and dimension m + 1 above); each entry is the difference across dimension d.
    scalar_t u[1 << (D - 1)];
    NNRT_UNROLL
    for (int j = 0; j < (1 << (D - 1)); ++j) {
      const int low = j & ((1 << d) - 1);
      const int k0 = low | ((j >> d) << (d + 1));
      u[j] = v[k0 | (1 << d)] - v[k0];
    }
    NNRT_UNROLL
    for (int m = D - 2; m >= 0; --m) {
      const int e = m < d ? m : m + 1;
      NNRT_UNROLL
      for (int j = 0; j < (1 << m); ++j)
        u[j] = u[j] * cell.weight[e][0] + u[j + (1 << m)] * cell.weight[e][1];
    }
    grad_x[d] = cell.inside[d] ? u[0] * res : scalar_t(0);
  }
}

// Forward of one point at one level: x (D), table_level (S, F) -> out (F), the level's slice of
// the point's output row.
template <int D, int F, typename scalar_t>
HOST_DEVICE inline void hashgrid_forward_point(const scalar_t* x, const HashGridLevel& level,
                                               uint32_t row_mask, const scalar_t* table_level,
                                               scalar_t* out) {
  HashGridCell<D, scalar_t> cell;
  hashgrid_locate<D, scalar_t>(x, level, row_mask, cell);
  hashgrid_interpolate<D, F, scalar_t>(cell, table_level, out);
}

// Backward of one point at one level: grad_out (F), the level's slice of the point's gradient
// row. Scatters into grad_table_level (S, F) unless it is null, and writes this level's input
// gradient (D values, not accumulated) to grad_x unless it is null.
template <int D, int F, typename scalar_t, typename AddFn>
HOST_DEVICE inline void hashgrid_backward_point(const scalar_t* x, const HashGridLevel& level,
                                                uint32_t row_mask, const scalar_t* table_level,
                                                const scalar_t* grad_out,
                                                scalar_t* grad_table_level, scalar_t* grad_x,
                                                AddFn add) {
  HashGridCell<D, scalar_t> cell;
  hashgrid_locate<D, scalar_t>(x, level, row_mask, cell);
  if (grad_table_level != nullptr)
    hashgrid_scatter_grad<D, F, scalar_t>(cell, grad_out, grad_table_level, add);
  if (grad_x != nullptr)
    hashgrid_input_grad<D, F, scalar_t>(cell, level.resolution, table_level, grad_out, grad_x);
}

// Calls fn(std::integral_constant<int, D>, std::integral_constant<int, F>) for the runtime
// (dim, features), so every launcher instantiates its kernels once per supported pair.
template <typename Fn>
inline void hashgrid_dispatch(int64_t dim, int64_t features, Fn&& fn) {
  auto with_f = [&](auto d_tag) {
    switch (features) {
      case 1: fn(d_tag, std::integral_constant<int, 1>()); return;
      case 2: fn(d_tag, std::integral_constant<int, 2>()); return;
      case 4: fn(d_tag, std::integral_constant<int, 4>()); return;
      case 8: fn(d_tag, std::integral_constant<int, 8>()); return;
      default:
        TORCH_CHECK(false, "hash grid: features per level must be 1, 2, 4 or 8, found ", features);
    }
  };
  switch (dim) {
    case 3: with_f(std::integral_constant<int, 3>()); return;
    case 4: with_f(std::integral_constant<int, 4>()); return;
    default: TORCH_CHECK(false, "hash grid: input dimension must be 3 or 4, found ", dim);
  }
}

// Lookup constants of every level for D-dimensional inputs and a table of `table_size` rows.
inline HashGridLevels make_hashgrid_levels(const std::vector<int64_t>& resolutions, int64_t dim,
                                           int64_t table_size) {
  static const uint32_t kPrimes[4] = {1u, 2654435761u, 805459861u, 3674653429u};
  HashGridLevels levels{};
  levels.num_levels = static_cast<int32_t>(resolutions.size());
  for (size_t l = 0; l < resolutions.size(); ++l) {
    const int64_t res = resolutions[l];
    TORCH_CHECK(res >= 1 && res <= kHashGridMaxResolution, "hash grid: resolutions must be in [1, ",
                kHashGridMaxResolution, "], found ", res, " at level ", l);
    // (res + 1)^dim grid points, counted with an early exit so that it cannot overflow.
    int64_t points = 1;
    bool dense = true;
    for (int64_t d = 0; d < dim && dense; ++d) {
      points *= res + 1;
      dense = points <= table_size;
    }
    HashGridLevel& level = levels.level[l];
    level.resolution = static_cast<int32_t>(res);
    level.hashed = dense ? 0 : 1;
    uint32_t stride = 1;
    for (int d = 0; d < 4; ++d) {
      level.multiplier[d] = dense ? stride : kPrimes[d];
      if (dense && d < dim) stride *= static_cast<uint32_t>(res + 1);
    }
  }
  return levels;
}

at::Tensor HashGridForwardCpu(const at::Tensor& x, const at::Tensor& table,
                              const HashGridLevels& levels);
std::vector<at::Tensor> HashGridBackwardCpu(const at::Tensor& grad_out, const at::Tensor& x,
                                            const at::Tensor& table, const HashGridLevels& levels,
                                            bool need_table_grad, bool need_input_grad);

#ifdef WITH_CUDA
at::Tensor HashGridForwardCuda(const at::Tensor& x, const at::Tensor& table,
                               const HashGridLevels& levels);
std::vector<at::Tensor> HashGridBackwardCuda(const at::Tensor& grad_out, const at::Tensor& x,
                                             const at::Tensor& table, const HashGridLevels& levels,
                                             bool need_table_grad, bool need_input_grad);
#endif

inline void check_hashgrid_inputs(const at::Tensor& x, const at::Tensor& table,
                                  const std::vector<int64_t>& resolutions) {
  TORCH_CHECK(x.dim() == 2 && (x.size(1) == 3 || x.size(1) == 4),
              "hash grid: x must have shape (N, 3) or (N, 4), found ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "hash grid: x must be float32 or float64, found ", x.scalar_type());
  TORCH_CHECK(table.dim() == 3, "hash grid: table must have shape (L, S, F), found ",
              table.sizes());
  TORCH_CHECK(table.scalar_type() == x.scalar_type(), "hash grid: table must have the dtype of x (",
              x.scalar_type(), "), found ", table.scalar_type());
  TORCH_CHECK(table.device() == x.device(), "hash grid: table must be on the device of x (",
              x.device(), "), found ", table.device());
  const int64_t L = table.size(0), S = table.size(1), F = table.size(2);
  TORCH_CHECK(L >= 1 && L <= kHashGridMaxLevels, "hash grid: number of levels must be in [1, ",
              kHashGridMaxLevels, "], found ", L);
  TORCH_CHECK(static_cast<int64_t>(resolutions.size()) == L,
              "hash grid: expected one resolution per table level (", L, "), found ",
              resolutions.size());
  TORCH_CHECK(S >= 1 && S <= kHashGridMaxTableSize && (S & (S - 1)) == 0,
              "hash grid: table rows per level must be a power of two in [1, 2^30], found ", S);
  TORCH_CHECK(F == 1 || F == 2 || F == 4 || F == 8,
              "hash grid: features per level must be 1, 2, 4 or 8, found ", F);
}

// out (N, L * F) = encoding of x (N, D) with table (L, S, F).
inline at::Tensor HashGridForward(const at::Tensor& x, const at::Tensor& table,
                                  const std::vector<int64_t>& resolutions) {
  check_hashgrid_inputs(x, table, resolutions);
  const HashGridLevels levels = make_hashgrid_levels(resolutions, x.size(1), table.size(1));
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    return HashGridForwardCuda(x.contiguous(), table.contiguous(), levels);
#else
    NNRT_NO_CUDA("hashgrid_forward");
#endif
  }
  return HashGridForwardCpu(x.contiguous(), table.contiguous(), levels);
}

// {grad_table (L, S, F), grad_x (N, D)}; a gradient that is not asked for is returned undefined
// (None in Python).
inline std::vector<at::Tensor> HashGridBackward(const at::Tensor& grad_out, const at::Tensor& x,
                                                const at::Tensor& table,
                                                const std::vector<int64_t>& resolutions,
                                                bool need_table_grad, bool need_input_grad) {
  check_hashgrid_inputs(x, table, resolutions);
  const int64_t N = x.size(0), C = table.size(0) * table.size(2);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == N && grad_out.size(1) == C,
              "hash grid: grad_out must have shape (", N, ", ", C, "), found ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(),
              "hash grid: grad_out must have the dtype of x (", x.scalar_type(), "), found ",
              grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == x.device(), "hash grid: grad_out must be on the device of x (",
              x.device(), "), found ", grad_out.device());
  const HashGridLevels levels = make_hashgrid_levels(resolutions, x.size(1), table.size(1));
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    return HashGridBackwardCuda(grad_out.contiguous(), x.contiguous(), table.contiguous(), levels,
                                need_table_grad, need_input_grad);
#else
    NNRT_NO_CUDA("hashgrid_backward");
#endif
  }
  return HashGridBackwardCpu(grad_out.contiguous(), x.contiguous(), table.contiguous(), levels,
                             need_table_grad, need_input_grad);
}

}  // namespace nnrt
