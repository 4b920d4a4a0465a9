"""``python -m pyshrink.benchmark.worker '{"runtime": ..., "model": ..., ...}'``: one measurement, one process.

Prints one JSON line (the result, or ``{"error": ...}``) last on stdout.
"""
from __future__ import annotations

import json
import sys
import traceback


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    try:
        from .runners import measure

        res = measure(spec.pop("runtime"), spec.pop("model"), **spec)
    except Exception as exc:  # noqa: BLE001  (reported in the table, not fatal to the other rows)
        from ..errors import PyshrinkError

        traceback.print_exc(file=sys.stderr)
        # bad_input: the model could not be read or the settings do not apply to it (the CLI exits 2, as for
        # any bad input), as opposed to a failure while measuring
        res = {"error": f"{type(exc).__name__}: {exc}",
               "bad_input": isinstance(exc, (PyshrinkError, FileNotFoundError, FileExistsError))}
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
