"""Timing one checkout beside another: each built checkout runs the same child script in its own process (two
builds of pyshrink._C cannot share one), the processes alternating round by round so that both see the same
drift of this machine's speed. Used by the benchmarks that take ``--baseline``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

_PROLOGUE = r"""
import json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import pyshrink
assert pyshrink.__file__.startswith(sys.argv[1]), pyshrink.__file__  # the checkout asked for
from pyshrink import ops
torch.set_num_threads(THREADS)
ops.set_num_threads(THREADS)
gen = torch.Generator().manual_seed(0)
"""


def child_script(body: str, threads: int) -> str:
    """A child script for :func:`measure`: imports pyshrink from the checkout in argv[1] (and checks that it did),
    sets torch's and pyshrink's threads, seeds ``gen``, then runs ``body`` (json, statistics, sys, time, torch
    and ops are imported), which prints its timings as a JSON object on its last line."""
    return _PROLOGUE.replace("THREADS", str(int(threads))) + body


def cli(doc: str, child: str, arg, argv=None) -> dict[str, dict[str, float]]:
    """The ``--baseline DIR --rounds N`` command line of a benchmark built on :func:`alternate`: parses ``argv``,
    times ``child`` in this checkout (once) or beside the baseline, and returns the medians, baseline first."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, help="another checkout of pyshrink, built in place, to time beside this one")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds with --baseline (default 3)")
    args = ap.parse_args(argv)
    return alternate(child, checkouts(ap, args.baseline), args.rounds if args.baseline is not None else 1, arg)


def checkouts(ap, baseline: Path | None) -> dict[str, Path]:
    """``{"this": HERE}``, with ``"baseline"`` first when a baseline checkout is given (checked)."""
    if baseline is None:
        return {"this": HERE}
    if not (baseline / "pyshrink").is_dir():
        ap.error(f"--baseline {baseline}: no pyshrink/ package there")
    return {"baseline": baseline.resolve(), "this": HERE}


def measure(child: str, repo: Path, arg) -> dict:
    """Run ``child`` (Python source; argv[1] = the checkout, argv[2] = ``arg`` as JSON) in a fresh process; its
    last line of output is a JSON object of timings."""
    out = subprocess.run([sys.executable, "-c", child, str(repo), json.dumps(arg)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"timing {repo} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def alternate(child: str, repos: dict[str, Path], rounds: int, arg) -> dict[str, dict[str, float]]:
    """Per checkout, per key of the child's output: the median over ``rounds`` alternating runs."""
    runs = {name: [] for name in repos}
    for r in range(rounds):
        for name in (list(repos) if r % 2 == 0 else list(repos)[::-1]):
            runs[name].append(measure(child, repos[name], arg))
    return {name: {key: statistics.median(run[key] for run in got) for key in got[0]} for name, got in runs.items()}
