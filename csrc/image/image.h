// Image processing on depth frames: back-projection, depth-boundary mask, mesh from depth.
//
// Shapes and dtypes (row-major, pixel (x, y) = column x, row y; camera x right, y down, z forward):
//   depth          (H, W)     float32/float64, metres, <= 0 or non-finite = invalid
//   points         (H, W, 3)  same dtype as depth; invalid pixels are (0, 0, 0)
//   boundary mask  (H, W)     bool
//   vertices       (V, 3)     float32, one per pixel that belongs to a face, row-major pixel order
//   vertex_pixels  (V, 2)     int32 (x, y)
//   faces          (F, 3)     int32 vertex indices, normals towards the camera
//
// backproject_depth and depth_boundary_mask have CPU and CUDA launchers that share the
// per-pixel functions below; mesh_from_depth has a variable-size output and runs on CPU.
#pragma once

#include <cmath>

#include "common.h"

namespace nnrt {

template <typename scalar_t>
HOST_DEVICE inline void backproject_pixel(scalar_t z, int x, int y, scalar_t fx, scalar_t fy,
                                          scalar_t cx, scalar_t cy, scalar_t max_depth,
                                          scalar_t* out) {
  // Written as negated comparisons so that NaN and +inf depths are rejected too.
  if (!(z > 0) || !(z <= max_depth)) {
    out[0] = out[1] = out[2] = scalar_t(0);
    return;
  }
  out[0] = z * (scalar_t(x) - cx) / fx;
  out[1] = z * (scalar_t(y) - cy) / fy;
  out[2] = z;
}

// A valid pixel is on a depth boundary when a pixel within `radius` (Chebyshev) is invalid,
// outside the image, or farther than sqrt(max_distance2) in 3D. Invalid pixels are not boundary.
template <typename scalar_t>
HOST_DEVICE inline bool is_boundary_pixel(const scalar_t* points, int H, int W, int x, int y,
                                          int radius, scalar_t max_distance2) {
  const scalar_t* p = points + 3 * (y * W + x);
  if (!(p[2] > 0)) return false;
  for (int dy = -radius; dy <= radius; ++dy) {
    for (int dx = -radius; dx <= radius; ++dx) {
      const int xx = x + dx, yy = y + dy;
      if (xx < 0 || yy < 0 || xx >= W || yy >= H) return true;
      const scalar_t* q = points + 3 * (yy * W + xx);
      if (!(q[2] > 0)) return true;
      const scalar_t d0 = p[0] - q[0], d1 = p[1] - q[1], d2 = p[2] - q[2];
      if (d0 * d0 + d1 * d1 + d2 * d2 > max_distance2) return true;
    }
  }
  return false;
}

at::Tensor BackprojectDepthCpu(const at::Tensor& depth, double fx, double fy, double cx, double cy,
                               double max_depth);
at::Tensor DepthBoundaryMaskCpu(const at::Tensor& points, int64_t radius, double max_distance);
std::vector<at::Tensor> MeshFromDepthCpu(const at::Tensor& points, double max_edge_length);

#ifdef WITH_CUDA
at::Tensor BackprojectDepthCuda(const at::Tensor& depth, double fx, double fy, double cx, double cy,
                                double max_depth);
at::Tensor DepthBoundaryMaskCuda(const at::Tensor& points, int64_t radius, double max_distance);
#endif

inline at::Tensor BackprojectDepth(const at::Tensor& depth, double fx, double fy, double cx,
                                   double cy, double max_depth) {
  NNRT_CHECK_DIM(depth, 2);
  TORCH_CHECK(depth.is_floating_point(), "depth must be floating point, found ", depth.scalar_type());
  if (depth.is_cuda()) {
#ifdef WITH_CUDA
    return BackprojectDepthCuda(depth.contiguous(), fx, fy, cx, cy, max_depth);
#else
    NNRT_NO_CUDA("backproject_depth");
#endif
  }
  return BackprojectDepthCpu(depth.contiguous(), fx, fy, cx, cy, max_depth);
}

inline at::Tensor DepthBoundaryMask(const at::Tensor& points, int64_t radius, double max_distance) {
  NNRT_CHECK_DIM(points, 3);
  TORCH_CHECK(points.size(2) == 3, "points must be (H, W, 3), found ", points.sizes());
  TORCH_CHECK(radius >= 0, "radius must be >= 0");
  if (points.is_cuda()) {
#ifdef WITH_CUDA
    return DepthBoundaryMaskCuda(points.contiguous(), radius, max_distance);
#else
    NNRT_NO_CUDA("depth_boundary_mask");
#endif
  }
  return DepthBoundaryMaskCpu(points.contiguous(), radius, max_distance);
}

inline std::vector<at::Tensor> MeshFromDepth(const at::Tensor& points, double max_edge_length) {
  NNRT_CHECK_CPU(points);
  NNRT_CHECK_DIM(points, 3);
  TORCH_CHECK(points.size(2) == 3, "points must be (H, W, 3), found ", points.sizes());
  return MeshFromDepthCpu(points.to(at::kFloat).contiguous(), max_edge_length);
}

}  // namespace nnrt
