"""4-bit group-wise and 8-bit per-channel weight quantization on pyshrink's native kernels.

``pyshrink.quantize(model, bits=4, group_size=64, method="auto", calibration=..., tokenizer=...)``
replaces the model's projections in place with :class:`QuantLinear` (4-bit, ONNX Runtime MatMulNBits
layout, ``linear_q4`` op) or :class:`QuantLinear8` (int8 per output channel, ``linear_q8`` op).
Methods: ``rtn`` (round to nearest), ``awq`` (activation-aware scales + clipping), ``gptq``
(error-compensating), ``auto`` (AWQ scales, then per layer the best of rtn, awq and gptq; ``rtn`` without data).
Modules: config (settings), linear (the layers), grid (fake quantization), hessian (output error),
awq, gptq, calib (block statistics and folds), methods (registry), api (the stage), pipeline (a source in, a
quantized folder out: ``pyshrink quantize``), stream (the same with one block in memory at a time).
"""
from .api import QuantReport, quantize, quantize_model
from .config import QuantConfig
from .linear import QuantLinear, QuantLinear8
from .methods import METHODS, register_method

__all__ = ["quantize", "quantize_model", "QuantConfig", "QuantReport", "QuantLinear", "QuantLinear8", "METHODS",
           "register_method"]


class _CallableModule(__import__("types").ModuleType):
    """``pyshrink.quantize`` is both this package and the function: once the package is imported (which
    ``load_model`` does to replay saved models), Python binds the attribute ``pyshrink.quantize`` to the
    module, so the module forwards calls to :func:`quantize`."""

    def __call__(self, *args, **kwargs):
        return quantize(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
