"""The `elbokit` command line: thin Typer commands that parse, call the library and print.

Command modules import torch and the library inside their functions, so that `--help` is fast.
"""

from __future__ import annotations

import sys

import typer

from . import benchmark, data, evaluate, listing, plot, train

app = typer.Typer(
    name="elbokit",
    help="Compose, train and honestly evaluate VAE objectives from pluggable terms, priors and estimators.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _global_options(
    show_traceback: bool = typer.Option(False, "--traceback", help="When a plugin's code raises, print the full "
                                        "traceback after the one-line error (also ELBOKIT_TRACEBACK=1)."),
) -> None:
    """Compose, train and honestly evaluate VAE objectives from pluggable terms, priors and estimators."""
    from .common import set_traceback

    set_traceback(show_traceback)


for _commands in (listing, train, evaluate, data, plot, benchmark):
    _commands.register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script. Usage errors are one line and exit code 2."""
    try:
        # Without standalone mode click *returns* the code of a typer.Exit raised in a command.
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool):
            return code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        print("Aborted.", file=sys.stderr)
        return 130
    except typer.TyperException as exc:  # bad option, missing argument, unknown command
        print(f"Error: {exc.format_message()}", file=sys.stderr)
        return getattr(exc, "exit_code", 2) or 2
    return 0


def console_main() -> None:
    sys.exit(main())
