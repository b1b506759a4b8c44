"""Errors elbokit raises on purpose. The CLI turns every `ElbokitError` into one line and exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ElbokitError(ValueError):
    """Bad input or a bad combination: the message is one sentence that says what to do instead."""


class UnknownNameError(ElbokitError):
    """A term, prior, estimator or dataset name that no plugin registered."""


class IncompatibleError(ElbokitError):
    """A component whose declared needs the prior or the data cannot meet."""


class PluginError(ElbokitError):
    """A plugin that failed to import, raised in a hook, or registered a name twice."""


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> UnknownNameError:
    """Build the standard 'unknown X' error: names the valid choices and the closest one."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return UnknownNameError(
        f"Unknown {kind} {name!r}.{hint} Valid choices: {', '.join(choices) or '(none)'}."
    )
