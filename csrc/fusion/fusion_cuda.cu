#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "fusion/fusion.h"

namespace nnrt {
namespace {

__global__ void IntegrateWarpedKernel(int64_t B, FusionParams p, const int* __restrict__ keys,
                                      const int64_t* __restrict__ slots,
                                      const int64_t* __restrict__ candidates,
                                      const float* __restrict__ nodes, const float* __restrict__ rotations,
                                      const float* __restrict__ translations,
                                      const float* __restrict__ depth, const float* __restrict__ image,
                                      const bool* __restrict__ mask, float* tsdf, float* weight,
                                      float* color) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < B * kBlockVoxels;
       i += int64_t(blockDim.x) * gridDim.x) {
    integrate_voxel(i / kBlockVoxels, int(i % kBlockVoxels), p, keys, slots, candidates, nodes,
                    rotations, translations, depth, image, mask, tsdf, weight, color);
  }
}

}  // namespace

void IntegrateWarpedCuda(at::Tensor& tsdf, at::Tensor& weight, at::Tensor& color,
                         const at::Tensor& keys, const at::Tensor& slots, const at::Tensor& candidates,
                         const at::Tensor& nodes, const at::Tensor& rotations,
                         const at::Tensor& translations, const at::Tensor& depth,
                         const at::Tensor& image, const at::Tensor& mask, const FusionParams& p) {
  at::cuda::CUDAGuard guard(tsdf.device());
  const int64_t B = keys.size(0);
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((B * kBlockVoxels + threads - 1) / threads, 65535));
  IntegrateWarpedKernel<<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      B, p, keys.data_ptr<int>(), slots.data_ptr<int64_t>(), candidates.data_ptr<int64_t>(),
      nodes.data_ptr<float>(), rotations.data_ptr<float>(), translations.data_ptr<float>(),
      depth.data_ptr<float>(), image.data_ptr<float>(), mask.data_ptr<bool>(),
      tsdf.data_ptr<float>(), weight.data_ptr<float>(), color.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace nnrt
