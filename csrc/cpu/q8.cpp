// quantize_q8 and linear_q8 on CPU: int8 weights with one float32 scale per output channel.
//
// linear_q8 keeps activations in float32: y[m, n] = scale[n] * sum_k x[m, k] * q[n, k] (+ bias). Tiles of
// RM rows of x by RN rows of q keep RM*RN float accumulators in registers; each int8 weight is widened to float
// once per tile and used RM times. Threads split the output channels and walk the rows of x inside, so each
// tile of weights comes from memory once per call.
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

constexpr const char* QOP = "pyshrink.quantize_q8";
constexpr const char* LOP = "pyshrink.linear_q8";

// q = clamp(round_half_even(w / scale), -127, 127) with an IEEE division, as the reference.
void quantize_row_scalar(const float* w, int64_t K, float safe, int8_t* q) {
  for (int64_t k = 0; k < K; ++k) {
    const float v = std::nearbyint(w[k] / safe);
    q[k] = static_cast<int8_t>(std::min(std::max(v, -127.0f), 127.0f));
  }
}

#if PYSHRINK_X86
PYSHRINK_AVX2 void quantize_row_avx2(const float* w, int64_t K, float safe, int8_t* q) {
  const __m256 vs = _mm256_set1_ps(safe), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(w + k), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
    const __m256i i32 = _mm256_cvtps_epi32(v);
    const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(i16, i16));
  }
  quantize_row_scalar(w + k, K - k, safe, q + k);
}
#endif

std::tuple<at::Tensor, at::Tensor> quantize_q8_cpu(const at::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu(), QOP, ": w must be a CPU tensor, got ", w.device());
  TORCH_CHECK(w.dim() == 2, QOP, ": w must be 2-D [N, K], got shape ", w.sizes());
  TORCH_CHECK(w.size(0) > 0 && w.size(1) > 0, QOP, ": w must be non-empty, got shape ", w.sizes());
  const Isa isa = active_isa(QOP);
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor q = at::empty({N, K}, w.options().dtype(at::kChar));
  at::Tensor scales = at::empty({N}, w.options().dtype(at::kFloat));
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scales.data_ptr<float>();
  dispatch_float(w.scalar_type(), QOP, "w", [&](auto tag) {
    using T = decltype(tag);
    const T* wp = w.const_data_ptr<T>();
    const int64_t rs = w.stride(0), cs = w.stride(1);
    parallel_for(N, std::max<int64_t>(1, 16384 / K), [&](int64_t n0, int64_t n1) {
      std::vector<float> row(K);
      for (int64_t n = n0; n < n1; ++n) {
        row_to_float(wp + n * rs, cs, K, row.data(), isa);
        float amax = 0.0f;
        for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(row[k]));
        const float scale = amax / 127.0f;
        const float safe = scale == 0.0f ? 1.0f : scale;
#if PYSHRINK_X86
        if (has_avx2(isa)) quantize_row_avx2(row.data(), K, safe, qp + n * K);
        else
#endif
          quantize_row_scalar(row.data(), K, safe, qp + n * K);
        sp[n] = scale;
      }
    });
  });
  return {q, scales};
}

// ---------------------------------------------------------------------------------------------------------
// linear_q8: raw[m][n] = sum_k x[m][k] * q[n][k] for a tile of RM x rows and RN weight rows

template <int RM, int RN>
void tile_scalar(const float* const* x, const int8_t* const* w, int64_t K, float* raw) {
  float acc[RM][RN] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int n = 0; n < RN; ++n) {
      const float wf = static_cast<float>(w[n][k]);
      for (int m = 0; m < RM; ++m) acc[m][n] += x[m][k] * wf;
    }
  for (int m = 0; m < RM; ++m)
    for (int n = 0; n < RN; ++n) raw[m * RN + n] = acc[m][n];
}

#if PYSHRINK_X86
template <int RM, int RN>
PYSHRINK_AVX2 void tile_avx2(const float* const* x, const int8_t* const* w, int64_t K, float* raw) {
  __m256 acc[RM][RN];
  for (int m = 0; m < RM; ++m)
    for (int n = 0; n < RN; ++n) acc[m][n] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wf[RN];
    for (int n = 0; n < RN; ++n)
      wf[n] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w[n] + k))));
    for (int m = 0; m < RM; ++m) {
      const __m256 xv = _mm256_loadu_ps(x[m] + k);
      for (int n = 0; n < RN; ++n) acc[m][n] = _mm256_fmadd_ps(wf[n], xv, acc[m][n]);
    }
  }
  for (int m = 0; m < RM; ++m)
    for (int n = 0; n < RN; ++n) {
      float s = hsum(acc[m][n]);
      for (int64_t kk = k; kk < K; ++kk) s += x[m][kk] * static_cast<float>(w[n][kk]);
      raw[m * RN + n] = s;
    }
}
#endif

template <int RM, int RN>
void tile(Isa isa, const float* const* x, const int8_t* const* w, int64_t K, float* raw) {
#if PYSHRINK_X86
  if (has_avx2(isa)) return tile_avx2<RM, RN>(x, w, K, raw);
#endif
  tile_scalar<RM, RN>(x, w, K, raw);
}

// One tile of at most RM rows of x (given by m0, mr) against RN weight rows starting at n0 (tail rows repeat
// the last row and are dropped).
template <int RN, typename Out>
void run_tile(Isa isa, const float* xf, int64_t xs, const int8_t* qp, int64_t K, int64_t N, int64_t m0, int64_t mr,
              int64_t n0, const float* scales, const float* bias, Out* out) {
  const int8_t* w[RN];
  for (int n = 0; n < RN; ++n) w[n] = qp + std::min(n0 + n, N - 1) * K;
  const float* x[4];
  for (int m = 0; m < 4; ++m) x[m] = xf + (m0 + std::min<int64_t>(m, mr - 1)) * xs;
  float raw[4 * RN];
  switch (mr) {
    case 1: tile<1, RN>(isa, x, w, K, raw); break;
    case 2: tile<2, RN>(isa, x, w, K, raw); break;
    case 3: tile<3, RN>(isa, x, w, K, raw); break;
    default: tile<4, RN>(isa, x, w, K, raw); break;
  }
  for (int64_t m = 0; m < mr; ++m)
    for (int64_t n = 0; n < RN && n0 + n < N; ++n) {
      const float y = raw[m * RN + n] * scales[n0 + n] + (bias ? bias[n0 + n] : 0.0f);
      out[(m0 + m) * N + n0 + n] = from_float<Out>(y);
    }
}

at::Tensor linear_q8_cpu(const at::Tensor& x, const at::Tensor& q_in, const at::Tensor& scales_in,
                         const c10::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(x.device().is_cpu() && q_in.device().is_cpu() && scales_in.device().is_cpu(), LOP,
              ": x, q and scales must be CPU tensors, got ", x.device(), ", ", q_in.device(), ", ", scales_in.device());
  TORCH_CHECK(q_in.scalar_type() == at::kChar && q_in.dim() == 2, LOP, ": q must be int8 [N, K], got ",
              q_in.scalar_type(), " ", q_in.sizes());
  const int64_t N = q_in.size(0), K = q_in.size(1);
  TORCH_CHECK(scales_in.scalar_type() == at::kFloat && scales_in.dim() == 1 && scales_in.size(0) == N, LOP,
              ": scales must be float32 [", N, "], got ", scales_in.scalar_type(), " ", scales_in.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, LOP, ": x must be [..., K] with K=", K,
              " matching the weights, got shape ", x.sizes());
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->device().is_cpu(), LOP, ": bias must be a CPU tensor, got ", bias_in->device());
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == N, LOP, ": bias must be [", N, "], got ", bias_in->sizes());
    TORCH_CHECK(at::isFloatingType(bias_in->scalar_type()), LOP, ": bias must be a float tensor, got ",
                bias_in->scalar_type());
    bias = bias_in->to(at::kFloat).contiguous();
  }
  const Isa isa = active_isa(LOP);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor out = at::empty(out_shape, x.options());
  const at::Tensor x2 = x.reshape({-1, K});
  const int64_t M = x2.size(0);
  if (M == 0 || N == 0) {
    dispatch_float(x.scalar_type(), LOP, "x", [](auto) {});
    return out;
  }
  const at::Tensor q = q_in.contiguous(), scales = scales_in.contiguous();
  const int8_t* qp = q.const_data_ptr<int8_t>();
  const float* sp = scales.const_data_ptr<float>();
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;

  dispatch_float(x.scalar_type(), LOP, "x", [&](auto tag) {
    using T = decltype(tag);
    // float32 rows of x: used in place when they already are, converted once otherwise
    at::Tensor xbuf;
    const float* xf;
    int64_t xs;
    if (std::is_same<T, float>::value && x2.stride(1) == 1) {
      xf = reinterpret_cast<const float*>(x2.const_data_ptr<T>());
      xs = x2.stride(0);
    } else {
      xbuf = at::empty({M, K}, x.options().dtype(at::kFloat));
      float* xb = xbuf.data_ptr<float>();
      const T* xp = x2.const_data_ptr<T>();
      parallel_for(M, std::max<int64_t>(1, 16384 / K), [&](int64_t m0, int64_t m1) {
        for (int64_t m = m0; m < m1; ++m) row_to_float(xp + m * x2.stride(0), x2.stride(1), K, xb + m * K, isa);
      });
      xf = xb;
      xs = K;
    }
    T* op = out.data_ptr<T>();
    constexpr int64_t kRN1 = 4, kRN = 2;  // M == 1: 4 rows of q per tile; else 4 x rows by 2 q rows
    const int64_t rn = M == 1 ? kRN1 : kRN;
    const int64_t ntiles = (N + rn - 1) / rn;
    const int64_t grain = std::max<int64_t>(1, (1 << 16) / (rn * K * M));
    parallel_for(ntiles, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
          const int64_t mr = std::min<int64_t>(4, M - m0);
          if (M == 1) run_tile<kRN1>(isa, xf, xs, qp, K, N, m0, mr, t * rn, sp, bp, op);
          else run_tile<kRN>(isa, xf, xs, qp, K, N, m0, mr, t * rn, sp, bp, op);
        }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyshrink, CPU, m) {
  m.impl("quantize_q8", &quantize_q8_cpu);
  m.impl("linear_q8", &linear_q8_cpu);
}

}  // namespace cpu
}  // namespace pyshrink
