"""Errors users see. Each names the problem and, where there is one, the valid range."""
import numbers


class PyshrinkError(Exception):
    """Base class: the CLI prints these as one clear line and exits non-zero."""


class InvalidSetting(PyshrinkError, ValueError):
    pass


class ModelLoadError(PyshrinkError):
    pass


class DataError(PyshrinkError, ValueError):
    pass


def is_int(value) -> bool:
    """A real integer (numpy's too): ``bool`` is an ``int`` subclass in Python, but ``True`` is no layer index or
    token count."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number that is not a ``bool`` (nor a string such as ``"1e-3"``, which compares with nothing)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def as_scalar(value):
    """A 0-d torch tensor or numpy scalar as the Python number (or bool) it holds; anything else as it is."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def check_range(name: str, value, lo, hi, *, integer: bool = False):
    """Validate ``lo <= value <= hi`` (and integrality); returns the value."""
    if hasattr(value, "dim"):  # a torch tensor would flow on past this check (into JSON, shapes, ranges)
        raise InvalidSetting(f"{name} must be a number, got a tensor {value!r}: pass tensor.item()")
    if integer and not (is_int(value) or (is_number(value) and float(value).is_integer())):
        raise InvalidSetting(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
    if not integer and not is_number(value):
        raise InvalidSetting(f"{name} must be a number in {lo}-{hi}, got {value!r}")
    if not (lo <= value <= hi):
        rng = f"{lo}..{hi}" if integer else f"{lo}-{hi}"
        raise InvalidSetting(f"{name} must be in {rng}, got {value!r}")
    return value
