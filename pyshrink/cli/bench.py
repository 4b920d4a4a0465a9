"""``pyshrink bench MODEL [MODEL ...]``: prefill and decode latency, tokens/s, peak memory, size on disk."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .. import jsonio
from ..errors import InvalidSetting


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
        overwrite: bool = typer.Option(False, "--overwrite",
                                       help="Replace the --json and --chart files if they exist."),
    ):
        """Benchmark MODELs at batch 1: each in a fresh process; prints a Markdown table.

        A model that fails is reported in its row and on stderr; the exit status is then 2 if every failure was
        bad input (a model that cannot be read, a setting that does not apply to it), else 1.
        """
        from ..benchmark import bench, chart, chart_formats, markdown_table
        from ..models import atomic_file

        for f in (json_out, chart_out):  # before any measurement, as every command checks its outputs
            if f is not None and f.is_dir():
                raise InvalidSetting(f"{f} is a folder: --json and --chart take file names")
            if f is not None and f.exists() and not overwrite:
                raise FileExistsError(f"{f} already exists (pass --overwrite to replace it)")
        formats = chart_formats() if chart_out is not None else None
        if formats is not None and chart_out.suffix.lstrip(".").lower() not in formats:
            raise InvalidSetting(f"--chart {chart_out}: the file name's suffix picks the format, one of "
                                 f"{', '.join(sorted(formats))}")
        rows = bench(models, runtime=runtime, prompt_tokens=prompt_tokens, new_tokens=new_tokens, threads=threads,
                     repeats=repeats, int4=int4, compile=compile, progress=lambda m: typer.echo(m, err=True))
        typer.echo(markdown_table(rows))
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(json_out) as tmp:
                tmp.write_text(jsonio.dumps(rows, indent=2))
        if chart_out is not None:
            chart_out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(chart_out) as tmp:
                drawn = chart(rows, tmp)  # None (nothing written) without matplotlib
            if drawn is None:
                typer.echo("matplotlib is not installed (pip install matplotlib): no chart written", err=True)
            else:
                typer.echo(f"chart: {chart_out}", err=True)
        failed = [r for r in rows if "error" in r]
        for r in failed:  # in full: the table cuts errors short
            typer.secho(f"pyshrink: error: {r['label']} on {r['runtime']}: {r['error']}", err=True,
                        fg=typer.colors.RED)
        if failed:
            raise typer.Exit(2 if all(r.get("bad_input") for r in failed) else 1)

