"""Errors users see. Each names the problem and, where there is one, the valid range."""


class PyshrinkError(Exception):
    """Base class: the CLI prints these as one clear line and exits non-zero."""


class InvalidSetting(PyshrinkError, ValueError):
    pass


class ModelLoadError(PyshrinkError):
    pass


class DataError(PyshrinkError, ValueError):
    pass


def is_int(value) -> bool:
    """A real integer: ``bool`` is an ``int`` subclass in Python, but ``True`` is no layer index or token count."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_range(name: str, value, lo, hi, *, integer: bool = False):
    """Validate ``lo <= value <= hi`` (and integrality); returns the value."""
    if integer and (isinstance(value, bool) or int(value) != value):
        raise InvalidSetting(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
    if not (lo <= value <= hi):
        rng = f"{lo}..{hi}" if integer else f"{lo}-{hi}"
        raise InvalidSetting(f"{name} must be in {rng}, got {value!r}")
    return value
