"""Fixtures: tiny random models of every family (see pyshrink_tiny_models.py)."""
from pyshrink_tiny_models import tiny_folder, tokenizer  # noqa: F401
