"""The contraction summary (and the iterative schedule's) as a rich table (the CLI's default output)."""
from __future__ import annotations


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"


def rows(summary: dict) -> list[tuple[str, str]]:
    s = summary
    out = [
        ("source", f"{s['source']} ({s['architecture']})"),
        ("mode", s["mode"] + (", streamed (one block in memory at a time)" if s.get("streamed") else "")),
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
    out.append((f"layers contracted ({len(layers)}{', as given' if s.get('layers_chosen') == 'given' else ''})",
                desc or "none"))
    if s.get("heal"):
        h = s["heal"]
        out.append(("healing", f"{h['tokens_seen']:,} of {h['tokens']:,} tokens in {h['seconds']:.1f} s, "
                               f"perplexity {h['ppl_before']:.3f} -> {h['ppl_after']:.3f} (stopped: {h['stopped']})"))
    if s.get("vocab"):
        out.append(("vocabulary", f"{s['vocab']['vocab_before']:,} -> {s['vocab']['vocab_after']:,} (a removed id "
                                  "gets probability 0: text outside the domain may score infinite perplexity)"))
    out.append(("time", f"{s['contraction_time_s']:.1f} s contraction + {s['evaluation_time_s']:.1f} s evaluation "
                        f"({s['wall_time_s']:.1f} s total)"))
    return out


def schedule_rows(summary: dict) -> list[tuple[str, str]]:
    """Rows for :attr:`pyshrink.heal.ScheduleResult.summary` (``pyshrink contract --steps K``)."""
    s = summary
    out = [("source", str(s["source"])),
           ("mode", f"iterative: {len(s['steps'])} slices cut during one heal (optimizer state carried)"
                    if s.get("heal_schedule") == "continuous" else
                    f"iterative: {len(s['steps'])} slice(s) faded out during one heal, each cut at factor 0"
                    if s.get("heal_schedule") == "fade" else
                    f"iterative: {len(s['steps'])} slices, each contracted then healed"),
           ("params before", _fmt_params(s["params_before"])),
           ("params after", _fmt_params(s["params_after"])),
           ("reduction", f"{s['reduction_pct']:.1f} %")]
    for st in s["steps"]:
        layers = ",".join(map(str, st["layers"])) if st.get("layers") is not None else "?"
        if st["ppl_contracted"] is None:  # a slice with no heal (weight 0 in --heal-split) was not measured
            out.append((f"slice {st['slice']}", f"ratio {st['ratio']:.3f} of blocks {layers}: not healed"))
            continue
        out.append((f"slice {st['slice']}", f"ratio {st['ratio']:.3f} of blocks {layers}: perplexity "
                                            f"{st['ppl_contracted']:.3f} -> {st['ppl_healed']:.3f} after "
                                            f"{st['tokens']:,} healing tokens ({st['seconds']:.1f} s)"))
    out += [("perplexity source", f"{s['ppl_source']:.3f}"),
            ("perplexity final", f"{s['ppl_final']:.3f}  (x{s['ppl_ratio']:.3f})"),
            ("evaluated on", s["evaluation"]),
            ("time", f"{s['seconds']:.1f} s total")]
    return out


def render(summary: dict, out=None, *, title: str = "pyshrink contract", table_rows=rows) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for k, v in table_rows(summary):
        table.add_row(k, v)
    if out is not None:
        table.add_row("saved to", str(out))
    Console().print(table)


def render_schedule(summary: dict, out=None) -> None:
    render(summary, out, title="pyshrink contract --steps", table_rows=schedule_rows)
