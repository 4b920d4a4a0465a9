"""Test-suite wiring. Tests are imported in pytest's importlib mode (so two folders may each hold a
test_cli.py); the folders are put on sys.path here so tests can import their small helper modules
(tests/tiny.py, tests/ops/_opsutil.py, ...) by name.
"""
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _d in [_HERE, *sorted(p for p in _HERE.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))]:
    if str(_d) not in sys.path:
        sys.path.insert(0, str(_d))
