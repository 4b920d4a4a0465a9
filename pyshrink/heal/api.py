"""``pyshrink.heal``: recover a contracted model's quality by distilling from the model it came from."""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import data, models
from ..arch import adapter_for
from ..errors import DataError, InvalidSetting, PyshrinkError, check_range, is_int
from . import checkpoint as ckpt
from .report import plot_curve
from .trainer import SCHEDULES, TRAINABLE, HealConfig, Trainer


class IncompatibleModels(PyshrinkError):
    """Student and teacher cannot be paired: different vocabularies, or the student is not smaller."""


@dataclass
class HealResult:
    """What a healing run produced. ``model`` holds the best weights seen (by held-out perplexity)."""

    model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    out: Path | None  # the run folder (None when nothing was written)
    stopped: str  # "until_ppl" | "budget" | "time"
    ppl_initial: float
    ppl_best: float
    ppl_teacher: float
    until_ppl: float
    tokens_seen: int
    best_tokens: int
    steps: int
    seconds: float
    train_tokens_per_s: float | None
    curve: list = field(default_factory=list, repr=False)
    config: dict = field(default_factory=dict, repr=False)
    optimizer_state: dict | None = field(default=None, repr=False)  # by name; only for a segment (the run goes on)

    @property
    def path(self) -> Path | None:
        """The healed model's folder (``OUT/checkpoint-best``), loadable with ``pyshrink.load_model``."""
        return None if self.out is None else self.out / ckpt.BEST

    @property
    def reached(self) -> bool:
        return self.ppl_best <= self.until_ppl

    @property
    def summary(self) -> dict:
        keys = ("stopped", "ppl_initial", "ppl_best", "ppl_teacher", "until_ppl", "tokens_seen", "best_tokens",
                "steps", "seconds", "train_tokens_per_s", "curve", "config")
        return {"path": str(self.path) if self.path else None, "reached": self.reached,
                **{k: getattr(self, k) for k in keys}}


# ---- inputs ----------------------------------------------------------------------------------------------
def _resolve(obj, what: str):
    """(model, tokenizer or None, source path or None) from a path/name, (model, tok), a result, or a model."""
    if isinstance(obj, (str, Path)):
        model, tok = models.load_model(obj)
        return model, tok, str(obj)
    if isinstance(obj, tuple) and len(obj) == 2:
        return obj[0], obj[1], None
    if hasattr(obj, "model") and not isinstance(obj, torch.nn.Module):  # ContractionResult, HealResult
        return obj.model, getattr(obj, "tokenizer", None), None
    if isinstance(obj, torch.nn.Module):
        return obj, None, None
    raise InvalidSetting(f"the {what} must be a model, a (model, tokenizer) pair or a model source, got {type(obj).__name__}")


def vocab_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def _vocab_size(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head.weight.shape[0] if head is not None else model.config.vocab_size


def require_decoder(model, setting: str = ""):
    """The model's adapter; an encoder is refused (``setting``: the option that asked for a heal, for the message)."""
    adapter = adapter_for(model)
    if adapter.kind != "decoder":
        raise InvalidSetting(f"{setting + ': ' if setting else ''}healing trains next-token prediction, so it needs a "
                             f"decoder; {adapter.name} is an encoder")
    return adapter


def check_pair(student, teacher, s_tok, t_tok, *, hidden_weight: float = 0.0, pending: int = 0):
    """Raise a clear error unless ``student`` can be healed from ``teacher``; ``pending``: parameters a fade
    will cut from the student during the heal (it counts as that much smaller)."""
    from ..quantize.api import is_quantized_model

    for role, m in (("student", student), ("teacher", teacher)):
        if is_quantized_model(m):
            raise InvalidSetting(f"the {role} is quantized: healing trains (and distills from) floating-point "
                                 "weights; heal the contracted floating-point model from its floating-point source, "
                                 "then quantize the healed model")
    low = sorted({str(p.dtype).removeprefix("torch.") for p in student.parameters()
                  if p.is_floating_point() and p.dtype != torch.float32})
    if low:  # AdamW has no master copy: its 1e-8 epsilon is 0 in float16 (0/0 = NaN), bf16 drops small updates
        raise InvalidSetting(f"healing trains the student in float32, but its weights are {', '.join(low)}: pass "
                             "student.float() (the teacher may stay 16-bit)")
    adapter = require_decoder(student)
    if adapter_for(teacher).name != adapter.name:
        raise IncompatibleModels(f"student ({adapter.name}) and teacher ({adapter_for(teacher).name}) are different "
                                 "model families")
    sv, tv = _vocab_size(student), _vocab_size(teacher)
    if sv != tv:
        pruned = "; a student whose vocabulary was pruned (contract --prune-vocab) heals before the pruning: " \
                 "pyshrink contract --heal-tokens N --prune-vocab" if sv < tv else ""
        raise IncompatibleModels(f"student and teacher have different vocabularies ({sv} vs {tv} tokens): "
                                 f"distillation compares their next-token distributions token by token{pruned}")
    if s_tok is not None and t_tok is not None and vocab_fingerprint(s_tok) != vocab_fingerprint(t_tok):
        raise IncompatibleModels("student and teacher use different tokenizers (their vocabularies differ although "
                                 f"both have {sv} tokens)")
    ns, nt = models.num_params(student) - pending, models.num_params(teacher)
    if ns >= nt:
        raise IncompatibleModels(f"the student ({ns:,} parameters) is not smaller than its teacher ({nt:,}): healing "
                                 "recovers a contracted model by distilling from the model it was contracted from")
    if hidden_weight > 0:
        ds, dt = adapter.depth(student), adapter.depth(teacher)
        hs, ht = student.config.hidden_size, teacher.config.hidden_size
        if (ds, hs) != (dt, ht):
            raise IncompatibleModels(f"hidden-state matching pairs blocks 1:1, but the student has {ds} blocks of width "
                                     f"{hs} and the teacher {dt} of width {ht}; use hidden_weight=0")
    return adapter


def _ids(source, tokenizer, what: str) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        ids = data.as_ids(source, what).flatten()
        if ids.numel() == 0:
            raise DataError(f"the {what} is empty")
        return ids
    if tokenizer is None:
        raise InvalidSetting(f"tokenizing the {what} needs a tokenizer: pass tokenizer=, a model folder, or "
                             "pre-tokenized ids")
    return data.tokenize(tokenizer, data.read_texts(source))


def split_data(text_ids: torch.Tensor, eval_ids: torch.Tensor | None, seq_len: int, eval_tokens: int,
               vocab: int | None = None):
    """(train windows [n, seq_len], held-out ids). Without ``eval_ids`` the end of the text is held out.
    ``vocab``: as :func:`pyshrink.data.windows`."""
    if eval_ids is None:
        n_windows = text_ids.numel() // seq_len
        n_eval = min(max(1, eval_tokens // seq_len), max(1, n_windows // 10))
        if n_windows < n_eval + 1:
            raise DataError(f"the healing text has {text_ids.numel()} tokens: at least {2 * seq_len} are needed "
                            f"(one {seq_len}-token window to train on and one held out); pass more text or eval_text")
        cut = (n_windows - n_eval) * seq_len
        text_ids, eval_ids = text_ids[:cut], text_ids[cut:cut + n_eval * seq_len]
    train = data.windows(text_ids, seq_len, what="healing text", vocab=vocab)
    held = data.windows(eval_ids, seq_len, eval_tokens, what="held-out evaluation text", vocab=vocab).flatten()
    return train, held


def _validate(cfg: HealConfig, eval_tokens: int):
    if not is_int(cfg.tokens) or cfg.tokens <= 0:
        raise InvalidSetting(f"tokens (the healing budget) must be a positive number of tokens, got {cfg.tokens!r}")
    check_range("lr", cfg.lr, 1e-12, 1.0)
    check_range("temperature", cfg.temperature, 1e-3, 100.0)
    check_range("alpha", cfg.alpha, 0.0, 1.0)
    check_range("hidden_weight", cfg.hidden_weight, 0.0, 1e6)
    if cfg.seq_len is not None:  # None: the student's default window, once it is loaded
        check_range("seq_len", cfg.seq_len, 2, 1 << 20, integer=True)
    check_range("batch_size", cfg.batch_size, 1, 4096, integer=True)
    check_range("grad_accum", cfg.grad_accum, 1, 1 << 16, integer=True)
    check_range("warmup", cfg.warmup, 0.0, 1.0)
    check_range("weight_decay", cfg.weight_decay, 0.0, 10.0)
    check_range("eval_tokens", eval_tokens, 2, 1 << 40, integer=True)
    if cfg.max_seconds is not None:
        check_range("max_seconds", cfg.max_seconds, 0.0, 1e9)
    if cfg.until_ppl is not None:
        check_range("until_ppl", cfg.until_ppl, 0.0, float("inf"))
    if cfg.eval_every is not None:
        check_range("eval_every", cfg.eval_every, 1, 1 << 62, integer=True)
    if cfg.teacher_topk is not None:
        check_range("teacher_topk", cfg.teacher_topk, 1, 1 << 24, integer=True)
        if cfg.hidden_weight > 0:  # the hidden-state loss needs the full teacher forward the cache saves
            raise InvalidSetting("teacher_topk caches the teacher's top logits, but hidden_weight > 0 needs its hidden "
                                 "states at every step: use one or the other")
    if cfg.max_grad_norm is not None:
        check_range("max_grad_norm", cfg.max_grad_norm, 0.0, 1e6)  # 0: no clipping
    check_range("data_offset", cfg.data_offset, 0, 1 << 62, integer=True)
    if cfg.schedule not in SCHEDULES:
        raise InvalidSetting(f"schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if cfg.trainable not in TRAINABLE:
        raise InvalidSetting(f"trainable must be one of {', '.join(TRAINABLE)}, got {cfg.trainable!r}")


def _check_out(out, *, resume: bool, overwrite: bool, sources=()) -> Path | None:
    """The run's output folder, checked without touching anything, before any model is loaded (``sources``: the
    student's and teacher's folders, which it must not overlap: --overwrite would delete them, or the run would
    write into a source). An existing output is refused unless the run resumes it or ``overwrite``."""
    if out is None:
        if resume:
            raise InvalidSetting("resume=True needs the output folder of the run to resume (out=)")
        return None
    out = models.check_output(out, sources=sources, exists_ok=True)  # resume / overwrite: decided here
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a folder")
    if out.exists() and not (resume or overwrite):
        raise FileExistsError(f"output {out} already exists (pass resume=True / --resume to continue the run in "
                              "it, or overwrite=True / --overwrite to start again)")
    return out


def _prepare_out(out, *, resume: bool, overwrite: bool, sources=()) -> Path | None:
    """:func:`_check_out`, then the folder made ready: checkpoints recovered for a resume, emptied for overwrite."""
    out = _check_out(out, resume=resume, overwrite=overwrite, sources=sources)
    if out is None:
        return None
    if resume and out.is_dir():
        ckpt.recover_checkpoints(out)
    if resume and not ckpt.has_resumable(out):
        raise InvalidSetting(f"nothing to resume in {out}: it holds no {ckpt.LAST}/{ckpt.STATE_FILE}, which a run "
                             "writes at its first evaluation; start the run without resume=True / --resume "
                             "(with overwrite=True / --overwrite if the folder exists)")
    if out.exists() and not resume:  # overwrite
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


# ---- the stage -------------------------------------------------------------------------------------------
def heal(student, teacher, text=None, *, tokenizer=None, tokens: int = 200_000, lr: float = 2e-4,
         temperature: float = 2.0, alpha: float = 0.5, hidden_weight: float = 0.0, seq_len: int | None = None,
         batch_size: int = 1, grad_accum: int = 4, schedule: str = "cosine", warmup: float = 0.05,
         weight_decay: float = 0.0, max_grad_norm: float = 1.0, trainable: str = "all", eval_text=None,
         eval_tokens: int = 8192, until_ppl: float | None = None, eval_every: int | None = None,
         max_seconds: float | None = None, out=None, resume: bool = False, overwrite: bool = False, seed: int = 0,
         gradient_checkpointing: bool = False, teacher_topk: int | None = None, teacher_cache=None,
         data_offset: int = 0, teacher_ppl: float | None = None, threads: int | None = None,
         progress: bool = True, plot: bool = True, callback=None, segment: tuple | None = None,
         optimizer_state: dict | None = None, fade=None) -> HealResult:
    """Distill ``teacher`` into the (smaller) ``student`` on ``text`` until it is as good, or the budget is spent.

    The loss is ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE`` (+ ``hidden_weight`` times the MSE
    of RMS-normalized hidden states of corresponding blocks). Only the student trains (AdamW, warm-up then
    ``schedule``, gradient clipping at ``max_grad_norm``); ``trainable="contracted"`` trains only the MLPs of the
    blocks narrower than the teacher's plus the norms. Every ``eval_every`` tokens (default: an eighth of the
    budget) the student's perplexity on held-out windows is measured (``eval_text``, or else the end of ``text``,
    at most ``eval_tokens`` tokens, never trained on); training stops once it is ``<= until_ppl`` (default: the
    teacher's perplexity on the same windows; 0 disables the early stop), when ``tokens`` training tokens are
    spent, or after ``max_seconds`` (of this call: a resumed run gets them again). The returned model holds the
    best weights seen. A student passed in memory is trained in place (``result.model`` is that object; pass a
    copy to keep it); the teacher is handed back unchanged.

    ``student``/``teacher``: model sources (folders, names), ``(model, tokenizer)`` pairs, a
    ``ContractionResult``, or models (then pass ``tokenizer=`` unless ``text`` is pre-tokenized ids).
    ``text``/``eval_text``: files, strings, or 1-D tensors of token ids. With ``out``, ``OUT/checkpoint-best``
    (the healed model), ``OUT/checkpoint-last`` (plus optimizer state, for ``resume=True``), ``OUT/heal.json``
    (settings, recovery curve) and ``OUT/curve.png`` are kept consistent even if the run is interrupted.

    ``teacher_topk=k`` distills from the teacher's k most likely tokens per position (plus a bucket for the
    rest), computed once per window and kept in ``teacher_cache`` (a :class:`~pyshrink.heal.teacher.TeacherCache`;
    pass the same one to several heals from the same teacher object so later ones skip its forward passes).
    Windows are visited in an order fixed by ``seed``; ``data_offset`` skips that many windows of it.
    ``teacher_ppl``: the teacher's perplexity on these held-out windows, if already known (skips measuring it).
    ``seq_len``: tokens per window (default 512, or the student's positions if fewer).
    ``callback(info)`` is called after every optimizer step with the step, tokens seen and loss parts.

    ``segment=(start, stop)`` trains only the part of a ``tokens``-token run between ``start`` and ``stop`` tokens
    (its warm-up, learning-rate schedule and data order are the whole run's), starting from ``optimizer_state``
    (``{parameter name: AdamW state}``, e.g. the previous segment's ``result.optimizer_state``); the result
    carries the optimizer state on, and a segment that ends before the run does leaves the current weights, not
    the best. This is how ``iterative_contract(heal_schedule="continuous")`` heals across its cuts.

    ``fade``: a :class:`~pyshrink.heal.fade.Fade` on the student, whose factor falls from 1 to 0 over the
    segment's steps (:func:`~pyshrink.heal.fade.fade_factor`); it needs a segment that ends before the run (the
    caller cuts the faded neurons there and goes on) and ``until_ppl=0`` (no early stop inside a fade). The student counts as its size after that cut, and
    ``trainable="contracted"`` trains the fading blocks too (``iterative_contract(heal_schedule="fade")``).
    """
    cfg = HealConfig(tokens=tokens, lr=lr, temperature=temperature, alpha=alpha, hidden_weight=hidden_weight,
                     seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, schedule=schedule, warmup=warmup,
                     weight_decay=weight_decay, max_grad_norm=max_grad_norm, trainable=trainable,
                     eval_every=eval_every, until_ppl=until_ppl, max_seconds=max_seconds, seed=seed,
                     gradient_checkpointing=gradient_checkpointing, data_offset=data_offset,
                     teacher_topk=teacher_topk if teacher_topk is not None or teacher_cache is None else teacher_cache.k)
    if teacher_cache is not None and cfg.teacher_topk != teacher_cache.k:
        raise InvalidSetting(f"teacher_topk={cfg.teacher_topk} but the teacher_cache keeps top-{teacher_cache.k}")
    _validate(cfg, eval_tokens)
    if segment is not None:
        _check_segment(segment, cfg.tokens, resume)
    elif optimizer_state is not None:
        raise InvalidSetting("optimizer_state continues a run: it needs segment=(start, stop)")
    if text is None:
        raise DataError("healing needs text to train on (text=...)")
    _check_out(out, resume=resume, overwrite=overwrite, sources=(student, teacher))  # before loading anything
    s_model, s_tok, s_src = _resolve(student, "student")
    t_model, t_tok, t_src = _resolve(teacher, "teacher")
    if fade is not None and fade.model is not s_model:
        raise InvalidSetting("the fade's hooks are on another model than the student")
    adapter = check_pair(s_model, t_model, s_tok, t_tok, hidden_weight=hidden_weight,
                         pending=fade.removed_params() if fade is not None else 0)
    seq_len = cfg.seq_len = models.window_length(s_model, seq_len)
    if fade is not None:  # its steps are counted in windows of seq_len
        _check_fade(fade, segment, cfg)
    tok = tokenizer or s_tok or t_tok
    train, held = split_data(_ids(text, tok, "healing text"),
                             None if eval_text is None else _ids(eval_text, tok, "held-out evaluation text"),
                             seq_len, eval_tokens, models.id_limit(s_model))
    metadata = {k: v for k, v in (models.read_metadata(s_src) if s_src and Path(s_src).is_dir() else {}).items()
                if k not in ("transforms", "pyshrink_version", "heal")}
    # what trains is decided now, so that a choice that selects nothing fails before --overwrite empties `out`
    TRAINABLE[trainable](s_model, t_model, adapter, fading=fade.blocks if fade is not None else ())
    out = _prepare_out(out, resume=resume, overwrite=overwrite, sources=(s_src, t_src))
    metadata["healed_from"] = {"student": s_src, "teacher": t_src}
    old_threads = torch.get_num_threads()
    t_flags = {p: p.requires_grad for p in t_model.parameters()}
    t_training = t_model.training
    trainer = None
    try:
        if threads:
            torch.set_num_threads(threads)
        t_model.eval()
        t_model.requires_grad_(False)
        trainer = Trainer(s_model, t_model, tok, train, held, cfg, adapter, out=out, metadata=metadata,
                          progress=progress, callback=callback, teacher_cache=teacher_cache, fade=fade)
        if resume:
            trainer.resume_from(out / ckpt.LAST)
        elif teacher_ppl is not None:
            trainer.state.teacher_ppl = float(teacher_ppl)
        stop = None
        if segment is not None:
            start, stop = (cfg.step_at(t) for t in segment)
            trainer.state.step, trainer.state.tokens_seen = start, start * cfg.tokens_per_step
            if optimizer_state:
                trainer.load_named_optimizer_state(optimizer_state)
        state = trainer.run(stop_step=stop)
    except KeyboardInterrupt:  # the folder keeps heal.json and both checkpoints; the plot of the curve so far too
        if out is not None and plot and trainer is not None and trainer.state.curve:
            _plot(out, trainer.state, trainer.report(), stopped="interrupted")
        raise
    finally:
        torch.set_num_threads(old_threads)
        t_model.train(t_training)
        for p, flag in t_flags.items():
            p.requires_grad_(flag)
    report = trainer.report()
    if out is not None and plot:
        _plot(out, state, report, stopped=state.stopped)
    return HealResult(model=s_model, tokenizer=tok, out=out, stopped=state.stopped, ppl_initial=report["ppl_initial"],
                      ppl_best=state.best_ppl, ppl_teacher=state.teacher_ppl, until_ppl=state.until_ppl,
                      tokens_seen=state.tokens_seen, best_tokens=state.best_tokens, steps=state.step,
                      seconds=round(state.seconds, 2), train_tokens_per_s=report["train_tokens_per_s"],
                      curve=list(state.curve), config=dict(state.config),
                      optimizer_state=trainer.named_optimizer_state() if segment is not None else None)


def _plot(out: Path, state, report: dict, *, stopped) -> None:
    plot_curve(out / "curve.png", {"student": state.curve},
               reference={"teacher": state.teacher_ppl, "target": state.until_ppl
                          if state.until_ppl != state.teacher_ppl else None},
               title=f"healing: {report['tokens_seen']:,} tokens, stopped: {stopped}")


def _check_segment(segment, tokens: int, resume: bool) -> None:
    ok = isinstance(segment, (tuple, list)) and len(segment) == 2 and all(is_int(t) for t in segment)
    if not ok or not 0 <= segment[0] <= segment[1] <= tokens:
        raise InvalidSetting(f"segment must be (start, stop) tokens with 0 <= start <= stop <= tokens ({tokens}), "
                             f"got {segment!r}")
    if resume:
        raise InvalidSetting("resume=True continues a run from its folder; a segment continues one in memory: "
                             "pass one or the other")


def _check_fade(fade, segment, cfg: HealConfig) -> None:
    if segment is None:
        raise InvalidSetting("fade= fades neurons over a segment of a run and is cut at its end: it needs "
                             "segment=(start, stop)")
    start, stop = (cfg.step_at(t) for t in segment)
    if stop <= start:
        raise InvalidSetting(f"the fade's segment {tuple(segment)} spans no optimizer step ({cfg.tokens_per_step} "
                             "tokens each): give it more tokens")
    if stop >= cfg.total_steps:
        raise InvalidSetting(f"the fade's segment {tuple(segment)} ends with the run ({cfg.tokens} tokens): the faded "
                             "neurons are cut at its end, so the run must go on after it (the best checkpoint is "
                             "kept among the cut model's)")
    if not fade.active:
        raise InvalidSetting("the fade was already cut or removed")
    if cfg.until_ppl != 0 or cfg.max_seconds is not None:
        # a fade stopped early would leave neurons half faded, which cannot be cut without a jump
        raise InvalidSetting("a fade runs to its segment's end: pass until_ppl=0 and no max_seconds (the early stop "
                             "belongs to the training of the cut model after it)")


def heal_in_place(model, tokenizer, *, teacher, text, tokens: int | None, **kwargs) -> dict | None:
    """Heal ``model`` (in memory, in place) from ``teacher`` on ``text``; the hook of ``contract(heal_tokens=N)``.

    Returns the heal summary (recovery curve included), or None when ``tokens`` is None or 0 (no healing).
    ``text`` is the contraction's calibration text; without one there is nothing to heal on.
    """
    if tokens is None or tokens == 0:
        return None
    if text is None:
        raise DataError("heal_tokens needs text to heal on: pass calibration=... (the calibration text is reused)")
    kwargs.setdefault("progress", False)
    return heal((model, tokenizer), teacher, text, tokens=tokens, **kwargs).summary
