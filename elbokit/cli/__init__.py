"""The `elbokit` command line: thin Typer commands that parse, call the library and print.

Command modules import torch and the library inside their functions, so that `--help` is fast.
"""

from __future__ import annotations

import sys

import typer

from . import benchmark, data, evaluate, listing, plot, runs, train, use

app = typer.Typer(
    name="elbokit",
    help="Compose, train and honestly evaluate VAE objectives from pluggable terms, priors and estimators.",
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def versions() -> dict[str, object]:
    """elbokit's, torch's and each entry-point plugin's version, from the installed packages'
    metadata: nothing is imported (torch takes seconds to import; a broken plugin cannot
    stop `--version`)."""
    import importlib.metadata as md

    def version_of(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    from elbokit import __version__

    plugins: dict[str, str | None] = {}
    for ep in md.entry_points(group="elbokit"):
        dist = getattr(ep, "dist", None)
        plugins[dist.name if dist is not None else ep.name] = dist.version if dist is not None else None
    return {"elbokit": version_of("elbokit") or __version__, "torch": version_of("torch"),
            "python": sys.version.split()[0], "plugins": dict(sorted(plugins.items()))}


def _print_version(value: bool) -> None:
    if not value:
        return
    info = versions()
    print(f"elbokit {info['elbokit']}")
    print(f"torch {info['torch'] or 'not installed'}")
    print(f"python {info['python']}")
    plugins = info["plugins"]
    if plugins:
        print("plugins: " + ", ".join(f"{name} {version or '(unknown version)'}" for name, version in plugins.items()))
    else:
        print("plugins: none")
    raise typer.Exit(0)


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print the versions of elbokit, torch and the installed plugins, and exit."),
    show_traceback: bool = typer.Option(False, "--traceback", help="When a plugin's code raises, print the full "
                                        "traceback after the one-line error (also ELBOKIT_TRACEBACK=1)."),
) -> None:
    """Compose, train and honestly evaluate VAE objectives from pluggable terms, priors and estimators."""
    from .common import set_traceback

    set_traceback(show_traceback)
    if ctx.invoked_subcommand is None:  # `elbokit` alone: the help, and success
        print(ctx.get_help())
        raise typer.Exit(0)

for _commands in (listing, train, evaluate, data, plot, benchmark, use, runs):
    _commands.register(app)


def _first_paragraph(text: str | None) -> str | None:
    import inspect

    return " ".join(inspect.cleandoc(text).split("\n\n")[0].split()) if text else None


def _plain_help(typer_app: typer.Typer) -> None:
    """Help as click prints it, for this app and every group and command under it: rich
    markup would swallow the "[classic]" and "[runs/<date-time>]" default texts of the
    options, and rich's option table cuts long help with an ellipsis at 80 columns; click's
    formatter wraps it. A command's line in its group's list is its whole first paragraph
    (wrapped), not click's first sentence cut at "e.g." or at 45 characters."""
    import inspect

    typer_app.rich_markup_mode = None
    for command in typer_app.registered_commands:
        if command.short_help is None:
            command.short_help = _first_paragraph(command.help or inspect.getdoc(command.callback))
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            if not isinstance(group.short_help, str):
                text = next((t for t in (group.help, group.typer_instance.info.help)
                             if isinstance(getattr(t, "value", t), str)), None)
                group.short_help = _first_paragraph(getattr(text, "value", text))
            _plain_help(group.typer_instance)


_plain_help(app)


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
        if type(exc).__name__ == "NoArgsIsHelpError":  # a group given no command: its help, and success
            print(exc.format_message())
            return 0
        print(f"Error: {exc.format_message()}", file=sys.stderr)
        return getattr(exc, "exit_code", 2) or 2
    return 0


def console_main() -> None:
    sys.exit(main())
