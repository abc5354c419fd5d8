#include <ATen/Parallel.h>

#include "fusion/fusion.h"

namespace nnrt {

void IntegrateWarpedCpu(at::Tensor& tsdf, at::Tensor& weight, at::Tensor& color,
                        const at::Tensor& keys, const at::Tensor& slots, const at::Tensor& candidates,
                        const at::Tensor& nodes, const at::Tensor& rotations,
                        const at::Tensor& translations, const at::Tensor& depth,
                        const at::Tensor& image, const at::Tensor& mask, const FusionParams& p) {
  const int64_t B = keys.size(0);
  const int* k = keys.data_ptr<int>();
  const int64_t* s = slots.data_ptr<int64_t>();
  const int64_t* c = candidates.data_ptr<int64_t>();
  const float *g = nodes.data_ptr<float>(), *R = rotations.data_ptr<float>(),
              *t = translations.data_ptr<float>(), *d = depth.data_ptr<float>(),
              *im = image.data_ptr<float>();
  const bool* m = mask.data_ptr<bool>();
  float *ts = tsdf.data_ptr<float>(), *w = weight.data_ptr<float>(), *col = color.data_ptr<float>();
  at::parallel_for(0, B, 4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int local = 0; local < kBlockVoxels; ++local)
        integrate_voxel(b, local, p, k, s, c, g, R, t, d, im, m, ts, w, col);
  });
}

}  // namespace nnrt
