"""Quantization tests: lean threading for tiny tensors (helpers live in _quantutil.py)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _lean_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: OpenMP start-up costs more than it saves on a shared machine
    yield
    torch.set_num_threads(n)

