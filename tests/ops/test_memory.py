"""pyshrink.ops.memory: large weight buffers copied into huge-page-advised memory, values unchanged (Linux with
THP 'always' or 'madvise', the native build loaded; skipped elsewhere)."""
from pathlib import Path

import pytest
import torch

from pyshrink.ops import memory
from pyshrink.quantize import QuantLinear


@pytest.fixture(autouse=True)
def _enabled(monkeypatch):
    monkeypatch.delenv("PYSHRINK_HUGEPAGES", raising=False)
    if not memory.hugepages_enabled():
        pytest.skip(f"no copies to test here (THP mode {memory.thp_mode()}, native build "
                    f"{'loaded' if memory._C is not None else 'missing'})")


def _anon_huge_kb(addr: int) -> int:
    """AnonHugePages of the mapping of this process that holds `addr` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= addr < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {addr:#x}")


def test_copy_is_equal_aligned_and_independent(gen):
    t = torch.randint(0, 256, (1024, 48, 32), dtype=torch.uint8, generator=gen)  # 1.5 MiB: under MIN_BYTES
    assert memory.in_hugepages(t) is t
    big = torch.randint(0, 256, (4096, 64, 32), dtype=torch.uint8, generator=gen)  # 8 MiB
    h = memory.in_hugepages(big)
    assert h is not big and torch.equal(h, big) and h.dtype == big.dtype and h.is_contiguous()
    assert h.data_ptr() % (2 << 20) == 0
    h[0, 0, 0] ^= 1  # a copy: the source is untouched
    assert h[0, 0, 0] != big[0, 0, 0]
    nc = torch.randn(1024, 1024, generator=gen).T  # non-contiguous: the copy is contiguous, same values
    assert torch.equal(memory.in_hugepages(nc), nc)


def test_copy_gets_huge_pages_even_after_large_frees(gen):
    """The copy is a fresh mapping: after a large tensor is freed, the allocator's recycled (already faulted,
    small-page) memory would otherwise come back. Only the whole 2 MiB stretches become huge pages."""
    torch.empty(24 << 20, dtype=torch.uint8).fill_(1)  # faulted in, then freed at once
    t = torch.randint(0, 256, ((8 << 20) + 4096,), dtype=torch.uint8, generator=gen)  # 4 huge pages and a bit
    h = memory.in_hugepages(t)
    assert torch.equal(h, t)
    assert _anon_huge_kb(h.data_ptr()) >= 8192  # more only where the kernel merged it with a neighbouring copy


def test_views_are_resolved(gen):
    c = torch.randn(1024, 512, dtype=torch.complex64, generator=gen)  # 4 MiB
    assert torch.equal(memory.in_hugepages(c.conj()), c.conj().resolve_conj())
    f = torch.randn(1024, 1024, generator=gen)
    assert torch.equal(memory.in_hugepages(f._neg_view()), -f)


def test_opt_out_and_small_or_grad_tensors(monkeypatch, gen):
    big = torch.zeros(3 << 20, dtype=torch.uint8)
    monkeypatch.setenv("PYSHRINK_HUGEPAGES", "0")
    assert not memory.hugepages_enabled() and memory.in_hugepages(big) is big
    monkeypatch.delenv("PYSHRINK_HUGEPAGES")
    assert memory.hugepages_enabled()
    p = torch.zeros(1 << 20, requires_grad=True)  # a trainable parameter is left where autograd has it
    assert memory.in_hugepages(p) is p


def test_quantlinear_streams_codes_from_huge_page_memory(gen):
    lin = torch.nn.Linear(2048, 2048, bias=False)  # codes: 2 MiB exactly
    q = QuantLinear.from_float(lin, group_size=64)
    assert q.packed.data_ptr() % (2 << 20) == 0
    x = torch.randn(3, 2048, generator=gen)
    ref = torch.ops.pyshrink.linear_q4(x, q.packed.clone(), q.scales, q.zero_points, None, True)
    assert torch.equal(q(x), ref)
    small = QuantLinear.from_float(torch.nn.Linear(64, 32), group_size=32)
    assert small.packed.nbytes < memory.MIN_BYTES  # left in place: nothing to check but that it still runs
    assert small(torch.randn(1, 64)).shape == (1, 32)
