"""Reuse the tiny-model helpers and fixtures of tests/arch (one definition for both test folders)."""
import importlib.util
import sys
from pathlib import Path

if "pyshrink_tiny_models" not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        "pyshrink_tiny_models", Path(__file__).parents[1] / "arch" / "pyshrink_tiny_models.py")
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["pyshrink_tiny_models"] = _mod
    _spec.loader.exec_module(_mod)

from pyshrink_tiny_models import tiny_folder, tokenizer  # noqa: E402,F401
