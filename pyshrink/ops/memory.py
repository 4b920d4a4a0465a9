"""Where large weight buffers live in memory: transparent huge pages for the ones the kernels stream.

A one-token step reads every weight once, as one stream per thread; in 4 KiB pages that stream crosses a page
boundary every 4 KiB, where the hardware prefetchers stop and the TLB misses, so on a machine whose THP mode is
``madvise`` (plain allocations, torch's included, get 4 KiB pages) the packed weights are copied into memory
advised ``MADV_HUGEPAGE`` (csrc/cpu/hugepages.cpp says what that measured). The copy is a hint to the kernel:
with THP off the pages stay small and nothing else changes.

Nothing is copied where THP is ``never`` (the copy could not get huge pages) or ``PYSHRINK_HUGEPAGES=0``
(to compare, or where memory is too fragmented for huge pages to pay). A copy costs at most 4 KiB more than the
buffer: only its whole 2 MiB stretches become huge pages.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from .. import _native

_C = _native.load()  # None only with PYSHRINK_REFERENCE=1 (after its loud warning)

MIN_BYTES = 2 << 20  # one huge page: a smaller buffer holds no whole huge page, so its copy would gain nothing


@functools.lru_cache(maxsize=1)
def thp_mode() -> str | None:
    """This machine's transparent-huge-page mode: 'always', 'madvise', 'never', or None where there is none."""
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def hugepages_enabled() -> bool:
    """Whether :func:`in_hugepages` copies: the native build is loaded, THP is 'always' or 'madvise', and
    ``PYSHRINK_HUGEPAGES`` is not 0."""
    return _C is not None and thp_mode() in ("always", "madvise") and os.environ.get("PYSHRINK_HUGEPAGES", "1") != "0"


def in_hugepages(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy of it in huge-page-advised memory when it is a CPU tensor of at least
    :data:`MIN_BYTES` and :func:`hugepages_enabled`. The values are equal; only where they live changes."""
    if not hugepages_enabled() or t.device.type != "cpu" or t.nbytes < MIN_BYTES or t.requires_grad:
        return t
    return _C.hugepage_copy(t)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Hand the heap's freed memory back to the system (glibc's ``malloc_trim``; nothing elsewhere). glibc keeps it
    for reuse: a streamed quantization's resident memory crept up by part of a block's temporaries per block (a
    0.85 B-parameter model: 1.1 GB after the first block, 1.5 GB after the 16th; with the trim 0.84 GB after every
    block), and loading a quantized 11 B-parameter folder left 1.2 GiB free but resident."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
