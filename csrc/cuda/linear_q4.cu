// linear_q4 / dequantize_q4 entry points: argument checks, Status codes instead of exceptions, and the
// dispatch by activation dtype (the linear_q4 instantiations live in linear_q4_f16.cu / linear_q4_bf16.cu,
// the tile configurations in linear_q4_launch.cuh). The dequantize_q4 instantiation list is below.
// The kernels themselves, and why they look the way they do, are in linear_q4_kernel.cuh.
#include <cstdint>

#include "cuda/kernels.h"
#include "cuda/linear_q4_launch.cuh"

namespace pyshrink_cuda {
namespace q4 {
namespace {

bool aligned(const void* p, uintptr_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; }

}  // namespace
}  // namespace q4

Status linear_q4_launch(const void* x, int64_t x_row_stride, DType xdt, const uint8_t* packed, const float* scales,
                        const uint8_t* zp, const void* bias, DType bias_dt, void* y, int M, int N, int K,
                        int group_size, cudaStream_t stream) {
  using namespace q4;
  if (M < 0 || N < 0 || K <= 0 || (M > 1 && x_row_stride < K)) return Status::kBadShape;
  if (K > (1 << 30)) return Status::kTooLarge;
  if (group_size != 32 && group_size != 64 && group_size != 128) return Status::kUnsupportedGroupSize;
  if (M == 0 || N == 0) return Status::kOk;
  if (!aligned(packed, 16) || !aligned(scales, 4) || (zp && !aligned(zp, 4))) return Status::kMisaligned;

  Args a{};
  a.x = static_cast<const uint16_t*>(x);
  a.ldx = M > 1 ? x_row_stride : K;
  a.packed = packed;
  a.scales = scales;
  a.zp = zp;
  a.bias = bias;
  a.bias_dt = static_cast<int>(bias_dt);
  a.y = y;
  a.M = M;
  a.N = N;
  a.K = K;
  a.nb = (K + group_size - 1) / group_size;
  a.zp_bytes = zp ? static_cast<int64_t>(N) * ((a.nb + 1) / 2) : 0;
  a.x_vec = aligned(x, 16) && K % 8 == 0 && a.ldx % 8 == 0;
  const bool has_zp = zp != nullptr;

  switch (xdt) {
    case DType::kFloat16: return launch_f16(a, group_size, has_zp, stream);
    case DType::kBFloat16: return launch_bf16(a, group_size, has_zp, stream);
    default: break;
  }
  return Status::kUnsupportedDType;  // float32 activations are served by dequantize + cuBLAS in the binding
}

Status dequantize_q4_launch(const uint8_t* packed, const float* scales, const uint8_t* zp, void* out, DType out_dt,
                            int N, int K, int group_size, cudaStream_t stream) {
  using namespace q4;
  if (N < 0 || K < 0) return Status::kBadShape;
  if (K > (1 << 30)) return Status::kTooLarge;
  if (group_size != 32 && group_size != 64 && group_size != 128) return Status::kUnsupportedGroupSize;
  if (N == 0 || K == 0) return Status::kOk;
  if (!aligned(packed, 16)) return Status::kMisaligned;
  const int nb = (K + group_size - 1) / group_size;
  const int64_t chunks = static_cast<int64_t>(N) * nb * (group_size / 32);
  const int64_t blocks = (chunks + 255) / 256;
  if (blocks > 0x7fffffff) return Status::kTooLarge;
  const bool has_zp = zp != nullptr;
  const unsigned grid = static_cast<unsigned>(blocks);

#define PYSHRINK_DQ_CASE(OUT_T, DT, G, ZP)                                                                 \
  if (out_dt == DT && group_size == G && has_zp == ZP) {                                                 \
    const int vec_ok = aligned(out, 16) && (static_cast<int64_t>(K) * sizeof(OUT_T)) % 16 == 0;         \
    dequantize_q4_kernel<OUT_T, G, ZP><<<grid, 256, 0, stream>>>(packed, scales, zp, static_cast<OUT_T*>(out), \
                                                                  N, K, nb, vec_ok);                       \
    return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kLaunchFailed;                      \
  }
  PYSHRINK_DQ_CASE(float, DType::kFloat32, 32, false)
  PYSHRINK_DQ_CASE(float, DType::kFloat32, 32, true)
  PYSHRINK_DQ_CASE(float, DType::kFloat32, 64, false)
  PYSHRINK_DQ_CASE(float, DType::kFloat32, 64, true)
  PYSHRINK_DQ_CASE(float, DType::kFloat32, 128, false)
  PYSHRINK_DQ_CASE(float, DType::kFloat32, 128, true)
  PYSHRINK_DQ_CASE(__half, DType::kFloat16, 32, false)
  PYSHRINK_DQ_CASE(__half, DType::kFloat16, 32, true)
  PYSHRINK_DQ_CASE(__half, DType::kFloat16, 64, false)
  PYSHRINK_DQ_CASE(__half, DType::kFloat16, 64, true)
  PYSHRINK_DQ_CASE(__half, DType::kFloat16, 128, false)
  PYSHRINK_DQ_CASE(__half, DType::kFloat16, 128, true)
  PYSHRINK_DQ_CASE(__nv_bfloat16, DType::kBFloat16, 32, false)
  PYSHRINK_DQ_CASE(__nv_bfloat16, DType::kBFloat16, 32, true)
  PYSHRINK_DQ_CASE(__nv_bfloat16, DType::kBFloat16, 64, false)
  PYSHRINK_DQ_CASE(__nv_bfloat16, DType::kBFloat16, 64, true)
  PYSHRINK_DQ_CASE(__nv_bfloat16, DType::kBFloat16, 128, false)
  PYSHRINK_DQ_CASE(__nv_bfloat16, DType::kBFloat16, 128, true)
#undef PYSHRINK_DQ_CASE
  return Status::kUnsupportedDType;
}

}  // namespace pyshrink_cuda
