import numpy as np
import pytest
import torch

from pyshrink.errors import InvalidSetting, as_scalar, check_range


def test_check_range_names_the_setting_and_its_range():
    assert check_range("ratio", 0.5, 0.1, 0.9) == 0.5 and check_range("n", np.int64(3), 1, 8, integer=True) == 3
    for value, match in ((0.95, "ratio must be in 0.1-0.9, got 0.95"), ("0.5", "ratio must be a number in 0.1-0.9"),
                         (None, "ratio must be a number"), (True, "ratio must be a number")):
        with pytest.raises(InvalidSetting, match=match):
            check_range("ratio", value, 0.1, 0.9)
    with pytest.raises(InvalidSetting, match="n must be an integer in 1..8, got 2.5"):
        check_range("n", 2.5, 1, 8, integer=True)


def test_a_tensor_is_refused_rather_than_passed_on():
    # callers keep their own value, so a tensor accepted here would reach JSON files and shapes as a tensor
    with pytest.raises(InvalidSetting, match=r"max_length must be a number, got a tensor tensor\(64\): pass tensor.item\(\)"):
        check_range("max_length", torch.tensor(64), 16, 1 << 20, integer=True)


def test_as_scalar_unwraps_0d_values_only():
    assert as_scalar(torch.tensor(4)) == 4 and type(as_scalar(np.float32(0.5))) is float
    one = torch.tensor([4])
    assert as_scalar(one) is one
