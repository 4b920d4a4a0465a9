#!/usr/bin/env bash
# Compile every CUDA device file (csrc/**/*.cu) for sm_80 and sm_90a with nvcc -c. Device code includes
# no torch header, so this works on a machine with a CPU-only torch and no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s globstar nullglob
files=(csrc/**/*.cu)
if [ ${#files[@]} -eq 0 ]; then echo "[nvcc] no .cu files"; exit 0; fi
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
for f in "${files[@]}"; do
  for arch in 80 90a; do
    echo "[nvcc] $f sm_$arch"
    nvcc -c -std=c++17 -O3 -Icsrc -gencode=arch=compute_${arch},code=sm_${arch} "$f" -o "$out/$(basename "$f").$arch.o"
  done
done
echo "[nvcc] compiled ${#files[@]} CUDA file(s) for sm_80 and sm_90a"
