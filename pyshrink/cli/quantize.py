"""``pyshrink quantize SOURCE -o OUT``: 4-bit group-wise or 8-bit weights, with before/after numbers."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .. import jsonio


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def register(app: typer.Typer) -> None:
    @app.command("quantize")
    def quantize_cmd(
        source: str = typer.Argument(..., help="Model folder, .gguf file, hub id or embedded name (smollm2-135m)."),
        out: Path = typer.Option(..., "-o", "--out", help="Output folder (packed safetensors + pyshrink.json)."),
        bits: int = typer.Option(4, help="4 (group-wise, MatMulNBits layout) or 8 (per output channel)."),
        group_size: int = typer.Option(64, "--group-size", help="Weights per scale for 4 bits: 32, 64 or 128."),
        method: str = typer.Option("auto", help="rtn, awq, gptq or auto (best the calibration data allows; "
                                   "rtn without data)."),
        calibration: Optional[List[Path]] = typer.Option(None, "--calibration", exists=True, dir_okay=False, readable=True, help="Calibration text file(s); "
                                                         "without --eval, the last 10% is held out for the before/after numbers."),
        eval_text: Optional[List[Path]] = typer.Option(None, "--eval", exists=True, dir_okay=False, readable=True, help="Evaluation text file(s) (default: "
                                                       "held-out calibration text, else the built-in pydoc text)."),
        symmetric: bool = typer.Option(True, "--symmetric/--asymmetric", help="4-bit zero point fixed at 8, or "
                                       "one per group."),
        head_bits: Optional[int] = typer.Option(None, "--head-bits", help="Also quantize the output head to 4 or "
                                                "8 bits (a tied head is untied; default: head kept in float)."),
        calib_tokens: int = typer.Option(16384, "--calibration-tokens", "--calib-tokens",
                                         help="Calibration tokens used at most."),
        eval_tokens: int = typer.Option(16384, help="Evaluation tokens used at most."),
        seq_len: Optional[int] = typer.Option(None, help="Window length in tokens (calibration and perplexity); "
                                              "default 512, or the model's position limit if that is shorter."),
        act_order: bool = typer.Option(False, "--act-order", help="GPTQ: columns by decreasing Hessian diagonal."),
        as_json: bool = typer.Option(False, "--json", help="Print the result (with every layer) as JSON."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
        stream: bool = typer.Option(False, "--stream", help="Hold one block in memory at a time: load, quantize, "
                                    "measure and write block by block, for models larger than memory (SOURCE: a "
                                    "folder of .safetensors files). Same result as without it."),
    ):
        """Quantize SOURCE's projections to 4 or 8 bits on pyshrink's kernels and save it to OUT."""
        from ..quantize import QuantConfig
        from ..quantize.config import HEAD
        from ..quantize.pipeline import quantize_to_folder

        skip = () if head_bits is not None else (HEAD,)
        config = QuantConfig(bits=bits, group_size=group_size, symmetric=symmetric, method=method, skip=skip,
                             head_bits=head_bits, calib_tokens=calib_tokens, seq_len=seq_len, act_order=act_order,
                             progress=not as_json)
        run = quantize_to_folder(source, out, config, calibration=calibration or None, eval_text=eval_text or None,
                                 eval_tokens=eval_tokens, overwrite=overwrite, progress=not as_json,
                                 stream=stream)
        s = run.summary
        if as_json:
            typer.echo(jsonio.dumps(s))
            return
        _print_summary(source, s)


def _print_summary(source, s: dict) -> None:
    cfg = s["config"]
    fmt = f"{cfg['bits']}-bit" + (f" g{cfg['group_size']} {'sym' if cfg['symmetric'] else 'asym'}"
                                  if cfg["bits"] == 4 else " per-channel")
    typer.echo(f"quantized {source} -> {s['out']}  ({fmt}, method {s['method']}, "
               f"{s['calib_tokens']:,} calibration tokens, {s['quantize_seconds']:.0f} s)")
    rows = [
        ("weights on disk", _mib(s["source_bytes"]), _mib(s["out_bytes"])),
        ("bits per weight (quantized layers)", str(s["source_bits_per_weight"] or "-"), f"{s['bits_per_weight_quantized']:.2f}"),
        ("bits per weight (whole model)", "", f"{s['bits_per_weight_model']:.2f}"),
        (s["metric"], f"{s['before']:.4f}", f"{s['after']:.4f}"),
    ]
    w = max(len(r[0]) for r in rows)
    typer.echo(f"{'':<{w}}  {'before':>12}  {'after':>12}")
    for name, a, b in rows:
        typer.echo(f"{name:<{w}}  {a:>12}  {b:>12}")
    if s["ratio"] and s["metric"] == "perplexity":
        typer.echo(f"perplexity ratio after/before: {s['ratio']:.4f} ({s['eval_tokens']:,} tokens of {s['eval_source']})")
    else:
        typer.echo(f"evaluated on {s['eval_tokens']:,} tokens of {s['eval_source']}")
    layers = s["layers"]
    if not layers:
        return
    kind = layers[0]["error_kind"]
    typer.echo(f"per-layer relative {kind} error ({'on the calibration data' if kind == 'output' else 'no data'}):")
    by: dict = {}
    for layer in layers:
        by.setdefault(layer["name"].rsplit(".", 1)[-1], []).append(layer)
    typer.echo(f"  {'layer':<16} {'count':>5} {'mean':>8} {'max':>8}  method(s)")
    for name, ls in by.items():
        errs = [x["rel_error"] for x in ls]
        methods = ",".join(sorted({x["method"] for x in ls}))
        typer.echo(f"  {name:<16} {len(ls):>5} {sum(errs) / len(errs):>8.4f} {max(errs):>8.4f}  {methods}")
    worst = sorted(layers, key=lambda x: -x["rel_error"])[:3]
    typer.echo("  worst: " + ", ".join(f"{x['name']} {x['rel_error']:.4f}" for x in worst))
