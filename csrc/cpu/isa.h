// Run-time ISA selection and small shared helpers for pyshrink's CPU kernels.
//
// The extension is compiled for the baseline x86-64 ISA so that it loads on any CPU. Each kernel carries an
// AVX2+FMA+F16C code path, compiled with a function-level target attribute (PYSHRINK_AVX2), and a portable
// scalar path; kernels that gain from 512-bit registers and VNNI (linear_q4) also carry an AVX-512 path
// (PYSHRINK_AVX512: avx512f/bw/vl/vnni). active_isa() picks the best level on every call; the levels are
// ordered and each includes the one below it, so a kernel without an AVX-512 path runs its AVX2 one at
// Isa::kAvx512 (has_avx2()). PYSHRINK_CPU_ISA=avx2|scalar forces a lower level, which is how the tests check
// that every path agrees with the references.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#define PYSHRINK_X86 1
#include <immintrin.h>
#define PYSHRINK_AVX2 __attribute__((target("avx2,fma,f16c")))
#define PYSHRINK_AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) inline
#define PYSHRINK_AVX512_TARGET "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
#define PYSHRINK_AVX512 __attribute__((target(PYSHRINK_AVX512_TARGET)))
#define PYSHRINK_AVX512_INLINE __attribute__((target(PYSHRINK_AVX512_TARGET), always_inline)) inline
#else
#define PYSHRINK_X86 0
#endif

namespace pyshrink {
namespace cpu {

// Ordered: a level includes every level below it.
enum class Isa { kScalar, kAvx2, kAvx512 };

constexpr const char* kIsaEnv = "PYSHRINK_CPU_ISA";

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "scalar";
}

// May a kernel take its AVX2 code path at this level (true at kAvx2 and kAvx512)?
inline bool has_avx2(Isa isa) { return isa >= Isa::kAvx2; }

// Does this CPU run the AVX2 code paths (AVX2, FMA and F16C all present)? Asked once.
inline bool cpu_supports_avx2() {
#if PYSHRINK_X86
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return ok;
#else
  return false;
#endif
}

// Does this CPU (and its OS, which must save the zmm state; libgcc's check asks XGETBV) run the AVX-512
// code paths: AVX-512 F, BW, VL and VNNI, on top of the AVX2 level? Asked once.
inline bool cpu_supports_avx512() {
#if PYSHRINK_X86
  static const bool ok = [] {
    __builtin_cpu_init();
    return cpu_supports_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  }();
  return ok;
#else
  return false;
#endif
}

// The code path a kernel takes now: the best one this CPU has, unless PYSHRINK_CPU_ISA says otherwise.
// Read on every call (a getenv, tens of nanoseconds) so that a test can flip it without a new process.
// `op` prefixes the error message, as every pyshrink kernel error does.
inline Isa active_isa(const char* op = "pyshrink") {
  const char* env = std::getenv(kIsaEnv);
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) {
    return cpu_supports_avx512() ? Isa::kAvx512 : cpu_supports_avx2() ? Isa::kAvx2 : Isa::kScalar;
  }
  if (std::strcmp(env, "scalar") == 0) return Isa::kScalar;
  if (std::strcmp(env, "avx512") == 0) {
    TORCH_CHECK(cpu_supports_avx512(), op, ": ", kIsaEnv,
                "=avx512 but this CPU (or its OS) lacks AVX-512 F, BW, VL or VNNI");
    return Isa::kAvx512;
  }
  if (std::strcmp(env, "avx2") == 0) {
    TORCH_CHECK(cpu_supports_avx2(), op, ": ", kIsaEnv, "=avx2 but this CPU lacks AVX2, FMA or F16C");
    return Isa::kAvx2;
  }
  TORCH_CHECK(false, op, ": ", kIsaEnv, " must be 'auto', 'avx512', 'avx2' or 'scalar', got '", env, "'");
}

// Calls f(T{}) with T the C++ type of a float32, float16 or bfloat16 tensor (the dtypes pyshrink's ops take).
template <typename F>
void dispatch_float(c10::ScalarType dtype, const char* op, const char* what, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Float: return f(float{});
    case c10::ScalarType::BFloat16: return f(c10::BFloat16{});
    case c10::ScalarType::Half: return f(c10::Half{});
    default: TORCH_CHECK(false, op, ": ", what, " must be float32, float16 or bfloat16, got ", dtype);
  }
}

// ---------------------------------------------------------------------------------------------------------
// scalar conversions (round to nearest even on the way down, as c10 does)

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }

template <typename T>
inline T from_float(float v) { return static_cast<T>(v); }

// Copies n elements of a strided row (any of the three float dtypes) into dst as float32.
template <typename T>
void row_to_float_scalar(const T* src, int64_t stride, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i * stride]);
}

#if PYSHRINK_X86
// ---------------------------------------------------------------------------------------------------------
// AVX2 helpers

PYSHRINK_AVX2_INLINE __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
PYSHRINK_AVX2_INLINE __m256 load8(const c10::BFloat16* p) {
  // bfloat16 is the top half of a float32: widen to 32 bits and shift into place.
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
PYSHRINK_AVX2_INLINE __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

PYSHRINK_AVX2_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

PYSHRINK_AVX2_INLINE int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

template <typename T>
PYSHRINK_AVX2 void row_to_float_avx2(const T* src, int64_t stride, int64_t n, float* dst) {
  if (stride != 1) return row_to_float_scalar(src, stride, n, dst);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(src + i));
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}
#endif

template <typename T>
void row_to_float(const T* src, int64_t stride, int64_t n, float* dst, Isa isa) {
#if PYSHRINK_X86
  if (has_avx2(isa)) return row_to_float_avx2(src, stride, n, dst);
#endif
  row_to_float_scalar(src, stride, n, dst);
}

}  // namespace cpu
}  // namespace pyshrink
