// linear_q4 launch machinery shared by the per-dtype translation units (linear_q4_f16.cu,
// linear_q4_bf16.cu): the tile configurations, the shared-memory opt-in and the choice of configuration by
// M. Splitting the instantiations by dtype halves the wall time of a parallel build. Torch-free.
#pragma once

#include <atomic>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "cuda/linear_q4_kernel.cuh"
#include "cuda/status.h"

namespace pyshrink_cuda {
namespace q4 {

// Tile configurations <BN, BM, BK, WN, WM, WK, STAGES> (first choices from the arithmetic below, to be
// tuned with bench/cuda_kernels.py on the target GPU):
//
// * Small (M <= 8, decode): 16 weight rows x 8 activation rows per block, 4 warps splitting each 512-k
//   tile. N = 4096 gives 256 blocks and N = 8192 gives 512, so every SM streams weights; a stage holds
//   16 x 256 B of weights, and with 3 stages in flight and ~4 resident blocks an SM keeps ~48 KB of loads
//   outstanding, about what H100 needs to run at full HBM bandwidth (3.35 TB/s x ~0.7 us / 132 SMs).
// * Mid (M <= 32): 32 x 32 tiles, 2 warps along N x 2 along K; still memory-bound, x is re-read from L2 by
//   every block, so the weight tile is wider than in the small case.
// * Large (M > 32): 128 x 64 tiles, 2 x 2 warps of 64 x 32, no split-K, 3 stages; compute-bound, so
//   dequantization (per 16 weight rows and span) is amortised over 4 activation tiles.
using CfgSmall = Cfg<16, 8, 512, 1, 1, 4, 4>;
using CfgMid = Cfg<32, 32, 256, 2, 1, 2, 4>;
using CfgLarge = Cfg<128, 64, 128, 2, 2, 1, 3>;

constexpr int kMaxDevices = 64;

inline bool device_smem_limit(int* device, int* limit) {
  if (cudaGetDevice(device) != cudaSuccess || *device < 0 || *device >= kMaxDevices) return false;
  static std::atomic<int> cached[kMaxDevices];  // 0 = not read yet
  int v = cached[*device].load(std::memory_order_relaxed);
  if (v == 0) {
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, *device) != cudaSuccess || v <= 0) {
      (void)cudaGetLastError();  // reported through the status; left pending, the next op's check would blame itself
      return false;
    }
    cached[*device].store(v, std::memory_order_relaxed);
  }
  *limit = v;
  return true;
}

template <typename T, int G, bool HAS_ZP, class C>
Status launch_cfg(Args a, cudaStream_t stream) {
  using L = Smem<C, G, HAS_ZP>;
  a.x_rows = a.M < C::BM ? a.M : C::BM;
  const int64_t m_tiles = (static_cast<int64_t>(a.M) + C::BM - 1) / C::BM;
  const int64_t n_tiles = (static_cast<int64_t>(a.N) + C::BN - 1) / C::BN;
  if (m_tiles > 0x7fffffff || n_tiles > 65535) return Status::kTooLarge;

  const int smem = L::total_bytes(a.x_rows);
  int device = 0, limit = 0;
  if (!device_smem_limit(&device, &limit)) return Status::kLaunchFailed;
  if (smem > limit) return Status::kTooLarge;
  auto kernel = linear_q4_mma_kernel<T, G, HAS_ZP, C>;
  if (smem > 48 * 1024) {
    // Opt in to more than 48 KB of dynamic shared memory, once per kernel and device (and again only if a
    // larger M asks for more).
    static std::atomic<int> opted[kMaxDevices];
    if (opted[device].load(std::memory_order_relaxed) < smem) {
      if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess) {
        (void)cudaGetLastError();
        return Status::kLaunchFailed;
      }
      opted[device].store(smem, std::memory_order_relaxed);
    }
  }
  kernel<<<dim3(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles)), C::THREADS, smem, stream>>>(a);
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kLaunchFailed;
}

template <typename T, int G, bool HAS_ZP>
Status launch_by_m(const Args& a, cudaStream_t stream) {
  if (a.M <= CfgSmall::BM) return launch_cfg<T, G, HAS_ZP, CfgSmall>(a, stream);
  if (a.M <= CfgMid::BM) return launch_cfg<T, G, HAS_ZP, CfgMid>(a, stream);
  return launch_cfg<T, G, HAS_ZP, CfgLarge>(a, stream);
}

// The explicit list of supported (group size x zero points) combinations for activations of type T, each
// expanding to the three tile configurations above.
template <typename T>
Status launch_any_group(const Args& a, int group_size, bool has_zp, cudaStream_t stream) {
  switch (group_size) {
    case 32: return has_zp ? launch_by_m<T, 32, true>(a, stream) : launch_by_m<T, 32, false>(a, stream);
    case 64: return has_zp ? launch_by_m<T, 64, true>(a, stream) : launch_by_m<T, 64, false>(a, stream);
    case 128: return has_zp ? launch_by_m<T, 128, true>(a, stream) : launch_by_m<T, 128, false>(a, stream);
    default: return Status::kUnsupportedGroupSize;
  }
}

// One per activation dtype, each instantiating launch_any_group (18 kernels) in its own .cu, so that nvcc
// compiles the two dtypes in two processes.
Status launch_f16(const Args& a, int group_size, bool has_zp, cudaStream_t stream);
Status launch_bf16(const Args& a, int group_size, bool has_zp, cudaStream_t stream);

}  // namespace q4
}  // namespace pyshrink_cuda
