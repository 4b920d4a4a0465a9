"""The source distribution can build pyshrink._C on its own: it carries every kernel source and header.

setuptools puts the compiled sources of setup.py into an sdist but not the headers they include (csrc/cpu/*.h,
csrc/cuda/*.cuh) or the CUDA sources of a CPU-only build, so without MANIFEST.in `pip install pyshrink-*.tar.gz`
failed on a missing isa.h. The sdist is built from a copy of the files it is made of, so the checkout is not
touched (setuptools writes its release tree and egg-info where it runs).
"""
from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import tarfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL_SUFFIXES = {".cpp", ".h", ".cu", ".cuh"}


def test_sdist_carries_every_kernel_source_and_header(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "csrc", src / "csrc")
    shutil.copytree(ROOT / "pyshrink", src / "pyshrink", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    dist = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist",
                           "-d", str(dist)], cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (archive,) = dist.glob("pyshrink-*.tar.gz")
    with tarfile.open(archive) as tar:
        members = {pathlib.PurePosixPath(m).relative_to(pathlib.PurePosixPath(m).parts[0]).as_posix()
                   for m in tar.getnames() if len(pathlib.PurePosixPath(m).parts) > 1}
    kernel_files = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*")
                          if p.suffix in KERNEL_SUFFIXES)
    assert any(f.endswith(".h") for f in kernel_files) and any(f.endswith(".cu") for f in kernel_files)
    missing = [f for f in kernel_files if f not in members]
    assert not missing, f"the sdist lacks kernel files that the build needs: {missing}"
    assert {"setup.py", "pyproject.toml", "pyshrink/__init__.py"} <= members
