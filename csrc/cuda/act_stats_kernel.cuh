// act_stats: per-channel sum |x|, sum x, sum x^2 of x [rows, C] in one pass over x. Torch-free device code.
//
// Why this shape:
// * It is purely bandwidth-bound (3 adds per element), so the only job is to stream x at HBM speed:
//   each thread owns VEC consecutive channels and reads them with one 16-byte load per row (VEC = 8 for
//   16-bit inputs, 4 for float32); a warp covers 32 * 16 = 512 contiguous bytes of a row (coalesced), and
//   the block's 256 threads cover TX column-vectors x TY rows. kUnroll rows are loaded before any is
//   used so several 16-byte loads per thread are in flight; the grid is exactly one wave of resident
//   blocks, each walking an equal share of the rows.
// * Precision: the calibration sums run over 10^5+ tokens, so the totals are float64. Doing every add in
//   float64 would run into the FP64 rate on most GPUs (1/32..1/64 of FP32 outside the datacenter parts),
//   so each thread sums kChunk = 16 rows in float32 (error <= 15 * 2^-24 of the chunk's sum of |terms|,
//   independent of the total row count), then adds the chunk into float64 registers. The block reduces
//   its rows in float64 through shared memory and adds into the global accumulators with
//   atomicAdd(double) (sm_60+), so the result is float64-accurate up to the float32 chunk rounding,
//   independently of the number of rows.
// * Rows are strided (row_stride elements apart) so that slices like x[:, :C] of a wider tensor need no
//   copy; the channel dimension must be unit-stride. The launcher picks the widest VEC that the pointer,
//   the row stride and C all allow, down to VEC = 1 for odd shapes.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace pyshrink_cuda {
namespace act_stats {

constexpr int kThreads = 256;
constexpr int kChunk = 16;   // rows summed in float32 before the float64 add
constexpr int kUnroll = 4;   // rows whose loads are issued back to back

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// 16-byte loads bypass L1 (x is read exactly once); narrower vectors use ordinary read-only loads.
template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* p) {
  Vec<T, VEC> out;
  if constexpr (sizeof(T) * VEC == 16) {
    uint4 u;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(u.x), "=r"(u.y), "=r"(u.z), "=r"(u.w)
                 : "l"(p));
    out = *reinterpret_cast<const Vec<T, VEC>*>(&u);
  } else {
    out = *reinterpret_cast<const Vec<T, VEC>*>(p);
  }
  return out;
}

// Grid: x covers column blocks of blockDim.x * VEC channels, y splits the rows; blockDim = (TX, TY) with
// TX * TY == kThreads. Each thread walks rows r = blockIdx.y * TY + ty + i * (gridDim.y * TY).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
act_stats_kernel(const T* __restrict__ x, int64_t rows, int cols, int64_t row_stride, double* __restrict__ acc,
                 double* __restrict__ count) {
  __shared__ double red[kThreads * VEC];  // [TY][TX * VEC], one statistic at a time

  const int tx = threadIdx.x, ty = threadIdx.y;
  const int TX = blockDim.x, TY = blockDim.y;
  const int c0 = (blockIdx.x * TX + tx) * VEC;
  const int64_t rstep = static_cast<int64_t>(gridDim.y) * TY;

  double dabs[VEC], dsum[VEC], dsq[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) dabs[v] = dsum[v] = dsq[v] = 0.0;

  if (c0 < cols) {  // cols % VEC == 0 (launcher), so the whole vector is in range
    for (int64_t rbase = static_cast<int64_t>(blockIdx.y) * TY + ty; rbase < rows; rbase += kChunk * rstep) {
      float fabs_[VEC], fsum[VEC], fsq[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) fabs_[v] = fsum[v] = fsq[v] = 0.f;
#pragma unroll
      for (int j0 = 0; j0 < kChunk; j0 += kUnroll) {
        Vec<T, VEC> buf[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t r = rbase + static_cast<int64_t>(j0 + u) * rstep;
          if (r < rows) {
            buf[u] = load_vec<T, VEC>(x + r * row_stride + c0);
          } else {
            buf[u] = Vec<T, VEC>{};  // all-zero bits; no float -> half conversion (torch builds disable them)
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            const float f = to_float(buf[u].v[v]);
            fabs_[v] += fabsf(f);
            fsum[v] += f;
            fsq[v] = fmaf(f, f, fsq[v]);
          }
        }
      }
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        dabs[v] += static_cast<double>(fabs_[v]);
        dsum[v] += static_cast<double>(fsum[v]);
        dsq[v] += static_cast<double>(fsq[v]);
      }
    }
  }

  // Block reduction over ty, one statistic at a time (16 KB of shared memory instead of 48).
  const int tid = ty * TX + tx;
  const int width = TX * VEC;  // channels this block covers
  const int cblock = blockIdx.x * width;
#pragma unroll
  for (int s = 0; s < 3; ++s) {
    const double* mine = s == 0 ? dabs : (s == 1 ? dsum : dsq);
#pragma unroll
    for (int v = 0; v < VEC; ++v) red[ty * width + tx * VEC + v] = mine[v];
    __syncthreads();
    for (int j = tid; j < width; j += kThreads) {
      if (cblock + j < cols) {
        double tot = 0.0;
        for (int yy = 0; yy < TY; ++yy) tot += red[yy * width + j];
        atomicAdd(acc + static_cast<int64_t>(s) * cols + cblock + j, tot);
      }
    }
    __syncthreads();
  }
  if (blockIdx.x == 0 && blockIdx.y == 0 && tid == 0) atomicAdd(count, static_cast<double>(rows));
}

}  // namespace act_stats
}  // namespace pyshrink_cuda
