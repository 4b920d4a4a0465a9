"""Text in, token windows out: calibration and evaluation data for every stage.

Users pass text files (or strings); pyshrink never downloads data. Texts that every CPython already has
serve as built-in corpora for tests and demos (``builtin_text``).
"""
from __future__ import annotations

import io
from collections.abc import Mapping, Set as AbstractSet
from pathlib import Path

import torch

from .errors import DataError, InvalidSetting, ModelLoadError


def read_texts(sources) -> str:
    """Concatenate text files (paths) and/or literal strings; an empty result is an error."""
    if sources is None:
        raise DataError("no text given")
    if isinstance(sources, (str, Path)):
        sources = [sources]
    # any iterable of them (a list, Path.glob's generator); a tensor of token ids is refused: it is not text
    # (not a dict's keys, a set's unordered members, nor an open file's lines: none is a list of texts)
    bad = type(sources).__name__ if isinstance(sources, (bytes, Mapping, AbstractSet, io.IOBase)) or not hasattr(
        sources, "__iter__") or hasattr(sources, "dtype") else None
    if bad is None:
        sources = list(sources)
        bad = next((type(s).__name__ for s in sources if not isinstance(s, (str, Path))), None)
    if bad is not None:
        raise DataError(f"text must be a string, a file path, or a list of them; got a {bad}")
    parts = []
    for s in sources:
        if _is_literal(s):
            parts.append(s)
            continue
        p = Path(s)
        if p.is_dir():
            raise DataError(f"{s} is a folder; give the text file(s) in it")
        if not p.exists():  # not is_file(): a pipe (<(...), a FIFO) is text too
            raise DataError(f"text file {s} does not exist")
        parts.append(_decode(p))
    text = "\n".join(parts)
    if not text.strip():
        raise DataError(f"the text given ({', '.join(map(str, sources))[:200]}) is empty")
    return text


def _decode(path: Path) -> str:
    """A file's text as UTF-8 (a byte-order mark is dropped). Anything else is refused, not read with
    replacement characters: a binary or UTF-16 file would otherwise calibrate, train or score on garbage
    without a word (a perplexity on random bytes looked like one on text)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read text file {path}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        hint = " (it looks like UTF-16)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise DataError(f"{path} is not UTF-8 text{hint}: byte 0x{raw[exc.start]:02x} at offset {exc.start} "
                        "(convert it first, e.g. iconv -t UTF-8)") from None
    if "\x00" in text:
        raise DataError(f"{path} holds a NUL character (at {text.index(chr(0))}): a binary file, not text")
    return text


TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".json", ".jsonl", ".csv", ".tsv", ".py", ".html", ".xml", ".log")


def describe(sources) -> str:
    """Text sources as a summary records them: file names as given, literal text as ``<text, N chars>`` (a
    summary must not carry a copy of the user's corpus)."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    return ", ".join(f"<text, {len(s)} chars>" if _is_literal(s) else str(s) for s in sources)


def _is_literal(s) -> bool:
    """Is ``s`` text rather than a file name? A ``Path`` is always a file. A string is text unless it reads like a
    file name: an existing file or folder, or one line of no whitespace with a folder separator or a text file's
    suffix (``data/wiki``, ``corpus.csv``). So a misspelt path is reported as missing instead of being read as a
    few words of text, while "3.14" or "e.g." stay text."""
    if not isinstance(s, str):
        return False
    if "\n" in s or len(s) > 1024:
        return True
    try:
        if Path(s).exists():
            return False
    except OSError:  # longer than a file name may be (ENAMETOOLONG): not a file
        return True
    return any(c.isspace() for c in s) or not ("/" in s or "\\" in s or Path(s).suffix.lower() in TEXT_SUFFIXES)


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
    if tokenizer is None:  # a folder saved without one (load_tokenizer gives None)
        raise ModelLoadError("the model has no tokenizer to read text with: its folder holds no tokenizer files "
                             "(copy them from the model it came from; from Python, token ids may be passed "
                             "instead of text)")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def as_ids(t: torch.Tensor, what: str) -> torch.Tensor:
    """A caller's pre-tokenized ids as int64; float and bool tensors are refused (``.long()`` would truncate
    floats to ids without a word)."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise DataError(f"the {what} must be token ids (an integer tensor), got a {t.dtype} tensor")
    return t.long()


def windows(ids: torch.Tensor, seq_len: int, max_tokens: int | None = None, *, min_windows: int = 1,
            what: str = "text", vocab: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[n, seq_len]`` windows from a 1-D id tensor, at most ``max_tokens`` tokens in all.

    ``vocab``: the model's number of token ids (:func:`pyshrink.models.id_limit`); an id outside ``0..vocab-1``
    is an error here rather than an index error deep inside the model's embedding."""
    if vocab is not None and ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise DataError(f"the {what} has token ids {lo}..{hi}, but the model knows ids 0..{vocab - 1}: was it "
                            "tokenized with another model's tokenizer?")
    n = ids.numel() // seq_len
    if max_tokens is not None:
        if max_tokens < seq_len:  # rounding up to a whole window would use more tokens than asked for
            raise InvalidSetting(f"at most {max_tokens} tokens of the {what} were asked for, less than one window of "
                                 f"{seq_len}: ask for at least {seq_len} tokens, or use a shorter window")
        n = min(n, max_tokens // seq_len)
    if n < min_windows:
        raise DataError(f"the {what} has {ids.numel()} tokens; at least {min_windows * seq_len} are needed "
                        f"({min_windows} window(s) of {seq_len})")
    return ids[: n * seq_len].view(n, seq_len)


def split_ids(ids: torch.Tensor, held_out_fraction: float):
    """Split a token stream into (calibration, held-out) parts, held-out at the end."""
    cut = int(ids.numel() * (1 - held_out_fraction))
    return ids[:cut], ids[cut:]
