// Copies of large CPU tensors into transparent huge pages (see hugepages.cpp for why).
#pragma once

#include <ATen/ATen.h>

namespace pyshrink {
namespace cpu {

// A contiguous copy of the CPU tensor `t` in a 2 MiB-aligned allocation advised MADV_HUGEPAGE (Linux; elsewhere
// the same copy, 2 MiB-aligned, without the advice).
at::Tensor hugepage_copy(const at::Tensor& t);

}  // namespace cpu
}  // namespace pyshrink
