"""The CUDA device code compiles without a GPU, and stays free of torch headers.

Runs on CPU-only machines: device code (csrc/**/*.cu and the headers they use) includes no torch, ATen or
c10 header, so plain ``nvcc -c`` builds it. One architecture here (sm_80) to stay quick; CI's
``.ci/nvcc_check.sh`` builds sm_80 and sm_90a. Skipped when nvcc is not on PATH.
"""
from __future__ import annotations

import concurrent.futures
import pathlib
import re
import shutil
import subprocess
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
# The flags the real build passes (torch.utils.cpp_extension's COMMON_NVCC_FLAGS, which turn off the
# implicit half/bfloat16 conversions and operators, plus setup.py's), so this catches what breaks `pip install`.
NVCC_FLAGS = ["-std=c++17", "-O3", "-lineinfo", "-DPYSHRINK_CUDA", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
              "--expt-relaxed-constexpr"]
TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10)/', re.MULTILINE)
DEVICE_SUFFIXES = {".cu", ".cuh"}


def _device_files():
    """Every .cu/.cuh under csrc, plus the plain headers in csrc/cuda that device code includes."""
    files = [p for p in CSRC.rglob("*") if p.suffix in DEVICE_SUFFIXES]
    files += [p for p in (CSRC / "cuda").glob("*.h")]
    return sorted(set(files))


def test_device_code_includes_no_torch_header():
    offenders = [str(p.relative_to(ROOT)) for p in _device_files() if TORCH_INCLUDE.search(p.read_text())]
    assert not offenders, f"device code must not include torch/ATen/c10 headers: {offenders}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cu_files_compile_for_sm80():
    sources = sorted(CSRC.rglob("*.cu"))
    if not sources:
        pytest.skip("no .cu files")
    nvcc = shutil.which("nvcc")

    with tempfile.TemporaryDirectory() as out:
        def compile_one(src: pathlib.Path):
            cmd = [nvcc, "-c", *NVCC_FLAGS, f"-I{CSRC}", "-gencode=arch=compute_80,code=sm_80",
                   str(src), "-o", str(pathlib.Path(out) / (src.name + ".o"))]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            return src, proc

        with concurrent.futures.ThreadPoolExecutor(max_workers=len(sources)) as pool:
            results = list(pool.map(compile_one, sources))

    failures = [f"{src.relative_to(ROOT)}:\n{proc.stderr[-4000:]}" for src, proc in results if proc.returncode != 0]
    assert not failures, "nvcc failed:\n" + "\n".join(failures)
    warnings = [f"{src.relative_to(ROOT)}: {line}" for src, proc in results
                for line in proc.stderr.splitlines() if "warning" in line.lower()]
    assert not warnings, "nvcc warnings:\n" + "\n".join(warnings)
