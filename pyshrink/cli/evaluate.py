"""``pyshrink eval MODEL --text FILE``: perplexity of a model on a text."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .. import jsonio


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        model: str = typer.Argument(..., help="Model folder, .gguf file, hub id or embedded name (smollm2-135m)."),
        text: List[Path] = typer.Option(..., "--text", exists=True, dir_okay=False, readable=True, help="Text file(s) to measure perplexity on."),
        seq_len: Optional[int] = typer.Option(None, help="Window length in tokens (non-overlapping windows); default "
                                              "512, or the model's position limit if that is shorter."),
        max_tokens: Optional[int] = typer.Option(None, help="Use at most this many tokens of the text."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ):
        """Perplexity of MODEL on the given text."""
        from .. import data
        from ..evaluate import perplexity
        from ..models import load_model, window_length

        m, tok = load_model(model)
        seq_len = window_length(m, seq_len)
        ppl = perplexity(m, ids=data.tokenize(tok, data.read_texts(text)), seq_len=seq_len, max_tokens=max_tokens)
        if as_json:
            typer.echo(jsonio.dumps({"model": model, "perplexity": ppl, "seq_len": seq_len}))
        else:
            typer.echo(f"perplexity of {model}: {ppl:.3f} ({seq_len}-token windows)")
