// Weight buffers in transparent huge pages.
//
// Why: a GEMV streams each weight once per token, and with 4 KiB pages that stream crosses a page every 4 KiB:
// the hardware prefetchers stop at page boundaries and every page costs a TLB walk. In 2 MiB pages the same
// read runs closer to the memory's bandwidth. On a machine whose THP mode is "madvise" plain allocations
// (torch's included) get 4 KiB pages. bench/RESULTS.md (CPU kernels, AVX2-only machine) has the measurements.
//
// The memory is a fresh anonymous mapping, never memory the allocator has used before: a recycled heap range
// is already faulted in with 4 KiB pages, and advising it would change nothing. The mapping starts on a 2 MiB
// boundary and is only as long as the data (rounded to 4 KiB): the kernel backs each whole 2 MiB of it with a
// huge page and the partial tail with small ones, so no buffer grows by more than 4 KiB. The advice is a hint:
// with THP "never", or no free huge page, the pages stay small and nothing else changes.
#include "hugepages.h"

#include <algorithm>
#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace pyshrink {
namespace cpu {

at::Tensor hugepage_copy(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.layout() == at::kStrided,
              "pyshrink hugepage_copy: expected a strided CPU tensor, got one on ", t.device(), " with layout ",
              t.layout());
#ifdef __linux__
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t len = std::max(page, (t.nbytes() + page - 1) / page * page);
  // over-map by one huge page, then give back the head before the first 2 MiB boundary and the tail after `len`
  const size_t span = len + kHuge;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(raw != MAP_FAILED, "pyshrink hugepage_copy: could not map ", span, " bytes");
  const uintptr_t base = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t start = (base + kHuge - 1) / kHuge * kHuge;
  if (start > base) munmap(raw, start - base);
  if (base + span > start + len) munmap(reinterpret_cast<void*>(start + len), base + span - (start + len));
  void* p = reinterpret_cast<void*>(start);
  madvise(p, len, MADV_HUGEPAGE);  // before the first touch, so that the copy faults the pages in as huge ones
  at::Tensor out = at::from_blob(p, t.sizes(), [len](void* q) { munmap(q, len); }, t.options());
#else
  at::Tensor out = at::empty(t.sizes(), t.options());  // no THP to advise: a plain contiguous copy
#endif
  out.copy_(t);  // copy_ resolves conjugate and negative views and strides
  return out;
}

}  // namespace cpu
}  // namespace pyshrink
