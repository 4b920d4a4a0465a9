"""pyshrink: make trained transformer models cheaper to serve, and prove it with numbers.

Stages (each a thin Python API over its module): ``contract`` (structured pruning), ``heal``
(distillation), ``quantize`` (4/8-bit on native kernels), ``export_onnx`` and ``bench``.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

try:  # the ONNX runtime side (pyshrink.runtime: generate/serve an exported folder) works without torch
    import torch as _torch  # noqa: F401
except ModuleNotFoundError:  # pragma: no cover - tests/runtime/test_generate.py::test_runtime_needs_no_torch
    _torch = None
if _torch is not None:
    from . import ops  # noqa: E402,F401  (loads pyshrink._C loudly; registers the kernels)

# Public API, imported lazily so that `import pyshrink` stays cheap (transformers is heavy).
_LAZY = {
    "load_model": "pyshrink.models",
    "save": "pyshrink.models",
    "perplexity": "pyshrink.evaluate",
    "contract": "pyshrink.contract",
    "ContractionResult": "pyshrink.contract",
    "quantize": "pyshrink.quantize",
    "heal": "pyshrink.heal",
    "HealResult": "pyshrink.heal",
    "export_onnx": "pyshrink.export",
}


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        # contract, quantize and heal are callable packages named like their function: importing one binds the
        # package here (the second access would find it), so return the package every time, not the function
        # on first access only (pyshrink.heal.iterative_contract must work in a fresh interpreter)
        return module if module.__name__ == f"{__name__}.{name}" else getattr(module, name)
    raise AttributeError(f"module 'pyshrink' has no attribute {name!r}")


__all__ = ["ops", *_LAZY]
