"""pyshrink's native ops: one schema each (``torch.library``), a fake, a pure-PyTorch reference and a
typed wrapper, all in the op's module. Kernels are registered by the C++ extension ``pyshrink._C``.
"""
from __future__ import annotations

from .. import _native
from ._lib import NAMESPACE, REFERENCES
from .act_stats import act_stats_, new_accumulators
from .q4 import GROUP_SIZES, dequantize_q4, linear_q4, quantize_q4
from .q8 import linear_q8, quantize_q8
from .threads import get_num_threads, kernel_threads, set_num_threads
from . import attention  # noqa: F401  (defines pyshrink::filled_attention)

_C = _native.load()

if _C is None:  # only reachable with PYSHRINK_REFERENCE=1, after a loud warning
    import torch

    for _name, _fn in REFERENCES.items():
        torch.library.impl(f"{NAMESPACE}::{_name}", "CPU")(_fn)

NATIVE = _C is not None

__all__ = [
    "act_stats_", "new_accumulators", "quantize_q4", "dequantize_q4", "linear_q4", "GROUP_SIZES",
    "quantize_q8", "linear_q8", "NATIVE", "set_num_threads", "get_num_threads", "kernel_threads",
]
