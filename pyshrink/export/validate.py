"""Export validation: ONNX Runtime must load the written model and agree with the PyTorch model.

Decoders are compared on a random prompt (prefill) and then on several single-token KV-cache steps, against
full-sequence PyTorch forwards (so the cache itself is under test). The PyTorch side computes with exactly
the weights the graph holds (4-bit weights quantized here are substituted dequantized).
"""
from __future__ import annotations

import contextlib

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import PyshrinkError

FLOAT_RTOL = 1e-3  # max |ort - torch| <= FLOAT_RTOL * max(1, max |torch|)
# 4-bit weights with accuracy_level 4: MatMulNBits quantizes activations to int8 per block, which moves
# logits by a few percent of their range after 30 layers. The graph itself is then checked exactly on an
# in-memory twin with accuracy_level 0 (float activations), against the same weights, at FLOAT_RTOL.
INT4_RTOL = 0.15


class ExportValidationError(PyshrinkError):
    pass


class OnnxRuntimeFailure(ExportValidationError):
    """ONNX Runtime could not run the graph at all: no accuracy level helps, so none is tried."""


@dataclass
class Validation:
    max_abs_diff: float = 0.0
    tolerance: float = 0.0
    scale: float = 0.0
    prompt_tokens: int = 0
    kv_steps: int = 0
    providers: list = field(default_factory=list)
    worst: str = ""
    exact_twin_max_abs_diff: float | None = None  # 4-bit models: the accuracy_level 0 twin's largest difference

    def to_dict(self):
        return asdict(self)


def providers() -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


def _session(model, provider: str):
    """An ONNX Runtime session of ``model``: a path, or serialized bytes (a float twin)."""
    import onnxruntime as ort

    from ..runtime.session import session_options

    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), session_options(),
                                providers=[provider])


def _compare(what: str, got: np.ndarray, ref: np.ndarray, v: Validation, tol_rel: float):
    if got.shape != ref.shape:
        raise ExportValidationError(f"validation failed: {what}: ONNX Runtime gave shape {got.shape}, PyTorch {ref.shape}")
    same_inf = np.isinf(ref) & (got == ref)  # tokens a contracted vocabulary removed: -inf on both sides
    ref, got = ref[~same_inf], got[~same_inf]
    scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
    diff = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()) if ref.size else 0.0
    if not np.isfinite(diff):
        diff = float("inf")
    v.scale = max(v.scale, scale)
    if diff >= v.max_abs_diff:
        v.max_abs_diff, v.worst = diff, what
    v.tolerance = tol_rel * v.scale
    if not diff <= tol_rel * scale:
        raise ExportValidationError(
            f"validation failed: ONNX Runtime and PyTorch disagree on {what}: largest |difference| {diff:.4g} > "
            f"tolerance {tol_rel * scale:.4g} ({tol_rel:g} x max(1, max|logit|) = {scale:.4g})")


def _float_twin(path: Path) -> bytes | None:
    """The model with every MatMulNBits at accuracy_level 0, serialized (None when its weights are external)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer):
        return None
    changed = False
    for node in m.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level" and a.i != 0:
                    a.i, changed = 0, True
    return m.SerializeToString() if changed else None


@contextlib.contextmanager
def exact_quantized(model):
    """Run pyshrink QuantLinear layers in their exact mode (float activations): the reference that both
    MatMulNBits modes are compared with (their fast mode approximates like accuracy_level 4 does)."""
    layers = [m for m in model.modules() if hasattr(m, "fast") and hasattr(m, "scales")]
    saved = [m.fast for m in layers]
    try:
        for m in layers:
            m.fast = False
        yield model
    finally:
        for m, f in zip(layers, saved):
            m.fast = f


def decoder_ids(meta: dict, n: int, seed: int = 0) -> np.ndarray:
    """The validation prompt: ``n`` random token ids (from the kept ones, for a contracted vocabulary)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, meta["vocab_size"], size=n, dtype=np.int64)
    if meta.get("vocab_keep") is not None:
        keep = np.asarray(meta["vocab_keep"], dtype=np.int64)
        ids = keep[rng.integers(0, len(keep), size=ids.shape)]
    return ids


def encoder_inputs(model, seed: int = 0) -> dict:
    """The validation batch for encoders: two rows of 9 random tokens, the second padded after 6."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@torch.no_grad()
def validate_decoder(path: Path, model, meta: dict, *, tol_rel: float, prompt_tokens: int = 8, steps: int = 3,
                     seed: int = 0, torch_logits=None, twin: bool = True) -> Validation:
    """Prefill ``prompt_tokens`` random tokens, then ``steps`` cached single-token steps; compare every logit."""
    from ..runtime.session import DecoderSession

    v = Validation(prompt_tokens=prompt_tokens, kv_steps=steps)
    ids = decoder_ids(meta, prompt_tokens + steps, seed)
    refs = [torch_logits(ids[: prompt_tokens + k]) for k in range(steps + 1)]

    def run(sess, label, tol):
        state = sess.new_state(prompt_tokens + steps)
        _compare(f"prefill logits ({label})", sess.step(state, ids[:prompt_tokens]), refs[0], v, tol)
        for k in range(steps):
            got = sess.step(state, ids[prompt_tokens + k: prompt_tokens + k + 1])
            _compare(f"KV-cache step {k + 1} logits ({label})", got, refs[k + 1], v, tol)

    twin = _float_twin(path) if twin and tol_rel > FLOAT_RTOL else None
    if twin is not None:
        run(DecoderSession(path.parent, meta=meta, model_bytes=twin), "accuracy_level 0 twin", FLOAT_RTOL)
        v.exact_twin_max_abs_diff = v.max_abs_diff
        v.max_abs_diff, v.scale, v.worst = 0.0, 0.0, ""
    for provider in providers():
        run(DecoderSession(path.parent, providers=[provider], meta=meta), provider, tol_rel)
        v.providers.append(provider)
    return v


@torch.no_grad()
def validate_encoder(path: Path, model, *, tol_rel: float, seed: int = 0) -> Validation:
    from .encoder import reference_outputs

    v = Validation(prompt_tokens=9)
    feeds = encoder_inputs(model, seed)
    ref = reference_outputs(model, feeds["input_ids"], feeds["attention_mask"], feeds["token_type_ids"])

    def run(sess, label, tol):
        names = [o.name for o in sess.get_outputs()]
        got = dict(zip(names, sess.run(None, {k: t.numpy() for k, t in feeds.items()})))
        for k, r in ref.items():
            _compare(f"{k} ({label})", got[k], r, v, tol)

    # as for decoders: the 4-bit graph with float activations must match the model exactly, so that the looser
    # bound of accuracy_level 4 covers only what int8 activations cost
    twin = _float_twin(path) if tol_rel > FLOAT_RTOL else None
    if twin is not None:
        run(_session(twin, "CPUExecutionProvider"), "accuracy_level 0 twin", FLOAT_RTOL)
        v.exact_twin_max_abs_diff = v.max_abs_diff
        v.max_abs_diff, v.scale, v.worst = 0.0, 0.0, ""
    for provider in providers():
        run(_session(path, provider), provider, tol_rel)
        v.providers.append(provider)
    return v
