// Helpers shared by every op of the extension.
//
// Per-element math is written once as HOST_DEVICE inline functions in each op's header and
// called from the CPU launcher (at::parallel_for) and the CUDA launcher (a grid-stride loop),
// so the CPU tests exercise the very arithmetic the GPU runs.
#pragma once

#include <torch/extension.h>

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
