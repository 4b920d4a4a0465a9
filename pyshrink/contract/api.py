"""``pyshrink.contract``: the contraction stage's Python API.

Flow: validate every setting and read every text (before anything heavy), load the model, get calibration
windows (the user's text, or text the model writes itself), measure the source, observe every block once
(:mod:`.calibration`), plan each block's contraction (:mod:`.neurons`, :mod:`.heads`), contract the cheapest
``num_layers_to_contract`` blocks (:mod:`.layer_selection`) or the ``layers`` given, optionally heal the result
by distillation from the source (:func:`pyshrink.heal.heal_in_place`) and drop unused vocabulary (:mod:`.vocab`),
measure the result. Nothing is written unless ``out`` is given (or ``.save`` is called), and
then only atomically.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import data, models
from ..arch import adapter_for
from ..errors import DataError, InvalidSetting, check_range, is_int
from . import calibration as stats_pass
from . import datafree, heads, layer_selection, neurons, scores, vocab
from .quality import Quality

RATIO_RANGE = (0.1, 0.9)
DEFAULT_LAYERS = 8  # blocks contracted when num_layers_to_contract is not given (fewer if the model has fewer)


def default_num_layers(depth: int) -> int:
    """The blocks contracted when ``num_layers_to_contract`` is not given, for a model of ``depth`` blocks."""
    return min(DEFAULT_LAYERS, depth)


@dataclass
class ContractionSettings:
    contraction_ratio: float = 0.5
    num_layers_to_contract: int | None = None  # None: DEFAULT_LAYERS, or the model's depth if it has fewer
    threshold: float | None = None
    prune_heads: bool = False
    head_ratio: float | None = None  # fraction of heads removed in contracted layers (default: contraction_ratio)
    prune_vocab: bool = False
    criterion: str = "fluctuation"
    refit: str = "lstsq"
    seq_len: int | None = None  # window length: None = 512, or the model's positions if fewer
    calibration_tokens: int = 32768
    eval_tokens: int = 16384
    datafree_tokens: int = 8192
    batch_size: int = 4
    seed: int = 0
    layers: list | None = None  # explicit block indices (None: the measured choice)
    heal_tokens: int | None = None  # distillation budget after contraction (None or 0: no healing)

    def validate(self) -> "ContractionSettings":
        """Check everything that does not need the model; raises :class:`InvalidSetting` naming the range."""
        _number("contraction_ratio", self.contraction_ratio)
        check_range("contraction_ratio", self.contraction_ratio, *RATIO_RANGE)
        if self.num_layers_to_contract is not None:
            _integer("num_layers_to_contract", self.num_layers_to_contract)
            if self.num_layers_to_contract < 1:
                raise InvalidSetting(f"num_layers_to_contract must be in 1..depth of the model, got "
                                     f"{self.num_layers_to_contract!r}")
        if self.head_ratio is not None:
            _number("head_ratio", self.head_ratio)
            check_range("head_ratio", self.head_ratio, *RATIO_RANGE)
        if self.threshold is not None:
            _number("threshold", self.threshold)
            if not (0 < self.threshold < math.inf):
                raise InvalidSetting(f"threshold must be a positive number (mean |activation| below which a "
                                     f"neuron is removed, e.g. 1e-3), got {self.threshold!r}")
        if self.criterion not in scores.CRITERIA:
            raise InvalidSetting(f"criterion must be one of {', '.join(scores.CRITERIA)}, got {self.criterion!r}")
        if self.refit not in ("lstsq", "mean", "none"):
            raise InvalidSetting(f"refit must be one of lstsq, mean, none, got {self.refit!r}")
        for name in ("seq_len", "calibration_tokens", "eval_tokens", "datafree_tokens", "batch_size"):
            if name == "seq_len" and self.seq_len is None:  # fitted to the model once it is loaded
                continue
            _integer(name, getattr(self, name))
            if getattr(self, name) < 1:
                raise InvalidSetting(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.layers is not None:
            self.layers = _layer_list(self.layers)
        if self.heal_tokens is not None:
            _integer("heal_tokens", self.heal_tokens)
            if self.heal_tokens < 0:
                raise InvalidSetting(f"heal_tokens must be a non-negative integer (0: no healing), got {self.heal_tokens!r}")
        return self


def _layer_list(layers) -> list[int]:
    """``layers`` as a list of unique non-negative ints (the upper bound, the depth, is checked with the model)."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise InvalidSetting(f"layers must be a list of block indices, e.g. [3, 4, 5], got {layers!r}")
    layers = list(layers)
    if not layers:
        raise InvalidSetting("layers must name at least one block index (or be None to choose the blocks by measurement)")
    for i in layers:
        if not is_int(i) or i < 0:
            raise InvalidSetting(f"layers must hold block indices (integers >= 0), got {i!r} in {layers!r}")
    if len(set(layers)) != len(layers):
        raise InvalidSetting(f"layers must not repeat a block index, got {layers!r}")
    return layers


# pyshrink.heal arguments that contract(heal_tokens=...) decides itself, so heal_options may not set them
_HEAL_FIXED = ("student", "teacher", "text", "tokens", "tokenizer", "eval_text", "out", "resume", "overwrite",
               "progress", "plot", "callback", "teacher_cache", "data_offset", "teacher_ppl", "segment",
               "optimizer_state", "fade")


def _heal_options(options) -> dict:
    import inspect

    from ..heal import heal

    if options is None:
        return {}
    if not isinstance(options, dict):
        raise InvalidSetting(f"heal_options must be a dict of pyshrink.heal arguments, got {type(options).__name__}")
    allowed = [k for k in inspect.signature(heal).parameters if k not in _HEAL_FIXED]
    bad = sorted(k for k in options if k not in allowed)
    if bad:
        raise InvalidSetting(f"heal_options: unknown or fixed argument(s) {', '.join(bad)}; allowed: {', '.join(allowed)}")
    return dict(options)


def _number(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidSetting(f"{name} must be a number, got {v!r}")


def _integer(name, v):
    if not is_int(v):
        raise InvalidSetting(f"{name} must be an integer, got {v!r}")


@dataclass
class ContractionResult:
    """The contracted model, its tokenizer (unchanged: ids keep their meaning) and the summary."""
    model: torch.nn.Module
    tokenizer: object
    summary: dict = field(default_factory=dict)
    # block index -> indices (in the width before contraction) of the MLP neurons kept; not saved. Lets a
    # schedule that trains across contractions slice the optimizer state of the narrowed projections alike.
    kept_neurons: dict = field(default_factory=dict)
    float_dtype: torch.dtype | None = None  # what save() stores float weights in (a 16-bit source's; None: float32)

    def __repr__(self) -> str:  # the numbers that matter, not the whole module tree
        keys = ("params_before", "params_after", "ppl_source", "ppl_final")
        return (f"ContractionResult({type(self.model).__name__}, "
                f"{', '.join(f'{k}={self.summary[k]!r}' for k in keys if k in self.summary)})")

    def save(self, out, *, overwrite: bool = False) -> Path:
        """Write safetensors + config + tokenizer + pyshrink.json atomically; ``load_model(out)`` reads it."""
        meta = {"stage": "contract", "contraction": self.summary,
                "source": {"name": self.summary.get("source"), "fingerprint": self.summary.get("source_fingerprint")}}
        return models.save(self.model, self.tokenizer, out, metadata=meta, overwrite=overwrite,
                           float_dtype=self.float_dtype)


def _windows(ids: torch.Tensor, seq_len: int, max_tokens: int, what: str, vocab: int | None) -> torch.Tensor:
    if ids.numel() < 16:
        raise DataError(f"the {what} has {ids.numel()} tokens; at least 16 are needed")
    seq_len = min(seq_len, ids.numel())
    return data.windows(ids, seq_len, max_tokens, what=what, vocab=vocab)  # at most max_tokens: less is an error


def _is_pair(source) -> bool:
    return isinstance(source, (tuple, list)) and len(source) == 2 and isinstance(source[0], torch.nn.Module)


def _load(source):
    """(model, tokenizer, description, fingerprint); an in-memory pair is copied, never changed."""
    if isinstance(source, torch.nn.Module) or (_is_pair(source) and source[1] is None):
        raise InvalidSetting("contract needs the model's tokenizer with an in-memory model (its calibration and "
                             "evaluation text are tokenized): pass (model, tokenizer), or a model folder")
    if _is_pair(source):
        return copy.deepcopy(source[0]).eval(), source[1], type(source[0]).__name__, None
    model, tok = models.load_model(source)
    kind, path = models.resolve(source)
    fp = None
    if kind == "embedded":
        fp = models.fingerprint(models.embedded_gguf(str(source)))
    elif path is not None:
        fp = models.fingerprint(path)
    return model, tok, str(source), fp


def contract(source, contraction_ratio: float = 0.5, num_layers_to_contract: int | None = None, calibration=None,
             eval_text=None, *, prune_heads: bool = False, prune_vocab: bool = False, threshold: float | None = None,
             head_ratio: float | None = None, criterion: str = "fluctuation", refit: str = "lstsq",
             seq_len: int | None = None, calibration_tokens: int = 32768, eval_tokens: int = 16384,
             datafree_tokens: int = 8192,
             seed: int = 0, out=None, overwrite: bool = False, progress: bool = True, layers=None,
             heal_tokens: int | None = None, heal_options: dict | None = None) -> ContractionResult:
    """Contract a model: physically remove the least useful MLP neurons (and optionally attention heads and
    unused vocabulary) in the ``num_layers_to_contract`` blocks where that costs least.

    Args:
        source: model folder, ``.gguf`` file, hub id, embedded name (``"smollm2-135m"``), or an in-memory
            ``(model, tokenizer)`` pair (copied, not changed).
        contraction_ratio: fraction of each contracted block's MLP neurons to remove (0.1-0.9).
        num_layers_to_contract: how many blocks to contract (1..depth); the cheapest by measurement are chosen.
            Default (None): 8, or every block of a model with fewer.
            Ignored when ``layers`` is given (the count is then ``len(layers)``; the CLI refuses both together).
        calibration: text file(s) or string(s) from your domain. None: data-free (decoders calibrate on text
            they sample themselves, seeded; encoders on built-in text): ``min(datafree_tokens,
            calibration_tokens)`` tokens of it.
        eval_text: text to measure quality on. None: the held-out last 10% of ``calibration``, or built-in
            text (CPython's pydoc topics, held-out windows) in data-free mode.
        prune_heads: also remove attention heads (``head_ratio`` of them, default ``contraction_ratio``),
            grouped-query aware.
        prune_vocab: drop embedding/head rows of ids the domain text (calibration + eval) never uses.
        threshold: contextual mode: remove the neurons whose mean |activation| on the calibration text is
            below ``threshold`` (instead of a fixed ratio), at most 90 % of a block's (the ratio's upper bound).
        criterion / refit: neuron ranking (``fluctuation``, ``obs``, ``magnitude``) and compensation
            (``lstsq``: least-squares refit of the down projection and its bias; ``mean``: FLAP's bias
            compensation only; ``none``); the defaults are the best measured.
        layers: explicit block indices to contract (unique ints in ``0..depth-1``) instead of the measured choice.
        seq_len: tokens per calibration and evaluation window (default 512, or the model's positions if fewer).
        heal_tokens: after contraction, heal the model in place by distillation from the source for this many
            tokens of the calibration text (:func:`pyshrink.heal.heal_in_place`; needs ``calibration``, decoders
            only). The heal trains on the calibration part only and keeps the best checkpoint by perplexity on its
            own held-out tail of it, so ``ppl_final`` (measured after healing, on the evaluation text) is on text
            the heal never saw. With ``prune_vocab`` the vocabulary is dropped after healing (distillation compares
            full-vocabulary distributions). The summary's ``heal`` entry has the tokens seen, the perplexity before
            and after healing and the time. None or 0: no healing.
        heal_options: further :func:`pyshrink.heal` arguments for that heal (``lr``, ``alpha``, ``temperature``,
            ``batch_size``, ``until_ppl``, ``max_seconds``, ...); ``seq_len`` and ``seed`` default to contraction's.
        out: if given, save the result there (atomically; ``overwrite`` to replace).

    Returns:
        :class:`ContractionResult` with ``model``, ``tokenizer`` and ``summary``.
    """
    t_start = time.perf_counter()
    st = ContractionSettings(contraction_ratio, num_layers_to_contract, threshold, prune_heads, head_ratio,
                             prune_vocab, criterion, refit, seq_len, calibration_tokens, eval_tokens,
                             datafree_tokens, 4, seed, layers, heal_tokens).validate()
    layers, heal_opts = st.layers, _heal_options(heal_options)
    if layers is not None:
        st.num_layers_to_contract = len(layers)  # recorded as what was done (the argument is ignored)
    if heal_opts and not heal_tokens:
        raise InvalidSetting("heal_options configure the heal, which runs only with heal_tokens=N (N > 0)")
    if heal_tokens and calibration is None:
        raise InvalidSetting("heal_tokens needs text to heal on: pass calibration text (calibration=... / "
                             "--calibration FILE); the heal distills the source into the contracted model on it")
    cal_text = data.read_texts(calibration) if calibration is not None else None
    eval_str = data.read_texts(eval_text) if eval_text is not None else None
    if prune_vocab and cal_text is None:
        raise InvalidSetting("prune_vocab needs domain text: pass calibration text (--calibration FILE); the "
                             "kept vocabulary is what that text uses")
    if out is not None:
        models.check_output(out, overwrite=overwrite, sources=() if _is_pair(source) else (source,))

    model, tok, source_name, fp = _load(source)
    from ..quantize.api import is_quantized_model  # lazily: quantize's import chain is heavier

    if is_quantized_model(model):
        raise InvalidSetting(f"{source_name} is quantized: contraction removes rows and columns of floating-point "
                             "weights; contract the floating-point model first, then quantize the result")
    adapter = adapter_for(model)
    models.check_finite(model, "contracting")
    if prune_vocab and any(isinstance(m, (vocab.CompactEmbedding, vocab.CompactHead)) for m in model.modules()):
        raise InvalidSetting(f"{source_name} has a pruned vocabulary already; contract it again without "
                             "prune_vocab / --prune-vocab (its kept ids stay as they are)")
    depth = adapter.depth(model)
    if layers is None:
        if num_layers_to_contract is None:
            num_layers_to_contract = st.num_layers_to_contract = default_num_layers(depth)
        check_range("num_layers_to_contract", num_layers_to_contract, 1, depth, integer=True)
    elif max(layers) >= depth:
        raise InvalidSetting(f"layers must be block indices in 0..{depth - 1} (the model has {depth} blocks), "
                             f"got {layers!r}")
    if heal_tokens:
        from ..heal.api import require_decoder

        require_decoder(model, "heal_tokens")
    # the heal's teacher is the source as it was: an in-memory source is already a copy, a loaded one is not
    teacher = None
    if heal_tokens:
        teacher = (source[0], source[1]) if _is_pair(source) else (copy.deepcopy(model), tok)
    torch.manual_seed(seed)

    # ---- data ------------------------------------------------------------------------------------------
    L = st.seq_len = models.window_length(model, seq_len)  # the summary records the window used
    n_ids = models.id_limit(model)  # every window's ids are checked against it
    if cal_text is not None:
        ids = data.tokenize(tok, cal_text)
        if eval_str is None:
            cal_ids, held = data.split_ids(ids, 0.1)
            eval_desc = f"held-out last 10% of the calibration text ({data.describe(calibration)})"
        else:
            cal_ids, held = ids, data.tokenize(tok, eval_str)
            eval_desc = data.describe(eval_text)
        cal_win = _windows(cal_ids, L, calibration_tokens, "calibration text", n_ids)
        cal_desc = data.describe(calibration)
        mode = "threshold" if threshold is not None else "calibrated"
    else:
        mode = "data-free"
        if eval_str is not None:
            held, eval_desc = data.tokenize(tok, eval_str), data.describe(eval_text)
        else:
            builtin = data.tokenize(tok, data.builtin_text("pydoc"))
            held = builtin[-min(eval_tokens, builtin.numel() // 2):]
            eval_desc = "built-in text: CPython pydoc topics (held-out last windows)"
        # calibration_tokens caps calibration in both modes ("use at most this many"); data-free sampling is the
        # costly step, and datafree_tokens (8,192) is its default budget
        n_free = min(datafree_tokens, calibration_tokens)
        if adapter.kind == "decoder":
            dl = min(128, L)
            cal_win = datafree.sample_ids(model, tok, tokens=n_free, seq_len=dl, seed=seed, progress=progress)
            cal_desc = f"data-free: {cal_win.numel()} tokens sampled from the source model (seed {seed}, temperature 1)"
        else:
            cal_win = datafree.encoder_ids(tok, tokens=n_free, seq_len=min(128, L), vocab=n_ids)
            cal_desc = "data-free: built-in text (CPython pydoc topics, first windows)"
        if threshold is not None:
            mode = "threshold (data-free)"
    eval_win = _windows(held, L, eval_tokens, "evaluation text", n_ids)
    batches = [cal_win[i:i + st.batch_size * max(1, 512 // cal_win.shape[1])]
               for i in range(0, len(cal_win), st.batch_size * max(1, 512 // cal_win.shape[1]))]

    # ---- source quality ---------------------------------------------------------------------------------
    t_eval = time.perf_counter()
    quality = Quality(adapter.kind, eval_win, progress=progress)
    q_source = quality.measure(model)
    eval_time = time.perf_counter() - t_eval
    params_before = models.num_params(model)

    # ---- observe and plan every block ------------------------------------------------------------------
    h_ratio = head_ratio if head_ratio is not None else contraction_ratio

    def consume(i, block, obs):
        if layers is not None and i not in layers:  # pinned blocks: nothing to plan here
            obs.mlp.gram = None
            if obs.attn is not None:
                obs.attn.gram = None
            return None
        if threshold is not None:
            remove = (obs.mlp.mean_abs < threshold).nonzero().squeeze(1)
            remove = remove[obs.mlp.mean_abs[remove].argsort()][: int(RATIO_RANGE[1] * len(obs.mlp.mean_abs))]
            npl = neurons.plan(adapter, block, obs.mlp, remove=remove, refit=refit)
        else:
            n_rm = round(contraction_ratio * adapter.mlp_width(block))
            npl = neurons.plan(adapter, block, obs.mlp, n_remove=n_rm, criterion=criterion, refit=refit)
        hpl = heads.plan(adapter, block, model.config, obs.attn, h_ratio, criterion=criterion, refit=refit) \
            if prune_heads else None
        obs.mlp.gram = None  # free the Gram matrices as soon as the block is planned
        if obs.attn is not None:
            obs.attn.gram = None
        return layer_selection.LayerCandidate(i, npl, hpl, **obs.scales)

    t_c = time.perf_counter()
    candidates = stats_pass.observe_blocks(model, adapter, batches, consume, heads=prune_heads, progress=progress)
    if layers is None:
        chosen = layer_selection.choose(candidates, num_layers_to_contract, per_removed=threshold is not None)
    else:
        chosen = [c for c in candidates if c is not None]  # block order, as choose() returns them
    del candidates  # the plans of the blocks not chosen (refit weights of every block) are freed here
    if threshold is not None and not any(c.removed_neurons for c in chosen):
        warnings.warn(f"threshold={threshold:g}: no neuron's mean |activation| on the calibration text is below it, "
                      "so nothing was removed and the result is the source's size; try a larger threshold",
                      UserWarning, stacklevel=2)
    rows, kept_neurons = [], {}
    for c in chosen:
        blk = adapter.blocks(model)[c.index]
        row = {"layer": c.index, "width_before": adapter.mlp_width(blk)}
        if prune_heads:
            row["heads_before"], row["kv_heads_before"] = adapter.head_counts(blk, model.config)
        if c.removed_neurons:
            neurons.apply(model, adapter, c.index, c.neurons.keep, c.neurons.weight, c.neurons.bias)
            kept_neurons[c.index] = c.neurons.keep.sort().values
        if c.heads is not None:
            heads.apply(model, adapter, c.index, c.heads)
        row["width_after"] = adapter.mlp_width(blk)
        if prune_heads:
            row["heads_after"], row["kv_heads_after"] = adapter.head_counts(blk, model.config)
            row["head_shape"] = c.heads.shape if c.heads is not None else None
        row["relative_error"] = c.relative_error
        rows.append(row)
    contraction_time = time.perf_counter() - t_c

    # ---- heal (before vocabulary pruning: distillation compares full-vocabulary distributions) -------------
    heal_info = None
    if heal_tokens:
        from ..heal import heal_in_place

        t_eval = time.perf_counter()
        q_before_heal = quality.measure(model)
        eval_time += time.perf_counter() - t_eval
        t_h = time.perf_counter()
        # cal_ids excludes the held-out evaluation text, so ppl_final is measured on text the heal never saw
        h = heal_in_place(model, tok, teacher=teacher, text=cal_ids, tokens=heal_tokens, progress=progress,
                          **{"seq_len": L, "seed": seed, **heal_opts})
        heal_info = {"tokens": heal_tokens, "tokens_seen": h["tokens_seen"], "stopped": h["stopped"],
                     "ppl_before": q_before_heal, "ppl_after": None, "seconds": time.perf_counter() - t_h,
                     "text": f"calibration text ({cal_desc}), without the evaluation text",
                     "held_out": {k: h[k] for k in ("ppl_initial", "ppl_best", "ppl_teacher", "until_ppl",
                                                    "best_tokens")},
                     "curve": h["curve"], "options": heal_opts}

    # ---- result ------------------------------------------------------------------------------------------
    # a 16-bit source's output is saved in 16 bits: measure what is saved
    store = models.storage_dtype(models.stored_float_dtype(source))
    models.round_floats_to(model, store)
    t_eval = time.perf_counter()
    q_final = quality.measure(model)
    eval_time += time.perf_counter() - t_eval
    vocab_info = None
    if prune_vocab:
        used = torch.cat([cal_ids, held]).unique()
        vocab_info = vocab.apply(model, vocab.kept_ids(used, tok, model.config), unk_id=vocab.unknown_token_id(tok))
        if quality.metric == "perplexity":
            # The kept ids include every id of the evaluation text (so none of it scores -inf), and dropping the
            # others renormalises the softmax over them: a perplexity measured now would be flattered by the test
            # text's own vocabulary. ppl_final is therefore the one measured above, before the drop (the kept
            # logits are unchanged by it); the renormalised figure is recorded here, marked as such.
            t_eval = time.perf_counter()
            vocab_info["ppl_renormalised_over_kept_ids"] = quality.measure(model)
            eval_time += time.perf_counter() - t_eval
    if heal_info is not None and heal_info["ppl_after"] is None:
        heal_info["ppl_after"] = q_final
    params_after = models.num_params(model)
    summary = {
        "source": source_name,
        "source_fingerprint": fp,
        "architecture": adapter.name,
        "mode": mode,
        "settings": asdict(st),
        "calibration": {"text": cal_desc, "tokens": int(cal_win.numel())},
        "evaluation": {"text": eval_desc, "tokens": int(eval_win.numel()), "metric": quality.metric,
                       "window": int(eval_win.shape[1])},
        "params_before": params_before,
        "params_after": params_after,
        "reduction_pct": 100.0 * (params_before - params_after) / params_before,
        "layers": rows,
        "layers_chosen": "given" if layers is not None else "measured",
        "vocab": vocab_info,
        "heal": heal_info,
        "contraction_time_s": contraction_time,
        "evaluation_time_s": eval_time,
    }
    if quality.metric == "perplexity":
        summary.update(ppl_source=q_source, ppl_final=q_final, ppl_ratio=q_final / q_source)
    else:
        summary.update(embedding_cosine=q_final)
    summary["wall_time_s"] = time.perf_counter() - t_start
    result = ContractionResult(model, tok, summary, kept_neurons, float_dtype=store)
    if out is not None:
        result.save(out, overwrite=overwrite)
    return result
