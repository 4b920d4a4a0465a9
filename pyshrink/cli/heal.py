"""``pyshrink heal STUDENT --teacher SOURCE --text FILE -o OUT``: distill a contracted model from its source.

(The iterative contract-heal schedule is ``pyshrink contract ... --heal-tokens N --steps K``.)"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .. import jsonio


def register(app: typer.Typer) -> None:
    @app.command("heal")
    def heal_cmd(
        student: str = typer.Argument(..., help="The contracted model (folder written by `pyshrink contract`)."),
        teacher: str = typer.Option(..., "--teacher", help="The model it was contracted from (folder, .gguf, name)."),
        text: List[Path] = typer.Option(..., "--text", exists=True, dir_okay=False, readable=True, help="Text file(s) to heal on."),
        out: Path = typer.Option(..., "-o", "--out", help="Run folder: checkpoint-best/ (the healed model), "
                                 "checkpoint-last/, heal.json, curve.png."),
        tokens: int = typer.Option(200_000, help="Training-token budget (rounded up to whole optimizer steps of "
                                   "batch size x accumulation x window)."),
        until_ppl: Optional[float] = typer.Option(None, "--until-ppl", help="Stop once held-out perplexity is at or "
                                                  "below this (default: the teacher's; 0 never stops early)."),
        lr: float = typer.Option(2e-4, help="Peak learning rate (AdamW, warm-up then cosine decay)."),
        temperature: float = typer.Option(2.0, help="Softening temperature of the distillation term."),
        alpha: float = typer.Option(0.5, help="Weight of distillation against plain next-token loss (0..1)."),
        hidden_weight: float = typer.Option(0.0, help="Weight of hidden-state matching (MSE, normalized)."),
        eval_text: Optional[List[Path]] = typer.Option(None, "--eval-text", exists=True, dir_okay=False, readable=True, help="Held-out text (default: the "
                                                        "end of --text, never trained on)."),
        eval_tokens: int = typer.Option(8192, help="Held-out tokens measured at each evaluation, at most (without "
                                        "--eval-text, at most a tenth of the text is held out; heal.json records "
                                        "held_out_tokens)."),
        eval_every: Optional[int] = typer.Option(None, help="Evaluate and checkpoint every N training tokens "
                                                 "(default: an eighth of the budget)."),
        seq_len: Optional[int] = typer.Option(None, help="Window length in tokens; default 512, or the model's "
                                              "position limit if that is shorter."),
        batch_size: int = typer.Option(1, help="Windows per forward pass."),
        grad_accum: int = typer.Option(4, help="Forward passes per optimizer step."),
        trainable: str = typer.Option("all", help="Which weights train: all, or contracted (MLPs of contracted "
                                      "blocks and norms)."),
        max_minutes: Optional[float] = typer.Option(None, help="Stop (and keep the best) after this much time in this invocation (--resume gets it again)."),
        seed: int = typer.Option(0, help="Seed of the window order."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in OUT from checkpoint-last."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ):
        """Recover a contracted model's quality by distillation from its source; keeps the best checkpoint."""
        from ..errors import check_range
        from ..heal import heal

        if max_minutes is not None:  # checked here: heal() takes seconds, and would name max_seconds
            check_range("--max-minutes", max_minutes, 0.0, 1e9 / 60)
        result = heal(student, teacher, text, tokens=tokens, until_ppl=until_ppl, lr=lr, temperature=temperature,
                      alpha=alpha, hidden_weight=hidden_weight, eval_text=eval_text or None, eval_tokens=eval_tokens,
                      eval_every=eval_every, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum,
                      trainable=trainable, max_seconds=None if max_minutes is None else 60 * max_minutes, seed=seed,
                      out=out, resume=resume, overwrite=overwrite, progress=not as_json)
        if as_json:
            typer.echo(jsonio.dumps(result.summary))
            return
        typer.echo(f"healed model: {result.path}")
        typer.echo(f"held-out perplexity: {result.ppl_initial:.3f} -> {result.ppl_best:.3f} "
                   f"(teacher {result.ppl_teacher:.3f}; target {result.until_ppl:.3f} "
                   f"{'reached' if result.reached else 'not reached'})")
        typer.echo(f"{result.tokens_seen:,} tokens in {result.seconds:.0f} s "
                   f"({result.train_tokens_per_s or 0:.0f} training tokens/s), stopped: {result.stopped}")
        typer.echo(f"recovery curve: {result.out / 'heal.json'}")
