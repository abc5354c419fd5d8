#include <ATen/Parallel.h>

#include "image/image.h"

namespace nnrt {

at::Tensor BackprojectDepthCpu(const at::Tensor& depth, double fx, double fy, double cx, double cy,
                               double max_depth) {
  const int H = depth.size(0), W = depth.size(1);
  at::Tensor points = at::empty({H, W, 3}, depth.options());
  AT_DISPATCH_FLOATING_TYPES(depth.scalar_type(), "backproject_depth_cpu", [&] {
    const scalar_t* z = depth.data_ptr<scalar_t>();
    scalar_t* out = points.data_ptr<scalar_t>();
    at::parallel_for(0, H, 16, [&](int64_t begin, int64_t end) {
      for (int64_t y = begin; y < end; ++y)
        for (int x = 0; x < W; ++x)
          backproject_pixel<scalar_t>(z[y * W + x], x, y, fx, fy, cx, cy, max_depth,
                                      out + 3 * (y * W + x));
    });
  });
  return points;
}

at::Tensor DepthBoundaryMaskCpu(const at::Tensor& points, int64_t radius, double max_distance) {
  const int H = points.size(0), W = points.size(1);
  at::Tensor mask = at::empty({H, W}, points.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "depth_boundary_mask_cpu", [&] {
    const scalar_t* p = points.data_ptr<scalar_t>();
    bool* out = mask.data_ptr<bool>();
    const scalar_t d2 = scalar_t(max_distance * max_distance);
    at::parallel_for(0, H, 16, [&](int64_t begin, int64_t end) {
      for (int64_t y = begin; y < end; ++y)
        for (int x = 0; x < W; ++x)
          out[y * W + x] = is_boundary_pixel<scalar_t>(p, H, W, x, y, radius, d2);
    });
  });
  return mask;
}

namespace {

inline float dist3(const float* a, const float* b) {
  const float d0 = a[0] - b[0], d1 = a[1] - b[1], d2 = a[2] - b[2];
  return std::sqrt(d0 * d0 + d1 * d1 + d2 * d2);
}

}  // namespace

// Two triangles per 2x2 block: (00, 01, 10) and (11, 10, 01), where 00 is pixel (x, y), 01 is
// (x, y+1) and 10 is (x+1, y), wound so that normals face the camera. A triangle is kept when its
// corners are valid and its three edges are at most max_edge_length long.
std::vector<at::Tensor> MeshFromDepthCpu(const at::Tensor& points, double max_edge_length) {
  const int H = points.size(0), W = points.size(1);
  const float* p = points.data_ptr<float>();
  const float max_edge = static_cast<float>(max_edge_length);
  auto valid = [&](int idx) { return p[3 * idx + 2] > 0; };

  // Pass 1 (parallel over block rows): which of the two triangles of each block exist.
  std::vector<uint8_t> tri(std::max(0, (H - 1) * (W - 1)), 0);
  at::parallel_for(0, std::max(0, H - 1), 8, [&](int64_t begin, int64_t end) {
    for (int64_t y = begin; y < end; ++y) {
      for (int x = 0; x + 1 < W; ++x) {
        const int i00 = y * W + x, i01 = (y + 1) * W + x, i10 = y * W + x + 1, i11 = i01 + 1;
        uint8_t flags = 0;
        if (valid(i00) && valid(i01) && valid(i10) && dist3(p + 3 * i00, p + 3 * i01) <= max_edge &&
            dist3(p + 3 * i00, p + 3 * i10) <= max_edge && dist3(p + 3 * i01, p + 3 * i10) <= max_edge)
          flags |= 1;
        if (valid(i11) && valid(i01) && valid(i10) && dist3(p + 3 * i11, p + 3 * i01) <= max_edge &&
            dist3(p + 3 * i11, p + 3 * i10) <= max_edge && dist3(p + 3 * i01, p + 3 * i10) <= max_edge)
          flags |= 2;
        tri[y * (W - 1) + x] = flags;
      }
    }
  });

  // Pass 2: a pixel is a vertex when a kept triangle touches it. Pixel (x, y) is corner 00 of
  // block (x, y) [tri 1], 10 of block (x-1, y) [both], 01 of block (x, y-1) [both] and 11 of
  // block (x-1, y-1) [tri 2].
  auto block = [&](int bx, int by) -> uint8_t {
    if (bx < 0 || by < 0 || bx >= W - 1 || by >= H - 1) return 0;
    return tri[by * (W - 1) + bx];
  };
  std::vector<int32_t> vertex_of_pixel(static_cast<size_t>(H) * W, -1);
  int32_t num_vertices = 0;
  for (int y = 0; y < H; ++y) {
    for (int x = 0; x < W; ++x) {
      const bool used = (block(x, y) & 1) || block(x - 1, y) || block(x, y - 1) ||
                        (block(x - 1, y - 1) & 2);
      if (used) vertex_of_pixel[y * W + x] = num_vertices++;
    }
  }

  // Faces are numbered row by row, so a prefix sum over rows lets rows fill in parallel.
  std::vector<int64_t> row_offset(std::max(1, H), 0);
  for (int y = 0; y + 1 < H; ++y) {
    int64_t count = 0;
    for (int x = 0; x + 1 < W; ++x) {
      const uint8_t f = tri[y * (W - 1) + x];
      count += (f & 1) + ((f >> 1) & 1);
    }
    row_offset[y + 1] = row_offset[y] + count;
  }
  const int64_t num_faces = H > 1 ? row_offset[H - 1] : 0;

  at::Tensor vertices = at::empty({num_vertices, 3}, points.options());
  at::Tensor vertex_pixels = at::empty({num_vertices, 2}, points.options().dtype(at::kInt));
  at::Tensor faces = at::empty({num_faces, 3}, points.options().dtype(at::kInt));
  float* v = vertices.data_ptr<float>();
  int32_t* vp = vertex_pixels.data_ptr<int32_t>();
  int32_t* f = faces.data_ptr<int32_t>();

  at::parallel_for(0, static_cast<int64_t>(H) * W, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int32_t id = vertex_of_pixel[i];
      if (id < 0) continue;
      v[3 * id] = p[3 * i];
      v[3 * id + 1] = p[3 * i + 1];
      v[3 * id + 2] = p[3 * i + 2];
      vp[2 * id] = static_cast<int32_t>(i % W);
      vp[2 * id + 1] = static_cast<int32_t>(i / W);
    }
  });
  at::parallel_for(0, std::max(0, H - 1), 8, [&](int64_t begin, int64_t end) {
    for (int64_t y = begin; y < end; ++y) {
      int64_t out = row_offset[y];
      for (int x = 0; x + 1 < W; ++x) {
        const uint8_t flags = tri[y * (W - 1) + x];
        const int i00 = y * W + x, i01 = (y + 1) * W + x, i10 = y * W + x + 1, i11 = i01 + 1;
        if (flags & 1) {
          f[3 * out] = vertex_of_pixel[i00];
          f[3 * out + 1] = vertex_of_pixel[i01];
          f[3 * out + 2] = vertex_of_pixel[i10];
          ++out;
        }
        if (flags & 2) {
          f[3 * out] = vertex_of_pixel[i11];
          f[3 * out + 1] = vertex_of_pixel[i10];
          f[3 * out + 2] = vertex_of_pixel[i01];
          ++out;
        }
      }
    }
  });
  return {vertices, vertex_pixels, faces};
}

}  // namespace nnrt
