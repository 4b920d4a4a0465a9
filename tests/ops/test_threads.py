"""pyshrink's kernel thread count: set apart from torch's, restored by the context manager, and the same
numbers on any count (each output is computed by one thread, whatever the split)."""
import pytest
import torch

import pyshrink
from pyshrink import _C
from pyshrink.errors import InvalidSetting
from pyshrink.ops import get_num_threads, kernel_threads, set_num_threads


@pytest.fixture(autouse=True)
def _follow_torch_after():
    yield
    set_num_threads(0)


def test_default_follows_torch():
    set_num_threads(0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert get_num_threads() == 1 and _C.build_info()["kernel_threads"] == 1
        torch.set_num_threads(2)
        assert get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_set_apart_from_torch_and_context_restores():
    before = torch.get_num_threads()
    set_num_threads(3)
    assert get_num_threads() == 3 and torch.get_num_threads() == before and _C.num_threads_setting() == 3
    with kernel_threads(2, torch_threads=1):
        assert get_num_threads() == 2 and torch.get_num_threads() == 1
    assert get_num_threads() == 3 and torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="boom"), kernel_threads(1):
        raise RuntimeError("boom")
    assert get_num_threads() == 3


@pytest.mark.parametrize("bad", [-1, 1.5, 2000])
def test_bad_counts(bad):
    with pytest.raises(InvalidSetting, match=r"threads must be"):
        set_num_threads(bad)
    with pytest.raises(InvalidSetting, match=r"threads must be"):
        with kernel_threads(0 if bad == -1 else bad):
            pass


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
@pytest.mark.parametrize("M", [1, 3, 17])
def test_same_numbers_on_any_thread_count(gen, fast, M):
    w = torch.randn(700, 576, generator=gen)
    x = torch.randn(M, 576, generator=gen)
    p, s, z = pyshrink.ops.quantize_q4(w, 64, True)
    outs = []
    for n in (1, 2, 4):  # set apart from torch's count: pyshrink's pool
        set_num_threads(n)
        outs.append(pyshrink.ops.linear_q4(x, p, s, z, fast=fast))
    set_num_threads(0)
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 4):  # following torch's count: torch's own threads
            torch.set_num_threads(n)
            outs.append(pyshrink.ops.linear_q4(x, p, s, z, fast=fast))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_followed_count_runs_on_torch_threads():
    """Following torch's count, the kernels' work runs on torch's own (OpenMP) threads, not on a second set of
    workers beside them (csrc/cpu/parallel.h says why); set apart, on pyshrink's pool. Seen from the threads of
    a fresh process: followed calls start no thread after torch's own, the first set-apart call starts the
    pool's worker."""
    import subprocess
    import sys

    code = """
import os, torch, pyshrink
from pyshrink.ops import set_num_threads
count = lambda: len(os.listdir("/proc/self/task"))
torch.set_num_threads(2)
p, s, z = pyshrink.ops.quantize_q4(torch.randn(4096, 1024), 64, True)
x = torch.randn(64, 1024)
pyshrink.ops.linear_q4(x, p, s, z, fast=True)  # torch's threads exist from here on
a = count()
for _ in range(3):
    pyshrink.ops.linear_q4(x, p, s, z, fast=True)
b = count()
set_num_threads(2)
pyshrink.ops.linear_q4(x, p, s, z, fast=True)
print(a, b, count())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    a, b, c = map(int, out.stdout.split())
    assert a == b and c == b + 1, (a, b, c)
