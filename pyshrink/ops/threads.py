"""How many threads pyshrink's CPU kernels use, set apart from torch's intra-op pool.

By default the kernels follow ``torch.get_num_threads()`` and run on torch's own threads, so that a model's
torch operators and pyshrink's kernels share one set of workers (csrc/cpu/parallel.h says why: a second set
beside OpenMP's spinning workers made a quantized model's prompt about 1.5-2x slower). A count set apart from
torch's (:func:`set_num_threads`, :func:`kernel_threads`) runs on pyshrink's own pool instead: its workers
spin for a short while between calls (``PYSHRINK_SPIN_US``, default 200) before they sleep, so that a decode
step's ~120 small calls each get both cores without a wake-up. Where torch's own operators are too small to
gain from a second thread (one-token decode steps), running torch on one thread and the kernels on two keeps
torch's OpenMP workers, which also spin after each region, off the cores the kernels use:
:class:`pyshrink.runtime.torch_decoder.TorchDecoder` does that with :func:`kernel_threads`.
"""
from __future__ import annotations

import contextlib

import torch

from .. import _native
from ..errors import check_range

_C = _native.load()  # None only with PYSHRINK_REFERENCE=1 (after its loud warning)


def set_num_threads(n: int) -> None:
    """Threads for pyshrink's CPU kernels from now on; 0 follows ``torch.get_num_threads()`` again."""
    check_range("threads", n, 0, 1024, integer=True)
    if _C is not None:  # the reference kernels (PYSHRINK_REFERENCE=1) are torch ops and use torch's threads
        _C.set_num_threads(int(n))


def get_num_threads() -> int:
    """Threads pyshrink's CPU kernels use now."""
    return _C.get_num_threads() if _C is not None else torch.get_num_threads()


@contextlib.contextmanager
def kernel_threads(n: int, *, torch_threads: int | None = None):
    """Within the block the kernels use ``n`` threads and, if given, torch ``torch_threads``; both restored after."""
    check_range("threads", n, 1, 1024, integer=True)
    before_k = _C.num_threads_setting() if _C is not None else 0
    before_t = torch.get_num_threads()
    set_num_threads(n)
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    try:
        yield
    finally:
        set_num_threads(before_k)
        if torch_threads is not None:
            torch.set_num_threads(before_t)
