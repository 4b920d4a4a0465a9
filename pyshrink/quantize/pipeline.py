"""Source in, quantized folder out, with before/after numbers: what ``pyshrink quantize`` runs.

Quality is measured on held-out text: ``eval_text`` when given, else the last ``held_out`` fraction of
the calibration tokens (never used for calibration), else the built-in pydoc corpus. Decoders are scored
by perplexity, encoders by the cosine similarity of their mean-pooled embeddings to the source model's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import data
from ..arch import adapter_for
from ..errors import DataError, InvalidSetting, is_int
from ..evaluate import embeddings, perplexity
from ..models import (CACHE_DIR, check_fits, check_output, id_limit, load_model, max_positions, resolve,
                      round_floats_to, save, storage_dtype, stored_float_dtype, transforms_of, window_length)
from .api import QuantReport, method_for, quantize_model
from .config import QuantConfig


@dataclass
class QuantRun:
    out: Path
    report: QuantReport
    metric: str  # "perplexity" or "embedding cosine similarity"
    before: float
    after: float
    eval_tokens: int
    eval_source: str
    source_bytes: int | None
    out_bytes: int
    params: int  # weights the model holds, quantized or not (tied ones once)
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def summary(self) -> dict:
        r = self.report.to_dict()
        return {
            "out": str(self.out), "method": self.report.method, "config": r["config"],
            "metric": self.metric, "before": self.before, "after": self.after,
            "ratio": self.after / self.before if self.before else None,
            "eval_tokens": self.eval_tokens, "eval_source": self.eval_source,
            "calib_tokens": self.report.calib_tokens,
            "source_bytes": self.source_bytes, "out_bytes": self.out_bytes,
            "bits_per_weight_quantized": self.report.bits_per_weight,
            "bits_per_weight_model": 8 * self.out_bytes / max(self.params, 1),
            "quantize_seconds": self.report.seconds, "seconds": self.seconds,
            "untied_head": self.report.untied_head, "layers": r["layers"],
            "source_bits_per_weight": self.extra.get("source_bits"),
        }


def weights_bytes(path) -> int:
    """Bytes of a model's weight files (``*.safetensors``, or the ``.gguf`` file)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.glob("*.safetensors"))


def _source_bytes(source) -> int | None:
    kind, path = resolve(source)
    if kind == "embedded":
        path = CACHE_DIR / str(source)
    return weights_bytes(path) if path is not None and Path(path).exists() else None


def represented_params(model) -> int:
    from .linear import is_quantized

    seen, n = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.numel()
    return n + sum(m.in_features * m.out_features for m in model.modules() if is_quantized(m))


class Quality:
    """The before/after measure of a run: perplexity on the evaluation windows (decoders), or the cosine
    similarity of mean-pooled embeddings to the source's (encoders; "before" is 1 by definition)."""

    def __init__(self, model, adapter, eval_ids, window: int, progress: bool):
        self.eval_ids, self.window, self.progress = eval_ids, window, progress
        self.decoder = adapter.kind == "decoder"
        self.metric = "perplexity" if self.decoder else "embedding cosine similarity"
        # the windows the measure runs on, in its order and batches (a streamed run computes their hidden states)
        self.windows = data.windows(eval_ids, window, what="evaluation text", vocab=id_limit(model))
        self.batch_size = 4 if self.decoder else 8
        self.ref = None

    def _measure(self, model):
        if self.decoder:
            return perplexity(model, ids=self.eval_ids, seq_len=self.window, batch_size=self.batch_size,
                              progress=self.progress)
        return embeddings(model, self.windows, batch_size=self.batch_size)

    def before(self, model) -> float:
        if self.decoder:
            return self._measure(model)
        self.ref = self._measure(model)
        return 1.0

    def after(self, model) -> float:
        if self.decoder:
            return self._measure(model)
        return float(torch.nn.functional.cosine_similarity(self._measure(model), self.ref).mean())


def _plan(model, tok, adapter, config: QuantConfig, calibration, eval_text, eval_tokens, held_out, progress):
    """Calibration ids (None without calibration text), the quality measure, and where its text came from."""
    calib_ids = eval_ids = None
    eval_source = ""
    if calibration:
        calib_ids = data.tokenize(tok, data.read_texts(calibration))
    if eval_text:
        eval_ids, eval_source = data.tokenize(tok, data.read_texts(eval_text)), "eval text"
    elif calib_ids is not None:
        calib_ids, eval_ids = data.split_ids(calib_ids, held_out)
        eval_source = f"held-out last {held_out:.0%} of the calibration text"
    else:
        eval_ids, eval_source = data.tokenize(tok, data.builtin_text("pydoc")), "built-in pydoc text"
    eval_ids = eval_ids[:eval_tokens]

    max_pos = max_positions(model.config)
    window = window_length(model, config.seq_len) if adapter.kind == "decoder" else min(128, max_pos or 128)
    if eval_source.startswith("held-out") and eval_ids.numel() < window:
        # say which text is short: without --eval the held-out tail of the calibration text is measured
        raise DataError(f"the calibration text has {calib_ids.numel() + eval_ids.numel()} tokens, so its held-out "
                        f"last {held_out:.0%} ({eval_ids.numel()} tokens) is shorter than one {window}-token window "
                        "for the before/after quality: pass more calibration text, or an evaluation text (--eval)")
    from ..contract import vocab

    pruned = next((r for r in transforms_of(model) if r["kind"] == vocab.KIND), None)
    if pruned is not None and adapter.kind == "decoder":
        # the model's softmax runs over its kept ids only: not comparable with perplexities over the whole vocabulary
        # (contract's ppl_final is measured before the vocabulary is dropped)
        eval_source += (f"; over the {len(pruned['kept_ids']):,} ids the pruned vocabulary keeps, not comparable "
                        "with contract's ppl_final")
    if adapter.kind == "decoder" and eval_tokens < window:
        raise InvalidSetting(f"eval_tokens ({eval_tokens}) must be at least one {window}-token window")
    if calib_ids is not None and calib_ids.numel() == 0:
        raise DataError("the calibration text is empty")
    return calib_ids, Quality(model, adapter, eval_ids, window, progress), eval_source


def quantize_to_folder(source, out, config: QuantConfig, *, calibration=None, eval_text=None,
                       eval_tokens: int = 16384, held_out: float = 0.1, overwrite: bool = False,
                       progress: bool = True, stream: bool = False) -> QuantRun:
    """Load ``source``, measure it, quantize it with ``config``, measure again, save to ``out``.

    ``stream``: never hold the whole model: load, quantize, measure and write one block at a time
    (:mod:`pyshrink.quantize.stream`; a local folder of .safetensors files), for models larger than memory.
    The result is the same as without it."""
    t0 = time.perf_counter()
    check_output(out, overwrite=overwrite, sources=(source,))  # fail before the expensive part
    if not is_int(eval_tokens) or eval_tokens < 2:
        raise InvalidSetting(f"eval_tokens must be an integer >= 2 (at least one window), got {eval_tokens!r}")
    method_for(config, bool(calibration))
    out = Path(out)
    if stream:
        from ..streaming import StreamedModel

        streamed = StreamedModel(source)
        model, tok = streamed.model, streamed.tokenizer
    else:
        check_fits(source, "quantize")
        model, tok = load_model(source)
    adapter = adapter_for(model)
    calib_ids, quality, eval_source = _plan(model, tok, adapter, config, calibration, eval_text, eval_tokens,
                                            held_out, progress)
    # A 16-bit source keeps its float weights (embedding, norms, an unquantized head) in 16 bits: stored in
    # float32 they took twice the source's bytes. They are rounded before "after" is measured, so that "after" is
    # what the folder holds.
    src_dtype = stored_float_dtype(source)
    store = storage_dtype(src_dtype)

    def metadata(report, before, after):
        return {"source": str(source), "quantize": {k: v for k, v in report.to_dict().items() if k != "layers"},
                "quality": {"metric": quality.metric, "before": before, "after": after,
                            "eval_tokens": int(quality.eval_ids.numel()), "eval_source": eval_source}}

    if stream:
        from .stream import quantize_streamed

        report, before, after, params = quantize_streamed(streamed, config, calib_ids, quality, out, store,
                                                          metadata, overwrite=overwrite)
    else:
        before = quality.before(model)
        report = quantize_model(model, config, calibration=calib_ids, tokenizer=tok)
        round_floats_to(model, store)
        after = quality.after(model)
        save(model, tok, out, metadata=metadata(report, before, after), overwrite=overwrite, float_dtype=store)
        params = represented_params(model)
    return QuantRun(out=out, report=report, metric=quality.metric, before=before, after=after,
                    eval_tokens=int(quality.eval_ids.numel()), eval_source=eval_source,
                    source_bytes=_source_bytes(source), out_bytes=weights_bytes(out), params=params,
                    seconds=time.perf_counter() - t0,
                    extra={"source_bits": None if src_dtype is None else torch.finfo(src_dtype).bits})


__all__ = ["quantize_to_folder", "QuantRun", "weights_bytes"]
