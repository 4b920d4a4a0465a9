// linear_q4: y[M, N] = x[M, K] @ dequant(W)^T (+ bias) straight from the canonical MatMulNBits layout.
// Torch-free device code; the launcher and the explicit instantiation list are in linear_q4.cu.
//
// Layout read (no repacking): packed uint8 [N, nb, g/2], byte j of a group = (k=2j low nibble, k=2j+1 high
// nibble); so a weight row is Kp/2 contiguous bytes (Kp = nb*g), and a little-endian 32-bit word holds 8
// consecutive k in its 8 nibbles, k0+i in nibble i. Every 16-byte chunk of a row is 32 consecutive k of
// one group (g >= 32), which is what makes 16-byte loads and per-group scales line up.
//
// ONE kernel template serves both the GEMV case (M = 1..8) and the GEMM case; they differ in the tile
// configuration only (see the Cfg list in linear_q4.cu):
//
// * Tensor cores for every M: mma.sync m16n8k16 (fp16 or bf16 in, fp32 accumulate), "swapped" so that
//   the weights are the 16-row A operand and the activations the 8-column B operand: y^T = W x^T. With
//   M = 1..8 the 8-wide n dimension of the mma is the batch, so a decode step wastes at most 7/8 of the
//   tensor-core work but none of the memory traffic, and the per-element work on the CUDA cores is the
//   dequantization alone (no per-M FMAs): it is the same arithmetic whatever M is, which is why GEMV and
//   GEMM share the code. (A CUDA-core GEMV needs M fp32 FMAs per weight and runs out of issue slots near
//   M = 8 on H100; this one does not.)
//
// * Exact integers in the tensor cores, scales in fp32: the A operand is (q - zp) as fp16/bf16, exact
//   (|q - zp| <= 15), x is taken as is, so every product is exact and the mma sums them in fp32. The
//   group's fp32 scale multiplies the fp32 partial sum of that group: acc += scale * mma(q - zp, x).
//   Folding the scale into the fp16/bf16 weights (Marlin) would round every weight to 11 (8) bits.
//
// * Dequantization trick (FasterTransformer / Marlin): OR a 4-bit code into the mantissa of a magic
//   number and subtract. fp16: (q | 0x6400) is the half 1024 + q, so (q | 0x6400) - (1024 + zp) = q - zp,
//   two codes per 32-bit register with one lop3; the codes in bits 4..7 give 1024 + 16q, fixed by an fma
//   with 1/16 and -(64 + zp). bf16 (7 mantissa bits): (q | 0x4300) = 128 + q, one shift per code pair.
//   One 32-bit word of 8 codes becomes four half2/bfloat162 registers holding the k pairs
//   (0,4), (1,5), (2,6), (3,7) (relative to the word's first k).
//
// * The k permutation that makes that free: an mma only needs A and B to agree on which k each register
//   lane holds, not that the k be in memory order. Thread (group g = lane/4, t = lane%4) of a warp takes
//   word t of a row's 16-byte chunk (k = 8t..8t+7 of a 32-k "span") through ldmatrix, and its B registers
//   from the 16 bytes x[m, 8t..8t+7] of the same span, permuted with 4 byte_perms into the same pairs.
//   Two mma steps consume one span: step 0 takes pairs (0,4),(1,5), step 1 pairs (2,6),(3,7). So a span
//   (32 k, one group) costs per 16 weight rows one ldmatrix.x2, 2 x (lop3 x4 + 4 half ops) and 2 mma.
//
// * Pipelining (Ampere-style): a k-tile of BK weights per row is moved global -> shared with cp.async
//   (16 B, L1 bypassed), STAGES - 1 tiles in flight ahead of the one being multiplied, one
//   __syncthreads per tile. Scales (and zero points) of the tile travel in the same cp.async groups. (An
//   L2 evict_first hint on the weight copies, cp.async...L2::cache_hint with a createpolicy descriptor,
//   raised "illegal instruction" on an H100 with CUDA 13.0 / driver 580 under compute-sanitizer, so the
//   copies carry no hint.)
//   Rows of shared memory are padded so that ldmatrix (16-byte rows, stride = 16 mod 128 B) and the
//   16-byte x loads (2 rows per quarter-warp, stride = 64 mod 128 B) hit distinct banks.
//
// * Split-K inside the block for small M (WK warps take interleaved quarters of each k-tile and reduce
//   through shared memory at the end), so that a block can own only 16 weight rows and N = 4096 still
//   gives 256 blocks; the GEMM configuration uses WK = 1 and bigger warp tiles instead.
//
// * Zero points are nibbles in [N, ceil(nb/2)] bytes, rarely 4-byte aligned per row: the loader copies
//   the aligned 32-bit words that contain the tile's bytes with 4-byte cp.async (the tensor's last word,
//   if partial, byte by byte, so nothing past the tensor is read), and the compute step picks the nibble
//   out.
//
// Padding semantics: x has K columns; columns K..Kp-1 are read as zeros (zero-filled cp.async), so
// whatever the padded codes hold multiplies zero. Weight rows >= N and x rows >= M are never stored.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace pyshrink_cuda {
namespace q4 {

// ------------------------------------------------------------------------------------------------------
// Tile configuration. BN weight rows x BM activation rows per block, BK k per pipeline stage.
// Warps: WN along N, WM along M, WK along K (split-K inside the block). Each warp owns NT 16-row A tiles
// and MT 8-row B tiles.
template <int BN_, int BM_, int BK_, int WN_, int WM_, int WK_, int STAGES_>
struct Cfg {
  static constexpr int BN = BN_, BM = BM_, BK = BK_, WN = WN_, WM = WM_, WK = WK_, STAGES = STAGES_;
  static constexpr int WARPS = WN * WM * WK;
  static constexpr int THREADS = 32 * WARPS;
  static constexpr int NT = BN / (16 * WN);
  static constexpr int MT = BM / (8 * WM);
  static constexpr int SPANS = BK / 32;  // 32-k spans per k-tile (one 16-byte chunk per weight row)
  static constexpr int SPW = SPANS / WK; // spans per warp per k-tile
  static_assert(NT >= 1 && NT * 16 * WN == BN, "BN must split into 16-row tiles per warp");
  static_assert(MT >= 1 && MT * 8 * WM == BM, "BM must split into 8-row tiles per warp");
  static_assert(SPW >= 1 && SPW * WK == SPANS, "BK must split evenly across the K warps");
  static_assert(STAGES >= 2, "need at least double buffering");
};

// Shared-memory layout of one pipeline stage (bytes). The x region is last because its row count is a
// launch-time value (min(BM, M) rows are allocated: a decode step needs 1 row, not 8).
template <class C, int G, bool HAS_ZP>
struct Smem {
  static constexpr int GT = C::BK / G;                          // groups per k-tile
  static constexpr int W_ROW = C::BK / 2 + 16;                  // bytes; 16 mod 128 -> ldmatrix conflict-free
  static constexpr int X_ROW = C::BK * 2 + 64;                  // bytes; 64 mod 128 -> 16-B loads conflict-free
  static constexpr int S_ROW = GT + 1;                          // floats; odd stride spreads the rows
  static constexpr int ZW = HAS_ZP ? GT / 8 + 2 : 0;            // 32-bit words of zero points per row
  static constexpr int round16(int b) { return (b + 15) / 16 * 16; }
  static constexpr int W_OFF = 0;
  static constexpr int S_OFF = W_OFF + round16(C::BN * W_ROW);
  static constexpr int Z_OFF = S_OFF + round16(C::BN * S_ROW * 4);
  static constexpr int X_OFF = Z_OFF + round16(C::BN * ZW * 4);
  static constexpr int FIXED = X_OFF;                           // stage bytes before the x rows
  static constexpr int RED = (C::WK - 1) * C::WN * C::WM * C::NT * C::MT * 4 * 32 * 4;  // split-K reduction
  static __host__ __device__ constexpr int stage_bytes(int x_rows) { return FIXED + x_rows * X_ROW; }
  static __host__ __device__ constexpr int total_bytes(int x_rows) {
    return stage_bytes(x_rows) * C::STAGES > RED ? stage_bytes(x_rows) * C::STAGES : RED;
  }
};

// ------------------------------------------------------------------------------------------------------
// PTX helpers

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Two 8x8 b16 matrices: thread (g = lane/4, t = lane%4) gets 32-bit word t of row g of each. Lanes 0-7
// address the rows of matrix 0, lanes 8-15 those of matrix 1.
__device__ __forceinline__ void ldsm_x2(uint32_t& r0, uint32_t& r1, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(addr));
}

template <int LUT>
__device__ __forceinline__ uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(LUT));
  return d;
}
constexpr int kAndOr = (0xf0 & 0xcc) | 0xaa;  // (a & b) | c

// ------------------------------------------------------------------------------------------------------
// Per-dtype pieces: the mma instruction and the dequantization of one word of 8 codes into 4 registers
// holding (q - zp) for the k pairs (0,4), (1,5), (2,6), (3,7).

template <typename T>
struct Ops;

template <>
struct Ops<__half> {
  // zero-point constants: lo = -(1024 + zp) twice, hi = -(64 + zp) twice (fp16 bit patterns)
  struct Zc {
    uint32_t lo, hi;
  };
  static __device__ __forceinline__ Zc zc(uint32_t zp) {
    const uint32_t a = 0xE400u + zp;         // -(1024 + zp): ulp at 1024 is 1
    const uint32_t b = 0xD400u + (zp << 4);  // -(64 + zp):   ulp at 64 is 1/16
    return {a | (a << 16), b | (b << 16)};
  }
  static __device__ __forceinline__ void dequant(uint32_t w, const Zc& z, uint32_t (&p)[4]) {
    constexpr uint32_t kLo = 0x000f000fu, kHi = 0x00f000f0u, kMagic = 0x64006400u;
    constexpr uint32_t kSixteenth = 0x2C002C00u;  // 1/16 in both halves
    const uint32_t lo0 = lop3<kAndOr>(w, kLo, kMagic);  // 1024 + (q0, q4)
    const uint32_t hi0 = lop3<kAndOr>(w, kHi, kMagic);  // 1024 + 16 * (q1, q5)
    const uint32_t w8 = w >> 8;
    const uint32_t lo1 = lop3<kAndOr>(w8, kLo, kMagic);  // 1024 + (q2, q6)
    const uint32_t hi1 = lop3<kAndOr>(w8, kHi, kMagic);  // 1024 + 16 * (q3, q7)
    asm("add.f16x2 %0, %1, %2;\n" : "=r"(p[0]) : "r"(lo0), "r"(z.lo));
    asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(p[1]) : "r"(hi0), "r"(kSixteenth), "r"(z.hi));
    asm("add.f16x2 %0, %1, %2;\n" : "=r"(p[2]) : "r"(lo1), "r"(z.lo));
    asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(p[3]) : "r"(hi1), "r"(kSixteenth), "r"(z.hi));
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Ops<__nv_bfloat16> {
  struct Zc {
    uint32_t lo;
  };
  static __device__ __forceinline__ Zc zc(uint32_t zp) {
    const uint32_t a = 0xC300u + zp;  // -(128 + zp) in bf16: ulp at 128 is 1
    return {a | (a << 16)};
  }
  static __device__ __forceinline__ void dequant(uint32_t w, const Zc& z, uint32_t (&p)[4]) {
    // bit 7 of a bf16 is an exponent bit, so the 16x trick of the fp16 path is not available: shift each
    // code pair down to bits 0..3 instead.
    constexpr uint32_t kLo = 0x000f000fu, kMagic = 0x43004300u, kOne = 0x3F803F80u;
    uint32_t v[4];
    v[0] = lop3<kAndOr>(w, kLo, kMagic);        // 128 + (q0, q4)
    v[1] = lop3<kAndOr>(w >> 4, kLo, kMagic);   // 128 + (q1, q5)
    v[2] = lop3<kAndOr>(w >> 8, kLo, kMagic);   // 128 + (q2, q6)
    v[3] = lop3<kAndOr>(w >> 12, kLo, kMagic);  // 128 + (q3, q7)
#pragma unroll
    for (int i = 0; i < 4; ++i) asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(p[i]) : "r"(v[i]), "r"(kOne), "r"(z.lo));
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

__device__ __forceinline__ float load_bias(const void* bias, int dt, int n) {
  switch (dt) {
    case 1: return __half2float(static_cast<const __half*>(bias)[n]);
    case 2: return __bfloat162float(static_cast<const __nv_bfloat16*>(bias)[n]);
    default: return static_cast<const float*>(bias)[n];
  }
}

// ------------------------------------------------------------------------------------------------------
// Kernel arguments (one struct keeps the launch and the instantiation list short).
struct Args {
  const uint16_t* x;      // [M, K] fp16/bf16 bits, row stride ldx elements
  int64_t ldx;
  const uint8_t* packed;  // [N, nb, g/2]
  const float* scales;    // [N, nb]
  const uint8_t* zp;      // [N, ceil(nb/2)] or nullptr
  int64_t zp_bytes;       // N * ceil(nb/2)
  const void* bias;       // [N] or nullptr
  int bias_dt;            // 0 float32, 1 float16, 2 bfloat16
  void* y;                // [M, N], dtype of x
  int M, N, K, nb;
  int x_rows;             // x rows allocated per stage in shared memory: min(BM, M)
  int x_vec;              // 1: x rows are 16-byte aligned and K % 8 == 0 -> cp.async; 0: plain loads
};

// Grid: blockIdx.x = M tile (fastest, so consecutive blocks share a weight tile in L2), blockIdx.y = N tile.
template <typename T, int G, bool HAS_ZP, class C>
__global__ void __launch_bounds__(C::THREADS) linear_q4_mma_kernel(const Args args) {
  using L = Smem<C, G, HAS_ZP>;
  using O = Ops<T>;
  constexpr int GT = L::GT;
  constexpr int SPG = G / 32;  // spans per group
  static_assert(C::BK % G == 0, "a k-tile must hold whole groups");
  static_assert(C::SPW % SPG == 0, "a warp's spans must hold whole groups");

  extern __shared__ __align__(16) unsigned char smem[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wk = warp % C::WK;
  const int wm = (warp / C::WK) % C::WM;
  const int wn = warp / (C::WK * C::WM);
  const int g = lane >> 2, t = lane & 3;

  const int m0 = blockIdx.x * C::BM;
  const int n0 = blockIdx.y * C::BN;
  const int M = args.M, N = args.N, K = args.K, nb = args.nb;
  const int Kp = nb * G;
  const int KT = (Kp + C::BK - 1) / C::BK;
  const int64_t wrow = Kp / 2;          // bytes per weight row
  const int64_t zrow = (nb + 1) / 2;    // zero-point bytes per row
  const int xr = args.x_rows;
  const int xvalid = min(C::BM, M - m0);  // rows of x this block really has (<= xr)
  const int stage_bytes = L::stage_bytes(xr);

  // Rows [xvalid, xr) of the x tiles are never loaded (only the last M tile has them): zero them once.
  if (xvalid < xr) {
    const int chunks = (xr - xvalid) * (C::BK / 8);
    for (int s = 0; s < C::STAGES; ++s) {
      unsigned char* xs = smem + s * stage_bytes + L::X_OFF;
      for (int i = tid; i < chunks; i += C::THREADS) {
        const int r = xvalid + i / (C::BK / 8), c = i % (C::BK / 8);
        *reinterpret_cast<uint4*>(xs + r * L::X_ROW + c * 16) = make_uint4(0, 0, 0, 0);
      }
    }
  }

  auto load_tile = [&](int stage, int kt) {
    unsigned char* sb = smem + stage * stage_bytes;
    const int kbase = kt * C::BK;
    const int spans_here = min(C::SPANS, (Kp - kbase) / 32);
    // weights: BN rows x spans_here chunks of 16 B
    for (int i = tid; i < C::BN * C::SPANS; i += C::THREADS) {
      const int r = i / C::SPANS, c = i % C::SPANS;
      const int n = n0 + r;
      if (n < N && c < spans_here) {
        cp_async16(smem_addr(sb + L::W_OFF + r * L::W_ROW + c * 16), args.packed + n * wrow + kbase / 2 + c * 16,
                   16);
      }
    }
    // scales: BN rows x GT groups
    const int gbase = kt * GT;
    for (int i = tid; i < C::BN * GT; i += C::THREADS) {
      const int r = i / GT, j = i % GT;
      const int n = n0 + r;
      if (n < N && gbase + j < nb) {
        cp_async4(smem_addr(sb + L::S_OFF + (r * L::S_ROW + j) * 4), args.scales + static_cast<int64_t>(n) * nb + gbase + j);
      }
    }
    // zero points: the aligned words holding bytes [b0, b1] of row n
    if constexpr (HAS_ZP) {
      const int glast = min(gbase + GT, nb) - 1;
      for (int i = tid; i < C::BN * L::ZW; i += C::THREADS) {
        const int r = i / L::ZW, j = i % L::ZW;
        const int n = n0 + r;
        if (n < N) {
          const int64_t b0 = n * zrow + gbase / 2, b1 = n * zrow + glast / 2;
          const int64_t a = (b0 & ~int64_t(3)) + 4 * j;
          if (a <= b1) {
            unsigned char* dst = sb + L::Z_OFF + (r * L::ZW + j) * 4;
            if (a + 4 <= args.zp_bytes) {
              cp_async4(smem_addr(dst), args.zp + a);
            } else {  // the tensor's last word is partial: read only its own bytes
              uint32_t v = 0;
              for (int e = 0; a + e < args.zp_bytes; ++e) v |= static_cast<uint32_t>(args.zp[a + e]) << (8 * e);
              *reinterpret_cast<uint32_t*>(dst) = v;
            }
          }
        }
      }
    }
    // activations: xvalid rows x (spans_here * 4) chunks of 8 elements; columns >= K read as zero
    constexpr int XCH = C::BK / 8;
    const int xch_here = spans_here * 4;
    for (int i = tid; i < xvalid * XCH; i += C::THREADS) {
      const int r = i / XCH, c = i % XCH;
      if (c >= xch_here) continue;
      const int k = kbase + c * 8;
      unsigned char* dst = sb + L::X_OFF + r * L::X_ROW + c * 16;
      const uint16_t* src = args.x + (m0 + r) * args.ldx + k;
      if (args.x_vec) {  // K % 8 == 0, so a chunk is entirely inside or entirely outside [0, K)
        cp_async16(smem_addr(dst), k < K ? src : args.x, k < K ? 16 : 0);
      } else {
        uint32_t v[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const uint32_t lo = k + 2 * e < K ? src[2 * e] : 0u;
          const uint32_t hi = k + 2 * e + 1 < K ? src[2 * e + 1] : 0u;
          v[e] = lo | (hi << 16);
        }
        *reinterpret_cast<uint4*>(dst) = make_uint4(v[0], v[1], v[2], v[3]);
      }
    }
  };

  float acc[C::NT][C::MT][4];
#pragma unroll
  for (int a = 0; a < C::NT; ++a)
#pragma unroll
    for (int b = 0; b < C::MT; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[a][b][e] = 0.f;

  // Rows of this thread inside the block tile: A tile nt covers rows wrow0 + nt*16 + {g, g+8}.
  const int wrow0 = wn * C::NT * 16;
  const int xrow0 = wm * C::MT * 8;

  auto compute_tile = [&](int stage, int kt) {
    const unsigned char* sb = smem + stage * stage_bytes;
    const int spans_here = min(C::SPANS, (Kp - kt * C::BK) / 32);
    const int span_begin = wk * C::SPW;
    const int span_end = min(span_begin + C::SPW, spans_here);
    const float* ssc = reinterpret_cast<const float*>(sb + L::S_OFF);
#pragma unroll
    for (int gi = 0; gi < C::SPW / SPG; ++gi) {
      const int s0 = span_begin + gi * SPG;
      if (s0 < span_end) {
        const int gl = s0 / SPG;          // group inside the tile
        const int ga = kt * GT + gl;      // absolute group index
        typename O::Zc zc[C::NT][2];
        float sc[C::NT][2];
#pragma unroll
        for (int nt = 0; nt < C::NT; ++nt) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = wrow0 + nt * 16 + g + 8 * h;
            sc[nt][h] = ssc[r * L::S_ROW + gl];
            uint32_t zp = 8u;
            if constexpr (HAS_ZP) {
              const int64_t n = n0 + r;
              const int64_t w0 = (n * zrow + (kt * GT) / 2) & ~int64_t(3);
              const int off = static_cast<int>(n * zrow + ga / 2 - w0);  // 0 .. 4*ZW-1
              const uint32_t* zw = reinterpret_cast<const uint32_t*>(sb + L::Z_OFF) + r * L::ZW;
              const uint32_t byte = (zw[off >> 2] >> ((off & 3) * 8)) & 0xffu;
              zp = (ga & 1) ? (byte >> 4) : (byte & 0xfu);
            }
            zc[nt][h] = O::zc(zp);
          }
        }
        float part[C::NT][C::MT][4];
#pragma unroll
        for (int a = 0; a < C::NT; ++a)
#pragma unroll
          for (int b = 0; b < C::MT; ++b)
#pragma unroll
            for (int e = 0; e < 4; ++e) part[a][b][e] = 0.f;

#pragma unroll
        for (int ss = 0; ss < SPG; ++ss) {
          const int span = s0 + ss;
          // B: x[m = xrow0 + mt*8 + g, k = span*32 + 8t .. +7], permuted into the pairs of the A side.
          uint32_t b[C::MT][4];
#pragma unroll
          for (int mt = 0; mt < C::MT; ++mt) {
            const int r = xrow0 + mt * 8 + g;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (r < xr) v = *reinterpret_cast<const uint4*>(sb + L::X_OFF + r * L::X_ROW + span * 64 + t * 16);
            b[mt][0] = __byte_perm(v.x, v.z, 0x5410);  // (x0, x4)
            b[mt][1] = __byte_perm(v.x, v.z, 0x7632);  // (x1, x5)
            b[mt][2] = __byte_perm(v.y, v.w, 0x5410);  // (x2, x6)
            b[mt][3] = __byte_perm(v.y, v.w, 0x7632);  // (x3, x7)
          }
#pragma unroll
          for (int nt = 0; nt < C::NT; ++nt) {
            uint32_t wlo, whi;  // rows g and g+8 of A tile nt, word t of the span's 16-byte chunk
            ldsm_x2(wlo, whi, smem_addr(sb + L::W_OFF + (wrow0 + nt * 16 + (lane & 15)) * L::W_ROW + span * 16));
            uint32_t p[4], q[4];
            O::dequant(wlo, zc[nt][0], p);
            O::dequant(whi, zc[nt][1], q);
            const uint32_t a0[4] = {p[0], q[0], p[1], q[1]};  // k pairs (0,4) and (1,5)
            const uint32_t a1[4] = {p[2], q[2], p[3], q[3]};  // k pairs (2,6) and (3,7)
#pragma unroll
            for (int mt = 0; mt < C::MT; ++mt) {
              if (xrow0 + mt * 8 < xvalid) {  // warp-uniform: skip B tiles that are all padding
                O::mma(part[nt][mt], a0, b[mt][0], b[mt][1]);
                O::mma(part[nt][mt], a1, b[mt][2], b[mt][3]);
              }
            }
          }
        }
        // acc += scale(row, group) * partial; c0, c1 belong to row g, c2, c3 to row g + 8.
#pragma unroll
        for (int nt = 0; nt < C::NT; ++nt)
#pragma unroll
          for (int mt = 0; mt < C::MT; ++mt) {
            acc[nt][mt][0] = fmaf(sc[nt][0], part[nt][mt][0], acc[nt][mt][0]);
            acc[nt][mt][1] = fmaf(sc[nt][0], part[nt][mt][1], acc[nt][mt][1]);
            acc[nt][mt][2] = fmaf(sc[nt][1], part[nt][mt][2], acc[nt][mt][2]);
            acc[nt][mt][3] = fmaf(sc[nt][1], part[nt][mt][3], acc[nt][mt][3]);
          }
      }
    }
  };

  // Pipeline: STAGES - 1 tiles in flight. One (possibly empty) commit group per iteration keeps the
  // wait_group arithmetic uniform.
#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < KT) load_tile(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();  // tile kt visible to all; everyone is done with the stage loaded next
    const int nk = kt + C::STAGES - 1;
    if (nk < KT) load_tile(nk % C::STAGES, nk);
    cp_async_commit();
    compute_tile(kt % C::STAGES, kt);
  }
  cp_async_wait<0>();
  __syncthreads();

  // Split-K reduction through shared memory (the pipeline buffers are free now).
  if constexpr (C::WK > 1) {
    float* red = reinterpret_cast<float*>(smem);
    constexpr int PER = C::NT * C::MT * 4;
    const int wnm = warp / C::WK;  // which (wn, wm) warp tile
    if (wk > 0) {
      float* dst = red + ((wk - 1) * (C::WN * C::WM) + wnm) * PER * 32;
#pragma unroll
      for (int a = 0; a < C::NT; ++a)
#pragma unroll
        for (int b = 0; b < C::MT; ++b)
#pragma unroll
          for (int e = 0; e < 4; ++e) dst[((a * C::MT + b) * 4 + e) * 32 + lane] = acc[a][b][e];
    }
    __syncthreads();
    if (wk == 0) {
      for (int o = 1; o < C::WK; ++o) {
        const float* src = red + ((o - 1) * (C::WN * C::WM) + wnm) * PER * 32;
#pragma unroll
        for (int a = 0; a < C::NT; ++a)
#pragma unroll
          for (int b = 0; b < C::MT; ++b)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[a][b][e] += src[((a * C::MT + b) * 4 + e) * 32 + lane];
      }
    }
  }

  if (wk == 0) {
    T* y = static_cast<T*>(args.y);
#pragma unroll
    for (int nt = 0; nt < C::NT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int n = n0 + wrow0 + nt * 16 + g + 8 * h;
        if (n >= N) continue;
        const float bv = args.bias ? load_bias(args.bias, args.bias_dt, n) : 0.f;
#pragma unroll
        for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int m = m0 + xrow0 + mt * 8 + 2 * t + e;
            if (m < M) y[static_cast<int64_t>(m) * N + n] = O::from_float(acc[nt][mt][2 * h + e] + bv);
          }
      }
  }
}

// ------------------------------------------------------------------------------------------------------
// Dequantization to a dense [N, K] matrix (the dequantize_q4 op, and the large-M path that hands the
// product to cuBLAS). One thread per 16-byte chunk = 32 consecutive k of one group.
template <typename OutT>
__device__ __forceinline__ OutT cast_out(float v);
template <>
__device__ __forceinline__ float cast_out<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half cast_out<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 cast_out<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename OutT, int G, bool HAS_ZP>
__global__ void __launch_bounds__(256)
dequantize_q4_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ scales,
                     const uint8_t* __restrict__ zp, OutT* __restrict__ out, int N, int K, int nb, int vec_ok) {
  const int chunks_per_row = nb * (G / 32);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(N) * chunks_per_row) return;
  const int n = static_cast<int>(i / chunks_per_row);
  const int c = static_cast<int>(i % chunks_per_row);
  const int k0 = c * 32;
  if (k0 >= K) return;  // padding only
  const int grp = k0 / G;
  uint4 w;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(w.x), "=r"(w.y), "=r"(w.z), "=r"(w.w)
               : "l"(packed + i * 16));
  const float s = scales[static_cast<int64_t>(n) * nb + grp];
  int zpv = 8;
  if constexpr (HAS_ZP) {
    const uint8_t byte = zp[static_cast<int64_t>(n) * ((nb + 1) / 2) + grp / 2];
    zpv = (grp & 1) ? (byte >> 4) : (byte & 0xf);
  }
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  alignas(16) OutT vals[32];
#pragma unroll
  for (int e = 0; e < 32; ++e) {
    const int q = (words[e / 8] >> (4 * (e % 8))) & 0xf;
    vals[e] = cast_out<OutT>(static_cast<float>(q - zpv) * s);  // exact difference, one rounding
  }
  OutT* dst = out + static_cast<int64_t>(n) * K + k0;
  if (vec_ok && k0 + 32 <= K) {  // 16-byte stores: K * sizeof(OutT) % 16 == 0 and out is 16-byte aligned
    constexpr int PER = 16 / sizeof(OutT);
#pragma unroll
    for (int j = 0; j < 32 / PER; ++j) *reinterpret_cast<uint4*>(dst + j * PER) = *reinterpret_cast<const uint4*>(vals + j * PER);
  } else {
    for (int e = 0; e < 32 && k0 + e < K; ++e) dst[e] = vals[e];
  }
}

}  // namespace q4
}  // namespace pyshrink_cuda
