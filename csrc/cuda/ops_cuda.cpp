// Torch binding of pyshrink's CUDA kernels: checks the inputs (messages start with "pyshrink.<op>: "),
// picks the stream and the device, calls the torch-free launchers of kernels.h and turns their Status
// codes into messages that carry the shapes. Only registers implementations: the schemas, fakes and
// references live in pyshrink/ops/*.py. Compiled only in CUDA builds (setup.py).
//
// What runs on CUDA:
// * act_stats_    custom kernel (act_stats_kernel.cuh): one pass, float64 accumulators, atomics.
// * linear_q4     custom tensor-core kernel (linear_q4_kernel.cuh) for float16 / bfloat16 activations
//                 when M < PYSHRINK_Q4_DEQUANT_MATMUL_MIN_M (default 512); at or above it, and for float32
//                 activations, the weights are dequantized by a custom kernel into the activation dtype
//                 and multiplied by cuBLAS (at::matmul): at large M the product is compute-bound and
//                 cuBLAS's Hopper kernels beat an mma.sync kernel, while dequantizing costs one pass over
//                 W. That path rounds the dequantized weights to fp16/bf16 (the kernel path does not).
//                 `fast=True` is treated as exact on CUDA: the activations stay fp16/bf16 and the tensor
//                 cores already run at full rate on them, so int8 activations would buy nothing here.
// * dequantize_q4 custom kernel (bit-identical to the reference in float32).
// * quantize_q4, quantize_q8, linear_q8: plain ATen compositions of the same math as the Python
//                 references (quantization is a one-off offline step; linear_q8 dequantizes to the
//                 activation dtype and calls cuBLAS). No custom kernels behind these three.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/kernels.h"

namespace {

using at::Tensor;
namespace pc = pyshrink_cuda;

// At and above this many activation rows linear_q4 dequantizes + calls cuBLAS (see the file comment).
// Overridable per call through the environment so the benchmark can compare both paths in one process.
constexpr int64_t kDefaultDequantMatmulMinM = 512;

int64_t dequant_matmul_min_m() {
  const char* e = std::getenv("PYSHRINK_Q4_DEQUANT_MATMUL_MIN_M");
  if (e != nullptr && *e != '\0') {
    char* end = nullptr;
    const long long v = std::strtoll(e, &end, 10);
    if (end != nullptr && *end == '\0' && v > 0) return v;
  }
  return kDefaultDequantMatmulMinM;
}

bool is_float(at::ScalarType s) { return s == at::kFloat || s == at::kHalf || s == at::kBFloat16; }

pc::DType to_dtype(at::ScalarType s) {
  switch (s) {
    case at::kHalf: return pc::DType::kFloat16;
    case at::kBFloat16: return pc::DType::kBFloat16;
    default: return pc::DType::kFloat32;
  }
}

// Contiguous, with a 16-byte aligned data pointer (a fresh allocation is; an odd view may not be).
Tensor contiguous_aligned(const Tensor& t) {
  Tensor c = t.contiguous();
  if (c.numel() > 0 && reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

// `what` describes the call for the message; it is only evaluated on failure, so that the hot path
// (one call per linear layer per decoded token) formats no strings.
template <class What>
void check_status(pc::Status st, const char* op, What&& what) {
  if (st == pc::Status::kOk) return;
  TORCH_CHECK(false, "pyshrink.", op, ": CUDA kernel failed: ", pc::status_string(st), " (", what(), ")");
}

void check_on_cuda(const char* op, const Tensor& t, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.device() == dev, "pyshrink.", op, ": ", name, " is on ", t.device(), " but expected ", dev,
                    " (all tensors must be on one CUDA device)");
}

// Mirrors pyshrink/ops/q4.py::_check_weights.
void check_q4_weights(const char* op, const Tensor& packed, const Tensor& scales, const Tensor& zp,
                      std::optional<int64_t> K) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3, "pyshrink.", op,
                    ": packed must be uint8 [N, nb, g/2], got ", packed.scalar_type(), " ", packed.sizes());
  const int64_t N = packed.size(0), nb = packed.size(1), g = 2 * packed.size(2);
  TORCH_CHECK(g == 32 || g == 64 || g == 128, "pyshrink.", op, ": group size ", g,
                    " (from packed.shape[2]) not in (32, 64, 128)");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 2 && scales.size(0) == N &&
                        scales.size(1) == nb,
                    "pyshrink.", op, ": scales must be float32 [", N, ", ", nb, "], got ", scales.scalar_type(), " ",
                    scales.sizes());
  TORCH_CHECK(zp.scalar_type() == at::kByte, "pyshrink.", op, ": zero_points must be uint8, got ",
                    zp.scalar_type());
  TORCH_CHECK(zp.numel() == 0 || (zp.dim() == 2 && zp.size(0) == N && zp.size(1) == (nb + 1) / 2), "pyshrink.",
                    op, ": zero_points must be empty (symmetric) or [", N, ", ", (nb + 1) / 2, "], got ", zp.sizes());
  if (K.has_value()) {
    TORCH_CHECK((*K + g - 1) / g == nb, "pyshrink.", op, ": K=", *K, " needs ", (*K + g - 1) / g,
                      " blocks of ", g, ", but the weights have ", nb);
  }
  TORCH_CHECK(packed.device() == scales.device() && packed.device() == zp.device(), "pyshrink.", op,
                    ": packed, scales and zero_points must share a device, got ", packed.device(), ", ",
                    scales.device(), ", ", zp.device());
  TORCH_CHECK(packed.is_cuda(), "pyshrink.", op, ": the CUDA kernel got weights on ", packed.device());
}

// Mirrors pyshrink/ops/q4.py::_check_linear.
void check_linear(const char* op, const Tensor& x, const at::Device& w_dev, int64_t K_w,
                  const std::optional<Tensor>& bias, int64_t N) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K_w, "pyshrink.", op, ": x must be [..., K] with K=", K_w,
                    " matching the weights, got shape ", x.sizes());
  TORCH_CHECK(is_float(x.scalar_type()), "pyshrink.", op, ": x must be float32, float16 or bfloat16, got ",
                    x.scalar_type());
  TORCH_CHECK(x.device() == w_dev, "pyshrink.", op, ": x is on ", x.device(), " but the weights are on ", w_dev);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "pyshrink.", op, ": bias must be [", N, "], got ",
                      bias->sizes());
    TORCH_CHECK(bias->device() == w_dev, "pyshrink.", op, ": bias is on ", bias->device(),
                      " but the weights are on ", w_dev);
    TORCH_CHECK(bias->is_floating_point(), "pyshrink.", op, ": bias must be floating point, got ",
                      bias->scalar_type());
  }
}

std::string q4_shapes(const Tensor& x, const Tensor& packed, const Tensor& scales, const Tensor& zp) {
  std::ostringstream s;
  s << "x " << x.sizes() << " " << x.scalar_type() << ", packed " << packed.sizes() << ", scales " << scales.sizes()
    << ", zero_points " << zp.sizes();
  return s.str();
}

// ------------------------------------------------------------------------------------------------------
// act_stats_

void act_stats_cuda(const Tensor& x, const Tensor& acc, const Tensor& count) {
  constexpr const char* op = "act_stats_";
  TORCH_CHECK(x.dim() >= 1, "pyshrink.act_stats_: x must have at least 1 dimension, got shape ", x.sizes());
  TORCH_CHECK(is_float(x.scalar_type()), "pyshrink.act_stats_: x must be float32, float16 or bfloat16, got ",
                    x.scalar_type());
  const int64_t C = x.size(-1);
  TORCH_CHECK(acc.scalar_type() == at::kDouble && acc.dim() == 2 && acc.size(0) == 3 && acc.size(1) == C,
                    "pyshrink.act_stats_: acc must be float64 of shape (3, ", C, "), got ", acc.scalar_type(), " ",
                    acc.sizes());
  TORCH_CHECK(count.scalar_type() == at::kDouble && count.dim() == 1 && count.size(0) == 1,
                    "pyshrink.act_stats_: count must be float64 of shape (1,), got ", count.scalar_type(), " ",
                    count.sizes());
  TORCH_CHECK(x.device() == acc.device() && x.device() == count.device() && x.is_cuda(),
                    "pyshrink.act_stats_: x, acc and count must be on one CUDA device, got ", x.device(), ", ",
                    acc.device(), ", ", count.device());
  TORCH_CHECK(acc.is_contiguous(), "pyshrink.act_stats_: acc must be contiguous");

  const c10::cuda::CUDAGuard guard(x.device());
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  if (rows == 0) return;
  if (C == 0) {  // no channels, but the tokens still count
    count.add_(static_cast<double>(rows));
    return;
  }
  // [rows, C] with unit channel stride; a row stride other than C (a slice of a wider tensor) is fine.
  Tensor x2 = x.reshape({rows, C});
  if (x2.stride(1) != 1 || x2.stride(0) < 0) x2 = x2.contiguous();
  const pc::Status st = pc::act_stats_launch(x2.data_ptr(), to_dtype(x2.scalar_type()), rows, C, x2.stride(0),
                                             acc.data_ptr<double>(), count.data_ptr<double>(),
                                             at::cuda::getCurrentCUDAStream());
  check_status(st, op, [&] {
    std::ostringstream what;
    what << "x " << x.sizes() << " " << x.scalar_type() << " viewed as [" << rows << ", " << C
         << "] with row stride " << x2.stride(0);
    return what.str();
  });
}

// ------------------------------------------------------------------------------------------------------
// q4

Tensor dequantize_into(const char* op, const Tensor& packed, const Tensor& scales, const Tensor& zp, int64_t K,
                       at::ScalarType out_dtype) {
  const int64_t N = packed.size(0), g = 2 * packed.size(2);
  Tensor out = at::empty({N, K}, packed.options().dtype(out_dtype));
  if (N == 0 || K == 0) return out;
  TORCH_CHECK(N <= INT32_MAX && K <= INT32_MAX, "pyshrink.", op, ": N=", N, ", K=", K, " exceed the kernel's int range");
  const Tensor p = contiguous_aligned(packed), s = contiguous_aligned(scales);
  const Tensor z = zp.numel() ? contiguous_aligned(zp) : Tensor();
  const pc::Status st = pc::dequantize_q4_launch(p.data_ptr<uint8_t>(), s.data_ptr<float>(),
                                                 z.defined() ? z.data_ptr<uint8_t>() : nullptr, out.data_ptr(),
                                                 to_dtype(out_dtype), static_cast<int>(N), static_cast<int>(K),
                                                 static_cast<int>(g), at::cuda::getCurrentCUDAStream());
  check_status(st, op, [&] {
    std::ostringstream what;
    what << "packed " << packed.sizes() << ", scales " << scales.sizes() << ", zero_points " << zp.sizes()
         << ", K=" << K << ", out " << out_dtype;
    return what.str();
  });
  return out;
}

Tensor dequantize_q4_cuda(const Tensor& packed, const Tensor& scales, const Tensor& zero_points, int64_t K) {
  check_q4_weights("dequantize_q4", packed, scales, zero_points, K);
  const c10::cuda::CUDAGuard guard(packed.device());
  return dequantize_into("dequantize_q4", packed, scales, zero_points, K, at::kFloat);
}

Tensor linear_q4_cuda(const Tensor& x, const Tensor& packed, const Tensor& scales, const Tensor& zero_points,
                      const std::optional<Tensor>& bias, bool fast) {
  (void)fast;  // exact on CUDA, see the file comment
  constexpr const char* op = "linear_q4";
  TORCH_CHECK(x.dim() >= 1, "pyshrink.linear_q4: x must be [..., K], got a 0-dim tensor");
  check_q4_weights(op, packed, scales, zero_points, x.size(-1));
  const int64_t N = packed.size(0), g = 2 * packed.size(2), K = x.size(-1);
  check_linear(op, x, packed.device(), K, bias, N);
  const c10::cuda::CUDAGuard guard(x.device());

  std::vector<int64_t> out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  const int64_t M = K > 0 ? x.numel() / K : [&] {
    int64_t r = 1;
    for (int64_t d = 0; d + 1 < x.dim(); ++d) r *= x.size(d);
    return r;
  }();
  if (M == 0 || N == 0 || K == 0) {  // empty product: zeros (+ bias)
    Tensor y = at::zeros({M, N}, x.options());
    if (bias.has_value() && M > 0) y.add_(*bias);
    return y.view(out_sizes);
  }
  TORCH_CHECK(M <= INT32_MAX && N <= INT32_MAX && K <= INT32_MAX, "pyshrink.linear_q4: sizes M=", M, ", N=", N,
              ", K=", K, " exceed the kernel's int range");

  Tensor x2 = x.reshape({M, K});
  if (x2.stride(1) != 1 || (M > 1 && x2.stride(0) < K)) x2 = x2.contiguous();

  if (x.scalar_type() == at::kFloat || M >= dequant_matmul_min_m()) {
    const Tensor w = dequantize_into(op, packed, scales, zero_points, K, x.scalar_type());
    Tensor y = at::matmul(x2, w.t());
    if (bias.has_value()) y.add_(*bias);
    return y.view(out_sizes);
  }

  const Tensor p = contiguous_aligned(packed), s = contiguous_aligned(scales);
  const Tensor z = zero_points.numel() ? contiguous_aligned(zero_points) : Tensor();
  Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    if (!is_float(b.scalar_type())) b = b.to(at::kFloat);
  }
  Tensor y = at::empty({M, N}, x.options());
  const pc::Status st = pc::linear_q4_launch(
      x2.data_ptr(), x2.stride(0), to_dtype(x.scalar_type()), p.data_ptr<uint8_t>(), s.data_ptr<float>(),
      z.defined() ? z.data_ptr<uint8_t>() : nullptr, b.defined() ? b.data_ptr() : nullptr,
      b.defined() ? to_dtype(b.scalar_type()) : pc::DType::kFloat32, y.data_ptr(), static_cast<int>(M),
      static_cast<int>(N), static_cast<int>(K), static_cast<int>(g), at::cuda::getCurrentCUDAStream());
  check_status(st, op, [&] { return q4_shapes(x, packed, scales, zero_points); });
  return y.view(out_sizes);
}

// The quantizers are the Python reference, op for op, in ATen (so CUDA results equal the reference's).
Tensor pack_nibbles(const Tensor& q) {  // uint8 [..., 2n] -> [..., n], even element in the low nibble
  const int64_t last = q.size(-1);
  const Tensor lo = q.slice(-1, 0, last, 2), hi = q.slice(-1, 1, last, 2);
  return at::bitwise_or(lo, at::bitwise_left_shift(hi, 4)).contiguous();
}

std::tuple<Tensor, Tensor, Tensor> quantize_q4_cuda(const Tensor& w, int64_t group_size, bool symmetric) {
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128,
                    "pyshrink.quantize_q4: group_size must be one of (32, 64, 128), got ", group_size);
  TORCH_CHECK(w.dim() == 2, "pyshrink.quantize_q4: w must be 2-D [N, K], got shape ", w.sizes());
  TORCH_CHECK(is_float(w.scalar_type()), "pyshrink.quantize_q4: w must be float32, float16 or bfloat16, got ",
                    w.scalar_type());
  TORCH_CHECK(w.size(0) > 0 && w.size(1) > 0, "pyshrink.quantize_q4: w must be non-empty, got shape ",
                    w.sizes());
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t N = w.size(0), K = w.size(1), g = group_size, nb = (K + g - 1) / g;
  Tensor wp = at::zeros({N, nb * g}, w.options().dtype(at::kFloat));
  wp.narrow(1, 0, K).copy_(w);
  const Tensor gr = wp.view({N, nb, g});
  Tensor scales, q, zp;
  if (symmetric) {
    const Tensor idx = gr.abs().argmax(-1, /*keepdim=*/true);
    const Tensor m = gr.gather(-1, idx).squeeze(-1);
    scales = m / -8.0;
    const Tensor safe = at::where(scales == 0, at::ones_like(scales), scales);
    q = at::clamp(at::round(gr / safe.unsqueeze(-1)) + 8, 0, 15);
    q = at::where(scales.unsqueeze(-1) == 0, at::full_like(q, 8), q);
    zp = at::empty({0}, w.options().dtype(at::kByte));
  } else {
    const Tensor lo = at::clamp_max(gr.amin({-1}), 0.0);
    const Tensor hi = at::clamp_min(gr.amax({-1}), 0.0);
    scales = (hi - lo) / 15.0;
    const Tensor safe = at::where(scales == 0, at::ones_like(scales), scales);
    Tensor zpf = at::clamp(at::round(-lo / safe), 0, 15);
    zpf = at::where(scales == 0, at::zeros_like(zpf), zpf);
    q = at::clamp(at::round(gr / safe.unsqueeze(-1)) + zpf.unsqueeze(-1), 0, 15);
    q = at::where(scales.unsqueeze(-1) == 0, at::zeros_like(q), q);
    Tensor z8 = zpf.to(at::kByte);
    if (nb % 2) z8 = at::cat({z8, at::zeros({N, 1}, z8.options())}, 1);
    zp = pack_nibbles(z8);
  }
  return {pack_nibbles(q.to(at::kByte)), scales.contiguous(), zp};
}

// ------------------------------------------------------------------------------------------------------
// q8 (ATen compositions)

std::tuple<Tensor, Tensor> quantize_q8_cuda(const Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "pyshrink.quantize_q8: w must be 2-D [N, K], got shape ", w.sizes());
  TORCH_CHECK(is_float(w.scalar_type()), "pyshrink.quantize_q8: w must be float32, float16 or bfloat16, got ",
                    w.scalar_type());
  TORCH_CHECK(w.size(0) > 0 && w.size(1) > 0, "pyshrink.quantize_q8: w must be non-empty, got shape ",
                    w.sizes());
  const c10::cuda::CUDAGuard guard(w.device());
  const Tensor wf = w.to(at::kFloat);
  const Tensor scales = wf.abs().amax({1}) / 127.0;
  const Tensor safe = at::where(scales == 0, at::ones_like(scales), scales);
  const Tensor q = at::clamp(at::round(wf / safe.unsqueeze(1)), -127, 127).to(at::kChar);
  return {q, scales};
}

Tensor linear_q8_cuda(const Tensor& x, const Tensor& q, const Tensor& scales, const std::optional<Tensor>& bias) {
  constexpr const char* op = "linear_q8";
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2, "pyshrink.linear_q8: q must be int8 [N, K], got ",
                    q.scalar_type(), " ", q.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1 && scales.size(0) == q.size(0),
                    "pyshrink.linear_q8: scales must be float32 [", q.size(0), "], got ", scales.scalar_type(), " ",
                    scales.sizes());
  TORCH_CHECK(q.device() == scales.device(), "pyshrink.linear_q8: q and scales must share a device, got ",
                    q.device(), ", ", scales.device());
  check_linear(op, x, q.device(), q.size(1), bias, q.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  // Dequantize to the activation dtype (one rounding per weight in fp16/bf16) and let cuBLAS multiply.
  const Tensor w = (q.to(at::kFloat) * scales.unsqueeze(1)).to(x.scalar_type());
  Tensor y = at::matmul(x, w.t());
  if (bias.has_value()) y.add_(*bias);
  return y.contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(pyshrink, CUDA, m) {
  m.impl("act_stats_", &act_stats_cuda);
  m.impl("linear_q4", &linear_q4_cuda);
  m.impl("dequantize_q4", &dequantize_q4_cuda);
  m.impl("quantize_q4", &quantize_q4_cuda);
  m.impl("quantize_q8", &quantize_q8_cuda);
  m.impl("linear_q8", &linear_q8_cuda);
}
