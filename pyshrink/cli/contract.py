"""``pyshrink contract SOURCE -o OUT``: structured pruning with a summary table (or JSON)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

HELP = (
    "Contract a model: physically remove the least useful MLP neurons (and, optionally, attention heads and "
    "unused vocabulary) in the layers where that costs least, save it, and print what it saved and what it cost."
    "\n\n"
    "Without --calibration it runs data-free: a decoder calibrates on text it samples itself (seeded), and quality "
    "is measured on built-in held-out text. With --calibration, statistics come from your domain text and quality "
    "is measured on --eval (or on the held-out last 10% of the calibration text)."
    "\n\n\b\nExamples:\n"
    "  pyshrink contract smollm2-135m -o out/smollm2-contracted\n"
    "  pyshrink contract smollm2-135m -o out/c --calibration domain.txt --prune-vocab --json"
)


def register(app: typer.Typer) -> None:
    @app.command("contract", help=HELP)
    def contract_cmd(
        source: str = typer.Argument(..., help="Model folder, .gguf file, hub id, or embedded name (smollm2-135m)."),
        out: Path = typer.Option(..., "-o", "--out", help="Output folder (written atomically)."),
        contraction_ratio: float = typer.Option(0.5, "--contraction-ratio", help="Fraction of each contracted layer's MLP neurons to remove (0.1-0.9)."),
        num_layers_to_contract: int = typer.Option(8, "--num-layers-to-contract", help="How many layers to contract (1..depth); the cheapest ones are chosen."),
        calibration: Optional[List[Path]] = typer.Option(None, "--calibration", help="Domain text file(s) to calibrate on (repeatable). Omit for data-free."),
        eval_text: Optional[List[Path]] = typer.Option(None, "--eval", help="Text file(s) to measure quality on."),
        prune_heads: bool = typer.Option(False, "--prune-heads", help="Also remove attention heads (grouped-query aware)."),
        prune_vocab: bool = typer.Option(False, "--prune-vocab", help="Drop vocabulary the domain text never uses (needs --calibration)."),
        threshold: Optional[float] = typer.Option(None, "--threshold", help="Contextual mode: remove neurons whose mean |activation| is below this (e.g. 1e-3)."),
        calibration_tokens: int = typer.Option(32768, "--calibration-tokens", help="Use at most this many calibration tokens."),
        eval_tokens: int = typer.Option(16384, "--eval-tokens", help="Measure quality on at most this many tokens."),
        seed: int = typer.Option(0, "--seed", help="Seed for data-free sampling."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of a table."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    ):
        from ..contract import contract
        from ..contract.summary import render

        if out.exists() and not overwrite:
            raise FileExistsError(f"output {out} already exists (pass --overwrite to replace it)")
        result = contract(
            source, contraction_ratio=contraction_ratio, num_layers_to_contract=num_layers_to_contract,
            calibration=[str(p) for p in calibration] if calibration else None,
            eval_text=[str(p) for p in eval_text] if eval_text else None,
            prune_heads=prune_heads, prune_vocab=prune_vocab, threshold=threshold,
            calibration_tokens=calibration_tokens, eval_tokens=eval_tokens, seed=seed,
            out=out, overwrite=overwrite, progress=True,
        )
        if as_json:
            typer.echo(json.dumps({**result.summary, "out": str(out)}, indent=2, default=str))
        else:
            render(result.summary, out)
