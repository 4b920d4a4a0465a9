// Host entry points of pyshrink's CUDA kernels: raw pointers, sizes and a stream in, a Status out.
//
// This header is what the torch binding (ops_cuda.cpp) includes; it pulls in no device code and no torch
// header. The definitions live in act_stats.cu and linear_q4.cu, next to their explicit template
// instantiation lists. Nothing here throws or synchronises the stream.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "cuda/status.h"

namespace pyshrink_cuda {

// acc[0, c] += sum_r |x[r, c]|, acc[1, c] += sum_r x[r, c], acc[2, c] += sum_r x[r, c]^2 and
// count[0] += rows, all float64 and in place. x is [rows, cols] with unit stride along cols and
// `row_stride` elements between rows (any value >= 0: rows may overlap, e.g. a broadcast view). acc is
// contiguous [3, cols]. With cols == 0 nothing is launched and count is left alone (the caller adds rows).
Status act_stats_launch(const void* x, DType xdt, int64_t rows, int64_t cols, int64_t row_stride, double* acc,
                        double* count, cudaStream_t stream);

// y[M, N] = x[M, K] @ dequant(W)^T (+ bias), W in the canonical MatMulNBits layout:
//   packed uint8 [N, nb, g/2] (low nibble = even k), scales float32 [N, nb], zp uint8 [N, ceil(nb/2)]
//   or nullptr for symmetric weights (implicit zero point 8), nb = ceil(K / g).
// x and y are float16 or bfloat16 (the same dtype); x has `x_row_stride` elements between rows and unit
// stride along K. bias is nullptr or a [N] vector of dtype `bias_dt` (float32, float16 or bfloat16).
// Accumulation is float32; the per-group scale is applied in float32 (see linear_q4_kernel.cuh).
Status linear_q4_launch(const void* x, int64_t x_row_stride, DType xdt, const uint8_t* packed, const float* scales,
                        const uint8_t* zp, const void* bias, DType bias_dt, void* y, int M, int N, int K,
                        int group_size, cudaStream_t stream);

// out[N, K] = dequant(W) in float32, float16 or bfloat16 (float32 is bit-identical to the reference:
// (q - zp) is exact and the one product with the scale is rounded once).
Status dequantize_q4_launch(const uint8_t* packed, const float* scales, const uint8_t* zp, void* out, DType out_dt,
                            int N, int K, int group_size, cudaStream_t stream);

}  // namespace pyshrink_cuda
