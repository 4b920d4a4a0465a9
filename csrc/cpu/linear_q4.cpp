// linear_q4 on CPU: y = x @ dequant(W)^T (+ bias) straight from the packed MatMulNBits layout.
//
// Activations are prepared once per call, never per output row, in the order that lets a packed weight
// byte's two nibbles meet their activations without any shuffling of the weights: byte j of a block holds
// element 2j (low nibble) and 2j+1 (high nibble).
//
// fast (int8 activations, see pyshrink/ops/q4.py): each block of g int8 activations is stored as its g/2
//   even-indexed elements then its g/2 odd ones, so `bytes & 0x0F` and `(bytes >> 4) & 0x0F` of a block's
//   packed codes line up with the two halves. _mm256_maddubs_epi16(codes u8 0..15, qx s8) sums adjacent
//   products into int16 (|.| <= 2*15*127; at most 4 of those are added for g=128, and the M = 1 AVX2 GEMV
//   then adds two int16 lanes of one block, at most 30,480: no saturation),
//   _mm256_madd_epi16 with ones widens to int32, and one FMA adds dot*sx*scale to a float accumulator. The
//   zero point is not subtracted per block: sum(qx*(q-zp)) = sum(qx*q) - zp*sum(qx), and the second term
//   for a whole row is one short dot product over blocks, sum_b zp*scale*(sx*sum qx), with sx*sum(qx)
//   computed when x is quantized (the GEMM tiles add it 8 blocks per FMA into their accumulators). Rows of x are stored in groups of 4, block-interleaved
//   ([M/4][nb][4][g]), so a tile of 4 rows reads one contiguous run per block through a single pointer.
// exact (float activations): every 16 activations are stored as their 8 even then 8 odd elements;
//   vpmovzxbd widens 8 packed bytes to 8 dwords, `& 15` and `>> 4` give the 8 even and the 8 odd codes,
//   minus the zero point (exact int32), converted to float and FMA'd into a per-block float sum that is
//   then scaled by the block's scale. For M >= 4 a tile of weight rows is dequantized once into an
//   L2-resident float buffer (same order) and a register-blocked float GEMM runs over it.
//
// AVX-512 level (isa.h; avx512f/bw/vl/vnni): fast mode with M >= 4 repacks 48 weight rows at a time into
//   signed (q - zp) bytes, 16 rows across a zmm, and runs a vpdpbusd GEMM over them (repack_vnni): each
//   4-byte activation broadcast feeds 16 output columns, about 3x the AVX2 tile's rate at M = 128. fast mode
//   with M <= 3 is a vpdpbusd GEMV over the bytes as stored (fast_gemv_tile_avx512). exact mode with M <= 3
//   is a float GEMV over the same bytes whose vpermps maps shifted dwords to (q - 8) (exact_gemv_tile_avx512);
//   exact with M >= 4 runs the GEMM on zmm.
//
// Tiling: RM rows of x by RN rows of W keep RM*RN accumulators in registers, so each weight block is loaded
// and unpacked once per RM rows of x. The M = 1 GEMVs are memory bound and prefetch the weights further on
// (AVX2: one row at a time as one stream, see fast_gemv_row_avx2; AVX-512: see GemvRows). Tiles of N are
// shared out by parallel.h (torch's threads or pyshrink's pool); each task walks all rows of x for its weight
// rows (in cache-sized panels and chunks at large M, see run_fast), so weights come from memory once per call.
//
// Accuracy (tests/ops/test_linear_q4.py checks these worst-case bounds): fast mode's activation codes equal
// the reference's bit for bit (same IEEE division, round half to even), its integer dots are exact, and only
// the float32 combination of ~2*nb block terms rounds; exact mode is a float32 dot product (the AVX-512 GEMV's
// with the zero point 8, asymmetric zero points corrected per output).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <numeric>
#include <type_traits>
#include <vector>

#include "cpu/isa.h"
#include "cpu/parallel.h"

namespace pyshrink {
namespace cpu {
namespace {

constexpr const char* OP = "pyshrink.linear_q4";
constexpr int kVnniRM = 4;  // AVX-512 fast GEMM register tile: kVnniRM rows of x by kVnniRN * 16 weight rows
constexpr int kVnniRN = 3;
// GEMV prefetch distance for rows of at most kGemvRowAhead bytes: a task walks its tiles of RN rows in order, so
// while it reads line c of each row it asks for line c of the rows of the tile that starts at least
// kGemvPrefetch bytes further on (4 tiles ahead for SmolLM2's 576-wide rows, whose tiles are 1.1 KB). Asking only for the next
// tile was too close for short rows (development measurements, not a committed benchmark: on 0.3-1 MB weights
// read from memory, 4 KiB ahead was 10-25 % faster on one thread; 1-2 KiB in between, 8 KiB the same).
constexpr int64_t kGemvPrefetch = 4096;
// Rows longer than this prefetch within the row instead, this far ahead. Asking for the next tile's rows kept a
// whole tile (22 KB for 11008-wide rows) in flight and pushed the GEMV's activations out of L1 (development
// measurement, interleaved, 2 threads, rotated weights: fast mode 11008 -> 4096 at 19.7 -> 22.6 GB/s, exact
// 20.3 -> 21.0; 4096-wide rows 20.6 / 21.6 -> 21.7 / 22.6; 512 bytes ahead was no better than the old way).
constexpr int64_t kGemvRowAhead = 1024;


// 64-byte aligned scratch for tile buffers: a zmm load that straddles two cache lines costs two
template <typename T>
struct Aligned64 {
  T* p;
  explicit Aligned64(size_t n) : p(static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64}))) {}
  ~Aligned64() { ::operator delete(p, std::align_val_t{64}); }
  Aligned64(const Aligned64&) = delete;
  Aligned64& operator=(const Aligned64&) = delete;
};

struct Q4Weights {
  const uint8_t* packed;  // [N, nb, g/2]
  const float* scales;    // [N, nb]
  const uint8_t* zp;      // [N, zb], or nullptr: symmetric, zero point 8
  int64_t N, nb, g, zb;
  const uint8_t* row(int64_t n) const { return packed + n * nb * (g / 2); }
  const float* srow(int64_t n) const { return scales + n * nb; }
  int zero_point(int64_t n, int64_t b) const {
    if (!zp) return 8;
    const uint8_t v = zp[n * zb + b / 2];
    return (b & 1) ? (v >> 4) : (v & 0x0F);
  }
};

struct GemvActs {
  int64_t nc = 0;           // 128-weight chunks per row (the last may be a partial one)
  const int8_t* xv[3];      // per row of x: nc * 128 activation codes
  const float* sxl[3];      // per row: nc * 16 lanes of the activations' block scale sx
  const int32_t* init[3];   // per row: nc * 16 lanes of -zp * (lane's activation sum); zeros if asym
};

// Grow-only 64-byte aligned scratch, one per calling thread: a decode step makes ~120 small calls, and fresh
// allocations for their few kilobytes of laid-out activations were a measurable part of each.
struct Scratch64 {
  void* p = nullptr;
  size_t n = 0;
  void* get(size_t bytes) {
    if (bytes > n) {
      ::operator delete(p, std::align_val_t{64});
      p = nullptr, n = 0;  // consistent if the allocation below throws
      p = ::operator new(bytes, std::align_val_t{64});
      n = bytes;
    }
    return p;
  }
  ~Scratch64() { ::operator delete(p, std::align_val_t{64}); }
};

#if PYSHRINK_X86
// clamp(round_half_even(x / s), -127, 127) of 16 floats, as int32
PYSHRINK_AVX512_INLINE __m512i gemv_code(const float* p, __m512 vs, __m512i lo, __m512i hi) {
  const __m512i q = _mm512_cvt_roundps_epi32(_mm512_div_ps(_mm512_loadu_ps(p), vs),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_min_epi32(_mm512_max_epi32(q, lo), hi);
}

// fast mode, M <= 3, AVX-512: quantizes one float row (natural order, Kp = nb * g elements, zero-padded) straight
// into the GEMV's layout (GemvActs): per 128-weight chunk the 64 codes that pair with low nibbles (each block's
// even elements), then the 64 that pair with high nibbles (its odd ones), and per chunk the 16 lanes of sx. One
// pass per block instead of the generic path's quantize, block-interleaved store and re-layout: this runs on
// every decode call, and those passes cost ~2 ns per element (K = 4096: ~6 of a 4096x4096 GEMV's ~400 us,
// all on one thread while the other waited). Codes equal the reference's: the same IEEE division and round
// half to even, then the clamp. A block holding a NaN gets sx = NaN, as the reference's max does (vmaxps alone
// would drop it), so the outputs that read it are NaN. xsum (nullable): sx * sum(qx) per block, for the
// asymmetric correction.
PYSHRINK_AVX512 void quantize_gemv_row_avx512(const float* x, int64_t g, int64_t nb, int8_t* v, float* sxl,
                                              float* xsum) {
  const int64_t bpc = 128 / g, nc = (nb + bpc - 1) / bpc;
  std::memset(v + (nc - 1) * 128, 0, 128);  // a partial last chunk's padding
  std::memset(sxl + (nc - 1) * 16, 0, 64);
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (int64_t b = 0; b < nb; ++b) {
    const float* src = x + b * g;
    __m512 m = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t i = 0; i < g; i += 16) {
      const __m512 xv = _mm512_loadu_ps(src + i);
      m = _mm512_max_ps(m, _mm512_abs_ps(xv));
      nan |= _mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q);
    }
    const float s = nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(m) / 127.0f;
    int8_t* dst = v + (b / bpc) * 128 + (b % bpc) * (g / 2);
    float* lanes = sxl + (b / bpc) * 16 + (b % bpc) * (g / 8);
    for (int64_t l = 0; l < g / 8; ++l) lanes[l] = s;
    if (!(s > 0.0f)) {  // all zeros, or a NaN (sx = NaN)
      std::memset(dst, 0, g / 2);
      std::memset(dst + 64, 0, g / 2);
      if (xsum) xsum[b] = s * 0.0f;  // sx * sum(qx) with every code 0: 0, or NaN for a NaN block
      continue;
    }
    const __m512 vs = _mm512_set1_ps(s);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t i = 0; i < g; i += 32) {
      const __m512i a = gemv_code(src + i, vs, lo, hi), c = gemv_code(src + i + 16, vs, lo, hi);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i / 2), _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(a, even, c)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 64 + i / 2), _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(a, odd, c)));
      sum = _mm512_add_epi32(sum, _mm512_add_epi32(a, c));
    }
    if (xsum) xsum[b] = s * static_cast<float>(_mm512_reduce_add_epi32(sum));
  }
}

PYSHRINK_AVX512 void gemv_init_lanes(const int8_t* v, int64_t nc, bool asym, int32_t* init);

// exact mode, M <= 3, AVX-512: one float row of nc whole 128-element chunks into Acts::lanes order (element
// 8l + j of a chunk at 16j + l), eight 16-lane gathers per chunk; the scalar loop it replaces cost ~1.5 ns per
// element on every call.
PYSHRINK_AVX512 void lay_out_lanes_avx512(const float* row, int64_t nc, float* out) {
  const __m512i idx = _mm512_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120);
  for (int64_t c = 0; c < nc; ++c)
    for (int j = 0; j < 8; ++j)
      _mm512_storeu_ps(out + c * 128 + 16 * j,
                       _mm512_i32gather_ps(_mm512_add_epi32(idx, _mm512_set1_epi32(j)), row + c * 128, 4));
}
#endif

// ---------------------------------------------------------------------------------------------------------
// activation preparation: natural-order float rows -> per-block [evens | odds] float (exact) or int8 (fast)

// Within every run of `span` elements (a block for fast mode, 16 for exact mode): evens first, then odds.
void deinterleave_scalar(const float* src, int64_t Kp, int64_t span, float* dst) {
  for (int64_t b = 0; b < Kp; b += span)
    for (int64_t j = 0; j < span / 2; ++j) {
      dst[b + j] = src[b + 2 * j];
      dst[b + span / 2 + j] = src[b + 2 * j + 1];
    }
}

// fast mode: sx = max|x| / 127, qx = clamp(round_half_even(x / sx), -127, 127) per block (IEEE division, as
// the reference); returns sum(qx) of the block.
int32_t quantize_block_scalar(const float* src, int64_t g, float* sx, int8_t* dst) {
  float amax = 0.0f;
  bool nan = false;  // std::max drops a NaN; the reference's max keeps it
  for (int64_t i = 0; i < g; ++i) nan |= std::isnan(src[i]), amax = std::max(amax, std::fabs(src[i]));
  const float s = nan ? std::numeric_limits<float>::quiet_NaN() : amax / 127.0f;
  *sx = s;
  if (!(s > 0.0f)) {  // all zeros, or a NaN (whose sx makes every output that reads the block NaN)
    std::fill(dst, dst + g, 0);
    return 0;
  }
  int32_t sum = 0;
  for (int64_t j = 0; j < g / 2; ++j)
    for (int h = 0; h < 2; ++h) {
      const float v = std::min(std::max(std::nearbyint(src[2 * j + h] / s), -127.0f), 127.0f);
      dst[h * (g / 2) + j] = static_cast<int8_t>(v);
      sum += static_cast<int32_t>(v);
    }
  return sum;
}

#if PYSHRINK_X86
PYSHRINK_AVX2 void deinterleave_avx2(const float* src, int64_t Kp, int64_t span, float* dst) {
  const __m256i perm = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  for (int64_t b = 0; b < Kp; b += span)
    for (int64_t i = 0; i < span; i += 16) {
      const __m256 a = _mm256_permutevar8x32_ps(_mm256_loadu_ps(src + b + i), perm);
      const __m256 c = _mm256_permutevar8x32_ps(_mm256_loadu_ps(src + b + i + 8), perm);
      _mm256_storeu_ps(dst + b + i / 2, _mm256_permute2f128_ps(a, c, 0x20));
      _mm256_storeu_ps(dst + b + span / 2 + i / 2, _mm256_permute2f128_ps(a, c, 0x31));
    }
}

// `src` is a block already in [evens | odds] order.
PYSHRINK_AVX2 int32_t quantize_block_avx2(const float* src, int64_t g, float* sx, int8_t* dst) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  for (int64_t i = 0; i < g; i += 8) {
    const __m256 xv = _mm256_loadu_ps(src + i);
    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, xv));
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(xv, xv, _CMP_UNORD_Q));  // vmaxps alone would drop a NaN
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, m);
  const float s = _mm256_movemask_ps(nan) ? std::numeric_limits<float>::quiet_NaN()
                                          : *std::max_element(t, t + 8) / 127.0f;
  *sx = s;
  if (!(s > 0.0f)) {  // all zeros, or a NaN
    std::fill(dst, dst + g, 0);
    return 0;
  }
  const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i sum = _mm256_setzero_si256();
  for (int64_t i = 0; i < g; i += 32) {
    __m256i q[4];
    for (int j = 0; j < 4; ++j) {
      __m256 v = _mm256_div_ps(_mm256_loadu_ps(src + i + 8 * j), vs);
      v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
      sum = _mm256_add_epi32(sum, q[j]);
    }
    // packs work per 128-bit lane: undo the lane interleave with one dword permute
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_permutevar8x32_epi32(p, order));
  }
  return hsum_epi32(sum);
}
#endif

// Activations of one call. exact: xd [M, Kp] float, 16-element [evens | odds] runs.
// fast: qx int8 and sx float in groups of MT rows, block-interleaved: row m, block b starts at
// ((m / MT) * nb + b) * MT + m % MT (times g for qx); xsum [M, nb] = sx * sum(qx), row-major.
// exact with M <= 3 at the AVX-512 level (exact_gemv_tile_avx512): `lanes` layout instead, xd [M, nc * 128]
// with element 8l + j of every 128-element chunk at 16j + l, and, for asymmetric weights, xsum [M, nb] the
// blocks' float sums.
// fast with M <= 3 at the AVX-512 level (fast_gemv_tile_avx512): `gemv` instead, the rows quantized straight
// into GemvActs' layout in a per-thread scratch, and xsum only for asymmetric weights.
struct Acts {
  int64_t M = 0, Kp = 0, nb = 0, MT = 1;
  bool lanes = false, gemv = false;
  at::Tensor xd, qx, sx, xsum;
  GemvActs gv;
  int64_t slot(int64_t m, int64_t b) const { return ((m / MT) * nb + b) * MT + m % MT; }
};

// One row of x as float32: the row itself when `direct` (T is float32, the row is contiguous and needs no
// padding), else converted into `buf`, whose elements from K on the caller has zeroed.
template <typename T>
const float* float_row(const T* row, int64_t cs, int64_t K, bool direct, float* buf, Isa isa) {
  if (direct) return reinterpret_cast<const float*>(row);
  row_to_float(row, cs, K, buf, isa);
  return buf;
}

template <typename T>
Acts prepare(const at::Tensor& x2, int64_t g, int64_t nb, bool fast, bool asym, Isa isa) {
  Acts a;
  a.M = x2.size(0);
  a.Kp = nb * g;
  a.nb = nb;
  a.MT = a.M == 1 ? 1 : 4;
  const bool gemv_level = isa == Isa::kAvx512 && a.M <= 3;  // the AVX-512 GEMVs, with their own layouts
  a.lanes = !fast && gemv_level;
  a.gemv = fast && gemv_level;
  const int64_t K = x2.size(1), M = a.M, Kp = a.Kp, nc = (Kp + 127) / 128;
  const int64_t Mp = (M + a.MT - 1) / a.MT * a.MT;  // padded rows are zeros (never stored to the output)
  auto f32 = x2.options().dtype(at::kFloat);
  const T* xp = x2.const_data_ptr<T>();
  const int64_t rs = x2.stride(0), cs = x2.stride(1);
  // rows of `len` floats can be read in place when x is float32 and contiguous and K needs no padding
  const auto in_place = [&](int64_t len) { return std::is_same<T, float>::value && cs == 1 && K == len; };
#if PYSHRINK_X86
  if (a.gemv) {
    // per row: nc * 128 codes, nc * 16 sx lanes, nc * 16 init lanes (each a multiple of 64 bytes); then one
    // row of float activations, unless x is already float32, contiguous and a whole number of blocks
    static thread_local Scratch64 scratch;
    const int64_t row_bytes = nc * (128 + 16 * 4 + 16 * 4);
    const bool direct = in_place(Kp);
    char* buf = static_cast<char*>(scratch.get(M * row_bytes + (direct ? 0 : Kp * 4)));
    float* nat = reinterpret_cast<float*>(buf + M * row_bytes);
    if (!direct) std::fill(nat + K, nat + Kp, 0.0f);
    if (asym) a.xsum = at::empty({M, nb}, f32);
    a.gv.nc = nc;
    for (int64_t m = 0; m < M; ++m) {
      int8_t* v = reinterpret_cast<int8_t*>(buf + m * row_bytes);
      float* sxl = reinterpret_cast<float*>(v + nc * 128);
      int32_t* init = reinterpret_cast<int32_t*>(sxl + nc * 16);
      const float* row = float_row(xp + m * rs, cs, K, direct, nat, isa);
      quantize_gemv_row_avx512(row, g, nb, v, sxl, asym ? a.xsum.data_ptr<float>() + m * nb : nullptr);
      gemv_init_lanes(v, nc, asym, init);
      a.gv.xv[m] = v;
      a.gv.sxl[m] = sxl;
      a.gv.init[m] = init;
    }
    return a;
  }
  if (a.lanes) {
    a.xd = at::empty({M, nc * 128}, f32);
    if (asym) a.xsum = at::empty({M, nb}, f32);  // only the asymmetric correction reads it
    const bool direct = in_place(nc * 128);
    std::vector<float> nat(direct ? 0 : nc * 128, 0.0f);  // zero-padded to whole chunks
    for (int64_t m = 0; m < M; ++m) {
      const float* row = float_row(xp + m * rs, cs, K, direct, nat.data(), isa);
      lay_out_lanes_avx512(row, nc, a.xd.data_ptr<float>() + m * nc * 128);
      if (asym) {
        float* xs = a.xsum.data_ptr<float>() + m * nb;
        for (int64_t b = 0; b < nb; ++b) xs[b] = std::accumulate(row + b * g, row + (b + 1) * g, 0.0f);
      }
    }
    return a;
  }
#endif
  // Every slot of a real row is written below, so only the padded rows' slots need zeros: zero-filled tensors
  // and buffers, and a copy of rows that can be read in place, cost microseconds a call, which matters to a
  // decoding step's small GEMVs (development measurement, one 576-wide row, fast mode, N = 1: 14 -> 9.5 us).
  if (fast) {
    a.qx = at::empty({Mp * Kp}, x2.options().dtype(at::kChar));
    a.sx = at::empty({Mp * nb}, f32);
    a.xsum = at::empty({M, nb}, f32);
    int8_t* q = a.qx.data_ptr<int8_t>();
    float* sx = a.sx.data_ptr<float>();
    for (int64_t m = M; m < Mp; ++m)
      for (int64_t b = 0; b < nb; ++b) {
        sx[a.slot(m, b)] = 0.0f;
        std::fill(q + a.slot(m, b) * g, q + (a.slot(m, b) + 1) * g, int8_t{0});
      }
  } else {
    a.xd = at::empty({M, Kp}, f32);
  }
  const bool direct = in_place(Kp);  // rows read in place, else converted (and zero-padded) into `nat`
  parallel_for(M, std::max<int64_t>(1, 8192 / Kp), [&](int64_t m0, int64_t m1) {
    std::unique_ptr<float[]> nat(direct ? nullptr : new float[Kp]), dei(fast ? new float[Kp] : nullptr);
    if (!direct) std::fill(nat.get() + K, nat.get() + Kp, 0.0f);
    for (int64_t m = m0; m < m1; ++m) {
      const float* row = float_row(xp + m * rs, cs, K, direct, nat.get(), isa);
      float* out = fast ? dei.get() : a.xd.data_ptr<float>() + m * Kp;
      const int64_t span = fast ? g : 16;
#if PYSHRINK_X86
      if (has_avx2(isa)) deinterleave_avx2(row, Kp, span, out);
      else
#endif
        deinterleave_scalar(row, Kp, span, out);
      if (!fast) continue;
      int8_t* q = a.qx.data_ptr<int8_t>();
      float* sx = a.sx.data_ptr<float>();
      float* xs = a.xsum.data_ptr<float>() + m * nb;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t sl = a.slot(m, b);
        int32_t sum;
#if PYSHRINK_X86
        if (has_avx2(isa)) sum = quantize_block_avx2(dei.get() + b * g, g, sx + sl, q + sl * g);
        else
#endif
          sum = quantize_block_scalar(row + b * g, g, sx + sl, q + sl * g);  // natural order in
        xs[b] = sx[sl] * static_cast<float>(sum);
      }
    }
  });
  return a;
}

#if PYSHRINK_X86
// Prologue shared by the AVX2 tiles: the RN weight rows' code and scale pointers, and RM x RN zeroed float
// accumulators.
template <int RM, int RN>
struct TileState {
  const uint8_t* wp[RN];
  const float* ws[RN];
  __m256 acc[RM][RN];
  PYSHRINK_AVX2_INLINE TileState(const Q4Weights& W, const int64_t* nidx) {
    for (int n = 0; n < RN; ++n) wp[n] = W.row(nidx[n]), ws[n] = W.srow(nidx[n]);
    for (int m = 0; m < RM; ++m)
      for (int n = 0; n < RN; ++n) acc[m][n] = _mm256_setzero_ps();
  }
  // The exact GEMV (RM == 1) is memory bound: ask early for block b of the next tile's rows (RN rows further),
  // which adds RN streams in flight to the RN the hardware prefetcher follows (prefetching the current rows
  // further ahead measured slower on the AVX-512 machine; the fast GEMV reads one row at a time instead, see
  // fast_gemv_row_avx2).
  template <int G>
  PYSHRINK_AVX2_INLINE void prefetch_next_tile(int64_t nb, int64_t b) const {
    const int64_t row_bytes = nb * (G / 2);
    for (int n = 0; n < RN; ++n) _mm_prefetch(reinterpret_cast<const char*>(wp[n] + RN * row_bytes + b * (G / 2)), _MM_HINT_T0);
    if (b % 16 == 0)
      for (int n = 0; n < RN; ++n) _mm_prefetch(reinterpret_cast<const char*>(ws[n] + RN * nb + b), _MM_HINT_T0);
  }
  PYSHRINK_AVX2_INLINE void finish(float* raw) const {
    for (int m = 0; m < RM; ++m)
      for (int n = 0; n < RN; ++n) raw[m * RN + n] = hsum(acc[m][n]);
  }
};
#endif

// ---------------------------------------------------------------------------------------------------------
// fast tiles: raw[m*RN+n] = sum_b sx[m][b] * scale[n][b] * sum_k qx[m][k] * q[n][k] - sum_b zs[n][b] * xs[m][b]
// x / sx point at the tile's first row; row m of block b is at (b * MT + m) * G / (b * MT + m). The integer dots
// leave the zero point out; the second sum puts it back, zs = zero point * scale per block of the RN weight rows
// (zero_point_scales, [RN][nb]) and xs = sx * sum(qx) per block of the RM activation rows ([RM][nb]).

template <int G, int MT, int RM, int RN>
void fast_tile_scalar(const Q4Weights& W, const int64_t* nidx, const int8_t* x, const float* sx, const float* zs,
                      const float* xs, float* raw) {
  for (int m = 0; m < RM; ++m)
    for (int n = 0; n < RN; ++n) {
      const uint8_t* wp = W.row(nidx[n]);
      const float* ws = W.srow(nidx[n]);
      float acc = 0.0f;
      for (int64_t b = 0; b < W.nb; ++b) {
        const uint8_t* p = wp + b * (G / 2);
        const int8_t* xb = x + (b * MT + m) * G;
        int32_t d = 0;
        for (int j = 0; j < G / 2; ++j) d += xb[j] * (p[j] & 0x0F) + xb[G / 2 + j] * (p[j] >> 4);
        acc += static_cast<float>(d) * (sx[b * MT + m] * ws[b]);
      }
      for (int64_t b = 0; b < W.nb; ++b) acc -= zs[n * W.nb + b] * xs[m * W.nb + b];
      raw[m * RN + n] = acc;
    }
}

#if PYSHRINK_X86
// One block's packed codes as C = G / 32 vectors of 32 codes (0..15); vector c pairs with the block's
// activations at 32 * c (the evens' low nibbles first, then the odds' high nibbles).
template <int G>
PYSHRINK_AVX2_INLINE void unpack_block_avx2(const uint8_t* p, __m256i* w) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  if (G == 32) {
    // 16 bytes in both lanes; the low lane keeps the low nibbles, the high lane shifts the high ones down
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    w[0] = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), mask);
  } else {
    for (int c = 0; c < G / 64; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * c));
      w[c] = _mm256_and_si256(v, mask);
      w[G / 64 + c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    }
  }
}

// The integer dot of one unpacked block with its G int8 activations xb, as 16 int16 partial sums
// (|.| <= (G / 32) * 2 * 15 * 127 <= 15240).
template <int G>
PYSHRINK_AVX2_INLINE __m256i block_sum16_avx2(const __m256i* w, const int8_t* xb) {
  __m256i s16 = _mm256_maddubs_epi16(w[0], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb)));
  for (int c = 1; c < G / 32; ++c)
    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[c], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 32 * c))));
  return s16;
}

// The same dot as 8 float partial sums.
template <int G>
PYSHRINK_AVX2_INLINE __m256 block_dot_avx2(const __m256i* w, const int8_t* xb) {
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(block_sum16_avx2<G>(w, xb), _mm256_set1_epi16(1)));
}

template <int G, int MT, int RM, int RN>
PYSHRINK_AVX2 void fast_tile_avx2(const Q4Weights& W, const int64_t* nidx, const int8_t* x, const float* sx,
                                  const float* zs, const float* xs, float* raw) {
  const int64_t nb = W.nb;
  TileState<RM, RN> t(W, nidx);
  auto& acc = t.acc;
  for (int64_t b = 0; b < nb; ++b) {
    __m256i w[RN][G / 32];
    for (int n = 0; n < RN; ++n) unpack_block_avx2<G>(t.wp[n] + b * (G / 2), w[n]);
    __m256 wsv[RN];
    for (int n = 0; n < RN; ++n) wsv[n] = _mm256_broadcast_ss(t.ws[n] + b);
    const int8_t* xb = x + b * MT * G;
    for (int m = 0; m < RM; ++m) {
      const __m256 sxv = _mm256_broadcast_ss(sx + b * MT + m);
      for (int n = 0; n < RN; ++n)
        acc[m][n] = _mm256_fmadd_ps(block_dot_avx2<G>(w[n], xb + m * G), _mm256_mul_ps(sxv, wsv[n]), acc[m][n]);
    }
  }
  // The zero-point term, 8 blocks per lane-wise FMA into the same accumulators, so that one horizontal sum per
  // output remains: a separate dot product per output (a call, its own horizontal sum and scalar tail) cost
  // more than the tile itself at K = 576 (SmolLM2), where a row has 9 blocks.
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t b = 0; b < nb; b += 8) {
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(8, nb - b))), lane);
    __m256 z[RN];
    for (int n = 0; n < RN; ++n) z[n] = _mm256_maskload_ps(zs + n * nb + b, live);
    for (int m = 0; m < RM; ++m) {
      const __m256 xv = _mm256_maskload_ps(xs + m * nb + b, live);
      for (int n = 0; n < RN; ++n) acc[m][n] = _mm256_fnmadd_ps(z[n], xv, acc[m][n]);
    }
  }
  t.finish(raw);
}
#endif

// ---------------------------------------------------------------------------------------------------------
// exact tiles (small M): raw[m*RN+n] = sum_b scale[n][b] * sum_k x[m][k] * (q[n][k] - zp[n][b])
// Packed byte j of a block pairs with activations 16*(j/8) + j%8 (low nibble) and that + 8 (high nibble).

template <int G, int RM, int RN>
void exact_tile_scalar(const Q4Weights& W, const int64_t* nidx, const float* const* xd, float* raw) {
  for (int m = 0; m < RM; ++m)
    for (int n = 0; n < RN; ++n) {
      const uint8_t* wp = W.row(nidx[n]);
      const float* ws = W.srow(nidx[n]);
      float acc = 0.0f;
      for (int64_t b = 0; b < W.nb; ++b) {
        const uint8_t* p = wp + b * (G / 2);
        const float* xb = xd[m] + b * G;
        const int zp = W.zero_point(nidx[n], b);
        float s = 0.0f;
        for (int j = 0; j < G / 2; ++j) {
          const int e = 16 * (j / 8) + j % 8;
          s += xb[e] * static_cast<float>((p[j] & 0x0F) - zp) + xb[e + 8] * static_cast<float>((p[j] >> 4) - zp);
        }
        acc += s * ws[b];
      }
      raw[m * RN + n] = acc;
    }
}

#if PYSHRINK_X86
template <int G, int RM, int RN>
PYSHRINK_AVX2 void exact_tile_avx2(const Q4Weights& W, const int64_t* nidx, const float* const* xd, float* raw) {
  const __m256i m15 = _mm256_set1_epi32(0x0F);
  const int64_t nb = W.nb;
  TileState<RM, RN> t(W, nidx);
  const uint8_t* const* wp = t.wp;
  const float* const* ws = t.ws;
  auto& acc = t.acc;
  for (int64_t b = 0; b < nb; ++b) {
    if (RM == 1) t.template prefetch_next_tile<G>(nb, b);
    __m256i zp[RN];
    for (int n = 0; n < RN; ++n) zp[n] = _mm256_set1_epi32(W.zero_point(nidx[n], b));
    __m256 blk[RM][RN];
    for (int m = 0; m < RM; ++m)
      for (int n = 0; n < RN; ++n) blk[m][n] = _mm256_setzero_ps();
    for (int j = 0; j < G / 2; j += 8) {  // 8 packed bytes = 16 codes per step
      __m256 lo[RN], hi[RN];
      for (int n = 0; n < RN; ++n) {
        const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wp[n] + b * (G / 2) + j)));
        lo[n] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(d, m15), zp[n]));
        hi[n] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(d, 4), zp[n]));
      }
      for (int m = 0; m < RM; ++m) {
        const __m256 xe = _mm256_loadu_ps(xd[m] + b * G + 2 * j), xo = _mm256_loadu_ps(xd[m] + b * G + 2 * j + 8);
        for (int n = 0; n < RN; ++n) blk[m][n] = _mm256_fmadd_ps(hi[n], xo, _mm256_fmadd_ps(lo[n], xe, blk[m][n]));
      }
    }
    for (int n = 0; n < RN; ++n) {
      const __m256 sv = _mm256_broadcast_ss(ws[n] + b);
      for (int m = 0; m < RM; ++m) acc[m][n] = _mm256_fmadd_ps(blk[m][n], sv, acc[m][n]);
    }
  }
  t.finish(raw);
}
#endif


// ---------------------------------------------------------------------------------------------------------
// exact, M >= 4: dequantize NT weight rows into float (same 16-element [evens | odds] order as the activations, value
// (q - zp) * scale rounded once, as dequantize_q4), then a register-blocked float GEMM over K chunks.

void dequant_rows_scalar(const Q4Weights& W, int64_t n, float* dst) {
  const int64_t g = W.g;
  const uint8_t* p = W.row(n);
  const float* s = W.srow(n);
  for (int64_t b = 0; b < W.nb; ++b) {
    const float z = static_cast<float>(W.zero_point(n, b));
    for (int64_t j = 0; j < g / 2; ++j) {
      const uint8_t v = p[b * (g / 2) + j];
      const int64_t e = b * g + 16 * (j / 8) + j % 8;
      dst[e] = (static_cast<float>(v & 0x0F) - z) * s[b];
      dst[e + 8] = (static_cast<float>(v >> 4) - z) * s[b];
    }
  }
}

template <int RM>
void gemm_tile_scalar(const float* const* x, const float* const* w, int64_t k0, int64_t k1, float* raw) {
  for (int m = 0; m < RM; ++m)
    for (int n = 0; n < 3; ++n) {
      float s = 0.0f;
      for (int64_t k = k0; k < k1; ++k) s += x[m][k] * w[n][k];
      raw[m * 3 + n] += s;
    }
}

#if PYSHRINK_X86
PYSHRINK_AVX2 void dequant_rows_avx2(const Q4Weights& W, int64_t n, float* dst) {
  const int64_t g = W.g;
  const uint8_t* p = W.row(n);
  const float* s = W.srow(n);
  const __m128i m4 = _mm_set1_epi8(0x0F);
  for (int64_t b = 0; b < W.nb; ++b) {
    const __m256 vs = _mm256_set1_ps(s[b]), vz = _mm256_set1_ps(static_cast<float>(W.zero_point(n, b)));
    for (int64_t j = 0; j < g / 2; j += 8) {
      const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + b * (g / 2) + j));
      const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(v, m4)));
      const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), m4)));
      _mm256_storeu_ps(dst + b * g + 2 * j, _mm256_mul_ps(_mm256_sub_ps(lo, vz), vs));
      _mm256_storeu_ps(dst + b * g + 2 * j + 8, _mm256_mul_ps(_mm256_sub_ps(hi, vz), vs));
    }
  }
}

template <int RM>
PYSHRINK_AVX2 void gemm_tile_avx2(const float* const* x, const float* const* w, int64_t k0, int64_t k1, float* raw) {
  __m256 acc[RM][3];
  for (int m = 0; m < RM; ++m)
    for (int n = 0; n < 3; ++n) acc[m][n] = _mm256_setzero_ps();
  for (int64_t k = k0; k < k1; k += 8) {
    const __m256 w0 = _mm256_loadu_ps(w[0] + k), w1 = _mm256_loadu_ps(w[1] + k), w2 = _mm256_loadu_ps(w[2] + k);
    for (int m = 0; m < RM; ++m) {
      const __m256 xv = _mm256_loadu_ps(x[m] + k);
      acc[m][0] = _mm256_fmadd_ps(xv, w0, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(xv, w1, acc[m][1]);
      acc[m][2] = _mm256_fmadd_ps(xv, w2, acc[m][2]);
    }
  }
  for (int m = 0; m < RM; ++m)
    for (int n = 0; n < 3; ++n) raw[m * 3 + n] += hsum(acc[m][n]);
}
template <int RM>
PYSHRINK_AVX512 void gemm_tile_avx512(const float* const* x, const float* const* w, int64_t k0, int64_t k1, float* raw) {
  __m512 acc[RM][3];
  for (int m = 0; m < RM; ++m)
    for (int n = 0; n < 3; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t k = k0; k < k1; k += 16) {  // k0, k1 are multiples of 32
    const __m512 w0 = _mm512_loadu_ps(w[0] + k), w1 = _mm512_loadu_ps(w[1] + k), w2 = _mm512_loadu_ps(w[2] + k);
    for (int m = 0; m < RM; ++m) {
      const __m512 xv = _mm512_loadu_ps(x[m] + k);
      acc[m][0] = _mm512_fmadd_ps(xv, w0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(xv, w1, acc[m][1]);
      acc[m][2] = _mm512_fmadd_ps(xv, w2, acc[m][2]);
    }
  }
  for (int m = 0; m < RM; ++m)
    for (int n = 0; n < 3; ++n) raw[m * 3 + n] += _mm512_reduce_add_ps(acc[m][n]);
}
#endif

// ---------------------------------------------------------------------------------------------------------
// fast, M >= 4, AVX-512 VNNI: a GEMM over a repacked tile of 16 * RN weight rows.
//
// Repack (once per tile, amortized over all M rows): lane l of a zmm is weight row n0 + 16r + l, and its 4
// bytes are the signed codes (q - zp) of 4 consecutive [evens | odds] positions of one block, so that
// vpdpbusd(acc, 4 activation bytes broadcast to every lane, tile zmm) adds 4 products to 16 output columns
// at once and every broadcast serves 16 * RN columns. The activations go in unsigned as qx + 128 (vpdpbusd
// multiplies u8 by s8): sum (qx + 128)(q - zp) = sum qx (q - zp) + 128 sum (q - zp), and the last term, a
// constant of the weight block, initializes each block's int32 accumulator negated, so the block dot comes
// out exact, zero point included, with no per-output correction. Per block: cvt and one FMA with
// scale * sx into a float accumulator.
#if PYSHRINK_X86
template <int G, int RN>
PYSHRINK_AVX512 void repack_vnni(const Q4Weights& W, int64_t n0, int8_t* codes, int32_t* corr, float* scl) {
  const int64_t nb = W.nb, row_bytes = nb * (G / 2);
  const __m512i m4 = _mm512_set1_epi8(0x0F), ones = _mm512_set1_epi8(1);
  for (int r = 0; r < RN; ++r) {
    int64_t nidx[16];
    alignas(64) int32_t off[16];
    for (int l = 0; l < 16; ++l) {
      nidx[l] = std::min(n0 + 16 * r + l, W.N - 1);  // past the end: duplicates of the last row, not stored
      off[l] = static_cast<int32_t>((nidx[l] - n0) * row_bytes);
    }
    const __m512i vidx = _mm512_load_si512(off);
    const uint8_t* base = W.row(n0);
    for (int64_t b = 0; b < nb; ++b) {
      alignas(64) int32_t zp4[16];
      alignas(64) float sc[16];
      for (int l = 0; l < 16; ++l) {
        zp4[l] = W.zero_point(nidx[l], b) * 0x01010101;
        sc[l] = W.srow(nidx[l])[b];
      }
      const __m512i zpv = _mm512_load_si512(zp4);
      _mm512_store_ps(scl + (b * RN + r) * 16, _mm512_load_ps(sc));
      __m512i sum = _mm512_setzero_si512();
      for (int s = 0; s < G / 8; ++s) {
        const __m512i d = _mm512_i32gather_epi32(vidx, base + b * (G / 2) + 4 * s, 1);
        const __m512i lo = _mm512_sub_epi8(_mm512_and_si512(d, m4), zpv);
        const __m512i hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(d, 4), m4), zpv);
        _mm512_store_si512(codes + ((b * (G / 4) + s) * RN + r) * 64, lo);
        _mm512_store_si512(codes + ((b * (G / 4) + G / 8 + s) * RN + r) * 64, hi);
        sum = _mm512_dpbusd_epi32(sum, ones, lo);
        sum = _mm512_dpbusd_epi32(sum, ones, hi);
      }
      _mm512_store_si512(corr + (b * RN + r) * 16, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sum, 7)));
    }
  }
}

// out[m * 16 * RN + c] for RM (<= 8) rows of x starting at a multiple of 4: xu / sx point at slot(m0, 0) of
// the unsigned codes and of sx; rows m0 + 4..7 are one activation group (gstride slots) further.
template <int G, int RM, int RN>
PYSHRINK_AVX512 void fast_gemm_tile_avx512(const int8_t* codes, const int32_t* corr, const float* scl, int64_t nb,
                                           const uint8_t* xu, const float* sx, int64_t gstride, float* out) {
  auto slot = [gstride](int m, int64_t b) { return (m / 4) * gstride + b * 4 + m % 4; };
  __m512 facc[RM][RN];
  for (int m = 0; m < RM; ++m)
    for (int r = 0; r < RN; ++r) facc[m][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i acc[RM][RN];
    for (int m = 0; m < RM; ++m)
      for (int r = 0; r < RN; ++r) acc[m][r] = _mm512_load_si512(corr + (b * RN + r) * 16);
    const int8_t* wc = codes + b * (G / 4) * RN * 64;
    for (int s = 0; s < G / 4; ++s) {
      __m512i w[RN];
      for (int r = 0; r < RN; ++r) w[r] = _mm512_load_si512(wc + (s * RN + r) * 64);
      for (int m = 0; m < RM; ++m) {
        int32_t x4;
        std::memcpy(&x4, xu + slot(m, b) * G + 4 * s, 4);
        const __m512i xb = _mm512_set1_epi32(x4);
        for (int r = 0; r < RN; ++r) acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], xb, w[r]);
      }
    }
    for (int m = 0; m < RM; ++m) {
      const __m512 sxv = _mm512_set1_ps(sx[slot(m, b)]);
      for (int r = 0; r < RN; ++r)
        facc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][r]), _mm512_mul_ps(_mm512_load_ps(scl + (b * RN + r) * 16), sxv),
                                     facc[m][r]);
    }
  }
  for (int m = 0; m < RM; ++m)
    for (int r = 0; r < RN; ++r) _mm512_storeu_ps(out + m * 16 * RN + 16 * r, facc[m][r]);
}
#endif

// ---------------------------------------------------------------------------------------------------------
// fast, M <= 3, AVX-512 VNNI: a GEMV straight over the packed bytes as stored (no repack: at M = 1 every
// weight byte is used once, so a repack would cost as much as the product).
//
// A zmm holds 64 packed bytes of one weight row: 128 weights, i.e. one block of 128, two of 64 or four of 32.
// The low nibbles pair with 64 activations and the high nibbles with 64 others, so the activations are laid
// out once per call to match (GemvActs): per 128-weight chunk, the 64 low-nibble partners, then the 64
// high-nibble ones. vpdpbusd(acc, nibbles as u8, activations as s8) adds 4 products per int32 lane, and a lane
// never straddles a block (a block is at least 16 bytes), so per chunk and row the block scales expand to the
// 16 lanes with one permute, and one cvt, one mul and one FMA add the lanes into float accumulators. That is
// about half the AVX2 tile's instructions per weight (maddubs + madd per 32 bytes). Symmetric weights: the zero
// point 8 goes into the integer accumulator's start value, -8 * (sum of the lane's 8 activations), computed
// once per call, so every lane's dot is exact with the zero point included and no per-output correction is
// left; asymmetric zero points are corrected per output as in gemv_tiles.
#if PYSHRINK_X86
// What the M <= 3 GEMV tiles (fast and exact) share: RN weight rows walked in 64-byte chunks (128 weights), the
// last one read with a mask; each chunk's block scales spread to the 16 int32/float lanes (a lane is 4 bytes
// of one block, since a block is at least 16 bytes); and the prefetch. Rows longer than kGemvRowAhead bytes:
// each row's line kGemvRowAhead bytes further along (in a row's last kGemvRowAhead bytes, that far into the
// next tile's row), so about RN * kGemvRowAhead bytes are in flight and the activations stay in L1; shorter
// rows: the same lines of the rows `ahead` tiles further on (at least kGemvPrefetch bytes). And the scales of
// the tile `ahead` further on.
template <int G, int RN>
struct GemvRows {
  static constexpr int BPC = 128 / G;  // blocks per chunk
  const uint8_t* wp[RN];
  const float* ws[RN];
  int64_t nb, nc, pf_bytes, pf_next, pf_switch, pf_scales;  // prefetch offsets (bytes) before / from chunk pf_switch
  __mmask64 tail;
  __mmask8 tail_blocks;
  __m512i sidx;

  PYSHRINK_AVX512_INLINE GemvRows(const Q4Weights& W, const int64_t* nidx, int64_t nchunks) : nb(W.nb), nc(nchunks) {
    const int64_t row_bytes = nb * (G / 2), tail_bytes = row_bytes - (nc - 1) * 64;  // 1..64
    tail = tail_bytes >= 64 ? ~__mmask64{0} : ((__mmask64{1} << tail_bytes) - 1);
    tail_blocks = static_cast<__mmask8>((1u << (nb - (nc - 1) * BPC)) - 1);
    sidx = _mm512_setr_epi32(0 * 8 / G, 1 * 8 / G, 2 * 8 / G, 3 * 8 / G, 4 * 8 / G, 5 * 8 / G, 6 * 8 / G, 7 * 8 / G,
                             8 * 8 / G, 9 * 8 / G, 10 * 8 / G, 11 * 8 / G, 12 * 8 / G, 13 * 8 / G, 14 * 8 / G, 15 * 8 / G);
    for (int r = 0; r < RN; ++r) wp[r] = W.row(nidx[r]), ws[r] = W.srow(nidx[r]);
    const int64_t tile_bytes = RN * row_bytes, ahead = (kGemvPrefetch + tile_bytes - 1) / tile_bytes;
    pf_scales = ahead * RN * nb;
    if (row_bytes > kGemvRowAhead) {  // chunk c < pf_switch: along the row; after: into the next tile's row
      pf_bytes = kGemvRowAhead;
      pf_next = kGemvRowAhead + (RN - 1) * row_bytes;
      pf_switch = (row_bytes - kGemvRowAhead + 63) / 64;
    } else {
      pf_bytes = pf_next = ahead * tile_bytes;
      pf_switch = nc;
    }
  }
  PYSHRINK_AVX512_INLINE void prefetch(int64_t c) const {
    const int64_t off = c * 64 + (c < pf_switch ? pf_bytes : pf_next);
    for (int r = 0; r < RN; ++r) _mm_prefetch(reinterpret_cast<const char*>(wp[r] + off), _MM_HINT_T0);
    if (c * 64 < RN * nb * 4) _mm_prefetch(reinterpret_cast<const char*>(ws[0] + pf_scales) + c * 64, _MM_HINT_T0);
  }
  PYSHRINK_AVX512_INLINE __m512i codes(int r, int64_t c) const {
    const uint8_t* p = wp[r] + c * 64;
    return c == nc - 1 ? _mm512_maskz_loadu_epi8(tail, p) : _mm512_loadu_si512(p);
  }
  PYSHRINK_AVX512_INLINE __m512 scales(int r, int64_t c) const {
    const float* s = ws[r] + c * BPC;
    if (G == 128) return _mm512_set1_ps(*s);
    const __m128 s4 = c == nc - 1 ? _mm_maskz_loadu_ps(tail_blocks, s)
                                  : (G == 64 ? _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(s))) : _mm_loadu_ps(s));
    return _mm512_permutexvar_ps(sidx, _mm512_castps128_ps512(s4));
  }
};

template <int G, int RM, int RN>
PYSHRINK_AVX512 void fast_gemv_tile_avx512(const Q4Weights& W, const int64_t* nidx, const GemvActs& a, float* raw) {
  const GemvRows<G, RN> rows(W, nidx, a.nc);
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  __m512 acc[RM][RN];
  for (int m = 0; m < RM; ++m)
    for (int r = 0; r < RN; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < a.nc; ++c) {
    rows.prefetch(c);
    __m512i lo[RN], hi[RN];
    __m512 wsv[RN];
    for (int r = 0; r < RN; ++r) {
      const __m512i w = rows.codes(r, c);
      lo[r] = _mm512_and_si512(w, m4);
      hi[r] = _mm512_and_si512(_mm512_srli_epi16(w, 4), m4);
      wsv[r] = rows.scales(r, c);
    }
    for (int m = 0; m < RM; ++m) {
      const __m512i xlo = _mm512_load_si512(a.xv[m] + c * 128), xhi = _mm512_load_si512(a.xv[m] + c * 128 + 64);
      const __m512i i0 = _mm512_load_si512(a.init[m] + c * 16);
      const __m512 sxv = _mm512_load_ps(a.sxl[m] + c * 16);
      for (int r = 0; r < RN; ++r) {
        const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(i0, lo[r], xlo), hi[r], xhi);
        acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(wsv[r], sxv), acc[m][r]);
      }
    }
  }
  for (int m = 0; m < RM; ++m)
    for (int r = 0; r < RN; ++r) raw[m * RN + r] = _mm512_reduce_add_ps(acc[m][r]);
}

// exact, M <= 3: the same walk over the stored bytes with float activations. The 64 bytes of a chunk are 16
// dwords, dword l holding weights 8l..8l+7 as 8 nibbles; `dword >> 4j` puts weight 8l + j in the low 4 bits of
// lane l, and vpermps, which reads only those 4 bits of each index, maps it through the table (0..15) - 8 to
// the exact float (q - 8). So 128 weights cost 7 shifts and 8 permutes, with no widening and one table for
// every block. The activations are laid out once per call to match (Acts::lanes: element 8l + j of a chunk at
// 16j + l). Each lane's 8 products belong to
// one block, so a chunk's lane sums take the block scales with one FMA per chunk and row. Asymmetric zero
// points are corrected per output: sum_b scale * (zp - 8) * (sum of the block's x).
template <int G, int RM, int RN>
PYSHRINK_AVX512 void exact_gemv_tile_avx512(const Q4Weights& W, const int64_t* nidx, const float* const* xl,
                                            int64_t nc, float* raw) {
  const GemvRows<G, RN> rows(W, nidx, nc);
  const __m512 tab = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  __m512 acc[RM][RN];
  for (int m = 0; m < RM; ++m)
    for (int r = 0; r < RN; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < nc; ++c) {
    rows.prefetch(c);
    __m512i w[RN];
    for (int r = 0; r < RN; ++r) w[r] = rows.codes(r, c);
    __m512 part[RM][RN];
    for (int j = 0; j < 8; ++j) {
      __m512 wv[RN];
      for (int r = 0; r < RN; ++r) wv[r] = _mm512_permutexvar_ps(j ? _mm512_srli_epi32(w[r], 4 * j) : w[r], tab);
      for (int m = 0; m < RM; ++m) {
        const __m512 x = _mm512_loadu_ps(xl[m] + c * 128 + 16 * j);
        for (int r = 0; r < RN; ++r) part[m][r] = j ? _mm512_fmadd_ps(wv[r], x, part[m][r]) : _mm512_mul_ps(wv[r], x);
      }
    }
    for (int r = 0; r < RN; ++r) {
      const __m512 sv = rows.scales(r, c);
      for (int m = 0; m < RM; ++m) acc[m][r] = _mm512_fmadd_ps(part[m][r], sv, acc[m][r]);
    }
  }
  for (int m = 0; m < RM; ++m)
    for (int r = 0; r < RN; ++r) raw[m * RN + r] = _mm512_reduce_add_ps(acc[m][r]);
}
#endif

// ---------------------------------------------------------------------------------------------------------
// drivers

template <typename Out>
struct Output {
  Out* y;
  int64_t N;
  const float* bias;
  void store(int64_t m, int64_t n, float v) const { y[m * N + n] = from_float<Out>(v + (bias ? bias[n] : 0.0f)); }
};

// Splits n-tiles over threads with at least ~64K multiply-adds per task.
template <typename F>
void for_tiles(int64_t ntiles, int64_t macs_per_tile, F&& f) {
  parallel_for(ntiles, std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, macs_per_tile)), f);
}

#if PYSHRINK_X86
PYSHRINK_AVX2 float dot_f32_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}
#endif

float dot_f32(Isa isa, const float* a, const float* b, int64_t n) {
#if PYSHRINK_X86
  if (has_avx2(isa)) return dot_f32_avx2(a, b, n);
#endif
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

#if PYSHRINK_X86
// fast mode, M == 1, AVX2: one weight row at a time, so that a task's rows (contiguous in memory) are read as ONE
// stream, with a software prefetch kAvx2GemvAhead bytes ahead of it. The general tile (4 rows side by side, which
// share the activation loads) reads four interleaved streams, which the hardware prefetcher of the AVX2 machine
// this was tuned on follows badly. Development measurements (a standalone harness of both loops, 2 threads,
// rotated weights, variants interleaved in one process, on a 2-core AMD EPYC (Zen 3) VM; % of a bare AVX2 read
// of the same bytes): 4096 x 4096 g64: 4 rows with the next-tile prefetch 72-75 %, the same loads without the
// arithmetic 74-77 %, one row without a prefetch 73 %, one row prefetching 1 / 4 / 8 / 16 KiB ahead
// 80 / 83 / 84-89 / 89 %; 1536 -> 576: 54-61 % against 82-88 %; 11008 -> 4096 (5.5 KB rows): 85-88 % against
// 86-87 %. bench/RESULTS.md (CPU kernels) has the committed effect. The symmetric zero point 8 comes off as
// 8 * sum_b scale_b * xsum_b, accumulated in the loop, instead of the general tile's per-block loop.
//
// The arithmetic is laid out for throughput, since on that machine the loop is as much compute as memory bound
// (the same loop over L2-resident weights ran at about the read bandwidth of the two cores): 4 blocks per step,
// and fast_pair_avx2 merges two blocks' int16 sums into one vector before the widening vpmaddwd, the int -> float
// conversion and the FMA, which then run once per 2 blocks against a vector of the 2 blocks' scales. Timed on
// L2-resident 4096-wide rows, 1 thread (development harness, TSC ticks per 64-weight block): the loop before
// this one 5.3 (it kept its two accumulators in an array indexed by b & 1, which the compiler put on the stack,
// so every FMA waited on a store-to-load forward), 4 named accumulators 3.1-3.6, this loop 2.6-2.7, the integer
// dots alone 1.9.
constexpr int64_t kAvx2GemvAhead = 8192;

// Two blocks' int16 partial sums s0, s1 -> 8 int32 partial sums, lanes [b0 b1 b0 b1 | b0 b1 b0 b1]: the 32-bit
// unpacks interleave int16 pairs of the two blocks, and the add folds lanes of the same block together
// (|.| <= 2 * 15240 < 2^15).
PYSHRINK_AVX2_INLINE __m256i fast_pair_avx2(__m256i s0, __m256i s1) {
  const __m256i s = _mm256_add_epi16(_mm256_unpacklo_epi32(s0, s1), _mm256_unpackhi_epi32(s0, s1));
  return _mm256_madd_epi16(s, _mm256_set1_epi16(1));
}

// One row's dot. Symmetric weights (`Sym`): the zero point 8 comes off inside the loop, 8 * sum_b scale_b *
// xsum_b accumulated beside the dot from the scales the step loads anyway (one FMA per 4 blocks); a second pass
// over the row's scales after the loop, as before, is a chain of dependent FMAs and reductions per row. With
// that pass and a call per row, the op took 315 us on a 4096 x 4096 weight held in cache, against 245 us for
// the bare loop in a development harness in the same process; with neither, 219 against 193. Asymmetric
// weights return the dot against the raw codes; the caller subtracts their zero points.
template <int G, bool Sym>
PYSHRINK_AVX2_INLINE float fast_gemv_row_avx2(const Q4Weights& W, int64_t n, const int8_t* x, const float* sx,
                                              const float* xsum) {
  constexpr int64_t kStep = 4 * (G / 2);  // packed bytes per 4 blocks
  const uint8_t* p = W.row(n);
  const float* ws = W.srow(n);
  const int64_t nb = W.nb;
  const char* ahead = reinterpret_cast<const char*>(p) + kAvx2GemvAhead;
  const char* sahead = reinterpret_cast<const char*>(ws) + kAvx2GemvAhead * 8 / G;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m128 accz = _mm_setzero_ps();
  int64_t b = 0;
  for (; b + 4 <= nb; b += 4) {
    for (int64_t l = 0; l < kStep; l += 64) _mm_prefetch(ahead + b * (G / 2) + l, _MM_HINT_T0);
    if ((b & 15) == 0) _mm_prefetch(sahead + b * 4, _MM_HINT_T0);
    __m256i s[4];
    for (int j = 0; j < 4; ++j) {
      __m256i w[G / 32];
      unpack_block_avx2<G>(p + (b + j) * (G / 2), w);
      s[j] = block_sum16_avx2<G>(w, x + (b + j) * G);
    }
    const __m128 wsv = _mm_loadu_ps(ws + b);
    if (Sym) accz = _mm_fmadd_ps(wsv, _mm_loadu_ps(xsum + b), accz);
    const __m128 sc = _mm_mul_ps(wsv, _mm_loadu_ps(sx + b));
    const __m256 sc2 = _mm256_set_m128(sc, sc);
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(fast_pair_avx2(s[0], s[1])), _mm256_permute_ps(sc2, 0x44), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(fast_pair_avx2(s[2], s[3])), _mm256_permute_ps(sc2, 0xEE), acc1);
  }
  float z = 0.0f;
  for (; b < nb; ++b) {
    __m256i w[G / 32];
    unpack_block_avx2<G>(p + b * (G / 2), w);
    acc0 = _mm256_fmadd_ps(block_dot_avx2<G>(w, x + b * G), _mm256_set1_ps(sx[b] * ws[b]), acc0);
    if (Sym) z += ws[b] * xsum[b];
  }
  const float dot = hsum(_mm256_add_ps(acc0, acc1));
  if (!Sym) return dot;
  return dot - 8.0f * (hsum(_mm256_set_m128(_mm_setzero_ps(), accz)) + z);
}

// Rows [n0, n1) of the M == 1 fast GEMV into raw[0 .. n1 - n0): the row loop in one AVX2 function, so that
// fast_gemv_row_avx2 inlines and a task's rows follow one another without a call per row.
template <int G, bool Sym>
PYSHRINK_AVX2 void fast_gemv_rows_avx2(const Q4Weights& W, int64_t n0, int64_t n1, const int8_t* x, const float* sx,
                                       const float* xsum, float* raw) {
  for (int64_t n = n0; n < n1; ++n) raw[n - n0] = fast_gemv_row_avx2<G, Sym>(W, n, x, sx, xsum);
}
#endif

// (zero point - offset) times scale of every block of the RN rows nidx, into zs[n * nb + b]: the per-output
// correction sum_b (zp - offset) * scale * xsum_b for dots computed with the zero point `offset` (fast mode's
// integer dots leave it out, offset 0, with xsum = sx * sum qx; the exact GEMV uses 8).
template <int RN>
void zero_point_scales(const Q4Weights& W, const int64_t* nidx, int offset, float* zs) {
  for (int n = 0; n < RN; ++n)
    for (int64_t b = 0; b < W.nb; ++b)
      zs[n * W.nb + b] = static_cast<float>(W.zero_point(nidx[n], b) - offset) * W.srow(nidx[n])[b];
}

template <int G, int MT, int RM, int RN>
void fast_tile(Isa isa, const Q4Weights& W, const int64_t* nidx, const int8_t* x, const float* sx, const float* zs,
               const float* xs, float* raw) {
#if PYSHRINK_X86
  // MT == 1 (M == 1) reaches the tiles only at the scalar level: AVX2 has fast_gemv_row_avx2
  if constexpr (MT > 1)
    if (has_avx2(isa)) return fast_tile_avx2<G, MT, RM, RN>(W, nidx, x, sx, zs, xs, raw);
#endif
  fast_tile_scalar<G, MT, RM, RN>(W, nidx, x, sx, zs, xs, raw);
}

// MT = RM = 1, RN = 4 for M == 1 (at the scalar level: AVX2 and AVX-512 have GEMVs of their own); MT = 4
// (activation row groups), RN = 2 and RM = rows left (<= 4) otherwise.
// Blocked for the caches when x is large: a task walks a panel of its weight tiles (about kPanelBytes of codes)
// against one chunk of x's rows (about kXChunkBytes of codes) at a time, so both stay in L2 while every tile of
// the panel meets every row of the chunk. Unblocked, each tile of 2 weight rows streamed all of x, which at
// M = 128, K = 4096 (512 KB of codes) does not fit a core's L2, from L3 (development measurement, 2-core
// AMD EPYC (Zen 3) VM: see bench/RESULTS.md, CPU kernels, for the committed effect).
constexpr int64_t kPanelBytes = 128 * 1024;
constexpr int64_t kXChunkBytes = 64 * 1024;

template <int G, int MT, int RN, typename Out>
void run_fast(Isa isa, const Q4Weights& W, const Acts& a, const Output<Out>& out) {
  const int64_t M = a.M, N = W.N, nb = W.nb;
  const int8_t* qx = a.qx.const_data_ptr<int8_t>();
  const float* sx = a.sx.const_data_ptr<float>();
  const float* xsum = a.xsum.const_data_ptr<float>();
  const int64_t ntiles = (N + RN - 1) / RN;
  const int64_t panel = std::max<int64_t>(1, kPanelBytes / (RN * nb * (G / 2)));
  const int64_t chunk = std::max<int64_t>(MT, kXChunkBytes / a.Kp / MT * MT);
  for_tiles(ntiles, RN * M * a.Kp, [&](int64_t t0, int64_t t1) {
    std::vector<float> zs(std::min(panel, t1 - t0) * RN * nb);  // zero point * scale per block, per tile
    for (int64_t p0 = t0; p0 < t1; p0 += panel) {
      const int64_t p1 = std::min(t1, p0 + panel);
      const auto rows_of = [&](int64_t t, int64_t* nidx) {
        for (int n = 0; n < RN; ++n) nidx[n] = std::min(t * RN + n, N - 1);
      };
      for (int64_t t = p0; t < p1; ++t) {
        int64_t nidx[RN];
        rows_of(t, nidx);
        zero_point_scales<RN>(W, nidx, 0, zs.data() + (t - p0) * RN * nb);
      }
      for (int64_t c0 = 0; c0 < M; c0 += chunk) {
        const int64_t c1 = std::min(M, c0 + chunk);
        for (int64_t t = p0; t < p1; ++t) {
          int64_t nidx[RN];
          rows_of(t, nidx);
          const float* zt = zs.data() + (t - p0) * RN * nb;
          for (int64_t m0 = c0; m0 < c1; m0 += MT) {
            const int64_t mr = std::min<int64_t>(MT, M - m0);
            const int8_t* xt = qx + a.slot(m0, 0) * W.g;
            const float* st = sx + a.slot(m0, 0);
            const float* xs = xsum + m0 * nb;
            float raw[MT * RN];
            if (MT == 1 || mr == 4) fast_tile<G, MT, MT, RN>(isa, W, nidx, xt, st, zt, xs, raw);
            else if (mr == 1) fast_tile<G, MT, 1, RN>(isa, W, nidx, xt, st, zt, xs, raw);
            else if (mr == 2) fast_tile<G, MT, 2, RN>(isa, W, nidx, xt, st, zt, xs, raw);
            else fast_tile<G, MT, 3, RN>(isa, W, nidx, xt, st, zt, xs, raw);
            for (int64_t m = 0; m < mr; ++m)
              for (int64_t n = 0; n < RN && t * RN + n < N; ++n) out.store(m0 + m, t * RN + n, raw[m * RN + n]);
          }
        }
      }
    }
  });
}


#if PYSHRINK_X86
template <int G, int RN>
void fast_gemm_rows(int64_t rows, const int8_t* codes, const int32_t* corr, const float* scl, int64_t nb,
                    const uint8_t* xu, const float* sx, int64_t gstride, float* out) {
  if (rows == kVnniRM) return fast_gemm_tile_avx512<G, kVnniRM, RN>(codes, corr, scl, nb, xu, sx, gstride, out);
  if (rows == 4) return fast_gemm_tile_avx512<G, 4, RN>(codes, corr, scl, nb, xu, sx, gstride, out);
  if (rows == 3) return fast_gemm_tile_avx512<G, 3, RN>(codes, corr, scl, nb, xu, sx, gstride, out);
  if (rows == 2) return fast_gemm_tile_avx512<G, 2, RN>(codes, corr, scl, nb, xu, sx, gstride, out);
  fast_gemm_tile_avx512<G, 1, RN>(codes, corr, scl, nb, xu, sx, gstride, out);
}

// fast mode, M >= 4, AVX-512 VNNI (see repack_vnni). Rows of x go kVnniRM at a time (kVnniRM is a
// multiple of 4, the activation group), the tail in groups of 4 and then the 1-3 rows left.
template <int G, typename Out>
void run_fast_vnni(const Q4Weights& W, const Acts& a, const Output<Out>& out) {
  constexpr int RN = kVnniRN, NT = 16 * RN;
  const int64_t M = a.M, N = W.N, nb = W.nb, Mp = (M + 3) / 4 * 4;
  std::vector<uint8_t> xu(Mp * a.Kp);  // unsigned activation codes qx + 128, same layout as qx
  const int8_t* qx = a.qx.const_data_ptr<int8_t>();
  for (size_t i = 0; i < xu.size(); ++i) xu[i] = static_cast<uint8_t>(qx[i]) ^ 0x80;
  const float* sx = a.sx.const_data_ptr<float>();
  for_tiles((N + NT - 1) / NT, NT * M * a.Kp, [&](int64_t t0, int64_t t1) {
    Aligned64<int8_t> codes(nb * (G / 4) * RN * 64);
    Aligned64<int32_t> corr(nb * RN * 16);
    Aligned64<float> scl(nb * RN * 16), tmp(kVnniRM * NT);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * NT;
      repack_vnni<G, RN>(W, n0, codes.p, corr.p, scl.p);
      for (int64_t m0 = 0; m0 < M;) {
        const int64_t rows = M - m0 >= kVnniRM ? kVnniRM : std::min<int64_t>(4, M - m0);
        const int64_t sl = a.slot(m0, 0);
        fast_gemm_rows<G, RN>(rows, codes.p, corr.p, scl.p, nb, xu.data() + sl * G, sx + sl, nb * 4, tmp.p);
        for (int64_t m = 0; m < rows; ++m)
          for (int64_t c = 0; c < NT && n0 + c < N; ++c) out.store(m0 + m, n0 + c, tmp.p[m * NT + c]);
        m0 += rows;
      }
    }
  });
}

#if PYSHRINK_X86
// The fast GEMV's int32 start values: -8 * (sum of lane l's 8 activations) per chunk (the symmetric zero point
// folded in; zeros for asymmetric weights, corrected per output). One vpdpbusd with ones per 64 codes: this runs
// on every call, ~120 of them per decoded token, where the scalar loop cost ~2 us at K = 4096.
PYSHRINK_AVX512 void gemv_init_lanes(const int8_t* v, int64_t nc, bool asym, int32_t* init) {
  const __m512i ones = _mm512_set1_epi8(1), zero = _mm512_setzero_si512();
  for (int64_t c = 0; c < nc; ++c) {
    const __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, ones, _mm512_load_si512(v + c * 128)), ones,
                                          _mm512_load_si512(v + c * 128 + 64));
    _mm512_store_si512(init + c * 16, asym ? zero : _mm512_sub_epi32(zero, _mm512_slli_epi32(s, 3)));
  }
}
#endif

// Walks tiles of RN weight rows for the M <= 3 GEMVs: tile(nidx, raw) fills raw[m * RN + r]; asymmetric
// weights then take the per-output correction sum_b scale * (zp - zp_offset) * xsum[m][b], for tiles whose dots
// used the zero point zp_offset (fast: 0, exact: 8).
template <int RM, int RN, typename Out, typename Tile>
void gemv_tiles(Isa isa, const Q4Weights& W, const Acts& a, int zp_offset, const Output<Out>& out, const Tile& tile) {
  const int64_t N = W.N, nb = W.nb;
  const float* xsum = W.zp ? a.xsum.const_data_ptr<float>() : nullptr;
  for_tiles((N + RN - 1) / RN, RN * RM * a.Kp, [&](int64_t t0, int64_t t1) {
    std::vector<float> zs(W.zp ? RN * nb : 0);
    for (int64_t t = t0; t < t1; ++t) {
      int64_t nidx[RN];
      for (int n = 0; n < RN; ++n) nidx[n] = std::min(t * RN + n, N - 1);
      float raw[RM * RN];
      tile(nidx, raw);
      if (W.zp) zero_point_scales<RN>(W, nidx, zp_offset, zs.data());
      for (int m = 0; m < RM; ++m)
        for (int64_t n = 0; n < RN && t * RN + n < N; ++n)
          out.store(m, t * RN + n,
                    raw[m * RN + n] - (W.zp ? dot_f32(isa, zs.data() + n * nb, xsum + m * nb, nb) : 0.0f));
    }
  });
}

// fast mode, M <= 3, AVX-512 VNNI (see fast_gemv_tile_avx512): the activations come laid out (Acts::gemv).
template <int G, int RM, typename Out>
void run_fast_gemv(const Q4Weights& W, const Acts& a, const Output<Out>& out) {
  gemv_tiles<RM, 4>(Isa::kAvx512, W, a, 0, out, [&](const int64_t* nidx, float* raw) { fast_gemv_tile_avx512<G, RM, 4>(W, nidx, a.gv, raw); });
}

// fast mode, M == 1, AVX2 (see fast_gemv_row_avx2): the activations in run_fast's layout (MT = 1). Tasks
// take runs of rows (at least ~64K multiply-adds each, as for_tiles shares out tiles); asymmetric zero points
// come off per row as in gemv_tiles.
template <int G, typename Out>
void run_fast_gemv_avx2(const Q4Weights& W, const Acts& a, const Output<Out>& out) {
  const int8_t* qx = a.qx.const_data_ptr<int8_t>();
  const float* sx = a.sx.const_data_ptr<float>();
  const float* xsum = a.xsum.const_data_ptr<float>();
  const int64_t nb = W.nb;
  for_tiles(W.N, a.Kp, [&](int64_t n0, int64_t n1) {
    std::vector<float> raw(n1 - n0), zs(W.zp ? nb : 0);
    if (W.zp) fast_gemv_rows_avx2<G, false>(W, n0, n1, qx, sx, xsum, raw.data());
    else fast_gemv_rows_avx2<G, true>(W, n0, n1, qx, sx, xsum, raw.data());
    for (int64_t n = n0; n < n1; ++n) {
      float v = raw[n - n0];
      if (W.zp) {
        zero_point_scales<1>(W, &n, 0, zs.data());
        v -= dot_f32(Isa::kAvx2, zs.data(), xsum, nb);
      }
      out.store(0, n, v);
    }
  });
}

// exact mode, M <= 3, AVX-512 (see exact_gemv_tile_avx512); the activations come laid out (Acts::lanes).
template <int G, int RM, int RN, typename Out>
void run_exact_gemv(const Q4Weights& W, const Acts& a, const Output<Out>& out) {
  const int64_t nc = (a.Kp + 127) / 128;
  const float* xl[RM];
  for (int m = 0; m < RM; ++m) xl[m] = a.xd.const_data_ptr<float>() + m * nc * 128;
  gemv_tiles<RM, RN>(Isa::kAvx512, W, a, 8, out, [&](const int64_t* nidx, float* raw) { exact_gemv_tile_avx512<G, RM, RN>(W, nidx, xl, nc, raw); });
}
#endif

template <int G, int RM, int RN>
void exact_tile(Isa isa, const Q4Weights& W, const int64_t* nidx, const float* const* xd, float* raw) {
#if PYSHRINK_X86
  if (has_avx2(isa)) return exact_tile_avx2<G, RM, RN>(W, nidx, xd, raw);
#endif
  exact_tile_scalar<G, RM, RN>(W, nidx, xd, raw);
}

// M in 1..3: weights unpacked straight into registers, no buffer.
template <int G, int RM, int RN, typename Out>
void run_exact_small(Isa isa, const Q4Weights& W, const Acts& a, const Output<Out>& out) {
  const int64_t N = W.N;
  const float* xd = a.xd.const_data_ptr<float>();
  const float* xr[RM];
  for (int m = 0; m < RM; ++m) xr[m] = xd + m * a.Kp;
  for_tiles((N + RN - 1) / RN, RN * RM * a.Kp, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t nidx[RN];
      for (int n = 0; n < RN; ++n) nidx[n] = std::min(t * RN + n, N - 1);
      float raw[RM * RN];
      exact_tile<G, RM, RN>(isa, W, nidx, xr, raw);
      for (int m = 0; m < RM; ++m)
        for (int64_t n = 0; n < RN && t * RN + n < N; ++n) out.store(m, t * RN + n, raw[m * RN + n]);
    }
  });
}

template <int RM>
void gemm_tile(Isa isa, const float* const* x, const float* const* w, int64_t k0, int64_t k1, float* raw) {
#if PYSHRINK_X86
  if (isa == Isa::kAvx512) return gemm_tile_avx512<RM>(x, w, k0, k1, raw);
  if (has_avx2(isa)) return gemm_tile_avx2<RM>(x, w, k0, k1, raw);
#endif
  gemm_tile_scalar<RM>(x, w, k0, k1, raw);
}

template <typename Out>
void run_exact_gemm(Isa isa, const Q4Weights& W, const Acts& a, const Output<Out>& out) {
  constexpr int64_t NT = 24;    // weight rows dequantized per task (multiple of 3)
  constexpr int64_t KC = 1024;  // K chunk: 4 rows of x and 3 of W stay in L1
  const int64_t M = a.M, N = W.N, Kp = a.Kp;
  const float* xd = a.xd.const_data_ptr<float>();
  for_tiles((N + NT - 1) / NT, NT * M * Kp, [&](int64_t t0, int64_t t1) {
    Aligned64<float> wbuf_(NT * Kp);  // rows start on cache lines (Kp * 4 is a multiple of 128 bytes)
    float* const wbuf = wbuf_.p;
    std::vector<float> ybuf(M * NT);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * NT, nr = std::min(NT, N - n0);
      for (int64_t i = 0; i < NT; ++i) {
        const int64_t n = n0 + std::min(i, nr - 1);
        if (i >= nr && i % 3 == 0) break;  // micro tiles that would hold only duplicates are skipped below
#if PYSHRINK_X86
        if (has_avx2(isa)) dequant_rows_avx2(W, n, wbuf + i * Kp);
        else
#endif
          dequant_rows_scalar(W, n, wbuf + i * Kp);
      }
      std::fill(ybuf.begin(), ybuf.end(), 0.0f);
      for (int64_t k0 = 0; k0 < Kp; k0 += KC) {
        const int64_t k1 = std::min(Kp, k0 + KC);
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
          const int64_t mr = std::min<int64_t>(4, M - m0);
          const float* xr[4];
          for (int m = 0; m < 4; ++m) xr[m] = xd + (m0 + std::min<int64_t>(m, mr - 1)) * Kp;
          for (int64_t j = 0; j < nr; j += 3) {
            const float* wr[3] = {wbuf + j * Kp, wbuf + (j + 1) * Kp, wbuf + (j + 2) * Kp};
            float raw[12] = {};
            switch (mr) {
              case 1: gemm_tile<1>(isa, xr, wr, k0, k1, raw); break;
              case 2: gemm_tile<2>(isa, xr, wr, k0, k1, raw); break;
              case 3: gemm_tile<3>(isa, xr, wr, k0, k1, raw); break;
              default: gemm_tile<4>(isa, xr, wr, k0, k1, raw); break;
            }
            for (int64_t m = 0; m < mr; ++m)
              for (int64_t n = 0; n < 3 && j + n < nr; ++n) ybuf[(m0 + m) * NT + j + n] += raw[m * 3 + n];
          }
        }
      }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < nr; ++n) out.store(m, n0 + n, ybuf[m * NT + n]);
    }
  });
}

template <int G, typename Out>
void run(Isa isa, const Q4Weights& W, const Acts& a, bool fast, const Output<Out>& out) {
  if (fast) {
#if PYSHRINK_X86
    if (a.gemv) {
      if (a.M == 1) return run_fast_gemv<G, 1>(W, a, out);
      if (a.M == 2) return run_fast_gemv<G, 2>(W, a, out);
      return run_fast_gemv<G, 3>(W, a, out);
    }
    if (isa == Isa::kAvx512) return run_fast_vnni<G>(W, a, out);
    if (a.M == 1 && has_avx2(isa)) return run_fast_gemv_avx2<G>(W, a, out);
#endif
    if (a.M == 1) run_fast<G, 1, 4>(isa, W, a, out);
    else run_fast<G, 4, 2>(isa, W, a, out);
  } else if (a.lanes) {
#if PYSHRINK_X86
    if (a.M == 1) return run_exact_gemv<G, 1, 4>(W, a, out);
    if (a.M == 2) return run_exact_gemv<G, 2, 3>(W, a, out);
    return run_exact_gemv<G, 3, 2>(W, a, out);
#else
    TORCH_CHECK(false, OP, ": internal error, AVX-512 activation layout on a non-x86 build");
#endif
  } else if (a.M == 1) {
    run_exact_small<G, 1, 4>(isa, W, a, out);
  } else if (a.M == 2) {
    run_exact_small<G, 2, 3>(isa, W, a, out);
  } else if (a.M == 3) {
    run_exact_small<G, 3, 2>(isa, W, a, out);
  } else {
    run_exact_gemm(isa, W, a, out);
  }
}

at::Tensor linear_q4_cpu(const at::Tensor& x, const at::Tensor& packed_in, const at::Tensor& scales_in,
                         const at::Tensor& zp_in, const c10::optional<at::Tensor>& bias_in, bool fast) {
  TORCH_CHECK(x.device().is_cpu() && packed_in.device().is_cpu() && scales_in.device().is_cpu() &&
                  zp_in.device().is_cpu(),
              OP, ": x, packed, scales and zero_points must be CPU tensors, got ", x.device(), ", ",
              packed_in.device(), ", ", scales_in.device(), ", ", zp_in.device());
  TORCH_CHECK(packed_in.scalar_type() == at::kByte && packed_in.dim() == 3, OP,
              ": packed must be uint8 [N, nb, g/2], got ", packed_in.scalar_type(), " ", packed_in.sizes());
  const int64_t N = packed_in.size(0), nb = packed_in.size(1), g = 2 * packed_in.size(2), zb = (nb + 1) / 2;
  TORCH_CHECK(g == 32 || g == 64 || g == 128, OP, ": group size ", g, " (from packed.shape[2]) not in (32, 64, 128)");
  TORCH_CHECK(scales_in.scalar_type() == at::kFloat && scales_in.dim() == 2 && scales_in.size(0) == N &&
                  scales_in.size(1) == nb,
              OP, ": scales must be float32 [", N, ", ", nb, "], got ", scales_in.scalar_type(), " ", scales_in.sizes());
  TORCH_CHECK(zp_in.scalar_type() == at::kByte, OP, ": zero_points must be uint8, got ", zp_in.scalar_type());
  TORCH_CHECK(zp_in.numel() == 0 || (zp_in.dim() == 2 && zp_in.size(0) == N && zp_in.size(1) == zb), OP,
              ": zero_points must be empty (symmetric) or [", N, ", ", zb, "], got ", zp_in.sizes());
  TORCH_CHECK(x.dim() >= 1, OP, ": x must be [..., K], got a 0-d tensor");
  const int64_t K = x.size(-1);
  TORCH_CHECK(K > 0 && (K + g - 1) / g == nb, OP, ": x has K=", K, ", which needs ", (K + g - 1) / g,
              " blocks of ", g, ", but the weights have ", nb);
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->device().is_cpu(), OP, ": bias must be a CPU tensor, got ", bias_in->device());
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == N, OP, ": bias must be [", N, "], got ", bias_in->sizes());
    TORCH_CHECK(at::isFloatingType(bias_in->scalar_type()), OP, ": bias must be a float tensor, got ",
                bias_in->scalar_type());
    bias = bias_in->to(at::kFloat).contiguous();
  }
  const Isa isa = active_isa(OP);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor out = at::empty(out_shape, x.options());
  const at::Tensor x2 = x.reshape({-1, K});
  const at::Tensor packed = packed_in.contiguous(), scales = scales_in.contiguous();
  const at::Tensor zps = zp_in.numel() ? zp_in.contiguous() : zp_in;
  const Q4Weights W{packed.const_data_ptr<uint8_t>(), scales.const_data_ptr<float>(),
                    zps.numel() ? zps.const_data_ptr<uint8_t>() : nullptr, N, nb, g, zb};

  dispatch_float(x.scalar_type(), OP, "x", [&](auto tag) {
    using T = decltype(tag);
    if (x2.size(0) == 0 || N == 0) return;
    const Acts a = prepare<T>(x2, g, nb, fast, W.zp != nullptr, isa);
    const Output<T> o{out.data_ptr<T>(), N, bias.defined() ? bias.const_data_ptr<float>() : nullptr};
    switch (g) {
      case 32: run<32>(isa, W, a, fast, o); break;
      case 64: run<64>(isa, W, a, fast, o); break;
      default: run<128>(isa, W, a, fast, o); break;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyshrink, CPU, m) { m.impl("linear_q4", &linear_q4_cpu); }

}  // namespace cpu
}  // namespace pyshrink
