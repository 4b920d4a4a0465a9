// act_stats launcher: picks the vector width and the grid, returns a Status. See act_stats_kernel.cuh.
#include "cuda/act_stats_kernel.cuh"
#include "cuda/kernels.h"

namespace pyshrink_cuda {
namespace act_stats {
namespace {

// Explicit instantiation list: {float32: VEC 4, 2, 1} and {float16, bfloat16: VEC 8, 4, 2, 1}.
#define PYSHRINK_ACT_STATS_INSTANTIATE(T, VEC) \
  template __global__ void act_stats_kernel<T, VEC>(const T*, int64_t, int, int64_t, double*, double*);

template <typename T, int VEC>
Status launch_vec(const T* x, int64_t rows, int cols, int64_t row_stride, double* acc, double* count,
                  cudaStream_t stream) {
  const int vecs = (cols + VEC - 1) / VEC;  // column vectors per row
  int tx = 1;
  while (tx < 32 && tx < vecs) tx *= 2;     // 32 threads x 16 B = 512 contiguous bytes of a row per warp
  const int ty = kThreads / tx;
  const int64_t gx = (vecs + tx - 1) / tx;
  if (gx > 0x7fffffff) return Status::kTooLarge;

  // Exactly one wave of resident blocks: every block then walks an equal run of rows, which amortises the
  // block reduction and the atomics (3 * C float64 atomics per row-block) and leaves no tail wave.
  int device = 0, sms = 0, per_sm = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
    sms = 108;
    (void)cudaGetLastError();  // a failed query must not be reported as this launch's failure below
  }
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, act_stats_kernel<T, VEC>, kThreads, 0) != cudaSuccess ||
      per_sm <= 0) {
    per_sm = 2;
    (void)cudaGetLastError();
  }
  const int64_t want_blocks = static_cast<int64_t>(sms) * per_sm;
  int64_t gy = (rows + static_cast<int64_t>(ty) * kChunk - 1) / (static_cast<int64_t>(ty) * kChunk);
  int64_t cap = want_blocks / gx;
  if (cap < 1) cap = 1;
  if (gy > cap) gy = cap;
  if (gy > 65535) gy = 65535;
  if (gy < 1) gy = 1;

  act_stats_kernel<T, VEC><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), dim3(tx, ty), 0, stream>>>(
      x, rows, cols, row_stride, acc, count);
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kLaunchFailed;
}

template <typename T>
Status launch_typed(const void* xv, int64_t rows, int cols, int64_t row_stride, double* acc, double* count,
                    cudaStream_t stream) {
  const T* x = static_cast<const T*>(xv);
  // Widest vector that the base pointer, the row stride (in elements) and the channel count all allow.
  const auto fits = [&](int vec) {
    const bool stride_ok = rows <= 1 || row_stride % vec == 0;
    return reinterpret_cast<uintptr_t>(x) % (sizeof(T) * vec) == 0 && cols % vec == 0 && stride_ok;
  };
  constexpr int kMax = 16 / sizeof(T);
  if (fits(kMax)) return launch_vec<T, kMax>(x, rows, cols, row_stride, acc, count, stream);
  if (fits(4)) return launch_vec<T, 4>(x, rows, cols, row_stride, acc, count, stream);
  if (fits(2)) return launch_vec<T, 2>(x, rows, cols, row_stride, acc, count, stream);
  return launch_vec<T, 1>(x, rows, cols, row_stride, acc, count, stream);
}

}  // namespace

PYSHRINK_ACT_STATS_INSTANTIATE(float, 4)
PYSHRINK_ACT_STATS_INSTANTIATE(float, 2)
PYSHRINK_ACT_STATS_INSTANTIATE(float, 1)
PYSHRINK_ACT_STATS_INSTANTIATE(__half, 8)
PYSHRINK_ACT_STATS_INSTANTIATE(__half, 4)
PYSHRINK_ACT_STATS_INSTANTIATE(__half, 2)
PYSHRINK_ACT_STATS_INSTANTIATE(__half, 1)
PYSHRINK_ACT_STATS_INSTANTIATE(__nv_bfloat16, 8)
PYSHRINK_ACT_STATS_INSTANTIATE(__nv_bfloat16, 4)
PYSHRINK_ACT_STATS_INSTANTIATE(__nv_bfloat16, 2)
PYSHRINK_ACT_STATS_INSTANTIATE(__nv_bfloat16, 1)
#undef PYSHRINK_ACT_STATS_INSTANTIATE

}  // namespace act_stats

Status act_stats_launch(const void* x, DType xdt, int64_t rows, int64_t cols, int64_t row_stride, double* acc,
                        double* count, cudaStream_t stream) {
  if (rows < 0 || cols < 0 || row_stride < 0) return Status::kBadShape;  // overlapping rows (stride 0) are fine
  if (cols > 0x7fffffff) return Status::kTooLarge;
  if (rows == 0 || cols == 0) return Status::kOk;  // nothing to read; the binding updates count itself
  const int c = static_cast<int>(cols);
  switch (xdt) {
    case DType::kFloat32: return act_stats::launch_typed<float>(x, rows, c, row_stride, acc, count, stream);
    case DType::kFloat16: return act_stats::launch_typed<__half>(x, rows, c, row_stride, acc, count, stream);
    case DType::kBFloat16:
      return act_stats::launch_typed<__nv_bfloat16>(x, rows, c, row_stride, acc, count, stream);
  }
  return Status::kUnsupportedDType;
}

}  // namespace pyshrink_cuda
