"""Shared fixtures for the op tests: every parity test runs on each CPU code path the kernels have.

The kernels read PYSHRINK_CPU_ISA on every call, so a test forces the portable scalar path with
monkeypatch instead of a new process (tests/ops/test_native.py checks the variable in a subprocess too).
"""
import pytest
import torch

import pyshrink  # noqa: F401  (loads pyshrink._C and registers the kernels)
from pyshrink import _C

ISAS = ["avx512", "avx2", "scalar"]  # every level the kernels have, best first


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Run the test body with PYSHRINK_CPU_ISA set to each code path; levels this CPU lacks are skipped."""
    if request.param != "scalar" and not _C.build_info()[f"cpu_supports_{request.param}"]:
        pytest.skip(f"this CPU (or its OS) lacks the {request.param} level")
    monkeypatch.setenv("PYSHRINK_CPU_ISA", request.param)
    assert _C.cpu_isa() == request.param
    return request.param


@pytest.fixture
def gen():
    """A seeded generator: fresh random inputs per test, reproducible per run."""
    return torch.Generator().manual_seed(1234)
