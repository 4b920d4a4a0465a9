#!/usr/bin/env bash
# Compile every CUDA device file (csrc/**/*.cu) for sm_80 and sm_90a with nvcc -c. Device code includes
# no torch header, so this works on a machine with a CPU-only torch and no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s globstar nullglob
files=(csrc/**/*.cu)
if [ ${#files[@]} -eq 0 ]; then echo "[nvcc] no .cu files"; exit 0; fi
# The flags a real torch CUDA build passes (cpp_extension's COMMON_NVCC_FLAGS turn off the implicit
# half/bfloat16 conversions): without them this check misses breaks that `pip install` would hit.
flags=(-std=c++17 -O3 -lineinfo -DPYSHRINK_CUDA -D__CUDA_NO_HALF_OPERATORS__
       -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       --expt-relaxed-constexpr)
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
for f in "${files[@]}"; do
  for arch in 80 90a; do
    echo "[nvcc] $f sm_$arch"
    nvcc -c "${flags[@]}" -Icsrc -gencode=arch=compute_${arch},code=sm_${arch} "$f" -o "$out/$(basename "$f").$arch.o"
  done
done
echo "[nvcc] compiled ${#files[@]} CUDA file(s) for sm_80 and sm_90a"
