#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "image/image.h"

namespace nnrt {
namespace {

template <typename scalar_t>
__global__ void BackprojectDepthKernel(const scalar_t* __restrict__ depth, int H, int W, scalar_t fx,
                                       scalar_t fy, scalar_t cx, scalar_t cy, scalar_t max_depth,
                                       scalar_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < int64_t(H) * W;
       i += int64_t(blockDim.x) * gridDim.x) {
    backproject_pixel<scalar_t>(depth[i], int(i % W), int(i / W), fx, fy, cx, cy, max_depth,
                                out + 3 * i);
  }
}

template <typename scalar_t>
__global__ void DepthBoundaryMaskKernel(const scalar_t* __restrict__ points, int H, int W, int radius,
                                        scalar_t max_distance2, bool* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < int64_t(H) * W;
       i += int64_t(blockDim.x) * gridDim.x) {
    out[i] = is_boundary_pixel<scalar_t>(points, H, W, int(i % W), int(i / W), radius, max_distance2);
  }
}

inline int NumBlocks(int64_t n, int threads) {
  return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535));
}

}  // namespace

at::Tensor BackprojectDepthCuda(const at::Tensor& depth, double fx, double fy, double cx, double cy,
                                double max_depth) {
  at::cuda::CUDAGuard guard(depth.device());
  const int H = depth.size(0), W = depth.size(1);
  at::Tensor points = at::empty({H, W, 3}, depth.options());
  if (depth.numel() == 0) return points;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(depth.scalar_type(), "backproject_depth_cuda", [&] {
    BackprojectDepthKernel<scalar_t><<<NumBlocks(depth.numel(), 256), 256, 0, stream>>>(
        depth.data_ptr<scalar_t>(), H, W, fx, fy, cx, cy, max_depth, points.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return points;
}

at::Tensor DepthBoundaryMaskCuda(const at::Tensor& points, int64_t radius, double max_distance) {
  at::cuda::CUDAGuard guard(points.device());
  const int H = points.size(0), W = points.size(1);
  at::Tensor mask = at::empty({H, W}, points.options().dtype(at::kBool));
  if (mask.numel() == 0) return mask;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "depth_boundary_mask_cuda", [&] {
    DepthBoundaryMaskKernel<scalar_t><<<NumBlocks(mask.numel(), 256), 256, 0, stream>>>(
        points.data_ptr<scalar_t>(), H, W, static_cast<int>(radius),
        static_cast<scalar_t>(max_distance * max_distance), mask.data_ptr<bool>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

}  // namespace nnrt
