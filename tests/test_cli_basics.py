"""What a user meets first: `python -m elbokit`, `--version`, `elbokit` alone, help that
shows every default at 80 columns without cutting it, and tables that wrap by column."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

ENV = {**os.environ, "COLUMNS": "80"}


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=env or ENV)


def test_python_m_elbokit_version_prints_every_version_without_importing_torch():
    proc = _run("-m", "elbokit", "--version")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    import elbokit

    assert lines["elbokit"] in (elbokit.__version__, importlib.metadata.version("elbokit"))
    assert lines["torch"] == importlib.metadata.version("torch")
    # Every plugin installed under the entry-point group is named with its version.
    installed = {ep.dist.name: ep.dist.version for ep in importlib.metadata.entry_points(group="elbokit") if ep.dist}
    for name, version in installed.items():
        assert f"{name} {version}" in lines["plugins:"]
    if not installed:
        assert lines["plugins:"] == "none"

    code = ("import sys\nfrom elbokit.cli import main\ncode = main(['--version'])\n"
            "sys.stderr.write(f'CODE={code} TORCH={\"torch\" in sys.modules}')")
    proc = _run("-c", code)
    assert "CODE=0 TORCH=False" in proc.stderr, proc.stderr


@pytest.mark.parametrize("args", [[], ["data"]])
def test_a_command_group_alone_prints_its_help_and_succeeds(run_cli, args):
    result = run_cli(*args)
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout.startswith("Usage: ") and "Commands:" in result.stdout


def _all_commands():
    """Every command path of the app (the app itself, groups, commands)."""
    import typer.main

    from elbokit.cli import app

    root = typer.main.get_command(app)
    out, stack = [], [((), root)]
    while stack:
        path, cmd = stack.pop()
        out.append((path, cmd))
        for name, sub in getattr(cmd, "commands", {}).items():
            stack.append((path + (name,), sub))
    return out


def test_help_of_every_command_shows_every_default_text_at_80_columns(run_cli, monkeypatch):
    """Each option's help is printed whole: its "[classic]"-style default texts are not
    swallowed as markup, nothing is cut with an ellipsis, and no line passes 80 columns."""
    monkeypatch.setenv("COLUMNS", "80")
    commands = _all_commands()
    assert len(commands) >= 10
    checked = 0
    for path, cmd in commands:
        result = run_cli(*path, "--help")
        assert result.exit_code == 0, (path, result.stderr)
        text = result.stdout
        assert max(len(line) for line in text.splitlines()) <= 80, path
        # "..." only as click writes a repeatable argument ([ARGS]..., {run_dirs}...), never a cut.
        assert "…" not in text and "..." not in re.sub(r"[\w\]}]\.\.\.", "", text), (path, text)
        # Click may wrap a line after a hyphen ("standard-\nnormal"): compare with those breaks joined.
        flat = re.sub(r"-\s+", "-", " ".join(text.split()))
        for param in cmd.params:
            for fragment in re.findall(r"\[[^\]]+\]", getattr(param, "help", None) or ""):
                assert re.sub(r"-\s+", "-", " ".join(fragment.split())) in flat, (path, param.name, fragment)
                checked += 1
        for sub in getattr(cmd, "commands", {}).values():  # a group lists each command's whole first paragraph
            first = re.sub(r"-\s+", "-", " ".join((sub.short_help or sub.help or "").split()))
            assert first and first in flat, (path, sub.name)
    assert checked >= 10  # train alone has more than 10 [default] texts


def test_train_help_shows_the_defaults_the_issue_names(run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    flat = " ".join(run_cli("train", "--help").stdout.split())
    for text in ("[classic]", "[on]", "[runs/<date-time>]", "[0.001]", "[400,400]"):
        assert text in flat


def test_tables_wrap_by_column_not_inside_words(run_cli, monkeypatch):
    """At 80 columns nothing is cropped, every name is printed whole, and so is every word of
    the descriptions up to PROSE_MIN characters (longer ones may be folded)."""
    import json

    from elbokit.cli.common import PROSE_MIN

    monkeypatch.setenv("COLUMNS", "80")
    for command in ("terms", "priors", "estimators"):
        rows = json.loads(run_cli(command, "--json").stdout)
        lines = run_cli(command).stdout.splitlines()
        assert max(len(line) for line in lines) <= 80
        printed = {w for line in lines for w in line.split()}
        names = {row["name"] for row in rows}
        words = {w for row in rows for w in str(row["description"]).split() if len(w) <= PROSE_MIN}
        assert names <= printed and words <= printed, (command, (names | words) - printed)


def test_column_widths_give_each_column_its_longest_word():
    from elbokit.cli.common import column_widths

    columns = ["name", "description", "plugin"]
    cells = [["standard-normal", "a long description " * 10, "elbokit-heavytail"]]
    widths = column_widths(columns, cells, 60)
    assert widths[0] == len("standard-normal") and widths[2] == len("elbokit-heavytail")
    assert sum(widths) == 60 and widths[1] == 60 - widths[0] - widths[2]  # the prose takes the rest
    assert column_widths(columns, [["a", "b", "c"]], 80) == [None, None, None]  # fits: rich's own layout
