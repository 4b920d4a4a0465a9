"""Loads the native extension ``pyshrink._C`` and says loudly when it cannot.

The kernels are the point of pyshrink: running the pure-PyTorch references instead is orders of magnitude
slower, so a missing or broken build is an ImportError, not a debug log. A user who really wants the
reference path (for example to debug a kernel) sets ``PYSHRINK_REFERENCE=1`` and gets a loud warning.
"""
from __future__ import annotations

import os
import warnings

REFERENCE_ENV = "PYSHRINK_REFERENCE"


class NativeExtensionMissing(ImportError):
    pass


def reference_requested() -> bool:
    return os.environ.get(REFERENCE_ENV, "") not in ("", "0")


def load():
    """Import pyshrink._C (which registers the CPU, and CUDA, kernels); return the module or None."""
    try:
        from pyshrink import _C  # noqa: F401  (import registers TORCH_LIBRARY_IMPL kernels)
    except ImportError as exc:
        if reference_requested():
            warnings.warn(
                f"pyshrink: native extension pyshrink._C is not available ({exc}); {REFERENCE_ENV}=1 is set, "
                "so the slow pure-PyTorch reference kernels are registered instead. Do not benchmark this.",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        raise NativeExtensionMissing(
            "pyshrink: the native extension pyshrink._C failed to import: "
            f"{exc}.\nBuild it with `pip install --no-build-isolation -e .` after installing torch, "
            f"or set {REFERENCE_ENV}=1 to run the (slow) pure-PyTorch reference kernels."
        ) from exc
    return _C
