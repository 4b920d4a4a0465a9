"""The one ``torch.library`` namespace every pyshrink op is defined in.

Schemas live in the op modules next to their fake and reference implementations; C++ only registers
implementations (``TORCH_LIBRARY_IMPL(pyshrink, CPU|CUDA, m)``).
"""
import torch

NAMESPACE = "pyshrink"
lib = torch.library.Library(NAMESPACE, "DEF")

# op name -> pure-PyTorch reference with the op's exact signature. Tests compare kernels against these;
# they are registered as kernels only when the native build is missing and PYSHRINK_REFERENCE=1.
REFERENCES: dict = {}


def define(schema: str) -> str:
    """Define ``pyshrink::<schema>``; returns the qualified name for ``register_fake``."""
    lib.define(schema)
    return f"{NAMESPACE}::{schema.split('(', 1)[0]}"


def reference(qualname: str):
    """Decorator: record ``fn`` as the pure-PyTorch reference of ``qualname``."""
    def deco(fn):
        REFERENCES[qualname.split("::", 1)[1]] = fn
        return fn
    return deco


def check(cond: bool, op: str, msg: str):
    """Raise the ValueError every op uses for bad input; the message starts with the op's name."""
    if not cond:
        raise ValueError(f"pyshrink.{op}: {msg}")
