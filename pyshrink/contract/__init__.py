"""Contraction: structured pruning that physically removes MLP neurons, attention heads and unused
vocabulary, calibrated on domain text or data-free. Entry point: :func:`contract`.

Importing this package registers the structure handlers (``contract.mlp``, ``contract.heads``,
``contract.vocab``) that :func:`pyshrink.load_model` uses to rebuild contracted models.
"""
from . import heads, neurons, vocab  # noqa: F401  (register structure handlers)
from .api import ContractionResult, ContractionSettings, contract

__all__ = ["contract", "ContractionResult", "ContractionSettings"]


class _CallableModule(type(heads)):
    """``pyshrink.contract`` is this package (the import system binds it on ``pyshrink``), and calling it
    calls :func:`contract`, so both ``pyshrink.contract(...)`` and ``from pyshrink.contract import contract``
    work."""

    def __call__(self, *args, **kwargs) -> ContractionResult:
        return contract(*args, **kwargs)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
