// Warped projective TSDF integration into sparse voxel blocks (docs/DESIGN.md 5.9).
//
// Storage: blocks of 8x8x8 voxels. A block with integer key k holds the voxels whose centres
// are (8 k + l) * voxel_size, l in [0, 8)^3, stored at voxel index l.x + 8 l.y + 64 l.z of its
// slot (the layout of Open3D's VoxelBlockGrid, so marching cubes can run on the same arrays).
//
// Shapes and dtypes (C = slots of storage, B = blocks to integrate, N = nodes):
//   tsdf          (C, 8, 8, 8)     float32  truncated signed distance / truncation, in [-1, 1],
//                                           positive in front of the surface; updated in place
//   weight        (C, 8, 8, 8)     float32  integration weight, capped; updated in place
//   color         (C, 8, 8, 8, 3)  float32  RGB 0..255; updated in place
//   block_keys    (B, 3)           int32    integer block coordinates
//   block_slots   (B,)             int64    slot of each block in tsdf / weight / color
//   candidates    (B, K)           int64    candidate anchor nodes of each block (-1 = none);
//                                           each voxel anchors to its A nearest candidates
//   nodes         (N, 3)           float32  canonical node positions g
//   rotations     (N, 3, 3)        float32  node rotations R (canonical -> live)
//   translations  (N, 3)           float32  node translations t
//   depth         (H, W)           float32  live depth in metres, <= 0 / non-finite = invalid
//   image         (H, W, 3)        float32  live colour 0..255
//   mask          (H, W)           bool     pixels that may be integrated
// A voxel centre x with anchors a_k (Gaussian weights w_k = exp(-|x - g_k|^2 / (2 coverage^2)),
// normalised) moves to x' = sum_k w_k (R_k (x - g_k) + g_k + t_k) (linear blend skinning,
// evaluated as x + sum_k w_k ((R_k - I)(x - g_k) + t_k)), or
// by the normalised blend of the nodes' dual quaternions. x' projects to the nearest pixel u;
// with d = depth(u), sdf = d - x'.z; voxels with sdf < -truncation (occluded), no valid depth,
// outside the mask or whose nearest anchor is farther than max_anchor_distance are left alone;
// otherwise tsdf <- (tsdf w + min(1, sdf / truncation)) / (w + 1), colour likewise,
// w <- min(w + 1, weight_cap).
#pragma once

#include <cmath>

#include "common.h"

namespace nnrt {

constexpr int kBlockResolution = 8;
constexpr int kBlockVoxels = kBlockResolution * kBlockResolution * kBlockResolution;
constexpr int kMaxFusionAnchors = 8;

struct FusionParams {
  float voxel_size, truncation, weight_cap, fx, fy, cx, cy, coverage, max_anchor_distance;
  int H, W, K, num_anchors;
  bool dual_quaternion;
};

// Quaternion (w, x, y, z) of a rotation matrix (row-major), numerically stable branch choice.
HOST_DEVICE inline void rotation_to_quaternion(const float* R, float* q) {
  const float trace = R[0] + R[4] + R[8];
  if (trace > 0) {
    const float s = sqrtf(trace + 1.0f) * 2.0f;
    q[0] = 0.25f * s; q[1] = (R[7] - R[5]) / s; q[2] = (R[2] - R[6]) / s; q[3] = (R[3] - R[1]) / s;
  } else if (R[0] > R[4] && R[0] > R[8]) {
    const float s = sqrtf(1.0f + R[0] - R[4] - R[8]) * 2.0f;
    q[0] = (R[7] - R[5]) / s; q[1] = 0.25f * s; q[2] = (R[1] + R[3]) / s; q[3] = (R[2] + R[6]) / s;
  } else if (R[4] > R[8]) {
    const float s = sqrtf(1.0f + R[4] - R[0] - R[8]) * 2.0f;
    q[0] = (R[2] - R[6]) / s; q[1] = (R[1] + R[3]) / s; q[2] = 0.25f * s; q[3] = (R[5] + R[7]) / s;
  } else {
    const float s = sqrtf(1.0f + R[8] - R[0] - R[4]) * 2.0f;
    q[0] = (R[3] - R[1]) / s; q[1] = (R[2] + R[6]) / s; q[2] = (R[5] + R[7]) / s; q[3] = 0.25f * s;
  }
}

// Quaternion product a * b, (w, x, y, z).
HOST_DEVICE inline void quaternion_multiply(const float* a, const float* b, float* out) {
  out[0] = a[0] * b[0] - a[1] * b[1] - a[2] * b[2] - a[3] * b[3];
  out[1] = a[0] * b[1] + a[1] * b[0] + a[2] * b[3] - a[3] * b[2];
  out[2] = a[0] * b[2] - a[1] * b[3] + a[2] * b[0] + a[3] * b[1];
  out[3] = a[0] * b[3] + a[1] * b[2] - a[2] * b[1] + a[3] * b[0];
}

// Warps x by the blend of its anchors' motions. Node k maps x to R_k x + (g_k + t_k - R_k g_k).
HOST_DEVICE inline void warp_voxel(const float* x, const int64_t* anchors, const float* w, int count,
                                   const float* nodes, const float* rotations,
                                   const float* translations, bool dual_quaternion, float* out) {
  if (!dual_quaternion) {
    // x + sum_k w_k ((R_k - I)(x - g_k) + t_k): the same as sum_k w_k (R_k (x - g_k) + g_k + t_k)
    // for normalised weights, but the identity motion gives x exactly (no rounding through g_k),
    // so the identity warp is exactly rigid integration even at pixel-boundary ties.
    float displacement[3] = {0.0f, 0.0f, 0.0f};
    for (int k = 0; k < count; ++k) {
      const float* g = nodes + 3 * anchors[k];
      const float* R = rotations + 9 * anchors[k];
      const float* t = translations + 3 * anchors[k];
      const float d0 = x[0] - g[0], d1 = x[1] - g[1], d2 = x[2] - g[2];
      for (int i = 0; i < 3; ++i) {
        const float di = i == 0 ? d0 : (i == 1 ? d1 : d2);
        displacement[i] += w[k] * (R[3 * i] * d0 + R[3 * i + 1] * d1 + R[3 * i + 2] * d2 - di + t[i]);
      }
    }
    for (int i = 0; i < 3; ++i) out[i] = x[i] + displacement[i];
    return;
  }
  // Dual quaternion blending: real part q, dual part 0.5 (0, T) q for the translation T.
  float real[4] = {0, 0, 0, 0}, dual[4] = {0, 0, 0, 0}, first[4] = {0, 0, 0, 0};
  for (int k = 0; k < count; ++k) {
    const float* g = nodes + 3 * anchors[k];
    const float* R = rotations + 9 * anchors[k];
    const float* t = translations + 3 * anchors[k];
    float q[4];
    rotation_to_quaternion(R, q);
    if (k == 0) {
      for (int i = 0; i < 4; ++i) first[i] = q[i];
    }
    // q and -q are the same rotation: take the one on the first anchor's side, so the blend
    // does not cancel.
    const float sign = (q[0] * first[0] + q[1] * first[1] + q[2] * first[2] + q[3] * first[3]) < 0 ? -1.0f : 1.0f;
    float T[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int i = 0; i < 3; ++i)
      T[i + 1] = g[i] + t[i] - (R[3 * i] * g[0] + R[3 * i + 1] * g[1] + R[3 * i + 2] * g[2]);
    float d[4];
    quaternion_multiply(T, q, d);
    for (int i = 0; i < 4; ++i) {
      real[i] += sign * w[k] * q[i];
      dual[i] += sign * w[k] * 0.5f * d[i];
    }
  }
  const float norm = sqrtf(real[0] * real[0] + real[1] * real[1] + real[2] * real[2] + real[3] * real[3]);
  for (int i = 0; i < 4; ++i) {
    real[i] /= norm;
    dual[i] /= norm;
  }
  const float a = real[0], b = real[1], c = real[2], e = real[3];
  const float R[9] = {1 - 2 * (c * c + e * e), 2 * (b * c - a * e), 2 * (b * e + a * c),
                      2 * (b * c + a * e), 1 - 2 * (b * b + e * e), 2 * (c * e - a * b),
                      2 * (b * e - a * c), 2 * (c * e + a * b), 1 - 2 * (b * b + c * c)};
  // Translation 2 dual conj(real), vector part.
  const float conj[4] = {real[0], -real[1], -real[2], -real[3]};
  float T[4];
  quaternion_multiply(dual, conj, T);
  for (int i = 0; i < 3; ++i)
    out[i] = R[3 * i] * x[0] + R[3 * i + 1] * x[1] + R[3 * i + 2] * x[2] + 2.0f * T[i + 1];
}

// The A nearest candidates of x (ascending distance) and their normalised Gaussian weights.
// Returns how many anchors were found (0 when the nearest is farther than max_anchor_distance).
HOST_DEVICE inline int voxel_anchors(const float* x, const int64_t* candidates, int K, const float* nodes,
                                     int num_anchors, float coverage, float max_anchor_distance,
                                     int64_t* anchors, float* weights) {
  float d2s[kMaxFusionAnchors];
  int count = 0;
  for (int c = 0; c < K; ++c) {
    const int64_t node = candidates[c];
    if (node < 0) continue;
    const float* g = nodes + 3 * node;
    const float d0 = x[0] - g[0], d1 = x[1] - g[1], d2 = x[2] - g[2];
    const float d = d0 * d0 + d1 * d1 + d2 * d2;
    if (count == num_anchors && !(d < d2s[count - 1])) continue;
    // Insertion into the sorted list; ties keep the earlier candidate first.
    int pos = count < num_anchors ? count : num_anchors - 1;
    while (pos > 0 && d < d2s[pos - 1]) {
      d2s[pos] = d2s[pos - 1];
      anchors[pos] = anchors[pos - 1];
      --pos;
    }
    d2s[pos] = d;
    anchors[pos] = node;
    if (count < num_anchors) ++count;
  }
  if (count == 0 || d2s[0] > max_anchor_distance * max_anchor_distance) return 0;
  float total = 0.0f;
  for (int k = 0; k < count; ++k) {
    weights[k] = expf(-d2s[k] / (2.0f * coverage * coverage));
    total += weights[k];
  }
  if (!(total > 0)) return 0;
  for (int k = 0; k < count; ++k) weights[k] /= total;
  return count;
}

// Integrates voxel `local` (0..511) of block b. Exactly one call writes each voxel, so the CPU
// and CUDA launchers need no atomics.
HOST_DEVICE inline void integrate_voxel(int64_t b, int local, const FusionParams& p, const int* keys,
                                        const int64_t* slots, const int64_t* candidates,
                                        const float* nodes, const float* rotations,
                                        const float* translations, const float* depth,
                                        const float* image, const bool* mask, float* tsdf,
                                        float* weight, float* color) {
  const int lx = local % kBlockResolution, ly = (local / kBlockResolution) % kBlockResolution,
            lz = local / (kBlockResolution * kBlockResolution);
  const float x[3] = {float(keys[3 * b] * kBlockResolution + lx) * p.voxel_size,
                      float(keys[3 * b + 1] * kBlockResolution + ly) * p.voxel_size,
                      float(keys[3 * b + 2] * kBlockResolution + lz) * p.voxel_size};
  int64_t anchors[kMaxFusionAnchors];
  float w[kMaxFusionAnchors];
  const int count = voxel_anchors(x, candidates + b * p.K, p.K, nodes, p.num_anchors, p.coverage,
                                  p.max_anchor_distance, anchors, w);
  if (count == 0) return;
  float y[3];
  warp_voxel(x, anchors, w, count, nodes, rotations, translations, p.dual_quaternion, y);
  if (!(y[2] > 0)) return;
  const float u = p.fx * y[0] / y[2] + p.cx, v = p.fy * y[1] / y[2] + p.cy;
  // Nearest pixel; the comparisons also reject NaN.
  if (!(u >= -0.5f && u < p.W - 0.5f && v >= -0.5f && v < p.H - 0.5f)) return;
  const int ui = static_cast<int>(floorf(u + 0.5f)), vi = static_cast<int>(floorf(v + 0.5f));
  const int pixel = vi * p.W + ui;
  const float d = depth[pixel];
  if (!(d > 0) || !mask[pixel]) return;
  const float sdf = d - y[2];
  if (sdf < -p.truncation) return;
  const float value = fminf(1.0f, sdf / p.truncation);
  const int64_t index = slots[b] * kBlockVoxels + local;
  const float old = weight[index];
  tsdf[index] = (tsdf[index] * old + value) / (old + 1.0f);
  for (int c = 0; c < 3; ++c)
    color[3 * index + c] = (color[3 * index + c] * old + image[3 * pixel + c]) / (old + 1.0f);
  weight[index] = fminf(old + 1.0f, p.weight_cap);
}

void IntegrateWarpedCpu(at::Tensor& tsdf, at::Tensor& weight, at::Tensor& color,
                        const at::Tensor& keys, const at::Tensor& slots, const at::Tensor& candidates,
                        const at::Tensor& nodes, const at::Tensor& rotations,
                        const at::Tensor& translations, const at::Tensor& depth,
                        const at::Tensor& image, const at::Tensor& mask, const FusionParams& p);
#ifdef WITH_CUDA
void IntegrateWarpedCuda(at::Tensor& tsdf, at::Tensor& weight, at::Tensor& color,
                         const at::Tensor& keys, const at::Tensor& slots, const at::Tensor& candidates,
                         const at::Tensor& nodes, const at::Tensor& rotations,
                         const at::Tensor& translations, const at::Tensor& depth,
                         const at::Tensor& image, const at::Tensor& mask, const FusionParams& p);
#endif

inline void CheckFusionTensor(const at::Tensor& x, const char* name, at::ScalarType dtype,
                              const at::Device& device) {
  TORCH_CHECK(x.scalar_type() == dtype, name, " must have dtype ", dtype, ", found ", x.scalar_type());
  TORCH_CHECK(x.device() == device, name, " must be on ", device, ", found ", x.device());
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
}

// In-place warped integration (shapes above). Returns nothing; the three storage tensors change.
inline void IntegrateWarped(at::Tensor tsdf, at::Tensor weight, at::Tensor color, const at::Tensor& keys,
                            const at::Tensor& slots, const at::Tensor& candidates,
                            const at::Tensor& nodes, const at::Tensor& rotations,
                            const at::Tensor& translations, const at::Tensor& depth,
                            const at::Tensor& image, const at::Tensor& mask, double voxel_size,
                            double truncation, double weight_cap, double fx, double fy, double cx,
                            double cy, double coverage, double max_anchor_distance,
                            int64_t num_anchors, bool dual_quaternion) {
  const auto device = tsdf.device();
  const at::Tensor* floats[] = {&tsdf, &weight, &color, &nodes, &rotations, &translations, &depth, &image};
  const char* float_names[] = {"tsdf", "weight", "color", "nodes", "rotations", "translations", "depth", "image"};
  for (int i = 0; i < 8; ++i) CheckFusionTensor(*floats[i], float_names[i], at::kFloat, device);
  CheckFusionTensor(keys, "block_keys", at::kInt, device);
  CheckFusionTensor(slots, "block_slots", at::kLong, device);
  CheckFusionTensor(candidates, "candidates", at::kLong, device);
  CheckFusionTensor(mask, "mask", at::kBool, device);
  const int64_t C = tsdf.size(0), B = keys.size(0), N = nodes.size(0);
  TORCH_CHECK(tsdf.dim() == 4 && tsdf.size(1) == kBlockResolution && tsdf.size(2) == kBlockResolution &&
              tsdf.size(3) == kBlockResolution, "tsdf must be (C, 8, 8, 8), found ", tsdf.sizes());
  TORCH_CHECK(weight.sizes() == tsdf.sizes(), "weight must be (C, 8, 8, 8) like tsdf, found ", weight.sizes());
  TORCH_CHECK(color.dim() == 5 && color.size(0) == C && color.size(4) == 3,
              "color must be (C, 8, 8, 8, 3), found ", color.sizes());
  TORCH_CHECK(keys.dim() == 2 && keys.size(1) == 3, "block_keys must be (B, 3), found ", keys.sizes());
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == B, "block_slots must be (B,), found ", slots.sizes());
  TORCH_CHECK(candidates.dim() == 2 && candidates.size(0) == B, "candidates must be (B, K), found ",
              candidates.sizes());
  TORCH_CHECK(nodes.dim() == 2 && nodes.size(1) == 3, "nodes must be (N, 3), found ", nodes.sizes());
  TORCH_CHECK(rotations.dim() == 3 && rotations.size(0) == N && rotations.size(1) == 3 && rotations.size(2) == 3,
              "rotations must be (N, 3, 3), found ", rotations.sizes());
  TORCH_CHECK(translations.dim() == 2 && translations.size(0) == N && translations.size(1) == 3,
              "translations must be (N, 3), found ", translations.sizes());
  TORCH_CHECK(depth.dim() == 2, "depth must be (H, W), found ", depth.sizes());
  TORCH_CHECK(image.dim() == 3 && image.size(0) == depth.size(0) && image.size(1) == depth.size(1) &&
              image.size(2) == 3, "image must be (H, W, 3) like depth, found ", image.sizes());
  TORCH_CHECK(mask.sizes() == depth.sizes(), "mask must be (H, W) like depth, found ", mask.sizes());
  TORCH_CHECK(num_anchors >= 1 && num_anchors <= kMaxFusionAnchors, "num_anchors must be in [1, ",
              kMaxFusionAnchors, "], found ", num_anchors);
  TORCH_CHECK(truncation > 0 && voxel_size > 0 && coverage > 0 && weight_cap > 0,
              "voxel_size, truncation, coverage and weight_cap must be > 0");
  if (B > 0) {
    const int64_t slot_min = slots.min().item<int64_t>(), slot_max = slots.max().item<int64_t>();
    TORCH_CHECK(slot_min >= 0 && slot_max < C, "block_slots must lie in [0, ", C, "), found [",
                slot_min, ", ", slot_max, "]");
    const int64_t cand_min = candidates.numel() ? candidates.min().item<int64_t>() : -1;
    const int64_t cand_max = candidates.numel() ? candidates.max().item<int64_t>() : -1;
    TORCH_CHECK(cand_min >= -1 && cand_max < N, "candidates must lie in [-1, ", N, "), found [",
                cand_min, ", ", cand_max, "]");
  }
  FusionParams p{float(voxel_size), float(truncation), float(weight_cap), float(fx), float(fy),
                 float(cx), float(cy), float(coverage), float(max_anchor_distance),
                 int(depth.size(0)), int(depth.size(1)), int(candidates.size(1)), int(num_anchors),
                 dual_quaternion};
  if (B == 0) return;
  if (device.is_cuda()) {
#ifdef WITH_CUDA
    IntegrateWarpedCuda(tsdf, weight, color, keys, slots, candidates, nodes, rotations, translations,
                        depth, image, mask, p);
    return;
#else
    NNRT_NO_CUDA("integrate_warped");
#endif
  }
  IntegrateWarpedCpu(tsdf, weight, color, keys, slots, candidates, nodes, rotations, translations,
                     depth, image, mask, p);
}

}  // namespace nnrt
