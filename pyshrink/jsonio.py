"""JSON that every parser reads. Python's json writes NaN and Infinity, which are not JSON (JavaScript's and
Go's parsers, for example, reject them): a perplexity that overflowed, or a model that was damaged, would make a
summary or report unreadable elsewhere. Non-finite numbers are written as null, as JavaScript's JSON.stringify
does."""
from __future__ import annotations

import json
import math


def finite(obj):
    """``obj`` with every non-finite float (at any depth of dicts, lists and tuples) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj, **kw) -> str:
    """``json.dumps`` of ``finite(obj)``; anything else JSON cannot hold is written as its ``str``."""
    kw.setdefault("default", str)
    return json.dumps(finite(obj), allow_nan=False, **kw)
