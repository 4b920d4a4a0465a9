"""Text in, token windows out: calibration and evaluation data for every stage.

Users pass text files (or strings); pyshrink never downloads data. Texts that every CPython already has
serve as built-in corpora for tests and demos (``builtin_text``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import DataError


def read_texts(sources) -> str:
    """Concatenate text files (paths) and/or literal strings; an empty result is an error."""
    if sources is None:
        raise DataError("no text given")
    if isinstance(sources, (str, Path)):
        sources = [sources]
    parts = []
    for s in sources:
        # a literal text (multi-line, or longer than any path) is never looked up as a file
        literal = isinstance(s, str) and ("\n" in s or len(s) > 1024)
        p = None if literal else Path(s)
        if p is not None and p.is_file():
            parts.append(p.read_text(encoding="utf-8", errors="replace"))
        elif p is not None and (p.suffix in (".txt", ".md", ".json", ".jsonl", ".py") or "/" in str(s)):
            raise DataError(f"text file {s} does not exist")
        else:
            parts.append(str(s))
    text = "\n".join(parts)
    if not text.strip():
        raise DataError(f"the text given ({', '.join(map(str, sources))[:200]}) is empty")
    return text


def builtin_text(name: str = "pydoc") -> str:
    """Real English text shipped with CPython: ``pydoc`` (~465 kB of documentation) or ``stdlib-code``."""
    if name == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    if name == "stdlib-code":
        import sysconfig

        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(root.glob("*.py"))[:200]
        return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    raise DataError(f"unknown built-in text {name!r} (known: pydoc, stdlib-code)")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, seq_len: int, max_tokens: int | None = None, *, min_windows: int = 1,
            what: str = "text") -> torch.Tensor:
    """Non-overlapping ``[n, seq_len]`` windows from a 1-D id tensor, at most ``max_tokens`` tokens in all."""
    n = ids.numel() // seq_len
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    if n < min_windows:
        raise DataError(f"the {what} has {ids.numel()} tokens; at least {min_windows * seq_len} are needed "
                        f"({min_windows} window(s) of {seq_len})")
    return ids[: n * seq_len].view(n, seq_len)


def split_ids(ids: torch.Tensor, held_out_fraction: float):
    """Split a token stream into (calibration, held-out) parts, held-out at the end."""
    cut = int(ids.numel() * (1 - held_out_fraction))
    return ids[:cut], ids[cut:]
