import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # onnx_helpers

from onnx_helpers import tiny_model, word_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Export each tiny family once per session (float, and int4 for decoders); returns a getter."""
    from pyshrink import export_onnx

    cache = {}

    def get(family: str, int4: bool = False):
        key = (family, int4)
        if key not in cache:
            out = tmp_path_factory.mktemp("onnx") / f"{family}{'-int4' if int4 else ''}"
            export_onnx(tiny_model(family), out, int4=int4, tokenizer=word_tokenizer())
            cache[key] = out
        return cache[key]

    return get
