"""MatMulNBits accuracy levels per projection (``accuracy_level="auto"``).

``accuracy_level=4`` makes ONNX Runtime quantize each projection's input to int8 per block of ``block_size``
along K (symmetric, one scale per block) before the 4-bit matmul: the fastest CPU path, and usually harmless.
It breaks where one input channel dwarfs the others of its block (their codes round to 0), or where the model
amplifies small errors. ``auto`` keeps level 4 wherever it is harmless and uses level 0 (float activations)
only on the projections that need it:

1. every projection at level 4; if validation passes, done (nothing else is measured);
2. otherwise each projection's own effect is measured: the logits with only that projection at level 4 (all
   others at 0), against all at 0, relative to max(1, max |logit|), on the validation prompt and KV steps;
3. projections are taken at level 4 from the least harmful up while the combined effect (root of the sum of
   squares: the per-projection errors are independent roundings) stays within a budget of half the validation
   tolerance; that plan is validated, and the budget halved until one passes; all at 0 is the last plan.

The measured effects and the chosen level of every projection go into ``pyshrink_onnx.json``.
"""
from __future__ import annotations

import math

import numpy as np

SUFFIX = "/MatMulNBits"
BUDGETS = (0.5, 0.25, 0.125)  # fractions of the validation tolerance tried in turn


def projection_names(model_proto) -> list[str]:
    """Names of the graph's MatMulNBits projections (``layers.3.mlp.out``, ``lm_head``...), in graph order."""
    return [n.name[: -len(SUFFIX)] if n.name.endswith(SUFFIX) else n.name
            for n in model_proto.graph.node if n.op_type == "MatMulNBits"]


def set_levels(model_proto, levels: dict) -> None:
    """Set every MatMulNBits node's accuracy_level from ``levels`` (projection name -> level), in place."""
    names = projection_names(model_proto)
    missing = set(names) - set(levels)
    if missing:
        raise KeyError(f"no accuracy level for projection(s) {sorted(missing)}")
    nodes = (n for n in model_proto.graph.node if n.op_type == "MatMulNBits")
    for node, name in zip(nodes, names):
        for a in node.attribute:
            if a.name == "accuracy_level":
                a.i = int(levels[name])


def levels_of(model_proto) -> dict:
    nodes = (n for n in model_proto.graph.node if n.op_type == "MatMulNBits")
    return {name: next(a.i for a in node.attribute if a.name == "accuracy_level")
            for node, name in zip(nodes, projection_names(model_proto))}


def measure(model_proto, probe) -> dict:
    """Each projection's effect at level 4 alone: max |logits - logits at level 0| / max(1, max |logits at 0|).

    ``probe(model_bytes) -> np.ndarray`` runs the model on fixed inputs. Costs one session per projection.
    """
    names = projection_names(model_proto)
    set_levels(model_proto, dict.fromkeys(names, 0))
    ref = probe(model_proto.SerializeToString()).astype(np.float64)
    finite = np.isfinite(ref)
    scale = max(1.0, float(np.abs(ref[finite]).max())) if finite.any() else 1.0
    drift = {}
    for name in names:
        set_levels(model_proto, {n: 4 if n == name else 0 for n in names})
        got = probe(model_proto.SerializeToString()).astype(np.float64)
        d = np.abs(got[finite] - ref[finite])
        drift[name] = float(d.max()) / scale if d.size and np.isfinite(d).all() else math.inf
    return drift


def choose(drift: dict, budget: float) -> dict:
    """Level 4 for the least harmful projections while sqrt(sum of their squared effects) <= budget, else 0."""
    levels, total = dict.fromkeys(drift, 0), 0.0
    for name in sorted(drift, key=drift.get):
        if not math.isfinite(drift[name]) or total + drift[name] ** 2 > budget ** 2:
            break
        total += drift[name] ** 2
        levels[name] = 4
    return levels


def plans(drift: dict, tolerance: float):
    """(label, levels) to validate in turn after "all at 4" failed: shrinking budgets, then all at 0."""
    seen = []
    for frac in BUDGETS:
        levels = choose(drift, frac * tolerance)
        n4 = sum(v == 4 for v in levels.values())
        if n4 and levels not in seen:
            seen.append(levels)
            yield f"per projection: {n4} of {len(levels)} at 4 (budget {frac:g} x tolerance)", levels
    yield "0", dict.fromkeys(drift, 0)


def decoder_probe(folder, meta: dict, *, prompt_tokens: int = 8, steps: int = 3, seed: int = 0):
    """Logits of a prefill and ``steps`` cached steps on the validation's prompt (CPU execution provider)."""
    from ..runtime.session import DecoderSession
    from .validate import decoder_ids

    ids = decoder_ids(meta, prompt_tokens + steps, seed)

    def probe(model) -> np.ndarray:  # serialized bytes, or the Path of a file next to its external data
        if isinstance(model, bytes):
            sess = DecoderSession(folder, meta=meta, model_bytes=model)
        else:
            sess = DecoderSession(model.parent, meta={**meta, "model_file": model.name})
        state = sess.new_state(prompt_tokens + steps)
        out = [sess.step(state, ids[:prompt_tokens])]
        out += [sess.step(state, ids[prompt_tokens + k: prompt_tokens + k + 1]) for k in range(steps)]
        return np.stack(out)

    return probe


def encoder_probe(model, *, seed: int = 0):
    """All outputs of the validation's encoder batch (CPU execution provider), flattened."""
    import onnxruntime as ort

    from ..runtime.session import session_options
    from .validate import encoder_inputs

    feeds = {k: v.numpy() for k, v in encoder_inputs(model, seed).items()}

    def probe(model) -> np.ndarray:  # serialized bytes, or the Path of a file next to its external data
        sess = ort.InferenceSession(model if isinstance(model, bytes) else str(model), session_options(),
                                    providers=["CPUExecutionProvider"])
        return np.concatenate([o.reshape(-1) for o in sess.run(None, feeds)])

    return probe
