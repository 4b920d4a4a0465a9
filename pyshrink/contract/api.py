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
    model: torch.nn.Module | None  # None for a streamed run: the result is only on disk (its summary's "out")
    tokenizer: object
    summary: dict = field(default_factory=dict)
    # block index -> indices (in the width before contraction) of the MLP neurons kept; not saved. Lets a
    # schedule that trains across contractions slice the optimizer state of the narrowed projections alike.
    kept_neurons: dict = field(default_factory=dict)
    float_dtype: torch.dtype | None = None  # what save() stores float weights in (a 16-bit source's; None: float32)

    def __repr__(self) -> str:  # the numbers that matter, not the whole module tree
        keys = ("params_before", "params_after", "ppl_source", "ppl_final")
        what = type(self.model).__name__ if self.model is not None else f"streamed to {self.summary.get('out')}"
        return (f"ContractionResult({what}, "
                f"{', '.join(f'{k}={self.summary[k]!r}' for k in keys if k in self.summary)})")

    def save(self, out, *, overwrite: bool = False) -> Path:
        """Write safetensors + config + tokenizer + pyshrink.json atomically; ``load_model(out)`` reads it."""
        if self.model is None:
            raise InvalidSetting(f"this result was streamed to {self.summary.get('out')} and is not in memory: "
                                 "copy that folder, or load it with pyshrink.load_model")
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
             heal_tokens: int | None = None, heal_options: dict | None = None,
             stream: bool = False) -> ContractionResult:
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
        stream: never hold the whole model (:mod:`.stream`): observe, plan, contract, measure and write one block
            at a time, for models larger than memory. Needs a local folder of .safetensors files and ``out``; a
            decoder needs ``calibration`` (data-free calibration samples text from the whole model); no heal. The
            result is the same as without it.

    Returns:
        :class:`ContractionResult` with ``model``, ``tokenizer`` and ``summary`` (``model`` is None with ``stream``:
        the result is at ``out``, for :func:`pyshrink.load_model`).
    """
    t_start = time.perf_counter()
    st = ContractionSettings(contraction_ratio, num_layers_to_contract, threshold, prune_heads, head_ratio,
                             prune_vocab, criterion, refit, seq_len, calibration_tokens, eval_tokens,
                             datafree_tokens, 4, seed, layers, heal_tokens).validate()
    heal_opts = _heal_options(heal_options)
    if st.layers is not None:
        st.num_layers_to_contract = len(st.layers)  # recorded as what was done (the argument is ignored)
    if heal_opts and not heal_tokens:
        raise InvalidSetting("heal_options configure the heal, which runs only with heal_tokens=N (N > 0)")
    if heal_tokens and calibration is None:
        raise InvalidSetting("heal_tokens needs text to heal on: pass calibration text (calibration=... / "
                             "--calibration FILE); the heal distills the source into the contracted model on it")
    if prune_vocab and calibration is None:
        raise InvalidSetting("prune_vocab needs domain text: pass calibration text (--calibration FILE); the "
                             "kept vocabulary is what that text uses")
    if stream and (_is_pair(source) or isinstance(source, torch.nn.Module)):
        raise InvalidSetting("stream=True reads the source block by block from a local folder of .safetensors files; "
                             "an in-memory model is already in memory: contract it without stream")
    if stream and out is None:
        raise InvalidSetting("stream=True writes the result block by block: pass out=FOLDER")
    if stream and heal_tokens:
        raise InvalidSetting("heal_tokens trains the whole contracted model, which stream=True never holds: "
                             "contract with --stream, then heal the result without it if it fits in memory")
    texts = Texts(calibration, eval_text)
    if out is not None:
        models.check_output(out, overwrite=overwrite, sources=() if _is_pair(source) else (source,))
    if stream:
        from .stream import contract_streamed

        return contract_streamed(source, st, texts, out, overwrite=overwrite, progress=progress, t_start=t_start)

    if not _is_pair(source) and not isinstance(source, torch.nn.Module):
        models.check_fits(source, "contract")
    model, tok, source_name, fp = _load(source)
    adapter = check_model(model, source_name, st)
    models.check_finite(model, "contracting")
    if heal_tokens:
        from ..heal.api import require_decoder

        require_decoder(model, "heal_tokens")
    # the heal's teacher is the source as it was: an in-memory source is already a copy, a loaded one is not
    teacher = None
    if heal_tokens:
        teacher = (source[0], source[1]) if _is_pair(source) else (copy.deepcopy(model), tok)
    torch.manual_seed(seed)
    texts.tokenize(model, adapter, tok, st, progress)

    # ---- source quality ---------------------------------------------------------------------------------
    t_eval = time.perf_counter()
    quality = Quality(adapter.kind, texts.eval_win, progress=progress)
    q_source = quality.measure(model)
    eval_time = time.perf_counter() - t_eval
    params_before = models.num_params(model)

    # ---- observe and plan every block, contract the chosen ----------------------------------------------
    t_c = time.perf_counter()
    candidates = stats_pass.observe_blocks(model, adapter, texts.batches(st), planner(model, adapter, st),
                                           heads=prune_heads, progress=progress)
    chosen = choose(candidates, st)
    del candidates  # the plans of the blocks not chosen (refit weights of every block) are freed here
    rows, kept_neurons = [], {}
    for c in chosen:
        rows.append(apply_candidate(model, adapter, c, prune_heads))
        if c.removed_neurons:
            kept_neurons[c.index] = c.neurons.keep.sort().values
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
        h = heal_in_place(model, tok, teacher=teacher, text=texts.cal_ids, tokens=heal_tokens, progress=progress,
                          **{"seq_len": st.seq_len, "seed": seed, **heal_opts})
        heal_info = {"tokens": heal_tokens, "tokens_seen": h["tokens_seen"], "stopped": h["stopped"],
                     "ppl_before": q_before_heal, "ppl_after": None, "seconds": time.perf_counter() - t_h,
                     "text": f"calibration text ({texts.cal_desc}), without the evaluation text",
                     "held_out": {k: h[k] for k in ("ppl_initial", "ppl_best", "ppl_teacher", "until_ppl",
                                                    "best_tokens")},
                     "curve": h["curve"], "options": heal_opts}

    # ---- result ------------------------------------------------------------------------------------------
    # a 16-bit source's output is saved in 16 bits: measure what is saved
    store = models.storage_dtype(models.stored_float_dtype(source))
    models.round_floats_to(model, store)
    t_eval = time.perf_counter()
    q_final = quality.measure(model)
    vocab_info = prune_vocabulary(model, tok, texts, quality, lambda: quality.measure(model)) if prune_vocab else None
    eval_time += time.perf_counter() - t_eval
    if heal_info is not None and heal_info["ppl_after"] is None:
        heal_info["ppl_after"] = q_final
    summary = make_summary(source_name, fp, adapter, st, texts, quality, params_before, models.num_params(model),
                           rows, vocab_info, heal_info, contraction_time, eval_time, q_source, q_final, t_start)
    result = ContractionResult(model, tok, summary, kept_neurons, float_dtype=store)
    if out is not None:
        result.save(out, overwrite=overwrite)
    return result


class Texts:
    """The run's text: read before anything heavy, tokenized into windows once the model is there."""

    def __init__(self, calibration, eval_text):
        self.calibration, self.eval_text = calibration, eval_text  # as given: the summary describes them
        self.cal_text = data.read_texts(calibration) if calibration is not None else None
        self.eval_str = data.read_texts(eval_text) if eval_text is not None else None

    def tokenize(self, model, adapter, tok, st: ContractionSettings, progress: bool) -> None:
        """Calibration and evaluation windows (``cal_win``, ``eval_win``), the calibration ids without the
        evaluation text (``cal_ids``), the held-out ids (``held``), their descriptions and the mode. Data-free
        decoders sample their calibration text from ``model``."""
        L = st.seq_len = models.window_length(model, st.seq_len)  # the summary records the window used
        n_ids = models.id_limit(model)  # every window's ids are checked against it
        self.cal_ids = None
        if self.cal_text is not None:
            ids = data.tokenize(tok, self.cal_text)
            if self.eval_str is None:
                self.cal_ids, self.held = data.split_ids(ids, 0.1)
                self.eval_desc = f"held-out last 10% of the calibration text ({data.describe(self.calibration)})"
            else:
                self.cal_ids, self.held = ids, data.tokenize(tok, self.eval_str)
                self.eval_desc = data.describe(self.eval_text)
            self.cal_win = _windows(self.cal_ids, L, st.calibration_tokens, "calibration text", n_ids)
            self.cal_desc = data.describe(self.calibration)
            self.mode = "threshold" if st.threshold is not None else "calibrated"
        else:
            self.mode = "data-free"
            if self.eval_str is not None:
                self.held, self.eval_desc = data.tokenize(tok, self.eval_str), data.describe(self.eval_text)
            else:
                builtin = data.tokenize(tok, data.builtin_text("pydoc"))
                self.held = builtin[-min(st.eval_tokens, builtin.numel() // 2):]
                self.eval_desc = "built-in text: CPython pydoc topics (held-out last windows)"
            # calibration_tokens caps calibration in both modes ("use at most this many"); data-free sampling is the
            # costly step, and datafree_tokens (8,192) is its default budget
            n_free = min(st.datafree_tokens, st.calibration_tokens)
            if adapter.kind == "decoder":
                self.cal_win = datafree.sample_ids(model, tok, tokens=n_free, seq_len=min(128, L), seed=st.seed,
                                                   progress=progress)
                self.cal_desc = (f"data-free: {self.cal_win.numel()} tokens sampled from the source model "
                                 f"(seed {st.seed}, temperature 1)")
            else:
                self.cal_win = datafree.encoder_ids(tok, tokens=n_free, seq_len=min(128, L), vocab=n_ids)
                self.cal_desc = "data-free: built-in text (CPython pydoc topics, first windows)"
            if st.threshold is not None:
                self.mode = "threshold (data-free)"
        self.eval_win = _windows(self.held, L, st.eval_tokens, "evaluation text", n_ids)

    def batches(self, st: ContractionSettings) -> list:
        """The calibration windows in batches of about ``st.batch_size`` 512-token windows."""
        n = st.batch_size * max(1, 512 // self.cal_win.shape[1])
        return [self.cal_win[i:i + n] for i in range(0, len(self.cal_win), n)]


def check_model(model, source_name: str, st: ContractionSettings):
    """Refuse a model contraction cannot take (quantized; a pruned vocabulary with prune_vocab; blocks it lacks)
    and fill in ``st.num_layers_to_contract``; returns the model's adapter."""
    from ..quantize.api import is_quantized_model  # lazily: quantize's import chain is heavier

    if is_quantized_model(model):
        raise InvalidSetting(f"{source_name} is quantized: contraction removes rows and columns of floating-point "
                             "weights; contract the floating-point model first, then quantize the result")
    adapter = adapter_for(model)
    if st.prune_vocab and any(isinstance(m, (vocab.CompactEmbedding, vocab.CompactHead)) for m in model.modules()):
        raise InvalidSetting(f"{source_name} has a pruned vocabulary already; contract it again without "
                             "prune_vocab / --prune-vocab (its kept ids stay as they are)")
    depth = adapter.depth(model)
    if st.layers is None:
        if st.num_layers_to_contract is None:
            st.num_layers_to_contract = default_num_layers(depth)
        check_range("num_layers_to_contract", st.num_layers_to_contract, 1, depth, integer=True)
    elif max(st.layers) >= depth:
        raise InvalidSetting(f"layers must be block indices in 0..{depth - 1} (the model has {depth} blocks), "
                             f"got {st.layers!r}")
    return adapter


def planner(model, adapter, st: ContractionSettings):
    """``consume(i, block, obs)`` for :func:`.calibration.observe_blocks`: block ``i``'s candidate plan (None for a
    block ``st.layers`` leaves out), its second moments (held tokens or Gram matrices) freed as soon as it is made."""
    h_ratio = st.head_ratio if st.head_ratio is not None else st.contraction_ratio

    def consume(i, block, obs):
        if st.layers is not None and i not in st.layers:  # pinned blocks: nothing to plan here
            obs.mlp.gram = None
            if obs.attn is not None:
                obs.attn.gram = None
            return None
        if st.threshold is not None:
            remove = (obs.mlp.mean_abs < st.threshold).nonzero().squeeze(1)
            remove = remove[obs.mlp.mean_abs[remove].argsort()][: int(RATIO_RANGE[1] * len(obs.mlp.mean_abs))]
            npl = neurons.plan(adapter, block, obs.mlp, remove=remove, refit=st.refit)
        else:
            n_rm = round(st.contraction_ratio * adapter.mlp_width(block))
            npl = neurons.plan(adapter, block, obs.mlp, n_remove=n_rm, criterion=st.criterion, refit=st.refit)
        hpl = heads.plan(adapter, block, model.config, obs.attn, h_ratio, criterion=st.criterion, refit=st.refit) \
            if st.prune_heads else None
        obs.mlp.gram = None  # free the second moments (held tokens or Gram matrices) as soon as the block is planned
        if obs.attn is not None:
            obs.attn.gram = None
        return layer_selection.LayerCandidate(i, npl, hpl, **obs.scales)

    return consume


def choose(candidates: list, st: ContractionSettings, *, stacklevel: int = 3) -> list:
    """The candidates to apply, in block order: the measured cheapest, or those of the blocks ``st.layers`` names."""
    if st.layers is None:
        chosen = layer_selection.choose(candidates, st.num_layers_to_contract, per_removed=st.threshold is not None)
    else:
        chosen = [c for c in candidates if c is not None]  # block order, as choose() returns them
    if st.threshold is not None and not any(c.removed_neurons for c in chosen):
        warnings.warn(f"threshold={st.threshold:g}: no neuron's mean |activation| on the calibration text is below "
                      "it, so nothing was removed and the result is the source's size; try a larger threshold",
                      UserWarning, stacklevel=stacklevel)
    return chosen


def apply_candidate(model, adapter, c, prune_heads: bool) -> dict:
    """Contract block ``c.index`` of ``model`` (loaded) as candidate ``c`` plans; returns its summary row."""
    blk = adapter.blocks(model)[c.index]
    row = {"layer": c.index, "width_before": adapter.mlp_width(blk)}
    if prune_heads:
        row["heads_before"], row["kv_heads_before"] = adapter.head_counts(blk, model.config)
    if c.removed_neurons:
        neurons.apply(model, adapter, c.index, c.neurons.keep, c.neurons.weight, c.neurons.bias)
    if c.heads is not None:
        heads.apply(model, adapter, c.index, c.heads)
    row["width_after"] = adapter.mlp_width(blk)
    if prune_heads:
        row["heads_after"], row["kv_heads_after"] = adapter.head_counts(blk, model.config)
        row["head_shape"] = c.heads.shape if c.heads is not None else None
    row["relative_error"] = c.relative_error
    return row


def prune_vocabulary(model, tok, texts: Texts, quality: Quality, measure) -> dict:
    """Drop the ids the domain text (calibration and evaluation) never uses; ``measure()``: the model's quality
    now (recorded for perplexity only, marked as renormalised)."""
    used = torch.cat([texts.cal_ids, texts.held]).unique()
    info = vocab.apply(model, vocab.kept_ids(used, tok, model.config), unk_id=vocab.unknown_token_id(tok))
    if quality.metric == "perplexity":
        # The kept ids include every id of the evaluation text (so none of it scores -inf), and dropping the
        # others renormalises the softmax over them: a perplexity measured now would be flattered by the test
        # text's own vocabulary. ppl_final is therefore the one measured before the drop (the kept logits are
        # unchanged by it); the renormalised figure is recorded here, marked as such.
        info["ppl_renormalised_over_kept_ids"] = measure()
    return info


def make_summary(source_name, fp, adapter, st, texts, quality, params_before, params_after, rows, vocab_info,
                 heal_info, contraction_time, eval_time, q_source, q_final, t_start) -> dict:
    summary = {
        "source": source_name,
        "source_fingerprint": fp,
        "architecture": adapter.name,
        "mode": texts.mode,
        "settings": asdict(st),
        "calibration": {"text": texts.cal_desc, "tokens": int(texts.cal_win.numel())},
        "evaluation": {"text": texts.eval_desc, "tokens": int(texts.eval_win.numel()), "metric": quality.metric,
                       "window": int(texts.eval_win.shape[1])},
        "params_before": params_before,
        "params_after": params_after,
        "reduction_pct": 100.0 * (params_before - params_after) / params_before,
        "layers": rows,
        "layers_chosen": "given" if st.layers is not None else "measured",
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
    return summary
