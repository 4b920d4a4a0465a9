"""The recovery curve (tokens seen against held-out perplexity) as a PNG next to ``heal.json``."""
from __future__ import annotations

import warnings
from pathlib import Path


def plot_curve(path: Path, curves: dict, *, reference: dict | None = None, title: str = "healing") -> Path | None:
    """Plot ``{label: [{"tokens", "ppl"}, ...]}`` with horizontal ``{label: ppl}`` reference lines.

    Returns the path, or None (with a warning) when matplotlib is not installed: the JSON report carries
    the same numbers.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed, so no recovery-curve PNG was written "
                      "(pip install matplotlib); the numbers are in heal.json", RuntimeWarning, stacklevel=2)
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for label, curve in curves.items():
        ax.plot([p["tokens"] for p in curve], [p["ppl"] for p in curve], marker="o", ms=3, label=label)
    for label, ppl in (reference or {}).items():
        if ppl:
            ax.axhline(ppl, ls="--", lw=1, color="gray")
            ax.annotate(f"{label} {ppl:.2f}", (0, ppl), textcoords="offset points", xytext=(4, 3), fontsize=8,
                        color="dimgray")
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
