"""The contraction summary as a rich table (the CLI's default output)."""
from __future__ import annotations


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"


def rows(summary: dict) -> list[tuple[str, str]]:
    s = summary
    out = [
        ("source", f"{s['source']} ({s['architecture']})"),
        ("mode", s["mode"]),
        ("calibration", f"{s['calibration']['text']} [{s['calibration']['tokens']:,} tokens]"),
        ("params before", _fmt_params(s["params_before"])),
        ("params after", _fmt_params(s["params_after"])),
        ("reduction", f"{s['reduction_pct']:.1f} %"),
    ]
    ev = s["evaluation"]
    if ev["metric"] == "perplexity":
        out += [("perplexity source", f"{s['ppl_source']:.3f}"),
                ("perplexity final", f"{s['ppl_final']:.3f}  (x{s['ppl_ratio']:.3f})")]
    else:
        out += [("embedding cosine to source", f"{s['embedding_cosine']:.4f}")]
    out.append(("evaluated on", f"{ev['text']} [{ev['tokens']:,} tokens, {ev['window']}-token windows]"))
    layers = s["layers"]
    desc = ", ".join(
        f"{r['layer']}:{r['width_before']}->{r['width_after']}"
        + (f" h{r['heads_before']}->{r['heads_after']}" if r.get("heads_after") is not None else "")
        for r in layers)
    out.append((f"layers contracted ({len(layers)})", desc or "none"))
    if s.get("vocab"):
        out.append(("vocabulary", f"{s['vocab']['vocab_before']:,} -> {s['vocab']['vocab_after']:,}"))
    out.append(("time", f"{s['contraction_time_s']:.1f} s contraction + {s['evaluation_time_s']:.1f} s evaluation "
                        f"({s['wall_time_s']:.1f} s total)"))
    return out


def render(summary: dict, out=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="pyshrink contract", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for k, v in rows(summary):
        table.add_row(k, v)
    if out is not None:
        table.add_row("saved to", str(out))
    Console().print(table)
