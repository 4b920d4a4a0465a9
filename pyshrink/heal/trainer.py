"""The healing loop: AdamW on the student, a frozen teacher, held-out perplexity at intervals, checkpoints.

One optimizer step sees ``batch_size * grad_accum`` windows of ``seq_len`` tokens. The windows come in a
deterministic order (a seeded permutation per epoch), so the data a step sees depends only on the seed and
the step number: that is what makes ``resume`` reproduce an uninterrupted run exactly.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..evaluate import perplexity
from . import checkpoint as ckpt
from .fade import fade_factor
from .losses import distillation_loss


@dataclass
class HealConfig:
    tokens: int = 200_000
    lr: float = 2e-4
    temperature: float = 2.0
    alpha: float = 0.5
    hidden_weight: float = 0.0
    seq_len: int = 512
    batch_size: int = 1
    grad_accum: int = 4
    schedule: str = "cosine"
    warmup: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    trainable: str = "all"
    eval_every: int | None = None
    until_ppl: float | None = None
    max_seconds: float | None = None
    seed: int = 0
    gradient_checkpointing: bool = False
    teacher_topk: int | None = None
    data_offset: int = 0  # windows of the seeded order to skip (the slices of a schedule continue the data)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    @property
    def total_steps(self) -> int:
        return max(1, math.ceil(self.tokens / self.tokens_per_step))

    def step_at(self, tokens: int) -> int:
        """The optimizer step at which ``tokens`` training tokens have been seen (the budget's end: the last)."""
        return self.total_steps if tokens >= self.tokens else round(tokens / self.tokens_per_step)

    @property
    def eval_every_steps(self) -> int:
        every = self.eval_every or max(self.tokens // 8, 1)
        return max(1, round(every / self.tokens_per_step))

    # settings that must not change between a run and its resumption (they decide data and updates)
    RESUME_KEYS = ("lr", "temperature", "alpha", "hidden_weight", "seq_len", "batch_size", "grad_accum", "schedule",
                   "warmup", "weight_decay", "max_grad_norm", "trainable", "seed", "teacher_topk", "data_offset")


# ---- learning-rate schedules: fraction of the peak rate after warm-up, progress in [0, 1] -------------------
SCHEDULES = {
    "cosine": lambda progress: 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)),
    "linear": lambda progress: 1.0 - 0.9 * progress,
    "constant": lambda progress: 1.0,
}


def lr_at(cfg: HealConfig, step: int, extension: list | None = None) -> float:
    """The learning rate of optimizer step ``step``. ``extension``: ``[step e, fraction f of the peak there]``
    when a resumed run changed the budget: from step e on, the rate decays from f to the schedule's floor
    over the new remaining steps with the schedule's shape (no jump back up, no second warm-up)."""
    if extension is not None and step >= extension[0]:
        start, f0 = extension
        shape = SCHEDULES[cfg.schedule]
        floor, top = shape(1.0), shape(0.0)
        if top == floor:  # constant
            return cfg.lr * f0
        p = min(1.0, (step - start) / max(1, cfg.total_steps - start))
        return cfg.lr * (floor + (f0 - floor) * (shape(p) - floor) / (top - floor))
    warm = max(1, round(cfg.warmup * cfg.total_steps)) if cfg.warmup > 0 else 0
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.total_steps - warm)
    return cfg.lr * SCHEDULES[cfg.schedule](min(1.0, progress))


# ---- which student parameters train --------------------------------------------------------------------
def _is_norm(module) -> bool:
    return "norm" in type(module).__name__.lower()


def _all_params(student, teacher, adapter, fading=()):
    return list(student.parameters())


def _contracted_params(student, teacher, adapter, fading=()):
    """MLP projections of the blocks narrower than the teacher's or being faded (``fading``: their indices; a
    fade's blocks are still as wide as the teacher's until it cuts them), plus every norm's weights."""
    chosen = []
    for i, (sb, tb) in enumerate(zip(adapter.blocks(student), adapter.blocks(teacher))):
        if adapter.mlp_width(sb) < adapter.mlp_width(tb) or i in fading:
            for m in adapter.mlp_in_modules(sb) + [adapter.mlp_out_module(sb)]:
                chosen += list(m.parameters())
    if not chosen:
        from ..errors import InvalidSetting
        raise InvalidSetting("trainable='contracted' found no block whose MLP is narrower than the teacher's; "
                             "use trainable='all'")
    for m in student.modules():
        if _is_norm(m):
            chosen += list(m.parameters(recurse=False))
    return chosen


TRAINABLE = {"all": _all_params, "contracted": _contracted_params}


# ---- data order ------------------------------------------------------------------------------------------
class WindowOrder:
    """Global window position -> window index: epoch ``e`` visits the windows in ``randperm(n, seed + e)``."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return self._perms[epoch]

    def take(self, start: int, count: int) -> torch.Tensor:
        return torch.stack([self._perm(g // self.n)[g % self.n] for g in range(start, start + count)])


# ---- the run ---------------------------------------------------------------------------------------------
@dataclass
class RunState:
    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0  # forward/backward/update time, for tokens/s
    seconds: float = 0.0  # wall time including evaluation and checkpoints
    curve: list = field(default_factory=list)  # [{"tokens", "step", "ppl", "loss", "seconds"}]
    best_ppl: float = math.inf
    best_step: int = -1
    best_tokens: int = 0
    teacher_ppl: float | None = None
    until_ppl: float | None = None
    stopped: str | None = None
    config: dict = field(default_factory=dict)
    lr_extension: list | None = None  # see lr_at: set when a resumed run changed the token budget
    # what a resumed run must see again (see data_digest, teacher_digest); None in checkpoints from before them
    data_digest: str | None = None
    teacher_digest: str | None = None


def data_digest(train_windows: torch.Tensor, eval_ids: torch.Tensor) -> str:
    """sha256 of the training windows and the held-out ids: a resumed run on other text would mix perplexities
    of two held-out sets in one curve and keep a best checkpoint chosen on the other."""
    h = hashlib.sha256()
    for t in (train_windows, eval_ids):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to(torch.int64).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def teacher_digest(teacher) -> str:
    """sha256 over every parameter's name and shape and 64 of its values, evenly spaced: tells another teacher
    (whose restored perplexity and early-stop target would be stale) from the same one without reading all of
    its weights."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            flat = p.detach().reshape(-1)
            k = min(64, flat.numel())  # integer steps: a float32 linspace rounds n - 1 up to n above 2^24
            idx = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)
            h.update(f"{name}{tuple(p.shape)}".encode())
            h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()


class Trainer:
    def __init__(self, student, teacher, tokenizer, train_windows: torch.Tensor, eval_ids: torch.Tensor,
                 cfg: HealConfig, adapter, *, out: Path | None = None, metadata: dict | None = None,
                 progress: bool = True, callback=None, eval_batch_size: int = 4, teacher_cache=None, fade=None):
        self.student, self.teacher, self.tokenizer = student, teacher, tokenizer
        self.train_windows, self.eval_ids, self.cfg, self.adapter = train_windows, eval_ids, cfg, adapter
        self.out, self.metadata, self.progress, self.callback = out, dict(metadata or {}), progress, callback
        self.eval_batch_size = eval_batch_size
        if cfg.teacher_topk and teacher_cache is None:
            from .teacher import TeacherCache
            teacher_cache = TeacherCache(cfg.teacher_topk)
        self.cache = teacher_cache if cfg.teacher_topk else None
        self.device = next(student.parameters()).device
        self.teacher_device = next(teacher.parameters()).device
        self.order = WindowOrder(len(train_windows), cfg.seed)
        self.state = RunState(config=asdict(cfg), data_digest=data_digest(train_windows, eval_ids),
                              teacher_digest=teacher_digest(teacher))
        self.best_weights = None  # in-memory copy when there is no output folder
        self.resumed_rng = None  # the random state of a checkpoint being resumed
        self.last_loss = math.nan
        # a fade (:class:`~pyshrink.heal.fade.Fade`) ramps its factor from 1 to 0 over the steps of run()
        self.fade, self.fade_steps = fade, None
        self.params = TRAINABLE[cfg.trainable](student, teacher, adapter, fading=fade.blocks if fade else ())
        self.optimizer = self._make_optimizer()

    def _make_optimizer(self):
        ids = {id(p) for p in self.params}
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        assert len(ids) == len({id(p) for p in decay + no_decay})
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.cfg.lr, betas=(0.9, 0.95), eps=1e-8)

    # ---- optimizer state by parameter name (what the continuous schedule carries across a contraction) -----
    def named_optimizer_state(self) -> dict:
        """``{parameter name: AdamW state}`` of the trainable parameters that have taken a step."""
        names = {id(p): n for n, p in self.student.named_parameters()}
        return {names[id(p)]: dict(self.optimizer.state[p]) for p in self.params if p in self.optimizer.state}

    def load_named_optimizer_state(self, named: dict) -> None:
        """Start the optimizer from ``named`` (as :meth:`named_optimizer_state` returns it, shapes already matching
        this student); trainable parameters it does not name start fresh, names of frozen parameters are ignored."""
        params = dict(self.student.named_parameters())
        trainable = {id(p) for p in self.params}
        for name, st in named.items():
            p = params.get(name)
            if p is None or id(p) not in trainable:
                continue
            bad = [k for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0 and v.shape != p.shape]
            if bad:
                raise ValueError(f"optimizer state {bad} of {name} has shape {tuple(st[bad[0]].shape)}, the parameter "
                                 f"{tuple(p.shape)}: slice the state with the kept indices first")
            self.optimizer.state[p] = {k: v.to(p.device) if torch.is_tensor(v) else v for k, v in st.items()}

    # ---- evaluation and checkpoints -----------------------------------------------------------------------
    def evaluate(self, model) -> float:
        was_training = model.training
        model.eval()
        try:
            return perplexity(model, ids=self.eval_ids, seq_len=self.cfg.seq_len,
                              batch_size=self.eval_batch_size, progress=False)
        finally:
            model.train(was_training)

    def _meta(self) -> dict:
        s = self.state
        heal = {"step": s.step, "tokens_seen": s.tokens_seen, "held_out_ppl": s.curve[-1]["ppl"] if s.curve else None,
                "teacher_ppl": s.teacher_ppl, "config": s.config}
        return {**self.metadata, "heal": heal}

    def _save_best(self):
        if self.out is not None:
            ckpt.save_checkpoint(self.out / ckpt.BEST, self.student, self.tokenizer, metadata=self._meta())
        else:
            # on the CPU: a GPU copy would double the student's device memory next to the teacher and AdamW
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in self.student.state_dict().items()}

    def _save_last(self, rng: dict | None = None):
        if self.out is None:
            return
        ckpt.save_checkpoint(self.out / ckpt.LAST, self.student, self.tokenizer, metadata=self._meta(),
                             state=asdict(self.state), optimizer=self.optimizer, rng=rng)
        self._write_report()

    def _write_report(self):
        if self.out is not None:
            ckpt.write_json_atomic(self.out / ckpt.REPORT_FILE, self.report())

    def report(self) -> dict:
        s = self.state
        return {
            "stopped": s.stopped, "step": s.step, "total_steps": self.cfg.total_steps, "tokens_seen": s.tokens_seen,
            "ppl_initial": s.curve[0]["ppl"] if s.curve else None, "ppl_best": s.best_ppl if s.curve else None,
            "best_tokens": s.best_tokens, "best_step": s.best_step, "ppl_teacher": s.teacher_ppl,
            "until_ppl": s.until_ppl, "seconds": round(s.seconds, 2),
            # what each evaluation measured (eval_tokens is an upper bound: without eval_text at most a tenth of the
            # text is held out) and trained on
            "held_out_tokens": int(self.eval_ids.numel()), "train_windows": int(len(self.train_windows)),
            "train_tokens_per_s": round(s.tokens_seen / s.train_seconds, 1) if s.train_seconds else None,
            "curve": s.curve, "config": s.config,
        }

    def _record_eval(self, ppl: float) -> bool:
        """Add a curve point, keep the best checkpoint; True when the target perplexity is reached."""
        s = self.state
        s.curve.append({"tokens": s.tokens_seen, "step": s.step, "ppl": ppl,
                        "loss": None if math.isnan(self.last_loss) else self.last_loss, "seconds": round(s.seconds, 2)})
        if ppl < s.best_ppl:
            s.best_ppl, s.best_step, s.best_tokens = ppl, s.step, s.tokens_seen
            self._save_best()
        return s.until_ppl is not None and ppl <= s.until_ppl

    # ---- resume ------------------------------------------------------------------------------------------
    def resume_from(self, folder: Path):
        from ..errors import InvalidSetting

        state, blob = ckpt.load_state(folder)
        saved = state.get("config", {})
        changed = [k for k in HealConfig.RESUME_KEYS if k in saved and saved[k] != getattr(self.cfg, k)]
        if changed:
            raise InvalidSetting("cannot resume with different settings: " + ", ".join(
                f"{k} was {saved[k]!r}, now {getattr(self.cfg, k)!r}" for k in changed))
        for key, what in (("data_digest", "training or held-out text (--text, --eval-text, --eval-tokens)"),
                          ("teacher_digest", "teacher")):
            if state.get(key) is not None and state[key] != getattr(self.state, key):
                raise InvalidSetting(f"cannot resume with a different {what} than the interrupted run's: its curve, "
                                     "best checkpoint and early-stop target were measured with the old one; resume "
                                     "with the same, or start a new run")
        ckpt.load_weights(self.student, folder)
        try:
            self.optimizer.load_state_dict(blob["optimizer"])
        except (ValueError, KeyError) as exc:
            raise ckpt.CheckpointError(f"the optimizer state in {folder} does not fit this student: {exc}") from exc
        self.resumed_rng = blob  # restored when run() starts
        fields = RunState.__dataclass_fields__
        now = self.state
        self.state = RunState(**{k: v for k, v in state.items() if k in fields})
        self.state.data_digest, self.state.teacher_digest = now.data_digest, now.teacher_digest
        if "tokens" in saved and saved["tokens"] != self.cfg.tokens:
            # a new budget: decay from the rate the old schedule had reached instead of jumping to the new one's
            old = replace(self.cfg, tokens=saved["tokens"])
            lr_then = lr_at(old, self.state.step, self.state.lr_extension)
            self.state.lr_extension = [self.state.step, lr_then / self.cfg.lr]
        self.state.config = asdict(self.cfg)
        self.state.stopped = None
        if self.state.curve:
            self.last_loss = self.state.curve[-1]["loss"] or math.nan

    # ---- training ----------------------------------------------------------------------------------------
    def _micro_step(self, batch: torch.Tensor) -> dict:
        cfg = self.cfg
        want_hidden = cfg.hidden_weight > 0
        teacher_out = None
        if self.cache is not None and cfg.alpha > 0 and not want_hidden:
            teacher_out = self.cache.targets(self.teacher, batch, cfg.temperature)
        elif cfg.alpha > 0 or want_hidden:
            with torch.no_grad():
                teacher_out = self.teacher(input_ids=batch.to(self.teacher_device), use_cache=False,
                                           output_hidden_states=want_hidden)
        student_out = self.student(input_ids=batch, use_cache=False, output_hidden_states=want_hidden)
        loss, parts = distillation_loss(student_out, teacher_out, batch, temperature=cfg.temperature,
                                        alpha=cfg.alpha, hidden_weight=cfg.hidden_weight)
        (loss / cfg.grad_accum).backward()
        return parts

    def _train_step(self) -> dict:
        cfg, s = self.cfg, self.state
        lr = lr_at(cfg, s.step, s.lr_extension)
        if self.fade is not None:
            self.fade.set_factor(fade_factor(s.step, *self.fade_steps))
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict = {}
        for a in range(cfg.grad_accum):
            idx = self.order.take(cfg.data_offset + (s.step * cfg.grad_accum + a) * cfg.batch_size, cfg.batch_size)
            parts = self._micro_step(self.train_windows[idx].to(self.device))
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
        if cfg.max_grad_norm and cfg.max_grad_norm > 0:
            totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        s.step += 1
        s.tokens_seen += cfg.tokens_per_step
        totals["lr"] = lr
        return totals

    def run(self, stop_step: int | None = None) -> RunState:
        """Train until the budget's end (or ``stop_step``, a segment's end: then the run is meant to go on, so the
        current weights are left in the student, not the best ones, and ``stopped`` is ``"segment"``)."""
        cfg, s = self.cfg, self.state
        end = cfg.total_steps if stop_step is None else min(stop_step, cfg.total_steps)
        at_end = "budget" if end == cfg.total_steps else "segment"
        if self.fade is not None:  # the fade spans this run's steps: its factor reaches 0 in the last one
            self.fade_steps = (s.step, end)
        started = time.perf_counter()
        base_seconds = s.seconds

        def tick():
            s.seconds = base_seconds + time.perf_counter() - started

        if s.teacher_ppl is None:
            s.teacher_ppl = self.evaluate(self.teacher)
        s.until_ppl = cfg.until_ppl if cfg.until_ppl is not None else s.teacher_ppl
        if not s.curve:  # the starting point of the recovery curve, and the first "best"
            tick()
            self._record_eval(self.evaluate(self.student))
            self._write_report()
        if s.curve[-1]["ppl"] <= s.until_ppl:
            s.stopped = "until_ppl"
        trainable = {id(p) for p in self.params}
        flags = {p: p.requires_grad for p in self.student.parameters()}
        for p in self.student.parameters():
            p.requires_grad_(id(p) in trainable)
        self.student.train()
        if cfg.gradient_checkpointing:
            self.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        bar = tqdm(total=cfg.total_steps * cfg.tokens_per_step, initial=s.tokens_seen, unit="tok", unit_scale=True,
                   desc="heal", disable=not self.progress, dynamic_ncols=True)
        # Dropout (GPT-2, OPT, Phi train with it) draws from the global generators: seed them for this run so
        # that a seed repeats a run and a resumed run draws what the uninterrupted one did; the caller's
        # generators are given back afterwards.
        outer_rng = ckpt.rng_state()
        if self.resumed_rng is not None:
            ckpt.restore_rng(self.resumed_rng)
            self.resumed_rng = None
        else:
            torch.manual_seed(cfg.seed + s.step)
        # What a resume from the last completed step must draw next: the generators' state after that step
        # (evaluation, in eval mode, draws nothing). Taken after each step, not before it, so that an interrupt
        # between a step's end and the next step's start (in the callback, an evaluation or a checkpoint write)
        # saves the state that goes with the saved weights.
        step_rng = ckpt.rng_state()
        last_saved = s.step

        def eval_and_save(over_time: bool = False):
            nonlocal last_saved
            reached = self._record_eval(self.evaluate(self.student))
            tick()
            # the last step is the end of the budget even when the time ran out during it ("time" says a resume
            # would train on)
            s.stopped = "until_ppl" if reached else at_end if s.step == end else "time" if over_time else None
            self._save_last()
            last_saved = s.step

        def eval_due(over_time: bool = False) -> bool:
            return s.step % cfg.eval_every_steps == 0 or s.step == end or over_time

        try:
            if s.stopped is None and s.step > 0 and eval_due() and s.curve[-1]["step"] < s.step:
                # interrupted after an evaluation step's training, before its evaluation was recorded: evaluate
                # it now, as the uninterrupted run did (its curve point, best checkpoint and early stop)
                eval_and_save()
            while s.stopped is None and s.step < end:
                t0 = time.perf_counter()
                parts = self._train_step()
                step_rng = ckpt.rng_state()
                s.train_seconds += time.perf_counter() - t0
                self.last_loss = parts["loss"]
                tick()
                bar.update(cfg.tokens_per_step)
                bar.set_postfix(loss=f"{parts['loss']:.3f}", tok_s=f"{s.tokens_seen / max(s.train_seconds, 1e-9):.0f}",
                                ppl=f"{s.curve[-1]['ppl']:.2f}", refresh=False)
                if self.callback is not None:
                    self.callback({"step": s.step, "tokens_seen": s.tokens_seen, **parts})
                # per invocation: a resumed run gets max_seconds again (the total would stop it at once)
                over_time = cfg.max_seconds is not None and time.perf_counter() - started >= cfg.max_seconds
                if eval_due(over_time):
                    eval_and_save(over_time)
                    bar.set_postfix(loss=f"{parts['loss']:.3f}", ppl=f"{s.curve[-1]['ppl']:.2f}")
            if s.stopped is None:
                s.stopped = at_end
            if s.step != last_saved:
                self._save_last()
        except KeyboardInterrupt:
            # the weights are those after the last *completed* step (a partial accumulation is discarded)
            s.stopped = "interrupted"
            tick()
            if s.step != last_saved:
                self._save_last(rng=step_rng)
            else:
                self._write_report()
            raise
        finally:
            ckpt.restore_rng(outer_rng)
            bar.close()
            if cfg.gradient_checkpointing:
                self.student.gradient_checkpointing_disable()
            self.student.eval()
            for p, flag in flags.items():
                p.requires_grad_(flag)
            self.optimizer.zero_grad(set_to_none=True)
        if end == cfg.total_steps:  # a segment's end keeps the weights the optimizer state belongs to
            self._restore_best()
        tick()
        self._write_report()
        return s

    def _restore_best(self):
        """Leave the best weights (by held-out perplexity) in the student."""
        s = self.state
        if s.best_step == s.step:
            return
        if self.best_weights is not None:
            self.student.load_state_dict(self.best_weights, strict=False)
        elif self.out is not None and (self.out / ckpt.BEST).is_dir():
            ckpt.load_weights(self.student, self.out / ckpt.BEST)
