"""Export to ONNX: decoders with a KV cache on ONNX Runtime's fused operators, encoders as their forward.

Recipe::

    import pyshrink
    pyshrink.export_onnx("out/smollm2-contracted", "out/smollm2-onnx", int4=True)   # validated, atomic
    # then, with onnxruntime + tokenizers only:
    #   pyshrink generate out/smollm2-onnx "The capital of France is"
    #   pyshrink serve out/smollm2-onnx --port 8000

The graph is written node by node from the live modules (:mod:`.decoder`, :mod:`.encoder`), so contracted
models (per-layer widths and head counts, a reduced vocabulary) and quantized models (QuantLinear bytes
copied into ``MatMulNBits`` initializers) export like any other. Before the output folder appears,
ONNX Runtime loads the written file and its logits are compared with the PyTorch model's, on a prompt and
on several KV-cache steps (:mod:`.validate`); on failure nothing is left at ``out_dir``.

The folder: ``model.onnx`` (+ ``model.onnx.data`` when external), tokenizer files, ``pyshrink_onnx.json``
(everything :mod:`pyshrink.runtime` needs, so serving needs neither torch nor transformers) and, for
decoders, ``genai_config.json`` for ONNX Runtime GenAI.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .. import jsonio
from ..errors import InvalidSetting, check_range, is_int
from ..models import atomic_output_dir, max_positions, read_metadata, transforms_of
from .graph import DEFAULT_OPSET
from .validate import FLOAT_RTOL, INT4_RTOL, ExportValidationError, OnnxRuntimeFailure
from .weights import WeightPolicy, apply_substitutions

MODEL_FILE = "model.onnx"
META_FILE = "pyshrink_onnx.json"
EXTERNAL_THRESHOLD = 1_500_000_000  # bytes of initializers above which weights go to model.onnx.data
GROUP_SIZES = (32, 64, 128)


def export_onnx(model_or_path, out_dir, *, int4: bool = False, accuracy_level: int | str = "auto",
                opset: int = DEFAULT_OPSET,
                group_size: int = 32, symmetric: bool = True, tokenizer=None, max_length: int | None = None,
                logits: str = "last", external_data: bool | None = None, validate: bool = True,
                tolerance: float | None = None, overwrite: bool = False) -> Path:
    """Export a model (object or any :func:`pyshrink.load_model` source) to an ONNX folder at ``out_dir``.

    ``int4``: quantize the remaining float projections (and a float LM head) to 4 bits with round-to-nearest
    (``group_size``, ``symmetric``); projections that are already pyshrink QuantLinear layers are always
    exported by byte copy. ``accuracy_level``: MatMulNBits' compute mode for every projection (4 = int8
    activations, fastest on CPU; 0 = float), or ``"auto"`` (the default): 4 where validation allows it, 0 only
    on the projections whose int8 activations measurably move the logits (:mod:`.accuracy`; the choice is
    recorded in ``pyshrink_onnx.json`` under ``weights.accuracy_levels``); without validation, "auto" is 4.
    ``logits``: ``"last"`` computes the LM head for the last position only (generation), ``"all"`` for every
    position. ``external_data``: None = only above 1.5 GB of weights, True = always. ``tolerance``: the
    validation bound relative to max(1, max|logit|) (default 1e-3, or 0.15 when any 4-bit projection runs at
    accuracy_level 4). Returns the output folder.
    """
    if accuracy_level == "auto" and not validate:
        accuracy_level = 4  # auto chooses by validating; unvalidated, the level it keeps wherever it can
    if accuracy_level != "auto":
        check_range("accuracy_level", accuracy_level, 0, 4, integer=True)
    check_range("opset", opset, 17, 23, integer=True)
    if group_size not in GROUP_SIZES:
        raise InvalidSetting(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    if logits not in ("last", "all"):
        raise InvalidSetting(f"logits must be 'last' or 'all', got {logits!r}")
    if max_length is not None:
        check_range("max_length", max_length, 16, 1 << 20, integer=True)

    from ..models import check_output, id_limit

    if isinstance(model_or_path, (tuple, list)) and len(model_or_path) == 2 and isinstance(model_or_path[0],
                                                                                          torch.nn.Module):
        if tokenizer is not None:
            raise InvalidSetting("export_onnx got a (model, tokenizer) pair and also tokenizer=: pass one of them")
        model_or_path, tokenizer = model_or_path  # as contract and heal take it
    check_output(out_dir, overwrite=overwrite,  # before the model loads and the graph is built
                 sources=() if isinstance(model_or_path, torch.nn.Module) else (model_or_path,))
    source_meta: dict = {}
    if isinstance(model_or_path, torch.nn.Module):
        model = model_or_path
        source = {"object": type(model).__name__}
        # The graph is built from CPU copies of the weights and validated by ONNX Runtime on the CPU against
        # the model's own outputs: a model elsewhere (CUDA, meta) would fail only after the whole build.
        where = sorted({t.device.type for t in (*model.parameters(), *model.buffers())} - {"cpu"})
        if where:
            raise InvalidSetting(f"export_onnx needs the model on the CPU, but it has tensors on {', '.join(where)}: "
                                 "pass model.cpu(), or the folder it was saved to")
    else:
        from ..models import load_model, resolve

        model, tok = load_model(model_or_path)
        tokenizer = tokenizer if tokenizer is not None else tok
        kind, path = resolve(model_or_path)
        source = {"source": str(model_or_path)}
        if path is not None and kind == "folder":
            source_meta = read_metadata(path)
    # The tokenizer's own vocabulary, without tokens added to it later (a pad token added without resizing the
    # embedding is common, and harmless while nobody feeds it): larger than the model's, it is another model's.
    n_ids = id_limit(model)
    base = getattr(tokenizer, "vocab_size", None) if tokenizer is not None else None
    if tokenizer is not None and not is_int(base) and hasattr(tokenizer, "__len__"):
        base = len(tokenizer)
    if n_ids is not None and is_int(base) and base > n_ids:
        raise InvalidSetting(f"the tokenizer has {base} ids but the model takes {n_ids}: it is not this "
                             "model's tokenizer (generation would index past the embedding)")
    was_training = model.training
    model.eval()
    try:
        return _export(model, model_or_path, out_dir, tokenizer, source, source_meta, int4=int4,
                       accuracy_level=accuracy_level, opset=opset, group_size=group_size, symmetric=symmetric,
                       max_length=max_length, logits=logits, external_data=external_data, validate=validate,
                       tolerance=tolerance, overwrite=overwrite)
    finally:
        model.train(was_training)  # a caller's model is handed back in the mode it came in


def _export(model, model_or_path, out_dir, tokenizer, source, source_meta, *, int4, accuracy_level, opset,
            group_size, symmetric, max_length, logits, external_data, validate, tolerance, overwrite) -> Path:
    from ..arch import adapter_for

    adapter = adapter_for(model)
    if adapter.kind == "encoder" and not isinstance(model_or_path, torch.nn.Module):
        model = model.base_model  # a checkpoint saved with a task head (BertForMaskedLM): its encoder is what we build
    policy = WeightPolicy(int4=int4, group_size=group_size, symmetric=symmetric)
    t0 = time.perf_counter()
    with torch.no_grad():
        if adapter.kind == "decoder":
            graph, meta = _decoder(model, policy, opset=opset, accuracy_level=_first_level(accuracy_level), logits=logits,
                                   max_length=max_length)
        else:
            from .encoder import build_encoder

            graph, info = build_encoder(model, policy, opset=opset, accuracy_level=_first_level(accuracy_level))
            meta = {"kind": "encoder", "family": adapter.name, "inputs": ["input_ids", "attention_mask", "token_type_ids"],
                    "outputs": info["outputs"], "hidden_size": int(model.config.hidden_size),
                    "vocab_size": int(model.config.vocab_size),
                    "max_length": max_positions(model.config)}  # longer inputs fail in the position embedding
    quantized = policy.counts["copied"] + policy.counts["rtn"] > 0
    proto = graph.model()
    external = external_data if external_data is not None else graph.initializer_bytes > EXTERNAL_THRESHOLD
    meta.update({
        "format": "pyshrink-onnx", "format_version": 1, "model_file": MODEL_FILE,
        "external_data": f"{MODEL_FILE}.data" if external else None, "opset": opset, "ir_version": proto.ir_version,
        # group_size: the exporter's own rounding (--int4); block_sizes: every MatMulNBits block size in the graph,
        # which also holds the group sizes of projections pyshrink quantized before (their bytes are copied)
        "weights": {"int4": int4, "group_size": group_size if int4 else None, "block_sizes": _block_sizes(proto),
                    "symmetric": symmetric,
                    # None: no 4-bit projection for a level to apply to
                    "accuracy_level": accuracy_level if quantized else None, "projections": dict(policy.counts)},
        "source": source, "transforms": [r.get("kind") for r in (source_meta.get("transforms") or transforms_of(model))],
        "pyshrink_version": __import__("pyshrink").__version__,
    })
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        _save(proto, tmp / MODEL_FILE, external)
        del proto
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if validate:
            check = lambda: _validate(tmp / MODEL_FILE, model, meta, policy, tolerance, quantized)  # noqa: E731
            if accuracy_level == "auto" and quantized:
                meta["validation"] = _auto_levels(tmp, model, meta, tolerance, check)
            else:
                meta["validation"] = _fixed_level(accuracy_level, check)
        meta["export_seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / META_FILE).write_text(jsonio.dumps(meta, indent=2))
        if meta["kind"] == "decoder":
            (tmp / "genai_config.json").write_text(json.dumps(genai_config(meta), indent=2))
    return Path(out_dir)


def _fixed_level(accuracy_level, check) -> dict:
    """Validate the graph as built (every projection at ``accuracy_level``); a failure is an error."""
    try:
        return check()
    except ExportValidationError as exc:
        if accuracy_level in (0, "auto") or isinstance(exc, OnnxRuntimeFailure):
            raise
        raise ExportValidationError(f"{exc}; int8 activations (accuracy_level {accuracy_level}) may be too coarse for "
                                    "this model: try accuracy_level='auto' (per projection) or 0") from None


def _auto_levels(tmp: Path, model, meta: dict, tolerance, check) -> dict:
    """accuracy_level="auto": level 4 where it is harmless, 0 where it is not, chosen by measurement
    (:mod:`.accuracy`). The choice and the measured effects are recorded in ``meta["weights"]``."""
    import onnx

    from . import accuracy

    path = tmp / MODEL_FILE
    proto = onnx.load(str(path), load_external_data=False)
    names = accuracy.projection_names(proto)
    weights = meta["weights"]
    weights["accuracy_levels"] = dict.fromkeys(names, 4)
    failures = []
    try:
        return check()
    except OnnxRuntimeFailure:
        raise
    except ExportValidationError as exc:
        failures.append(f"accuracy_level 4 on every projection: {exc}")
    tol = tolerance if tolerance is not None else INT4_RTOL
    drift = accuracy.measure(proto, _probe(tmp, model, meta))
    weights["level4_effect"] = {n: round(d, 6) for n, d in drift.items()}
    for label, levels in accuracy.plans(drift, tol):
        accuracy.set_levels(proto, levels)
        onnx.save_model(proto, str(path))  # references to model.onnx.data, if any, stay as they are
        weights["accuracy_levels"] = levels
        try:
            return {**check(), "rejected": failures}
        except ExportValidationError as exc:
            failures.append(f"accuracy_level {label}: {exc}")
    raise ExportValidationError("; ".join(failures))


def _probe(tmp: Path, model, meta: dict):
    """Runs a variant of the written model on fixed inputs (a different prompt from validation's, so that
    validation stays an independent check of the choice). Models with external weights run from a file
    next to ``model.onnx.data``; others from memory."""
    import onnx

    from . import accuracy

    probe = (accuracy.decoder_probe(tmp, meta, seed=1) if meta["kind"] == "decoder" else
             accuracy.encoder_probe(model, seed=1))
    if not meta["external_data"]:
        return probe

    def from_file(model_bytes: bytes):
        f = tmp / "probe.onnx"
        try:
            onnx.save_model(onnx.load_from_string(model_bytes), str(f))
            return probe(f)
        finally:
            f.unlink(missing_ok=True)

    return from_file


def _validate(path: Path, model, meta, policy, tolerance, quantized: bool) -> dict:
    """Validate the model at ``path``; the default bound depends on whether any 4-bit projection uses int8
    activations (accuracy_level 4)."""
    import onnx

    from .accuracy import levels_of
    from .validate import exact_quantized, validate_decoder, validate_encoder

    any4 = quantized and any(v == 4 for v in levels_of(onnx.load(str(path), load_external_data=False)).values())
    tol = tolerance if tolerance is not None else (INT4_RTOL if any4 else FLOAT_RTOL)
    with apply_substitutions(model, policy.substitutions), exact_quantized(model):
        try:
            if meta["kind"] == "decoder":
                v = validate_decoder(path, model, meta, tol_rel=tol, torch_logits=_torch_logits(model))
            else:
                v = validate_encoder(path, model, tol_rel=tol)
        except Exception as exc:  # ONNX Runtime's own errors (plain Exception subclasses) are a failed validation
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            raise OnnxRuntimeFailure(f"validation failed: ONNX Runtime could not run the exported graph: {exc}") \
                from exc
    return {**v.to_dict(), "relative_tolerance": tol}


def _block_sizes(proto) -> list:
    import onnx

    return sorted({onnx.helper.get_attribute_value(a) for n in proto.graph.node if n.op_type == "MatMulNBits"
                   for a in n.attribute if a.name == "block_size"})


def _save(proto, path: Path, external: bool):
    import onnx

    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


def _first_level(accuracy_level) -> int:
    return 4 if accuracy_level == "auto" else int(accuracy_level)


def _torch_logits(model):
    """PyTorch logits of the last position (a contracted vocabulary's model already returns the full one)."""

    def fn(seq):
        return model(torch.from_numpy(seq)[None]).logits[0, -1].float().numpy()

    return fn


def _decoder(model, policy, *, opset, accuracy_level, logits, max_length):
    from .decoder import build_decoder
    from .spec import decoder_spec

    spec = decoder_spec(model, policy, max_length=max_length)
    graph = build_decoder(spec, opset=opset, accuracy_level=accuracy_level, logits=logits)
    gen = getattr(model, "generation_config", None)
    cfg = model.config
    eos = _ids(getattr(gen, "eos_token_id", None)) or _ids(getattr(cfg, "eos_token_id", None))
    layers = [{"num_heads": l.num_heads, "num_kv_heads": l.num_kv_heads, "head_dim": spec.head_dim,
               "mlp_width": l.mlp_out.K} for l in spec.layers]
    meta = {
        "kind": "decoder", "family": spec.family, "model_type": cfg.model_type,
        "inputs": ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{k}" for i in range(len(layers)) for k in ("key", "value")],
        "outputs": ["logits"] + [f"present.{i}.{k}" for i in range(len(layers)) for k in ("key", "value")],
        # batches: shorter rows padded on the RIGHT (mask 0 after their tokens), GroupQueryAttention's convention;
        # a left-padded row attends to its pads
        "logits": logits, "padding": "right", "past_present_share_buffer": True, "num_layers": len(layers), "layers": layers,
        "hidden_size": spec.hidden, "head_dim": spec.head_dim,
        "vocab_size": spec.extra.get("full_vocab_size", spec.vocab_size), "max_length": spec.max_positions,
        "vocab_keep": spec.extra.get("vocab_keep"),
        "embedding": ("float" if spec.extra.get("embedding_q4") is None else
                      "4-bit, the head's bytes" if spec.extra["embedding_q4"] is spec.head else "4-bit"),
        "bos_token_id": _first(getattr(gen, "bos_token_id", None), getattr(cfg, "bos_token_id", None)),
        "eos_token_ids": eos,
        "pad_token_id": _first(getattr(gen, "pad_token_id", None), getattr(cfg, "pad_token_id", None), *(eos or [None])),
        "generation": {
            "do_sample": bool(getattr(gen, "do_sample", False)),
            "temperature": float(getattr(gen, "temperature", None) or 1.0),
            "top_p": float(getattr(gen, "top_p", None) or 1.0),
            "top_k": int(getattr(gen, "top_k", None) or 0),
        },
    }
    return graph, meta


def _ids(x):
    if x is None:
        return []
    return [int(i) for i in (x if isinstance(x, (list, tuple)) else [x])]


def _first(*xs):
    for x in xs:
        if x is not None:
            return int(x[0] if isinstance(x, (list, tuple)) else x)
    return None


GENAI_TYPES = ("llama", "mistral", "qwen2", "phi")  # GenAI model types; others run as its generic "decoder"


def genai_config(meta: dict) -> dict:
    """ONNX Runtime GenAI's ``genai_config.json`` (its model builder's layout). Head counts are the first
    layer's; GenAI detects per-layer KV shapes of contracted models from the graph itself."""
    kv_heads, head_dim = meta["layers"][0]["num_kv_heads"], meta["layers"][0]["head_dim"]
    gen = meta["generation"]
    eos = meta["eos_token_ids"]
    return {
        "model": {
            "bos_token_id": meta["bos_token_id"],
            "context_length": meta["max_length"],
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": meta["model_file"],
                "head_size": head_dim,
                "hidden_size": meta["hidden_size"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": meta["layers"][0]["num_heads"],
                "num_hidden_layers": meta["num_layers"],
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": meta["pad_token_id"],
            "type": meta["model_type"] if meta["model_type"] in GENAI_TYPES else "decoder",
            "vocab_size": meta["vocab_size"],
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": gen["do_sample"], "early_stopping": True, "length_penalty": 1.0,
            "max_length": meta["max_length"], "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": gen["temperature"], "top_k": gen["top_k"] or 50, "top_p": gen["top_p"],
        },
    }


__all__ = ["export_onnx", "ExportValidationError", "genai_config"]
