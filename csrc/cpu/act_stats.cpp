// act_stats_ on CPU: per-channel sum|x|, sum x, sum x^2 in float64 and the row count, in one pass over x.
//
// x [..., C] may have any strides: rows are addressed through the leading sizes and strides, never copied.
// The AVX2 path (channel stride 1) keeps 8 channels' float64 sums in registers while it walks a batch of rows,
// so the float64 accumulators are read and written once per batch instead of once per row, and while it walks
// one batch it prefetches the next batch's rows (once per 64 bytes of each row). Work is split over rows when
// there are kRowBatch rows or more per thread on average (thread 0 adds into acc itself, each other thread into
// a float64 partial [3, C], added in order at the end), and over channels when rows are fewer, or so few next
// to C that those partials would be more than an eighth of the bytes of x (each thread then owns its slice of
// acc). Threads: see parallel.h.
//
// Why rows, a small batch and the prefetch (bench/kernels.py shapes, 2 threads, interleaved in one process,
// development build with all three switchable; ms): with the channel split each thread read a narrow column
// slice of every row, a strided walk (16384 x 576 float32: 5.57 ms, 6.8 GB/s). Rows with 64-row batches: 3.23
// ms. Our reading, not measured: a 64-row batch, walked channel group by channel group, is more concurrent
// streams than the hardware prefetcher follows, and narrow rows put two of them in one 4 KiB page. 8-row
// batches with the next batch prefetched: 1.96 ms; 16384 x 1536: 11.46 -> 4.25 ms; 2048 x 4096 float32: 2.50 ->
// 1.41 ms; bfloat16: 1.87 -> 1.32 ms.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/isa.h"
#include "cpu/parallel.h"

namespace pyshrink {
namespace cpu {
namespace {

constexpr const char* OP = "pyshrink.act_stats_";
constexpr int64_t kRowBatch = 8;
// The float64 sums of the channels one walk covers are loaded and stored once per batch. Beyond this many bytes
// of them (3 x 8 per channel) they no longer stay in L2, and that traffic rivals x's own, so such walks (very
// wide rows) take kWideRowBatch rows per batch. 16 x 2^20 float32, 2 threads, checkouts in alternating
// processes (development script): 8-row batches 4.34-5.02 ms, 64-row 3.77-4.16 ms.
constexpr int64_t kSumsInCache = 512 * 1024;
constexpr int64_t kWideRowBatch = 64;

// Addresses row r of x [..., C] viewed as [R, C], whatever the leading strides.
struct Rows {
  std::vector<int64_t> sizes, strides;  // leading dims, outermost first
  int64_t offset(int64_t r) const {
    int64_t off = 0;
    for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
      off += (r % sizes[d]) * strides[d];
      r /= sizes[d];
    }
    return off;
  }
};

// float64 sums of channel c live at abs[c], sum[c], sq[c].
struct Sums {
  double* abs;
  double* sum;
  double* sq;
};

template <typename T>
void accumulate_scalar(const T* x, const Rows& rows, int64_t cs, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                       Sums s) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = x + rows.offset(r);
    for (int64_t c = c0; c < c1; ++c) {
      const double v = to_float(row[c * cs]);
      s.abs[c] += std::fabs(v);
      s.sum[c] += v;
      s.sq[c] += v * v;
    }
  }
}

#if PYSHRINK_X86
template <typename T>
PYSHRINK_AVX2 void accumulate_avx2(const T* x, const Rows& rows, int64_t cs, int64_t r0, int64_t r1, int64_t c0,
                                   int64_t c1, Sums s) {
  if (cs != 1) return accumulate_scalar(x, rows, cs, r0, r1, c0, c1, s);
  const __m256d sign = _mm256_set1_pd(-0.0);
  const int64_t batch = 3 * 8 * (c1 - c0) > kSumsInCache ? kWideRowBatch : kRowBatch;
  const T* ptr[kWideRowBatch];
  const T* next[kWideRowBatch];
  for (int64_t i = 0; i < std::min(batch, r1 - r0); ++i) next[i] = x + rows.offset(r0 + i);
  for (int64_t rb = r0; rb < r1; rb += batch) {
    const int64_t nr = std::min(batch, r1 - rb), nn = std::clamp<int64_t>(r1 - rb - batch, 0, batch);
    std::copy(next, next + nr, ptr);
    for (int64_t i = 0; i < nn; ++i) next[i] = x + rows.offset(rb + batch + i);
    int64_t c = c0;
    for (; c + 8 <= c1; c += 8) {
      if (nn > 0 && ((c * static_cast<int64_t>(sizeof(T))) & 63) == 0)  // once per 64 bytes of the next batch's rows
        for (int64_t i = 0; i < nn; ++i) _mm_prefetch(reinterpret_cast<const char*>(next[i] + c), _MM_HINT_T0);
      __m256d a0 = _mm256_loadu_pd(s.abs + c), a1 = _mm256_loadu_pd(s.abs + c + 4);
      __m256d m0 = _mm256_loadu_pd(s.sum + c), m1 = _mm256_loadu_pd(s.sum + c + 4);
      __m256d q0 = _mm256_loadu_pd(s.sq + c), q1 = _mm256_loadu_pd(s.sq + c + 4);
      for (int64_t i = 0; i < nr; ++i) {
        const __m256 v = load8(ptr[i] + c);
        const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
        const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        a0 = _mm256_add_pd(a0, _mm256_andnot_pd(sign, lo));
        a1 = _mm256_add_pd(a1, _mm256_andnot_pd(sign, hi));
        m0 = _mm256_add_pd(m0, lo);
        m1 = _mm256_add_pd(m1, hi);
        q0 = _mm256_fmadd_pd(lo, lo, q0);
        q1 = _mm256_fmadd_pd(hi, hi, q1);
      }
      _mm256_storeu_pd(s.abs + c, a0);
      _mm256_storeu_pd(s.abs + c + 4, a1);
      _mm256_storeu_pd(s.sum + c, m0);
      _mm256_storeu_pd(s.sum + c + 4, m1);
      _mm256_storeu_pd(s.sq + c, q0);
      _mm256_storeu_pd(s.sq + c + 4, q1);
    }
    for (; c < c1; ++c) {
      for (int64_t i = 0; i < nr; ++i) {
        const double v = to_float(ptr[i][c]);
        s.abs[c] += std::fabs(v);
        s.sum[c] += v;
        s.sq[c] += v * v;
      }
    }
  }
}
#endif

template <typename T>
void accumulate(Isa isa, const T* x, const Rows& rows, int64_t cs, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                Sums s) {
#if PYSHRINK_X86
  if (has_avx2(isa)) return accumulate_avx2(x, rows, cs, r0, r1, c0, c1, s);
#endif
  accumulate_scalar(x, rows, cs, r0, r1, c0, c1, s);
}

void act_stats_cpu(const at::Tensor& x, const at::Tensor& acc, const at::Tensor& count) {
  TORCH_CHECK(x.device().is_cpu() && acc.device().is_cpu() && count.device().is_cpu(), OP,
              ": x, acc and count must be CPU tensors, got ", x.device(), ", ", acc.device(), ", ", count.device());
  TORCH_CHECK(x.dim() >= 1, OP, ": x must have at least 1 dimension, got shape ", x.sizes());
  const int64_t C = x.size(-1);
  TORCH_CHECK(acc.scalar_type() == at::kDouble && acc.dim() == 2 && acc.size(0) == 3 && acc.size(1) == C, OP,
              ": acc must be float64 of shape (3, ", C, "), got ", acc.scalar_type(), " ", acc.sizes());
  TORCH_CHECK(acc.is_contiguous(), OP, ": acc must be contiguous, got strides ", acc.strides());
  TORCH_CHECK(count.scalar_type() == at::kDouble && count.dim() == 1 && count.size(0) == 1, OP,
              ": count must be float64 of shape (1,), got ", count.scalar_type(), " ", count.sizes());
  const Isa isa = active_isa(OP);

  Rows rows;
  int64_t R = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) {
    rows.sizes.push_back(x.size(d));
    rows.strides.push_back(x.stride(d));
    R *= x.size(d);
  }
  const int64_t cs = x.stride(-1);
  double* a = acc.data_ptr<double>();
  const Sums total{a, a + C, a + 2 * C};

  if (R > 0 && C > 0) {
    dispatch_float(x.scalar_type(), OP, "x", [&](auto tag) {
      using T = decltype(tag);
      const T* xp = x.const_data_ptr<T>();
      const int64_t nt = num_threads();
      if (nt == 1 || R * C < (1 << 15)) {
        accumulate(isa, xp, rows, cs, 0, R, 0, C, total);
      } else if (C >= 64 * nt && (R < kRowBatch * nt || (nt - 1) * 3 * 8 * 8 > R * int64_t(sizeof(T)))) {
        // few rows of many channels (the row split's float64 partials, (nt - 1) x 3 x C, would be more than an
        // eighth of the bytes of x): each thread owns a slice of channels (multiples of 8) and walks all rows
        const int64_t chunks = (C + 7) / 8;
        parallel_for(chunks, std::max<int64_t>(8, chunks / (4 * nt)), [&](int64_t b, int64_t e) {
          accumulate(isa, xp, rows, cs, 0, R, b * 8, std::min(e * 8, C), total);
        });
      } else {
        // rows: thread 0 adds into acc itself, every other thread into a float64 partial, added in order
        std::vector<double> parts(static_cast<size_t>(nt - 1) * 3 * C, 0.0);
        const int64_t per = (R + nt - 1) / nt;
        parallel_chunks(nt, [&](int64_t t) {
          double* p = t ? parts.data() + (t - 1) * 3 * C : nullptr;
          accumulate(isa, xp, rows, cs, std::min(R, t * per), std::min(R, (t + 1) * per), 0, C,
                     t ? Sums{p, p + C, p + 2 * C} : total);
        });
        for (int64_t t = 1; t < nt; ++t) {
          const double* p = parts.data() + (t - 1) * 3 * C;
          for (int64_t i = 0; i < 3 * C; ++i) a[i] += p[i];
        }
      }
    });
  } else {
    dispatch_float(x.scalar_type(), OP, "x", [](auto) {});
  }
  count.data_ptr<double>()[0] += static_cast<double>(R);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyshrink, CPU, m) { m.impl("act_stats_", &act_stats_cpu); }

}  // namespace cpu
}  // namespace pyshrink
