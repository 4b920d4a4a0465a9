import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))  # onnx_helpers

from onnx_helpers import tiny_model, word_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory):
    """Tiny decoders exported once per session (with the word-level tokenizer)."""
    from pyshrink import export_onnx

    cache = {}

    def get(family: str = "llama"):
        if family not in cache:
            out = tmp_path_factory.mktemp("rt") / family
            export_onnx(tiny_model(family), out, tokenizer=word_tokenizer())
            cache[family] = out
        return cache[family]

    return get
