// The Python module pyshrink._C. Importing it registers every kernel (TORCH_LIBRARY_IMPL blocks in csrc/cpu/
// and, in CUDA builds, csrc/cuda/) for the schemas that pyshrink/ops/*.py define; the functions here only
// say what was built and which CPU code path runs.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "cpu/hugepages.h"
#include "cpu/isa.h"
#include "cpu/parallel.h"

namespace {

std::string cpu_isa() { return pyshrink::cpu::isa_name(pyshrink::cpu::active_isa("pyshrink._C.cpu_isa")); }

pybind11::dict build_info() {
  pybind11::dict info;
#if PYSHRINK_X86
  info["isa_compiled"] = "x86-64 baseline + avx2,fma,f16c and avx512f,bw,vl,vnni (function targets)";
#else
  info["isa_compiled"] = "portable scalar";
#endif
  info["cpu_supports_avx2"] = pyshrink::cpu::cpu_supports_avx2();
  info["cpu_supports_avx512"] = pyshrink::cpu::cpu_supports_avx512();
  info["cpu_isa"] = cpu_isa();
  info["openmp_threads"] = at::get_num_threads();
  info["kernel_threads"] = pyshrink::cpu::num_threads();
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#ifdef PYSHRINK_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyshrink native kernels (registered with torch.library on import)";
  m.def("cpu_isa", &cpu_isa, "The CPU code path the kernels take now: 'avx512', 'avx2' or 'scalar' (PYSHRINK_CPU_ISA overrides).");
  m.def("build_info", &build_info, "What this build contains: compiled ISA, OpenMP threads, CUDA.");
  m.def(
      "set_num_threads",
      [](int n) {
        TORCH_CHECK(n >= 0, "pyshrink.ops.set_num_threads: n must be >= 0 (0 follows torch.get_num_threads()), got ", n);
        pyshrink::cpu::kernel_threads_setting().store(n);
      },
      "Threads for pyshrink's CPU kernels; 0 follows torch.get_num_threads().");
  m.def("num_threads_setting", [] { return pyshrink::cpu::kernel_threads_setting().load(); },
        "The value set_num_threads last set (0: following torch).");
  m.def("get_num_threads", &pyshrink::cpu::num_threads, "Threads pyshrink's CPU kernels use now.");
  m.def("hugepage_copy", &pyshrink::cpu::hugepage_copy,
        "A contiguous copy of a CPU tensor in 2 MiB-aligned memory advised MADV_HUGEPAGE (csrc/cpu/hugepages.cpp).");
}
