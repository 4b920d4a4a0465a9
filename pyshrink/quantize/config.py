"""What to quantize and how: one small dataclass, validated once, recorded with the model.

:class:`QuantConfig` is the whole recipe. ``bits=4`` stores ``group_size`` weights per scale in ONNX
Runtime's MatMulNBits layout (:mod:`pyshrink.ops.q4`); ``bits=8`` stores int8 weights with one scale per
output channel (:mod:`pyshrink.ops.q8`; ``group_size`` and ``symmetric`` do not apply). ``method`` names a
quantizer registered in :data:`pyshrink.quantize.methods.METHODS`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..errors import InvalidSetting, as_scalar, is_int, is_number
from ..ops.q4 import GROUP_SIZES

BITS = (4, 8)


HEAD = "lm_head"  # the name skip uses for the output head, whatever the model calls it


@dataclass
class QuantConfig:
    """Settings of :func:`pyshrink.quantize`.

    bits            4 (group-wise, MatMulNBits layout) or 8 (per output channel, symmetric).
    group_size      weights per scale along K for 4 bits: 32, 64 or 128. A K that is not a multiple is
                    zero-padded (as MatMulNBits does); any K works.
    symmetric       4-bit only: zero point fixed at 8 (True) or one 4-bit zero point per group (False).
    method          "rtn", "awq", "gptq" or "auto" (best the calibration data allows; "rtn" without data).
    skip            module names (fnmatch patterns) to keep in floating point, with the modules inside them:
                    a pattern matches the qualified name or any run of its dotted parts ("down_proj",
                    "self_attn", "mlp.*", "model.layers.0.*"); one that matches no projection is an error.
                    "lm_head" names the output head whatever the model calls it (BERT's
                    cls.predictions.decoder); it is skipped by default.
    head_bits       bits for the output head when it is not skipped (None: ``bits``). A tied head is
                    untied: the embedding stays in floating point.
    fast            4-bit layers' ``linear_q4`` mode: True (default) = activations quantized to int8 per
                    block with integer dot products, False = float activations (see
                    :class:`~pyshrink.quantize.linear.QuantLinear` for the measurements).
    calib_tokens    calibration tokens used at most (the first ones of the text).
    min_calib_tokens  fewer calibration tokens than this is an error that names the number.
    seq_len         calibration and perplexity window length in tokens (None: 512, or the model's
                    positions if fewer; a value beyond them is an error).
    batch_size      calibration windows per forward batch.
    awq_grid        number of alpha values searched for the activation-aware scales (0 .. 1).
    clip_grid       number of clipping ratios searched, from 1.0 down to ``clip_min``.
    clip_min        smallest clipping ratio tried.
    damp            GPTQ's Hessian damping, as a fraction of the mean diagonal.
    act_order       GPTQ: process columns by decreasing Hessian diagonal (group scales stay in K order).
    gptq_block      GPTQ's lazy-batch width in columns (a multiple of the group size is used).
    scale_unfoldable  AWQ: where no preceding op can absorb 1/s (verified numerically), keep the scale
                    vector in QuantLinear (``input_scale``, one extra multiply) instead of not scaling.
    """

    bits: int = 4
    group_size: int = 64
    symmetric: bool = True
    method: str = "auto"
    skip: tuple = (HEAD,)
    head_bits: int | None = None
    fast: bool = True
    calib_tokens: int = 16384
    min_calib_tokens: int = 2048
    seq_len: int | None = None
    batch_size: int = 8
    awq_grid: int = 20
    clip_grid: int = 20
    clip_min: float = 0.5
    damp: float = 0.01
    act_order: bool = False
    gptq_block: int = 128
    scale_unfoldable: bool = True
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        # numpy and torch scalars as Python values, and 4.0 as 4, so that the checks below and the recorded
        # config see plain numbers
        for f in fields(self):
            v = as_scalar(getattr(self, f.name))
            if f.type in ("int", "int | None") and isinstance(v, float) and v.is_integer():
                v = int(v)
            setattr(self, f.name, v)
        # one name is one pattern: tuple("lm_head") would be the patterns "l", "m", "_", ... (none of them the head)
        self.skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip or ())
        self.validate()

    def validate(self) -> "QuantConfig":
        from .methods import METHODS

        for name, b in (("bits", self.bits), ("head_bits", self.head_bits)):
            if b is not None and (not is_int(b) or b not in BITS):
                raise InvalidSetting(f"{name} must be 4 or 8, got {b!r} (pyshrink stores 4-bit group-wise or "
                                     f"8-bit per-channel weights; other widths are not supported)")
        if not is_int(self.group_size) or self.group_size not in GROUP_SIZES:
            raise InvalidSetting(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))} (the group sizes "
                                 f"the 4-bit kernels and ONNX Runtime's MatMulNBits support), got {self.group_size!r}")
        for name in ("symmetric", "fast", "act_order", "scale_unfoldable", "progress"):
            if not isinstance(getattr(self, name), bool):  # "no" would be truthy
                raise InvalidSetting(f"{name} must be True or False, got {getattr(self, name)!r}")
        bad = [p for p in self.skip if not isinstance(p, str)]
        if bad:
            raise InvalidSetting(f"skip must be module names or fnmatch patterns (strings), got {bad[0]!r}")
        if self.bits == 8 and not self.symmetric:
            raise InvalidSetting("8-bit weights are symmetric per output channel; asymmetric (zero-point) "
                                 "quantization is supported with bits=4 only")
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise InvalidSetting(f"unknown quantization method {self.method!r} (known: {', '.join(METHODS)})")
        for name, lo in (("calib_tokens", 1), ("min_calib_tokens", 1), ("seq_len", 2), ("batch_size", 1),
                         ("awq_grid", 1), ("clip_grid", 1), ("gptq_block", 1)):
            v = getattr(self, name)
            if name == "seq_len" and v is None:  # the model's default window (pyshrink.models.window_length)
                continue
            if not is_int(v) or v < lo:
                raise InvalidSetting(f"{name} must be an integer >= {lo}, got {v!r}")
        for name in ("clip_min", "damp"):
            if not is_number(getattr(self, name)):
                raise InvalidSetting(f"{name} must be a number, got {getattr(self, name)!r}")
        if not 0.0 < self.clip_min <= 1.0:
            raise InvalidSetting(f"clip_min must be in (0, 1], got {self.clip_min!r}")
        if not 0.0 < self.damp < 1.0:  # 0 leaves a rank-deficient Hessian (few tokens, wide layer) unfactorable
            raise InvalidSetting(f"damp must be in (0, 1), got {self.damp!r}")
        if self.head_bits is not None and HEAD in self.skip:
            raise InvalidSetting("head_bits sets the output head's bits, but skip keeps lm_head in float: "
                                 "remove 'lm_head' from skip (the CLI's --head-bits does)")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skip"] = list(self.skip)
        d.pop("progress")
        return d
