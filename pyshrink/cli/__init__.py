"""The ``pyshrink`` command line: a thin layer over the Python API.

Each command lives in its own module ``pyshrink/cli/<name>.py`` that defines ``register(app)``; adding a
command is adding its module name to ``COMMANDS``. Errors that are the user's (bad settings, bad files)
print one line and exit with status 2; nothing half-written is left behind by the stages.
"""
from __future__ import annotations

import importlib
import sys

import typer

COMMANDS = ("contract", "evaluate", "heal", "quantize", "export", "generate", "serve", "bench")

app = typer.Typer(
    name="pyshrink",
    help="Make trained transformer models cheaper to serve: contract, heal, quantize, export, bench.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        from .. import __version__

        typer.echo(f"pyshrink {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print pyshrink's version and exit.")):
    """Make trained transformer models cheaper to serve: contract, heal, quantize, export, bench."""


for _name in COMMANDS:
    importlib.import_module(f"{__name__}.{_name}").register(app)


def _user_errors():
    from ..arch import UnsupportedArchitecture
    from ..errors import PyshrinkError

    return (PyshrinkError, UnsupportedArchitecture, FileExistsError, FileNotFoundError, ValueError)


def main(argv=None) -> int:
    try:
        # standalone mode: click itself prints usage errors and --help and exits (status 2 for usage)
        app(args=argv, standalone_mode=True)
    except _user_errors() as exc:
        typer.secho(f"pyshrink: error: {exc}", err=True, fg=typer.colors.RED)
        return 2
    except KeyboardInterrupt:
        typer.secho("pyshrink: interrupted", err=True)
        return 130
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code == 130:  # click turns Ctrl-C during a command into exit 130 itself, without a word
            typer.secho("pyshrink: interrupted", err=True)
        return code
    return 0

if __name__ == "__main__":
    sys.exit(main())


def run():  # console-script entry point
    sys.exit(main())
