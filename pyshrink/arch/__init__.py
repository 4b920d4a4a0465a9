"""Model families pyshrink understands, one adapter file each; ``adapter_for(model)`` finds the right one.

Adding a family = adding ``pyshrink/arch/<family>.py`` that calls :func:`register`, and its name to
``_FAMILIES`` below (tests parametrize over :data:`ADAPTERS`).
"""
from __future__ import annotations

import importlib

from .base import Adapter, get_path, module_name

ADAPTERS: dict[str, Adapter] = {}  # model_type -> adapter
_FAMILIES = ("llama", "gpt2", "opt", "phi", "bert")


class UnsupportedArchitecture(ValueError):
    pass


def register(adapter: Adapter) -> Adapter:
    for t in adapter.model_types:
        ADAPTERS[t] = adapter
    return adapter


def adapter_for(model_or_config) -> Adapter:
    config = getattr(model_or_config, "config", model_or_config)
    mt = getattr(config, "model_type", None)
    if mt not in ADAPTERS:
        raise UnsupportedArchitecture(
            f"unsupported architecture model_type={mt!r}; pyshrink supports: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[mt]


for _f in _FAMILIES:
    try:
        importlib.import_module(f"{__name__}.{_f}")
    except ModuleNotFoundError as exc:  # a family file not written yet is a bug, but say which
        if exc.name != f"{__name__}.{_f}":
            raise

__all__ = ["Adapter", "ADAPTERS", "adapter_for", "register", "get_path", "module_name", "UnsupportedArchitecture"]
