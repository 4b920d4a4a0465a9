"""Iterative contraction: prune a slice, heal, measure, repeat, until the one-shot size is reached.

One-shot contraction removes ``contraction_ratio`` of the MLP neurons of ``num_layers_to_contract`` blocks at
once, then heals. The schedule removes the same neurons in ``steps`` slices: after slice ``k`` a fraction
``k * ratio / steps`` of each chosen block's original width is gone (the per-slice ratio handed to contraction
is relative to the current, already narrower width), and after each slice the model is healed from the
*source* (the best teacher there is) with ``heal_tokens / steps`` tokens, so every later slice measures
neuron importance on a model that has already adapted to the earlier removals.

``heal_schedule="continuous"`` is gradual pruning as the literature practises it instead: one heal of
``heal_tokens`` (one warm-up, one learning-rate decay over the whole budget, one AdamW optimizer) during
which the slices are cut at the points ``heal_split`` sets (``[1, 1, 2]``: after 1/4 and 1/2 of the tokens);
at each cut the optimizer state is sliced with the neurons contraction kept (:mod:`.carry`). The default,
``"per-slice"``, gives every slice a heal of its own (warm-up and decay restart, optimizer state dropped).

``heal_schedule="fade"`` is the continuous schedule without abrupt cuts (:mod:`.fade`): each slice's neurons are
chosen by contraction's ranking on the current model, then faded out (factor 1 -> 0) over that slice's share of
the one heal and cut when the factor is 0, which changes nothing in the function; the last slice fades over the
first ``fade_share`` of its share, and the final architecture trains on the rest.
"""
from __future__ import annotations

import copy
import inspect
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import models
from ..errors import InvalidSetting, check_range, is_int
from .carry import carry_optimizer_state

HEAL_SCHEDULES = ("per-slice", "continuous", "fade")
# "blocks": deepest group first; "blocks-shallow-first": shallowest first, so each later (deeper) slice is planned
# on the inputs the earlier cuts and heals really produce (one-shot contraction plans every block on the
# source's inputs)
SLICINGS = ("ratio", "blocks", "blocks-shallow-first")


@dataclass
class ScheduleResult:
    model: Any
    tokenizer: Any
    steps: list = field(default_factory=list)  # one dict per slice: ratio, params, ppl after contraction / heal
    num_params: int = 0
    source_params: int = 0
    heal_tokens: int = 0
    heal_schedule: str = "per-slice"
    slices: str = "ratio"
    source: str | None = None
    seconds: float = 0.0

    @property
    def summary(self) -> dict:
        """Sizes, per-slice measurements, and the source's and the final perplexity on the heals' held-out windows
        (the tail of the heal text, never trained on; each heal keeps its best checkpoint by them)."""
        last = self.steps[-1] if self.steps else {}
        ppl_source, ppl_final = last.get("ppl_teacher"), last.get("ppl_healed")
        # the size keys are one-shot contraction's (ContractionResult.summary), so one script reads both
        return {"source": self.source, "params_before": self.source_params, "params_after": self.num_params,
                "reduction_pct": 100.0 * (1 - self.num_params / self.source_params) if self.source_params else None,
                "heal_tokens": self.heal_tokens, "heal_schedule": self.heal_schedule, "slices": self.slices,
                "tokens_seen": sum(s["tokens"] for s in self.steps),
                "ppl_source": ppl_source, "ppl_final": ppl_final,
                "ppl_ratio": ppl_final / ppl_source if ppl_source and ppl_final is not None else None,
                "evaluation": "held-out tail of the heal text (the heals' own windows)",
                "seconds": round(self.seconds, 2), "steps": self.steps}


def _slice_kwargs(contract_fn, contract_kwargs: dict, pinned, progress) -> dict:
    """The keyword arguments of one slice's contraction: the caller's, plus the pinned blocks and the progress
    setting where ``contract_fn`` takes them."""
    kw = dict(contract_kwargs)
    if pinned is not None and _accepts(contract_fn, "layers"):
        kw["layers"] = pinned
    if "progress" not in kw and _accepts(contract_fn, "progress"):
        kw["progress"] = progress
    return kw


def slice_ratios(contraction_ratio: float, steps: int) -> list[float]:
    """Per-slice ratios, each relative to the width left by the previous slices, that compose to the total.

    After slice ``k`` the kept fraction of the original width is ``1 - k * ratio / steps``:
    ``r_k = 1 - (1 - k r / K) / (1 - (k - 1) r / K)``.
    """
    r, k_total = contraction_ratio, steps
    return [1 - (1 - k * r / k_total) / (1 - (k - 1) * r / k_total) for k in range(1, k_total + 1)]


def block_groups(blocks, steps: int, *, deepest_first: bool = True) -> list[list[int]]:
    """``blocks`` shared out over ``steps`` slices for ``slices="blocks"``: contiguous groups of (nearly) equal
    size, the deepest first (or the shallowest), so each later heal also re-adapts the blocks already cut to
    their final width."""
    order = sorted(blocks, reverse=deepest_first)
    size, extra = divmod(len(order), steps)
    groups, i = [], 0
    for k in range(steps):
        n = size + (1 if k < extra else 0)
        groups.append(sorted(order[i:i + n]))
        i += n
    return groups


def split_budget(heal_tokens: int, steps: int, heal_split=None) -> list[int]:
    """Healing tokens of each slice: ``heal_tokens`` shared in proportion to ``heal_split`` (default: equally).

    A weight of 0 skips the heal after that slice (the next slice then calibrates on the unhealed model).
    Rounding leftovers go to the last slice, so the slices always add up to ``heal_tokens``.
    """
    if heal_split is None:
        heal_split = [1] * steps
    weights = list(heal_split)
    if len(weights) != steps or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0
                                    for w in weights):
        raise InvalidSetting(f"heal_split must hold {steps} non-negative weights (one per slice), got {heal_split!r}")
    if weights[-1] <= 0:
        raise InvalidSetting(f"heal_split must give the last slice a positive weight (the final model is the one "
                             f"that must recover), got {heal_split!r}")
    total = sum(weights)
    tokens = [int(heal_tokens * w // total) for w in weights[:-1]]
    return tokens + [heal_tokens - sum(tokens)]


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _contracted_layers(result) -> list[int] | None:
    rows = (getattr(result, "summary", None) or {}).get("layers")
    return None if rows is None else [r["layer"] for r in rows]


def _default_contract():
    """pyshrink.contract, imported late (pyshrink.contract imports pyshrink.heal for ``heal_tokens``)."""
    from ..contract import contract

    return contract


def iterative_contract(source, *, steps: int = 2, contraction_ratio: float = 0.5,
                       num_layers_to_contract: int | None = None,
                       calibration=None, heal_tokens: int = 100_000, heal_text=None, eval_text=None,
                       teacher=None, layers=None, out=None, overwrite: bool = False,
                       contract_fn: Callable | None = None, contract_kwargs: dict | None = None, progress: bool = True,
                       heal_split=None, heal_schedule: str = "per-slice", fade_share: float | None = None,
                       slices: str = "ratio", **heal_kwargs) -> ScheduleResult:
    """Contract ``source`` in ``steps`` slices with a heal after each; same final size as one-shot contraction.

    ``contraction_ratio`` (0.1-0.9) and ``num_layers_to_contract`` (default: 8, or every block of a shallower
    model) are the final model's, as in :func:`pyshrink.contract`.
    ``contract_fn(model_or_source, contraction_ratio=..., num_layers_to_contract=..., calibration=..., **contract_kwargs)``
    must return an object with ``.model`` and ``.tokenizer`` (default: :func:`pyshrink.contract`). Every slice must
    narrow the *same* blocks for the final size to equal one-shot contraction's: the blocks the first slice
    chose (its ``summary["layers"]``), or ``layers`` when given, are passed to every later slice as ``layers=``
    when ``contract_fn`` accepts that argument; otherwise each slice chooses again, and a warning says so if it
    chose other blocks. Healing uses
    ``heal_text`` (default: the calibration text), ``heal_tokens // steps`` tokens per slice (or shares in
    proportion to ``heal_split``, K weights, e.g. ``[1, 3]``; 0 skips a slice's heal), and ``heal_kwargs``
    (lr, alpha, temperature, teacher_topk, ...; ``max_seconds`` applies to each slice). Slice ``k`` continues the
    window order where slice ``k - 1`` stopped, so all slices together see the windows one heal of
    ``heal_tokens`` would; with ``teacher_topk`` one teacher cache serves every slice.
    ``heal_schedule``: ``"per-slice"`` (the default: every slice's heal restarts warm-up and learning-rate decay
    with a new optimizer) or ``"continuous"`` (one heal over all of ``heal_tokens``, the slices cut during it at
    the cumulative shares of ``heal_split``, AdamW state carried across each cut, sliced with the kept neurons;
    each step's ``optimizer`` entry counts the state tensors carried, sliced and reset, and ``ppl_healed`` of a
    slice before the last is its perplexity at the next cut; ``max_seconds`` is not taken, the budget is tokens),
    or ``"fade"`` (one heal like ``"continuous"``, but each slice's neurons, chosen by contraction on the current
    model, fade out over the slice's share of the budget and are cut when they contribute nothing, without
    contraction's refit; the last slice fades over the first ``fade_share`` (default 0.5) of its share and the
    final model trains on the rest (``until_ppl`` stops that part only); every slice needs a positive weight in
    ``heal_split``; ``steps=1`` fades one-shot's neurons; a step's ``ppl_contracted`` is then at the fade's start
    and ``ppl_faded`` at its end, just before the cut, and the last step's ``ppl_cut`` just after it).
    ``slices``: ``"ratio"`` (the default: every slice narrows all the chosen blocks by its share of the ratio) or
    ``"blocks"`` (slice ``k`` narrows its own group of the chosen blocks by the whole ratio, deepest group first,
    so each block is cut once and keeps what the later heals teach it; the blocks are ``layers`` or, without it,
    the ones one-shot contraction of ``source`` chooses; not with ``heal_schedule="fade"``) or
    ``"blocks-shallow-first"`` (the same groups, the shallowest first).
    With ``out``, the final model is saved there (atomically, with the per-slice measurements in its
    ``pyshrink.json``); the result's ``steps`` holds them too.
    """
    from ..arch import adapter_for
    from ..contract.api import RATIO_RANGE, default_num_layers
    from .api import heal, require_decoder

    check_range("steps", steps, 1, 64, integer=True)
    # the user's setting, checked before any work: a slice's own ratio (slice_ratios) is checked by contraction
    # only when that slice runs, after the heals before it
    check_range("contraction_ratio", contraction_ratio, *RATIO_RANGE)
    if num_layers_to_contract is not None:
        check_range("num_layers_to_contract", num_layers_to_contract, 1, 1 << 16, integer=True)
    if not is_int(heal_tokens) or heal_tokens < steps:
        raise InvalidSetting(f"heal_tokens must be an integer >= steps ({steps}), got {heal_tokens!r}")
    split_budget(heal_tokens, steps, heal_split)  # refuse a bad split before any work
    if heal_schedule not in HEAL_SCHEDULES:
        raise InvalidSetting(f"heal_schedule must be one of {', '.join(HEAL_SCHEDULES)}, got {heal_schedule!r}")
    continuous = heal_schedule == "continuous"
    if heal_schedule in ("continuous", "fade") and heal_kwargs.get("max_seconds") is not None:
        raise InvalidSetting(f"heal_schedule={heal_schedule!r} runs one heal whose cuts are placed in tokens: pass a "
                             "token budget (heal_tokens), not max_seconds")
    if heal_schedule == "fade":
        fade_share = 0.5 if fade_share is None else fade_share
        if isinstance(fade_share, bool) or not isinstance(fade_share, (int, float)) or not 0 < fade_share < 1:
            raise InvalidSetting(f"fade_share (the part of the last slice's tokens spent fading; the rest trains the "
                                 f"final model) must be a number in (0, 1), got {fade_share!r}")
        if heal_split is not None and min(heal_split) <= 0:
            raise InvalidSetting(f"heal_schedule='fade' fades every slice during its share of the heal, so every "
                                 f"weight of heal_split must be positive, got {heal_split!r}")
    elif fade_share is not None:
        raise InvalidSetting("fade_share sets the fade of heal_schedule='fade'")
    if slices not in SLICINGS:
        raise InvalidSetting(f"slices must be one of {', '.join(SLICINGS)}, got {slices!r}")
    by_blocks = slices.startswith("blocks")
    if by_blocks:
        if heal_schedule == "fade":
            raise InvalidSetting(f"slices={slices!r} cuts whole blocks' shares at once; heal_schedule='fade' fades "
                                 "slices of every block: use slices='ratio' with it")
        if steps < 2:
            raise InvalidSetting(f"slices={slices!r} shares the blocks out over the slices of steps >= 2; with one "
                                 "step it is one-shot contraction")
        n_blocks = len(layers) if layers is not None else num_layers_to_contract
        if n_blocks is not None and n_blocks < steps:
            raise InvalidSetting(f"slices={slices!r} gives every one of the {steps} slices at least one block, but "
                                 f"{'layers holds' if layers is not None else 'num_layers_to_contract is'} {n_blocks}")
    if layers is not None and len(set(layers)) != len(layers):
        raise InvalidSetting(f"layers names a block more than once: {list(layers)}")
    text = heal_text if heal_text is not None else calibration
    if text is None:
        raise InvalidSetting("the schedule heals after every slice, so it needs text: pass calibration= or heal_text=")
    contract_kwargs = dict(contract_kwargs or {})
    if contract_fn is None:
        contract_fn = _default_contract()
        _check_slices(contraction_ratio, 1 if by_blocks else steps, contract_kwargs)
    if (layers is not None or by_blocks) and not _accepts(contract_fn, "layers"):
        raise InvalidSetting(f"{'layers=' if layers is not None else f'slices={slices!r}'} needs a contraction function "
                             "that takes a layers= argument")
    out = None if out is None else models.check_output(out, overwrite=overwrite, sources=(source,))
    if teacher is None:
        teacher = models.load_model(source) if isinstance(source, (str, Path)) else source
    t_model = teacher[0] if isinstance(teacher, tuple) else getattr(teacher, "model", teacher)
    require_decoder(t_model)  # before the first slice's contraction, not at its heal
    if num_layers_to_contract is None:
        num_layers_to_contract = (len(layers) if layers is not None
                                  else default_num_layers(adapter_for(t_model).depth(t_model)))
        if by_blocks and layers is None and num_layers_to_contract < steps:
            raise InvalidSetting(f"slices={slices!r} gives every one of the {steps} slices at least one block, but "
                                 f"the model has {num_layers_to_contract}")
    result = ScheduleResult(model=None, tokenizer=None, source_params=models.num_params(t_model),
                            heal_tokens=heal_tokens, heal_schedule=heal_schedule, slices=slices)
    if heal_kwargs.get("teacher_topk") and heal_kwargs.get("teacher_cache") is None:
        from .teacher import TeacherCache
        heal_kwargs["teacher_cache"] = TeacherCache(heal_kwargs["teacher_topk"])  # one teacher: share its targets
    if "seq_len" not in heal_kwargs:  # heal on contraction's windows
        heal_kwargs["seq_len"] = models.window_length(t_model, contract_kwargs.get("seq_len"))
    seq_len = heal_kwargs["seq_len"]
    offset = heal_kwargs.pop("data_offset", 0)
    current = source
    budgets = split_budget(heal_tokens, steps, heal_split)
    pinned = None if layers is None else list(layers)
    if heal_schedule == "fade":
        t_start = time.perf_counter()
        _fade_slices(result, source, t_model, teacher, text, calibration, eval_text, contract_fn, contract_kwargs,
                     contraction_ratio, num_layers_to_contract, steps, heal_tokens, budgets, fade_share, pinned,
                     offset, progress, heal_kwargs)
        return _finish(result, source, t_model, t_start, out, overwrite)
    position, opt_state = 0, None  # continuous: tokens of the one heal done so far, and its AdamW state
    t_start = time.perf_counter()
    groups = None
    if by_blocks:
        if pinned is None:  # the blocks one-shot contraction would narrow (its time counts in result.seconds)
            if progress:  # stderr: stdout may carry the CLI's --json summary
                print(f"choosing the {num_layers_to_contract} blocks to share out over {steps} slices (one-shot "
                      "contraction's choice)", file=sys.stderr, flush=True)
            pinned = _contracted_layers(contract_fn(source, contraction_ratio=contraction_ratio,
                                                    num_layers_to_contract=num_layers_to_contract,
                                                    calibration=calibration,
                                                    **_slice_kwargs(contract_fn, contract_kwargs, None, progress)))
            if pinned is None or len(pinned) < steps:
                raise InvalidSetting(f"slices={slices!r} needs at least {steps} blocks to share out, and contraction "
                                     f"chose {pinned}")
        groups = block_groups(pinned, steps, deepest_first=slices == "blocks")
    ratios = [contraction_ratio] * steps if groups else slice_ratios(contraction_ratio, steps)
    for k, ratio in enumerate(ratios, start=1):
        want = groups[k - 1] if groups else pinned
        kw = _slice_kwargs(contract_fn, contract_kwargs, want, progress)
        contracted = contract_fn(current, contraction_ratio=ratio,
                                 num_layers_to_contract=len(want) if groups else num_layers_to_contract,
                                 calibration=calibration, **kw)
        done = _contracted_layers(contracted)
        if pinned is None:
            pinned = done
        elif done is not None and sorted(done) != sorted(want):
            warnings.warn(f"slice {k} contracted blocks {done}, not the blocks {want} asked of it, so the final "
                          "size differs from one-shot contraction",
                          RuntimeWarning, stacklevel=2)
        carried = None
        if continuous and opt_state is not None:
            opt_state, carried = carry_optimizer_state(opt_state, contracted.model,
                                                       getattr(contracted, "kept_neurons", None))
        if budgets[k - 1] == 0:  # no heal after this slice: the next one contracts the unhealed model
            result.steps.append({"slice": k, "ratio": ratio, "layers": done,
                                 "num_params": models.num_params(contracted.model), "ppl_contracted": None,
                                 "ppl_healed": None, "ppl_teacher": heal_kwargs.get("teacher_ppl"), "tokens": 0,
                                 "stopped": "no heal", "seconds": 0.0,
                                 **({"optimizer": carried} if carried is not None else {})})
            current = (contracted.model, contracted.tokenizer)
            continue
        if continuous:
            # one run: this slice trains from where the last one stopped up to its cumulative share of the budget
            stop = heal_tokens if k == steps else max(position, sum(budgets[:k]))
            healed = heal((contracted.model, contracted.tokenizer), teacher, text, tokens=heal_tokens,
                          eval_text=eval_text, progress=progress, data_offset=offset, segment=(position, stop),
                          optimizer_state=opt_state, **heal_kwargs)
            tokens = healed.tokens_seen - position
            position, opt_state = healed.tokens_seen, healed.optimizer_state
            ppl_healed = healed.ppl_best if k == steps else healed.curve[-1]["ppl"]  # the weights cut next
        else:
            healed = heal((contracted.model, contracted.tokenizer), teacher, text, tokens=budgets[k - 1],
                          eval_text=eval_text, progress=progress, data_offset=offset, **heal_kwargs)
            offset += healed.tokens_seen // seq_len  # the next slice continues the same data order
            tokens, ppl_healed = healed.tokens_seen, healed.ppl_best
        heal_kwargs["teacher_ppl"] = healed.ppl_teacher  # same teacher, same held-out windows
        result.steps.append({"slice": k, "ratio": ratio, "layers": done, "num_params": models.num_params(healed.model),
                             "ppl_contracted": healed.ppl_initial, "ppl_healed": ppl_healed,
                             "ppl_teacher": healed.ppl_teacher, "tokens": tokens,
                             "stopped": healed.stopped, "seconds": healed.seconds,
                             **({"optimizer": carried} if carried is not None else {})})
        current = (healed.model, healed.tokenizer)
    result.model, result.tokenizer = current
    return _finish(result, source, t_model, t_start, out, overwrite)


def _finish(result: ScheduleResult, source, t_model, t_start: float, out, overwrite: bool) -> ScheduleResult:
    result.num_params = models.num_params(result.model)
    result.source = str(source) if isinstance(source, (str, Path)) else type(t_model).__name__
    result.seconds = time.perf_counter() - t_start
    if out is not None:
        models.save(result.model, result.tokenizer, out, overwrite=overwrite,
                    metadata={"schedule": result.summary, "source": str(source)})
    return result


def calibration_windows(tok, calibration, text, seq_len: int, contract_kwargs: dict, vocab: int | None = None):
    """The calibration windows contraction ranks on (the first ``calibration_tokens`` of the calibration text
    without its held-out last 10 %), else the heal text's first: what the fade's channel means (and
    bench/fisher_rank.py's gradients) are measured on."""
    from .. import data

    if calibration is not None:
        ids = data.split_ids(data.tokenize(tok, data.read_texts(calibration)), 0.1)[0]
    else:
        ids = (data.as_ids(text, "healing text").flatten() if hasattr(text, "flatten")
               else data.tokenize(tok, data.read_texts(text)))
    return data.windows(ids, seq_len, contract_kwargs.get("calibration_tokens", 32768), what="calibration text",
                        vocab=vocab)


def _fade_slices(result, source, t_model, teacher, text, calibration, eval_text, contract_fn, contract_kwargs,
                 contraction_ratio, num_layers_to_contract, steps, heal_tokens, budgets, fade_share, pinned, offset,
                 progress, heal_kwargs) -> None:
    """The fade schedule (see :func:`iterative_contract`): one heal of ``heal_tokens`` in segments; segment ``k``
    fades slice ``k``'s neurons, which are cut at its end; a last segment trains the final architecture."""
    from .api import heal
    from .fade import Fade, channel_means

    if isinstance(source, (str, Path)):
        model, tok = models.load_model(source)
    else:  # the student trains in place: never the caller's (or the teacher's) model
        model = copy.deepcopy(source[0] if isinstance(source, tuple) else getattr(source, "model", source))
        tok = source[1] if isinstance(source, tuple) else getattr(source, "tokenizer", None)
    windows = calibration_windows(tok, calibration, text, heal_kwargs["seq_len"], contract_kwargs,
                                  models.id_limit(model))
    cum = [sum(budgets[:k]) for k in range(steps + 1)]
    fade_end = cum[-2] + max(1, round(fade_share * budgets[-1]))
    position, opt_state = 0, None
    for k, ratio in enumerate(slice_ratios(contraction_ratio, steps), start=1):
        kw = _slice_kwargs(contract_fn, contract_kwargs, pinned, progress)
        ranked = contract_fn((model, tok), contraction_ratio=ratio, num_layers_to_contract=num_layers_to_contract,
                             calibration=calibration, **kw)
        kept, done = getattr(ranked, "kept_neurons", None), _contracted_layers(ranked)
        del ranked  # only its choice of neurons is used: the fade removes them from the trained model itself
        if not kept:
            raise InvalidSetting("heal_schedule='fade' needs a contraction function that reports the neurons it "
                                 "keeps (kept_neurons, as pyshrink.contract does)")
        if pinned is None:
            pinned = done
        elif done is not None and sorted(done) != sorted(pinned):
            warnings.warn(f"slice {k} contracted blocks {done}, not the blocks {pinned} of slice 1",
                          RuntimeWarning, stacklevel=3)
        fade = Fade(model, kept, channel_means(model, kept, windows))
        stop = cum[k] if k < steps else fade_end
        try:
            # no early stop inside a fade (half-faded neurons cannot be cut without a jump): until_ppl applies to
            # the final model's training only
            faded = heal((model, tok), teacher, text, tokens=heal_tokens, eval_text=eval_text, progress=progress,
                         data_offset=offset, segment=(position, stop), optimizer_state=opt_state, fade=fade,
                         **{**heal_kwargs, "until_ppl": 0})
            opt_state, carried = carry_optimizer_state(faded.optimizer_state, model, fade.cut())
        finally:
            fade.remove()  # the returned model never carries the hooks (cut() took them off already)
        heal_kwargs["teacher_ppl"] = faded.ppl_teacher
        row = {"slice": k, "ratio": ratio, "layers": done, "num_params": models.num_params(model),
               "ppl_contracted": faded.ppl_initial, "ppl_faded": faded.curve[-1]["ppl"],
               "ppl_healed": faded.curve[-1]["ppl"], "ppl_teacher": faded.ppl_teacher,
               "tokens": faded.tokens_seen - position, "fade_tokens": faded.tokens_seen - position,
               "stopped": faded.stopped, "seconds": faded.seconds, "optimizer": carried}
        position = faded.tokens_seen
        if k == steps:  # the final architecture trains on the rest of the budget; its best checkpoint is kept
            final = heal((model, tok), teacher, text, tokens=heal_tokens, eval_text=eval_text, progress=progress,
                         data_offset=offset, segment=(position, heal_tokens), optimizer_state=opt_state,
                         **heal_kwargs)
            row.update(ppl_cut=final.ppl_initial, ppl_healed=final.ppl_best,
                       tokens=row["tokens"] + final.tokens_seen - position, stopped=final.stopped,
                       seconds=faded.seconds + final.seconds)
            position = final.tokens_seen
        result.steps.append(row)
    result.model, result.tokenizer = model, tok


def _check_slices(contraction_ratio: float, steps: int, contract_kwargs: dict) -> None:
    """Refuse, before any work, settings pyshrink.contract cannot run slice by slice."""
    from ..contract.api import RATIO_RANGE

    for name, why in (("threshold", "threshold mode removes neurons by activation, not by a ratio that can be "
                                    "sliced"),
                      ("prune_vocab", "a slice with vocabulary pruning leaves the student a vocabulary unlike the "
                                      "source's, and the next heal compares them token by token; one-shot "
                                      "contraction with heal_tokens (steps=1) heals first and then drops the "
                                      "vocabulary"),
                      ("heal_tokens", "the schedule heals after every slice itself")):
        if contract_kwargs.get(name):
            raise InvalidSetting(f"the iterative schedule cannot take {name}: {why}")
    ratios = slice_ratios(contraction_ratio, steps)
    if steps > 1 and min(ratios) < RATIO_RANGE[0]:
        raise InvalidSetting(f"{steps} steps of contraction_ratio {contraction_ratio} make slices that remove "
                             f"{min(ratios):.3f} of a block's width, below contraction's minimum {RATIO_RANGE[0]}: "
                             "use fewer steps or a larger ratio")
