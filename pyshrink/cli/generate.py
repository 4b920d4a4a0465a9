"""``pyshrink generate OUT "prompt"``: generate text from an exported ONNX folder (no torch needed)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate_cmd(
        folder: Path = typer.Argument(..., help="Folder written by `pyshrink export`."),
        prompt: str = typer.Argument(..., help="Prompt text."),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate at most."),
        temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy; otherwise sampling temperature."),
        top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (0 < p <= 1)."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed (reproducible output)."),
        threads: Optional[int] = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads."),
        stats: bool = typer.Option(False, "--stats", help="Print timing to stderr."),
    ):
        """Generate a continuation of PROMPT with the KV cache on ONNX Runtime; prints the text."""
        from ..errors import InvalidSetting, check_range
        from ..runtime import OnnxLM, Sampling

        if max_new_tokens < 1:
            raise InvalidSetting(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        if threads is not None:
            check_range("--threads", threads, 1, 1024, integer=True)
        if seed is not None:
            check_range("--seed", seed, 0, 2**63 - 1, integer=True)  # numpy's generators take non-negative seeds
        try:
            sampling = Sampling(temperature, top_p, seed)
        except ValueError as exc:
            raise InvalidSetting(str(exc)) from None
        lm = OnnxLM(folder, threads=threads)
        ids = lm.encode(prompt)
        t0 = time.perf_counter()
        new, reason = lm.generate_ids(ids, max_new_tokens, sampling)
        dt = time.perf_counter() - t0
        typer.echo(lm.decode(new))
        if stats:
            print(f"[{len(ids)} prompt tokens, {len(new)} new ({reason}), {dt:.2f} s, "
                  f"{len(new) / dt if dt else 0:.1f} tokens/s]", file=sys.stderr)
