// Helpers shared by every op of the extension.
//
// Per-element math is written once as HOST_DEVICE inline functions in each op's header and
// called from the CPU launcher (at::parallel_for) and the CUDA launcher (a grid-stride loop),
// so the CPU tests exercise the very arithmetic the GPU runs.
#pragma once

#include <torch/extension.h>

#ifndef __CUDACC__
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#endif

#ifdef __CUDACC__
#define HOST_DEVICE __host__ __device__
#else
#define HOST_DEVICE
#endif

#define NNRT_CHECK_CPU(x) TORCH_CHECK(!(x).is_cuda(), #x " must be a CPU tensor")
#define NNRT_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define NNRT_CHECK_DTYPE(x, t) \
  TORCH_CHECK((x).scalar_type() == (t), #x " must have dtype " #t ", found ", (x).scalar_type())
#define NNRT_CHECK_DIM(x, d) \
  TORCH_CHECK((x).dim() == (d), #x " must have ", (d), " dimensions, found shape ", (x).sizes())

// Message for ops routed to CUDA in a build that left the CUDA launchers out.
#define NNRT_NO_CUDA(name)                                                                  \
  TORCH_CHECK(false, name ": this build of nnrt_ext has no CUDA launchers (torch without CUDA " \
                          "or no nvcc at build time); rebuild with NNRT_FORCE_CUDA=1 on a CUDA machine")

#ifndef __CUDACC__
namespace nnrt {

// Runs body(i, workspace) for i in [0, n) on all intra-op threads, handing indices out one at a
// time, so that uneven work per index (Dijkstra from a central vs. a border node, a node with
// many matches vs. few) stays balanced; at::parallel_for alone would give each thread one fixed
// contiguous range. make_workspace() is called once per thread.
template <typename Workspace, typename MakeWorkspace, typename Body>
void DynamicParallelFor(int64_t n, MakeWorkspace make_workspace, Body body) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      Workspace workspace = make_workspace();
      for (int64_t i = next++; i < n; i = next++) body(i, workspace);
    }
  });
}

}  // namespace nnrt
#endif
