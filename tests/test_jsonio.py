import json
import math

import numpy as np
import pytest

from pyshrink import jsonio


def test_non_finite_numbers_become_null_at_any_depth():
    obj = {"ppl": math.inf, "curve": [(0, 1.5), (64, math.nan)], "np": np.float64("-inf"), "n": 3, "s": "nan"}
    text = jsonio.dumps(obj)
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"ppl": None, "curve": [[0, 1.5], [64, None]], "np": None, "n": 3, "s": "nan"}


def test_what_json_cannot_hold_is_written_as_its_str(tmp_path):
    assert json.loads(jsonio.dumps({"out": tmp_path})) == {"out": str(tmp_path)}


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_plain_json_would_have_written_an_unparseable_token(value):
    # why jsonio exists: Python's json writes tokens that strict parsers (JavaScript's, Go's) reject
    assert json.dumps(value) in ("NaN", "Infinity")
    with pytest.raises(ValueError):
        json.dumps(value, allow_nan=False)
    assert jsonio.dumps(value) == "null"
