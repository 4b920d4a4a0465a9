// Weight buffers in transparent huge pages.
//
// Why: a GEMV streams each weight once per token, and with 4 KiB pages that stream crosses a page every 4 KiB:
// the hardware prefetchers stop at page boundaries and every page costs a TLB walk. In 2 MiB pages the same
// read runs closer to the memory's bandwidth. Development measurements on a 2-core AMD EPYC (Zen 3) VM with THP
// in "madvise" mode (so plain allocations, torch's included, get 4 KiB pages), linear_q4 fast, M = 1, 4096 x 4096
// g64, weights rotated over 300 MB, beside torch.sum over float32 buffers of the same size and pages: with
// 4 KiB pages 79-97 % of that read, both in 2 MiB pages 90-95 % (and both faster).
// bench/RESULTS.md (CPU kernels) has the committed effect.
//
// The advice is a hint: with THP "never", or no free huge page, the kernel keeps 4 KiB pages and nothing else
// changes. The allocation is freed with the tensor's storage.
#include "hugepages.h"

#include <cstdlib>
#include <cstring>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace pyshrink {
namespace cpu {

at::Tensor hugepage_copy(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "pyshrink hugepage_copy: expected a CPU tensor, got one on ", t.device());
  const at::Tensor src = t.contiguous();
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t bytes = src.nbytes();
  const size_t cap = std::max<size_t>(kHuge, (bytes + kHuge - 1) / kHuge * kHuge);
  void* p = std::aligned_alloc(kHuge, cap);
  TORCH_CHECK(p != nullptr, "pyshrink hugepage_copy: could not allocate ", cap, " bytes");
#ifdef __linux__
  madvise(p, cap, MADV_HUGEPAGE);  // before the first touch, so that the copy faults the pages in as huge ones
#endif
  if (bytes) std::memcpy(p, src.const_data_ptr(), bytes);
  return at::from_blob(p, src.sizes(), [](void* q) { std::free(q); }, src.options());
}

}  // namespace cpu
}  // namespace pyshrink
