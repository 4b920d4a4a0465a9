"""``pyshrink bench MODEL [MODEL ...]``: prefill and decode latency, tokens/s, peak memory, size on disk."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench_cmd(
        models: List[str] = typer.Argument(..., help="Model sources (torch) and/or `pyshrink export` folders (onnxruntime)."),
        runtime: str = typer.Option("both", "--runtime", help="torch, onnxruntime, or both (exports non-ONNX models "
                                    "on the fly)."),
        prompt_tokens: int = typer.Option(128, "--prompt-tokens", help="Prompt length (random tokens)."),
        new_tokens: int = typer.Option(64, "--new-tokens", help="Tokens generated per repeat (greedy)."),
        threads: Optional[int] = typer.Option(None, "--threads", help="Threads for every runtime (default: theirs)."),
        repeats: int = typer.Option(3, "--repeats", help="Timed repeats after one warm-up."),
        int4: bool = typer.Option(False, "--int4", help="On-the-fly exports (--runtime both) with 4-bit weights."),
        compile: bool = typer.Option(False, "--compile", help="PyTorch rows: static KV cache, q|k|v and gate|up fused "
                                     "(Llama-family; not GPT-2, OPT, Phi), decode step through torch.compile "
                                     "(compile time reported apart)."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the rows as JSON here."),
        chart_out: Optional[Path] = typer.Option(None, "--chart", help="Write a PNG bar chart here (needs matplotlib)."),
    ):
        """Benchmark MODELs at batch 1: each in a fresh process; prints a Markdown table."""
        from ..benchmark import bench, chart, markdown_table

        rows = bench(models, runtime=runtime, prompt_tokens=prompt_tokens, new_tokens=new_tokens, threads=threads,
                     repeats=repeats, int4=int4, compile=compile, progress=lambda m: typer.echo(m, err=True))
        typer.echo(markdown_table(rows))
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(rows, indent=2))
        if chart_out is not None:
            if chart(rows, chart_out) is None:
                typer.echo("matplotlib is not installed (pip install matplotlib): no chart written", err=True)
            else:
                typer.echo(f"chart: {chart_out}", err=True)
        if any("error" in r for r in rows):
            raise typer.Exit(1)
