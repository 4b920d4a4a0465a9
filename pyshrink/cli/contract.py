"""``pyshrink contract SOURCE -o OUT``: structured pruning with a summary table (or JSON)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .. import jsonio
from ..errors import InvalidSetting

HELP = (
    "Contract a model: physically remove the least useful MLP neurons (and, optionally, attention heads and "
    "unused vocabulary) in the layers where that costs least, save it, and print what it saved and what it cost."
    "\n\n"
    "Without --calibration it runs data-free: a decoder calibrates on text it samples itself (seeded), and quality "
    "is measured on built-in held-out text. With --calibration, statistics come from your domain text and quality "
    "is measured on --eval (or on the held-out last 10% of the calibration text)."
    "\n\n"
    "--heal-tokens N then heals the contracted model by distillation from SOURCE on N tokens of the calibration "
    "text (never on the evaluation text), so 'perplexity final' is after healing. --steps K (K >= 2) contracts "
    "in K slices instead, healing after each (N/K tokens per slice), to the same final size; its perplexities "
    "are measured on the heals' held-out tail of the calibration text. --heal-schedule continuous makes that one "
    "heal of N tokens (one warm-up and learning-rate decay, optimizer state carried across the cuts) during which "
    "the slices are cut at equal shares of N. --heal-split W1:...:WK shares N by weight instead (e.g. 1:1:1:9 with "
    "--steps 4: three slices in the first quarter, the final model trained on the rest). --heal-schedule fade is "
    "that one heal without abrupt cuts: each slice's neurons fade out (their activations scaled from 1 to 0) "
    "during its share of N and are cut when they contribute nothing; the last slice fades over the first "
    "--fade-share of its share (default 0.5), the final model trains on the rest (also with --steps 1)."
    "\n\n\b\nExamples:\n"
    "  pyshrink contract smollm2-135m -o out/smollm2-contracted\n"
    "  pyshrink contract smollm2-135m -o out/c --calibration domain.txt --prune-vocab --json\n"
    "  pyshrink contract smollm2-135m -o out/c --calibration domain.txt --heal-tokens 100000\n"
    "  pyshrink contract smollm2-135m -o out/c --calibration domain.txt --heal-tokens 100000 --steps 2\n"
    "  pyshrink contract smollm2-135m -o out/c --calibration domain.txt --heal-tokens 100000 --steps 3 "
    "--heal-schedule continuous\n"
    "  pyshrink contract smollm2-135m -o out/c --calibration domain.txt --layers 10,11,12,13"
)


def parse_layers(text: str | None) -> list[int] | None:
    """``"3,4,5"`` -> ``[3, 4, 5]`` (range and uniqueness are checked by the API, against the model)."""
    if text is None:
        return None
    parts = [x.strip() for x in text.split(",")]
    if not all(p.lstrip("-").isdigit() for p in parts):
        raise InvalidSetting(f"--layers takes comma-separated block indices, e.g. 3,4,5; got {text!r}")
    return [int(p) for p in parts]


def parse_split(text: str | None) -> list[float] | None:
    """``"1:1:2"`` -> ``[1.0, 1.0, 2.0]`` (the count and signs are checked by the API against --steps)."""
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(":")]
    except ValueError:
        raise InvalidSetting(f"--heal-split takes colon-separated weights, one per slice, e.g. 1:1:2; got {text!r}") \
            from None


def check_schedule(steps: int, heal_tokens: int | None, calibration) -> None:
    """--steps K needs --heal-tokens and --calibration (every slice is healed on the calibration text)."""
    if steps < 1:
        raise InvalidSetting(f"--steps must be 1 (one shot) or more (slices), got {steps}")
    if steps >= 2 and not heal_tokens:
        raise InvalidSetting(f"--steps {steps} heals after every slice, so it needs --heal-tokens N (N/{steps} per slice)")
    if steps >= 2 and not calibration:
        raise InvalidSetting(f"--steps {steps} heals after every slice on the calibration text: pass --calibration FILE")


def register(app: typer.Typer) -> None:
    @app.command("contract", help=HELP)
    def contract_cmd(
        source: str = typer.Argument(..., help="Model folder, .gguf file, hub id, or embedded name (smollm2-135m)."),
        out: Path = typer.Option(..., "-o", "--out", help="Output folder (written atomically)."),
        contraction_ratio: float = typer.Option(0.5, "--contraction-ratio", help="Fraction of each contracted layer's MLP neurons to remove (0.1-0.9)."),
        num_layers_to_contract: Optional[int] = typer.Option(None, "--num-layers-to-contract", show_default=False, help="How many layers to contract (1..depth); the cheapest ones are chosen (default 8, or all layers of a model with fewer)."),
        layers: Optional[str] = typer.Option(None, "--layers", help="Contract exactly these blocks (comma-separated indices, 0-based, e.g. 3,4,5) instead of the cheapest; excludes --num-layers-to-contract."),
        calibration: Optional[List[Path]] = typer.Option(None, "--calibration", exists=True, dir_okay=False, readable=True, help="Domain text file(s) to calibrate on (repeatable). Omit for data-free."),
        eval_text: Optional[List[Path]] = typer.Option(None, "--eval", exists=True, dir_okay=False, readable=True, help="Text file(s) to measure quality on."),
        prune_heads: bool = typer.Option(False, "--prune-heads", help="Also remove attention heads (grouped-query aware)."),
        prune_vocab: bool = typer.Option(False, "--prune-vocab", help="Drop vocabulary the domain text never uses (needs --calibration)."),
        threshold: Optional[float] = typer.Option(None, "--threshold", help="Contextual mode: remove neurons whose mean |activation| is below this (e.g. 1e-3), at most 90 % of a block's."),
        calibration_tokens: int = typer.Option(32768, "--calibration-tokens", help="Use at most this many calibration tokens."),
        eval_tokens: int = typer.Option(16384, "--eval-tokens", help="Measure quality on at most this many tokens."),
        heal_tokens: Optional[int] = typer.Option(None, "--heal-tokens", help="After contracting, heal by distillation from SOURCE on this many tokens of the calibration text (needs --calibration)."),
        steps: int = typer.Option(1, "--steps", help="Contract in K slices with a heal after each (prune, heal, measure, repeat); K >= 2 needs --heal-tokens and --calibration. 1: one shot."),
        heal_schedule: str = typer.Option("per-slice", "--heal-schedule", help="With --steps K >= 2: 'per-slice' (a heal of N/K tokens after each slice, each with its own warm-up, decay and optimizer) or 'continuous' (one heal of N tokens, the slices cut during it after each N/K tokens, optimizer state carried across the cuts); with any --steps: 'fade' (as continuous, but each slice's neurons fade out during its share before they are cut)."),
        fade_share: Optional[float] = typer.Option(None, "--fade-share", help="With --heal-schedule fade: the part of the last slice's share of --heal-tokens spent fading its neurons (0-1, default 0.5); the final model trains on the rest."),
        slices: str = typer.Option("ratio", "--slices", help="With --steps K >= 2: 'ratio' (every slice narrows every chosen block by its share of the ratio) or 'blocks' (each slice narrows its own group of the chosen blocks by the whole ratio, deepest group first, so every block is cut once) or 'blocks-shallow-first' (the same, shallowest group first)."),
        heal_split: Optional[str] = typer.Option(None, "--heal-split", help="With --steps K: K colon-separated weights sharing --heal-tokens among the slices (e.g. 1:1:1:9; 0 = no heal after that slice). Default: equal."),
        criterion: Optional[str] = typer.Option(None, "--criterion", show_default=False, help="Ranking of the neurons (and, with --prune-heads, heads) to remove: 'fluctuation' (the default: activation variance times the squared norm of the output weights, FLAP's), 'obs' (greedy Optimal-Brain-Surgeon removal, slower) or 'magnitude' (weight norms only). Not with --threshold, which removes by activation."),
        refit: Optional[str] = typer.Option(None, "--refit", show_default=False, help="Compensation in the output projections for what was removed: 'lstsq' (the default: least-squares refit of the kept weights and the bias to the calibration text, best when no heal follows), 'mean' (the removed channels' mean folded into the bias, FLAP's; with a heal after it, it kept more quality on other text in our measurements, see README) or 'none'. Not with --heal-schedule fade, which folds the mean itself."),
        seed: int = typer.Option(0, "--seed", help="Seed for data-free sampling and the healing data order."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of a table."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
        stream: bool = typer.Option(False, "--stream", help="Hold one block in memory at a time: observe, contract, "
                                    "measure and write block by block, for models larger than memory (SOURCE: a "
                                    "folder of .safetensors files; a decoder needs --calibration; no heal). Same "
                                    "result as without it."),
    ):
        from ..contract import contract
        from ..contract.summary import render, render_schedule
        from ..models import check_output

        check_output(out, overwrite=overwrite, sources=(source,))
        pinned = parse_layers(layers)
        if pinned is not None and num_layers_to_contract is not None:
            raise InvalidSetting("--layers names the blocks to contract; leave out --num-layers-to-contract")
        from ..heal.schedule import SLICINGS

        if slices not in SLICINGS:
            raise InvalidSetting(f"--slices must be one of {', '.join(SLICINGS)}, got {slices!r}")
        fading = heal_schedule == "fade"
        check_schedule(steps, heal_tokens, calibration)
        if fading and not (heal_tokens and calibration):
            raise InvalidSetting("--heal-schedule fade fades the neurons out during a heal on the calibration text: "
                                 "it needs --heal-tokens N and --calibration FILE")
        if not fading and fade_share is not None:
            raise InvalidSetting("--fade-share sets the fade of --heal-schedule fade")
        if (heal_schedule not in ("per-slice", "fade") or heal_split is not None or slices != "ratio") and steps < 2:
            raise InvalidSetting("--heal-schedule, --heal-split and --slices set how the slices of --steps K (K >= 2) "
                                 "are cut and healed; with one step there are no slices (only --heal-schedule fade "
                                 "takes one)")
        if criterion is not None and threshold is not None:
            raise InvalidSetting("--criterion ranks the neurons to remove by a ratio; --threshold removes them by "
                                 "activation instead: pass one of them")
        if refit is not None and fading:
            raise InvalidSetting("--heal-schedule fade folds the removed neurons' mean into the bias itself; "
                                 "--refit does not apply to it")
        if stream and (steps >= 2 or fading):
            raise InvalidSetting("--steps and --heal-schedule heal the whole model between slices, which --stream "
                                 "never holds: contract with --stream in one step, without healing")
        split = parse_split(heal_split)
        cal = [str(p) for p in calibration] if calibration else None
        settings = dict(eval_text=[str(p) for p in eval_text] if eval_text else None, prune_heads=prune_heads,
                        prune_vocab=prune_vocab, threshold=threshold, calibration_tokens=calibration_tokens,
                        eval_tokens=eval_tokens, seed=seed)
        settings.update({k: v for k, v in (("criterion", criterion), ("refit", refit)) if v is not None})
        if steps >= 2 or fading:
            from ..heal import iterative_contract

            result = iterative_contract(source, steps=steps, contraction_ratio=contraction_ratio,
                                        num_layers_to_contract=num_layers_to_contract, calibration=cal,
                                        heal_tokens=heal_tokens,
                                        layers=pinned, contract_kwargs=settings, seed=seed, out=out,
                                        heal_schedule=heal_schedule, heal_split=split, fade_share=fade_share,
                                        slices=slices,
                                        overwrite=overwrite, progress=True)
            if as_json:
                typer.echo(jsonio.dumps({**result.summary, "out": str(out)}, indent=2))
            else:
                render_schedule(result.summary, out)
            return
        # None (here and above): DEFAULT_LAYERS, or every block of a shallower model
        result = contract(source, contraction_ratio=contraction_ratio, num_layers_to_contract=num_layers_to_contract,
                          calibration=cal, layers=pinned, heal_tokens=heal_tokens, out=out, overwrite=overwrite,
                          progress=True, stream=stream, **settings)
        if as_json:
            typer.echo(jsonio.dumps({**result.summary, "out": str(out)}, indent=2))
        else:
            render(result.summary, out)
