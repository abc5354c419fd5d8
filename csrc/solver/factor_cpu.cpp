// In-place Cholesky factorisation of the dense solver's matrix on the CPU (FactorUpperInPlace in
// solver.h), by LAPACK's potrf from the library torch itself links (MKL or OpenBLAS).
//
// Why not torch.linalg.cholesky_ex: it copies the input into a column-major clone and then
// zeroes the other triangle of the factor (tril), which at 6N = 624 cost about half as much
// as the factorisation itself; the dense assembly fills only the upper triangle, so potrf
// on that triangle in place needs neither, nor the assembly's mirror into the lower one.
//
// The LAPACK entry points are declared weak: where the process has none (a torch build without
// LAPACK, or a platform whose torch does not export them), HasLapackFactor() is false and the
// Python side uses torch.linalg.cholesky_ex instead. On Windows they are never looked up.
#include "solver.h"

#if !defined(_WIN32)
extern "C" {
// Fortran LAPACK, LP64 (32-bit integers), as ATen declares them.
void spotrf_(char* uplo, int* n, float* a, int* lda, int* info) __attribute__((weak));
void dpotrf_(char* uplo, int* n, double* a, int* lda, int* info) __attribute__((weak));
}
#endif

namespace nnrt {

namespace {

template <typename scalar_t>
void Potrf(char uplo, int n, scalar_t* a, int* info);

template <>
void Potrf<float>(char uplo, int n, float* a, int* info) {
#if !defined(_WIN32)
  spotrf_(&uplo, &n, a, &n, info);
#endif
}

template <>
void Potrf<double>(char uplo, int n, double* a, int* info) {
#if !defined(_WIN32)
  dpotrf_(&uplo, &n, a, &n, info);
#endif
}

}  // namespace

bool HasLapackFactor() {
#if defined(_WIN32)
  return false;
#else
  return spotrf_ != nullptr && dpotrf_ != nullptr;
#endif
}

at::Tensor FactorUpperInPlaceCpu(at::Tensor A) {
  const int64_t B = A.size(0), D = A.size(1);
  at::Tensor info = at::zeros({B}, A.options().dtype(at::kLong));
  int64_t* info_p = info.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "factor_upper_cpu", [&] {
    scalar_t* Ap = A.data_ptr<scalar_t>();
    // Row-major upper = column-major lower: LAPACK's 'L' factor L (A = L L^T, column-major)
    // is, read row-major, U = L^T with A = U^T U in the upper triangle. One sample at a time;
    // potrf threads internally.
    for (int64_t s = 0; s < B; ++s) {
      int status = 0;
      Potrf<scalar_t>('L', static_cast<int>(D), Ap + s * D * D, &status);
      info_p[s] = status;
    }
  });
  return info;
}

}  // namespace nnrt
