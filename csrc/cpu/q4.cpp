// quantize_q4 and dequantize_q4 on CPU, in ONNX Runtime's MatMulNBits layout (see pyshrink/ops/q4.py).
//
// Codes are bit-identical to quantize_q4_reference: the kernels divide (w / scale, an IEEE division in both the
// AVX2 and the scalar path, never a multiplication by a reciprocal) and round half to even, exactly as the
// float32 reference does, so there are no one-code differences at rounding ties.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "cpu/isa.h"
#include "cpu/parallel.h"

namespace pyshrink {
namespace cpu {
namespace {

constexpr const char* QOP = "pyshrink.quantize_q4";
constexpr const char* DOP = "pyshrink.dequantize_q4";

struct GroupParams {
  float scale;
  int zp;
};

// Symmetric: the element of largest |w| (the first one on ties, as argmax) lands on code 0.
// Asymmetric: [min(w, 0), max(w, 0)] spans codes 0..15.
inline float group_scale_scalar(const float* w, int64_t g, bool symmetric, float* lo_out) {
  if (symmetric) {
    int64_t idx = 0;
    float best = std::fabs(w[0]);
    for (int64_t i = 1; i < g; ++i) {
      const float a = std::fabs(w[i]);
      if (a > best) best = a, idx = i;
    }
    return w[idx] / -8.0f;
  }
  float lo = 0.0f, hi = 0.0f;
  for (int64_t i = 0; i < g; ++i) lo = std::min(lo, w[i]), hi = std::max(hi, w[i]);
  *lo_out = lo;
  return (hi - lo) / 15.0f;
}

GroupParams quantize_group_scalar(const float* w, int64_t g, bool symmetric, uint8_t* q) {
  float lo = 0.0f;
  const float scale = group_scale_scalar(w, g, symmetric, &lo);
  if (scale == 0.0f) {
    const int zp = symmetric ? 8 : 0;
    std::fill(q, q + g, static_cast<uint8_t>(zp));
    return {scale, zp};
  }
  const float zpf = symmetric ? 8.0f : std::min(std::max(std::nearbyint(-lo / scale), 0.0f), 15.0f);
  for (int64_t i = 0; i < g; ++i) {
    const float v = std::nearbyint(w[i] / scale) + zpf;
    q[i] = static_cast<uint8_t>(std::min(std::max(v, 0.0f), 15.0f));
  }
  return {scale, static_cast<int>(zpf)};
}

#if PYSHRINK_X86
PYSHRINK_AVX2 GroupParams quantize_group_avx2(const float* w, int64_t g, bool symmetric, uint8_t* q) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  float scale, zpf;
  if (symmetric) {
    __m256 m = _mm256_setzero_ps();
    for (int64_t i = 0; i < g; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(w + i)));
    alignas(32) float t[8];
    _mm256_store_ps(t, m);
    const float amax = *std::max_element(t, t + 8);
    int64_t idx = 0;
    while (idx + 1 < g && std::fabs(w[idx]) != amax) ++idx;  // first element of largest |w|
    scale = w[idx] / -8.0f;
    zpf = 8.0f;
  } else {
    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
    for (int64_t i = 0; i < g; i += 8) {
      const __m256 v = _mm256_loadu_ps(w + i);
      lo = _mm256_min_ps(lo, v);
      hi = _mm256_max_ps(hi, v);
    }
    alignas(32) float tl[8], th[8];
    _mm256_store_ps(tl, lo);
    _mm256_store_ps(th, hi);
    const float l = std::min(0.0f, *std::min_element(tl, tl + 8));
    const float h = std::max(0.0f, *std::max_element(th, th + 8));
    scale = (h - l) / 15.0f;
    zpf = scale == 0.0f ? 0.0f : std::min(std::max(std::nearbyint(-l / scale), 0.0f), 15.0f);
  }
  if (scale == 0.0f) {
    std::fill(q, q + g, static_cast<uint8_t>(zpf));
    return {scale, static_cast<int>(zpf)};
  }
  const __m256 vs = _mm256_set1_ps(scale), vz = _mm256_set1_ps(zpf);
  const __m256 v0 = _mm256_setzero_ps(), v15 = _mm256_set1_ps(15.0f);
  for (int64_t i = 0; i < g; i += 8) {
    __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(w + i), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, vz), v0), v15);
    alignas(32) int32_t t[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(t), _mm256_cvtps_epi32(v));
    for (int j = 0; j < 8; ++j) q[i + j] = static_cast<uint8_t>(t[j]);
  }
  return {scale, static_cast<int>(zpf)};
}
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_q4_cpu(const at::Tensor& w, int64_t group_size, bool symmetric) {
  TORCH_CHECK(w.device().is_cpu(), QOP, ": w must be a CPU tensor, got ", w.device());
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128, QOP,
              ": group_size must be one of (32, 64, 128), got ", group_size);
  TORCH_CHECK(w.dim() == 2, QOP, ": w must be 2-D [N, K], got shape ", w.sizes());
  TORCH_CHECK(w.size(0) > 0 && w.size(1) > 0, QOP, ": w must be non-empty, got shape ", w.sizes());
  const Isa isa = active_isa(QOP);
  const int64_t N = w.size(0), K = w.size(1), g = group_size, nb = (K + g - 1) / g, zb = (nb + 1) / 2;
  auto u8 = w.options().dtype(at::kByte);
  at::Tensor packed = at::empty({N, nb, g / 2}, u8);
  at::Tensor scales = at::empty({N, nb}, w.options().dtype(at::kFloat));
  at::Tensor zps = symmetric ? at::empty({0}, u8) : at::empty({N, zb}, u8);
  uint8_t* pp = packed.data_ptr<uint8_t>();
  float* sp = scales.data_ptr<float>();
  uint8_t* zp = symmetric ? nullptr : zps.data_ptr<uint8_t>();

  dispatch_float(w.scalar_type(), QOP, "w", [&](auto tag) {
    using T = decltype(tag);
    const T* wp = w.const_data_ptr<T>();
    const int64_t rs = w.stride(0), cs = w.stride(1);
    parallel_for(N, std::max<int64_t>(1, 16384 / K), [&](int64_t n0, int64_t n1) {
      std::vector<float> row(nb * g);
      std::vector<uint8_t> codes(g);
      for (int64_t n = n0; n < n1; ++n) {
        std::fill(row.begin() + K, row.end(), 0.0f);  // K is zero-padded up to nb*g
        row_to_float(wp + n * rs, cs, K, row.data(), isa);
        uint8_t* zrow = zp ? zp + n * zb : nullptr;
        if (zrow) std::fill(zrow, zrow + zb, 0);
        for (int64_t b = 0; b < nb; ++b) {
          GroupParams p;
#if PYSHRINK_X86
          if (has_avx2(isa)) p = quantize_group_avx2(row.data() + b * g, g, symmetric, codes.data());
          else
#endif
            p = quantize_group_scalar(row.data() + b * g, g, symmetric, codes.data());
          sp[n * nb + b] = p.scale;
          uint8_t* dst = pp + (n * nb + b) * (g / 2);
          for (int64_t j = 0; j < g / 2; ++j) dst[j] = static_cast<uint8_t>(codes[2 * j] | (codes[2 * j + 1] << 4));
          if (zrow) zrow[b / 2] |= static_cast<uint8_t>(p.zp << ((b & 1) * 4));
        }
      }
    });
  });
  return {packed, scales, zps};
}

// ---------------------------------------------------------------------------------------------------------
// dequantize: w[n, k] = (q - zp) * scale, one float32 rounding, as the reference

inline int zero_point_at(const uint8_t* zrow, int64_t b) {
  if (!zrow) return 8;
  const uint8_t v = zrow[b / 2];
  return (b & 1) ? (v >> 4) : (v & 0x0F);
}

void dequantize_block_scalar(const uint8_t* src, int64_t g, float scale, int zp, float* dst) {
  const float z = static_cast<float>(zp);
  for (int64_t j = 0; j < g / 2; ++j) {
    dst[2 * j] = (static_cast<float>(src[j] & 0x0F) - z) * scale;
    dst[2 * j + 1] = (static_cast<float>(src[j] >> 4) - z) * scale;
  }
}

#if PYSHRINK_X86
PYSHRINK_AVX2 void dequantize_block_avx2(const uint8_t* src, int64_t g, float scale, int zp, float* dst) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m256 vs = _mm256_set1_ps(scale), vz = _mm256_set1_ps(static_cast<float>(zp));
  for (int64_t j = 0; j < g / 2; j += 16) {  // 16 bytes -> 32 elements in natural order
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
    const __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    const __m128i c[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};
    for (int h = 0; h < 2; ++h) {
      const __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c[h]));
      const __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c[h], 8)));
      _mm256_storeu_ps(dst + 2 * j + 16 * h, _mm256_mul_ps(_mm256_sub_ps(f0, vz), vs));
      _mm256_storeu_ps(dst + 2 * j + 16 * h + 8, _mm256_mul_ps(_mm256_sub_ps(f1, vz), vs));
    }
  }
}
#endif

at::Tensor dequantize_q4_cpu(const at::Tensor& packed_in, const at::Tensor& scales_in, const at::Tensor& zp_in,
                             int64_t K) {
  TORCH_CHECK(packed_in.device().is_cpu() && scales_in.device().is_cpu() && zp_in.device().is_cpu(), DOP,
              ": packed, scales and zero_points must be CPU tensors, got ", packed_in.device(), ", ",
              scales_in.device(), ", ", zp_in.device());
  TORCH_CHECK(packed_in.scalar_type() == at::kByte && packed_in.dim() == 3, DOP,
              ": packed must be uint8 [N, nb, g/2], got ", packed_in.scalar_type(), " ", packed_in.sizes());
  const int64_t N = packed_in.size(0), nb = packed_in.size(1), g = 2 * packed_in.size(2);
  TORCH_CHECK(g == 32 || g == 64 || g == 128, DOP, ": group size ", g, " (from packed.shape[2]) not in (32, 64, 128)");
  TORCH_CHECK(scales_in.scalar_type() == at::kFloat && scales_in.dim() == 2 && scales_in.size(0) == N &&
                  scales_in.size(1) == nb,
              DOP, ": scales must be float32 [", N, ", ", nb, "], got ", scales_in.scalar_type(), " ", scales_in.sizes());
  const int64_t zb = (nb + 1) / 2;
  TORCH_CHECK(zp_in.scalar_type() == at::kByte, DOP, ": zero_points must be uint8, got ", zp_in.scalar_type());
  TORCH_CHECK(zp_in.numel() == 0 || (zp_in.dim() == 2 && zp_in.size(0) == N && zp_in.size(1) == zb), DOP,
              ": zero_points must be empty (symmetric) or [", N, ", ", zb, "], got ", zp_in.sizes());
  TORCH_CHECK(K > 0 && (K + g - 1) / g == nb, DOP, ": K=", K, " needs ", K > 0 ? (K + g - 1) / g : 0,
              " blocks of ", g, ", but the weights have ", nb);
  const Isa isa = active_isa(DOP);
  const at::Tensor packed = packed_in.contiguous(), scales = scales_in.contiguous();
  const at::Tensor zps = zp_in.numel() ? zp_in.contiguous() : zp_in;
  at::Tensor out = at::empty({N, K}, scales.options());
  const uint8_t* pp = packed.const_data_ptr<uint8_t>();
  const float* sp = scales.const_data_ptr<float>();
  const uint8_t* zp = zps.numel() ? zps.const_data_ptr<uint8_t>() : nullptr;
  float* op = out.data_ptr<float>();
  parallel_for(N, std::max<int64_t>(1, 16384 / K), [&](int64_t n0, int64_t n1) {
    std::vector<float> tail(g);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* zrow = zp ? zp + n * zb : nullptr;
      for (int64_t b = 0; b < nb; ++b) {
        const bool full = (b + 1) * g <= K;
        float* dst = full ? op + n * K + b * g : tail.data();
#if PYSHRINK_X86
        if (has_avx2(isa))
          dequantize_block_avx2(pp + (n * nb + b) * (g / 2), g, sp[n * nb + b], zero_point_at(zrow, b), dst);
        else
#endif
          dequantize_block_scalar(pp + (n * nb + b) * (g / 2), g, sp[n * nb + b], zero_point_at(zrow, b), dst);
        if (!full) std::copy(tail.begin(), tail.begin() + (K - b * g), op + n * K + b * g);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyshrink, CPU, m) {
  m.impl("quantize_q4", &quantize_q4_cpu);
  m.impl("dequantize_q4", &dequantize_q4_cpu);
}

}  // namespace cpu
}  // namespace pyshrink
