"""Build pyshrink._C: C++ CPU kernels always, CUDA kernels when torch and the toolkit both speak CUDA.

Sources are globbed so that adding a kernel never touches this file:
  csrc/*.cpp, csrc/cpu/*.cpp        -> always
  csrc/cuda/*.cu, csrc/cuda/*.cpp   -> only in CUDA builds (torch.version.cuda and CUDA_HOME set)
"""
import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _want_cuda() -> bool:
    if os.environ.get("PYSHRINK_NO_CUDA") == "1":
        return False
    import torch

    return bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None


cpu_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
with_cuda = _want_cuda()

# The CPU kernels carry their own AVX2/FMA/F16C code paths (function-level target attributes) and pick
# one at run time, so the extension itself is compiled for the baseline ISA and runs on any x86-64.
cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-DPYSHRINK_CPU"]
nvcc_flags = [
    "-O3",
    "-std=c++17",
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
    # PTX as well, so that newer GPUs (sm_100, sm_120) JIT-compile the kernels instead of failing every launch
    "-gencode=arch=compute_80,code=compute_80",
    # no --use_fast_math: it flushes float32 denormals to zero, and the ops promise the reference's values for
    # tiny scales and activations too (a group whose largest |w| is under ~1e-37, x^2 of |x| < ~1e-19)
    "--expt-relaxed-constexpr",
    "-lineinfo",
]
sources = cpu_sources + (cuda_sources if with_cuda else [])
ext_cls = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
extra = {"cxx": cxx_flags + (["-DPYSHRINK_CUDA"] if with_cuda else [])}
if with_cuda:
    extra["nvcc"] = nvcc_flags + ["-DPYSHRINK_CUDA"]

print(f"[pyshrink] building pyshrink._C: CPU kernels ({len(cpu_sources)} files)"
      + (f" + CUDA kernels ({len(cuda_sources)} files, sm_80 + sm_90a)" if with_cuda else "; CUDA: off "
         f"(torch.version.cuda={__import__('torch').version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})"))
for s in sources:
    print(f"[pyshrink]   {s}")

setup(
    ext_modules=[
        ext_cls(
            "pyshrink._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
