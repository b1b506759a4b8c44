"""`elbokit terms|priors|estimators|plugins`: what is registered, as rich tables or JSON."""

from __future__ import annotations

from typing import Any

import typer

from .common import console, handle_errors, print_json, registry

JSON_OPTION = typer.Option(False, "--json", help="Print a JSON list instead of a table.")


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for col in columns:
        table.add_column(col, overflow="fold")
    from rich.markup import escape

    for row in rows:
        table.add_row(*(escape(str(cell)) for cell in row))
    console().print(table)


def _plugin_label(plugin: str) -> str:
    return "built-in" if plugin.startswith("elbokit.default_plugins.") else plugin


def term_rows() -> list[dict[str, Any]]:
    from elbokit.objective import PRESETS, describe_needs

    reg = registry()
    rows = []
    for name, entry in reg.terms.items():
        cls = entry.obj
        needs = set(cls.needs)
        if cls.quantity is not None:
            est = reg.estimators.get((cls.quantity, cls.default_estimator))
            if est is not None:
                needs |= set(est.obj.needs)
        rows.append({
            "name": name,
            "description": entry.description,
            "quantity": cls.quantity,
            "sign": cls.sign,
            "default_estimator": cls.default_estimator,
            "estimators": sorted(n for (q, n) in reg.estimators if q == cls.quantity) if cls.quantity else [],
            "needs": sorted(needs),
            "needs_text": describe_needs(frozenset(needs)),
            "presets": sorted(p for p, spec in PRESETS.items() if name in spec.split(",")),
            "plugin": entry.plugin,
        })
    return rows


def terms(json_output: bool = JSON_OPTION) -> None:
    """List the ELBO terms (presets: classic = recon,kl; ed = recon,infonce,entropy,xent)."""
    rows = term_rows()
    if json_output:
        return print_json(rows)
    _table("Terms (loss contributions in nats per example, ELBO sign)",
           ["name", "description", "estimators (default first)", "needs", "plugin"],
           [[r["name"], r["description"],
             ", ".join([r["default_estimator"]] + [e for e in r["estimators"] if e != r["default_estimator"]]) if r["default_estimator"] else "-",
             ", ".join(r["needs"]) or "-", _plugin_label(r["plugin"])] for r in rows])


def prior_rows() -> list[dict[str, Any]]:
    reg = registry()
    return [{
        "name": name,
        "description": e.description,
        "has_log_prob": e.obj.has_log_prob,
        "has_rsample": e.obj.has_rsample,
        "needs_samples": e.obj.needs_samples,
        "plugin": e.plugin,
    } for name, e in reg.priors.items()]


def priors(json_output: bool = JSON_OPTION) -> None:
    """List the priors p(z)."""
    rows = prior_rows()
    if json_output:
        return print_json(rows)
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    _table("Priors", ["name", "description", "log_prob", "fitted to samples", "plugin"],
           [[r["name"], r["description"], yes(r["has_log_prob"]), yes(r["needs_samples"]), _plugin_label(r["plugin"])] for r in rows])


def estimator_rows() -> list[dict[str, Any]]:
    from elbokit.estimators import QUANTITIES

    reg = registry()
    return [{
        "name": name,
        "quantity": quantity,
        "quantity_description": QUANTITIES.get(quantity, ""),
        "description": e.description,
        "kind": e.obj.kind,
        "needs": sorted(e.obj.needs),
        "plugin": e.plugin,
    } for (quantity, name), e in reg.estimators.items()]


def estimators(json_output: bool = JSON_OPTION) -> None:
    """List the estimators, by the quantity they estimate."""
    rows = estimator_rows()
    if json_output:
        return print_json(rows)
    _table("Estimators", ["quantity", "name", "description", "kind", "needs", "plugin"],
           [[r["quantity"], r["name"], r["description"], r["kind"], ", ".join(r["needs"]) or "-", _plugin_label(r["plugin"])] for r in rows])


def plugin_rows() -> list[dict[str, Any]]:
    """One row per plugin; a plugin that failed (to import, in a hook, with a duplicate name)
    carries its error messages in `error`."""
    reg = registry()
    rows = [{
        "name": info.name,
        "description": "built-in" if info.builtin else ("failed to load" if not info.loaded else "third-party plugin"),
        "version": info.version,
        "builtin": info.builtin,
        "registers": info.registers,
        "error": "; ".join(info.errors) or None,
    } for info in reg.plugins.values()]
    known = set(reg.plugins)
    for plugin, message in reg.failures:
        if plugin not in known:
            rows.append({"name": plugin, "description": "failed to load", "version": None, "builtin": False,
                         "registers": {}, "error": message})
    return rows


def plugins(json_output: bool = JSON_OPTION,
            all_plugins: bool = typer.Option(False, "--all", help="Include the built-in plugins.")) -> None:
    """List installed plugins, their versions, what each registers, and any that failed."""
    rows = [r for r in plugin_rows() if all_plugins or not r["builtin"]]
    if json_output:
        return print_json(rows)
    if not rows:
        console().print("No third-party plugins installed (use --all to show the built-ins).")
        return
    _table("Plugins", ["name", "version", "registers", "error"],
           [[r["name"], r["version"] or "-",
             "; ".join(f"{k}: {', '.join(v)}" for k, v in r["registers"].items()) or "-",
             r["error"] or ""] for r in rows])


def register(app: typer.Typer) -> None:
    for command in (terms, priors, estimators, plugins):
        app.command(name=command.__name__)(handle_errors(command))
