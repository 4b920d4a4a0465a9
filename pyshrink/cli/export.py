"""``pyshrink export MODEL -o OUT [--int4]``: ONNX with a KV cache (decoders) or the forward (encoders)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .. import jsonio


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        model: str = typer.Argument(..., help="Model folder, .gguf file, hub id or embedded name (smollm2-135m)."),
        out: Path = typer.Option(..., "-o", "--out", help="Output folder (model.onnx, tokenizer, pyshrink_onnx.json, "
                                 "genai_config.json)."),
        int4: bool = typer.Option(False, "--int4", help="4-bit MatMulNBits for float projections and the LM head "
                                  "(round-to-nearest); pyshrink-quantized layers are always copied byte for byte."),
        accuracy_level: str = typer.Option("auto", "--accuracy-level", help="MatMulNBits compute for every 4-bit "
                                           "projection (none without --int4 or a pyshrink-quantized model): "
                                           "4 = int8 activations (fastest on CPU), 0 = float; auto = 4 where validation "
                                           "allows, 0 only on the projections whose int8 activations move the logits "
                                           "(measured; recorded in pyshrink_onnx.json; with --no-validate: 4)."),
        opset: int = typer.Option(21, "--opset", help="ONNX opset (17..23)."),
        group_size: int = typer.Option(32, "--group-size", help="4-bit group size for --int4 (32, 64 or 128)."),
        asymmetric: bool = typer.Option(False, "--asymmetric", help="--int4 with zero points."),
        max_length: Optional[int] = typer.Option(None, "--max-length", help="Longest sequence the export supports "
                                                 "(default: the model's maximum positions)."),
        all_logits: bool = typer.Option(False, "--all-logits", help="Logits for every position (default: the last "
                                        "only, which is all generation needs)."),
        external_data: bool = typer.Option(False, "--external-data", help="Always write weights to model.onnx.data "
                                           "(automatic above 1.5 GB)."),
        no_validate: bool = typer.Option(False, "--no-validate", help="Skip the ONNX Runtime vs PyTorch check."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
        as_json: bool = typer.Option(False, "--json", help="Print pyshrink_onnx.json."),
    ):
        """Export MODEL to ONNX (validated against PyTorch before OUT appears)."""
        from ..export import export_onnx

        from ..errors import InvalidSetting

        if accuracy_level != "auto" and not accuracy_level.isdigit():
            raise InvalidSetting(f"accuracy_level must be 0..4 or auto, got {accuracy_level!r}")
        level = accuracy_level if accuracy_level == "auto" else int(accuracy_level)
        path = export_onnx(model, out, int4=int4, accuracy_level=level, opset=opset, group_size=group_size,
                           symmetric=not asymmetric, max_length=max_length, logits="all" if all_logits else "last",
                           external_data=True if external_data else None, validate=not no_validate,
                           overwrite=overwrite)
        meta = json.loads((path / "pyshrink_onnx.json").read_text())
        if meta.get("kind") == "decoder" and not (path / "tokenizer.json").is_file():
            # the export is valid, but what reads text from it is not: say so now, not at the first generate
            typer.echo(f"note: {path} holds no tokenizer.json ({model} has no fast tokenizer): `pyshrink generate` "
                       "and `serve` need one (export from a folder that holds the model's tokenizer files)", err=True)
        if as_json:
            typer.echo(jsonio.dumps(meta, indent=2))
            return
        size = sum(f.stat().st_size for f in path.iterdir() if f.name.startswith("model.onnx"))
        v = meta.get("validation")
        check = (f"max |ORT - PyTorch| {v['max_abs_diff']:.3g} <= {v['tolerance']:.3g} over a {v['prompt_tokens']}-token "
                 f"prompt + {v['kv_steps']} KV-cache steps on {', '.join(v['providers'])}") if v else "not validated"
        levels = meta["weights"].get("accuracy_levels")
        if levels:
            zero = sorted(n for n, lvl in levels.items() if lvl == 0)
            check += (f"; accuracy_level 4 on {len(levels) - len(zero)} of {len(levels)} projections"
                      + (f" (0 on {', '.join(zero)})" if zero and len(zero) <= 8 else ""))
        typer.echo(f"exported {model} -> {path} ({meta['kind']}, {size / 1e6:.1f} MB, projections "
                   f"{meta['weights']['projections']}); {check}")
