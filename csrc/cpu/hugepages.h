// Copies of large CPU tensors into transparent huge pages (see hugepages.cpp for why).
#pragma once

#include <ATen/ATen.h>

namespace pyshrink {
namespace cpu {

// A contiguous copy of the strided CPU tensor `t` in a fresh 2 MiB-aligned anonymous mapping advised
// MADV_HUGEPAGE (Linux; elsewhere a plain contiguous copy).
at::Tensor hugepage_copy(const at::Tensor& t);

}  // namespace cpu
}  // namespace pyshrink
