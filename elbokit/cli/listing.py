"""`elbokit terms|priors|estimators|models|plugins`: what is registered, as rich tables or JSON."""

from __future__ import annotations

from typing import Any

import typer

from .common import console, handle_errors, print_json, print_table, registry

JSON_OPTION = typer.Option(False, "--json", help="Print a JSON list instead of a table.")


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    print_table(title, columns, rows)


def _plugin_label(row: dict[str, Any]) -> str:
    """`built-in`, or `elbokit-laplace 0.1.0`: which plugin, at which version, provides a name."""
    if row.get("builtin"):
        return "built-in"
    return f"{row['plugin']} {row['version']}" if row.get("version") else row["plugin"]


def _display_name(reg: Any, entry: Any) -> str:
    """The bare name when it picks this entry; the qualified `PLUGIN:NAME` otherwise (a name
    two plugins register, or a plugin's that a built-in keeps)."""
    try:
        chosen = reg.entry(entry.kind, entry.name, getattr(entry.obj, "quantity", None))
    except Exception:  # noqa: BLE001 - an ambiguous bare name: show the qualified one
        chosen = None
    return entry.name if chosen is entry else entry.qualified


def _origin(reg: Any, entry: Any) -> dict[str, Any]:
    """The columns every listing shares: the name to type, the plugin, its version."""
    return {"name": _display_name(reg, entry), "qualified": entry.qualified, "plugin": entry.plugin,
            "version": entry.version, "builtin": entry.builtin}


def term_rows() -> list[dict[str, Any]]:
    from elbokit.objective import PRESETS, describe_needs

    reg = registry()
    rows = []
    for entry in reg.entries("term"):
        cls = entry.obj
        needs = set(cls.needs)
        if cls.quantity is not None:
            est = reg.estimators.get((cls.quantity, cls.default_estimator))
            if est is not None:
                needs |= set(est.obj.needs)
        rows.append({
            **_origin(reg, entry),
            "description": entry.description,
            "quantity": cls.quantity,
            "sign": cls.sign,
            "default_estimator": cls.default_estimator,
            "estimators": sorted(n for (q, n) in reg.estimators if q == cls.quantity) if cls.quantity else [],
            "needs": sorted(needs),
            "needs_text": describe_needs(frozenset(needs)),
            "presets": sorted(p for p, spec in PRESETS.items() if entry.name in spec.split(",")) if entry.builtin else [],
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
             ", ".join(r["needs"]) or "-", _plugin_label(r)] for r in rows])


def prior_rows() -> list[dict[str, Any]]:
    reg = registry()
    return [{
        **_origin(reg, e),
        "description": e.description,
        "has_log_prob": e.obj.has_log_prob,
        "has_rsample": e.obj.has_rsample,
        "needs_samples": e.obj.needs_samples,
    } for e in reg.entries("prior")]


def priors(json_output: bool = JSON_OPTION) -> None:
    """List the priors p(z)."""
    rows = prior_rows()
    if json_output:
        return print_json(rows)
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    _table("Priors", ["name", "description", "log_prob", "fitted to samples", "plugin"],
           [[r["name"], r["description"], yes(r["has_log_prob"]), yes(r["needs_samples"]), _plugin_label(r)] for r in rows])


def estimator_rows() -> list[dict[str, Any]]:
    from elbokit.estimators import QUANTITIES

    reg = registry()
    return [{
        **_origin(reg, e),
        "quantity": e.obj.quantity,
        "quantity_description": QUANTITIES.get(e.obj.quantity, ""),
        "description": e.description,
        "kind": e.obj.kind,
        "needs": sorted(e.obj.needs),
    } for e in reg.entries("estimator")]


def estimators(json_output: bool = JSON_OPTION) -> None:
    """List the estimators, by the quantity they estimate."""
    rows = estimator_rows()
    if json_output:
        return print_json(rows)
    _table("Estimators", ["quantity", "name", "description", "kind", "needs", "plugin"],
           [[r["quantity"], r["name"], r["description"], r["kind"], ", ".join(r["needs"]) or "-", _plugin_label(r)] for r in rows])


def model_rows() -> list[dict[str, Any]]:
    reg = registry()
    return [{
        "name": name,
        "description": e.description,
        "event_ndims": list(e.obj.event_ndims) if getattr(e.obj, "event_ndims", None) else None,
        "options": e.obj.option_defaults() if hasattr(e.obj, "option_defaults") else {},
        "plugin": e.plugin,
    } for name, e in reg.models.items()]


def models(json_output: bool = JSON_OPTION) -> None:
    """List the models, the encoder and decoder pairs that train takes as --model NAME."""
    rows = model_rows()
    if json_output:
        return print_json(rows)
    shape = lambda n: "any (flattened)" if not n else " or ".join(f"{k}-D" for k in n)  # noqa: E731
    _table("Models", ["name", "description", "example shape", "options (defaults)", "plugin"],
           [[r["name"], r["description"], shape(r["event_ndims"]),
             ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-", _plugin_label(r["plugin"])] for r in rows])


def plugin_rows() -> list[dict[str, Any]]:
    """One row per plugin (a distribution, with all its entry points): `status` is loaded,
    failed (its one-line `error`) or disabled (ELBOKIT_DISABLE_PLUGINS); `warnings` holds name
    clashes and missing docstrings."""
    reg = registry()
    rows = []
    for info in reg.plugins.values():
        status = info.status
        if info.errors and not info.registers:
            status = "failed"
        description = ("built-in" if info.builtin else {"failed": "failed to load", "disabled": "disabled"}
                       .get(status, "third-party plugin"))
        rows.append({
            "name": info.name,
            "description": description,
            "status": status,
            "version": info.version,
            "builtin": info.builtin,
            "entry_points": info.entry_points,
            "registers": info.registers,
            "error": "; ".join(info.errors) or None,
            "warnings": info.warnings,
        })
    return rows


def plugins(json_output: bool = JSON_OPTION,
            all_plugins: bool = typer.Option(False, "--all", help="Include the built-in plugins.")) -> None:
    """List installed plugins, their versions, what each registers, and any that failed or are disabled."""
    rows = [r for r in plugin_rows() if all_plugins or not r["builtin"]]
    if json_output:
        return print_json(rows)
    if not rows:
        console().print("No third-party plugins installed (use --all to show the built-ins).")
        return
    _table("Plugins", ["name", "version", "status", "registers", "error"],
           [[r["name"], r["version"] or "-", r["status"],
             "; ".join(f"{k}: {', '.join(v)}" for k, v in r["registers"].items()) or "-",
             r["error"] or ""] for r in rows])
    if any(r["status"] == "disabled" for r in rows):
        console().print("Entry-point plugins are disabled (ELBOKIT_DISABLE_PLUGINS is set); the built-ins are loaded.")


def register(app: typer.Typer) -> None:
    for command in (terms, priors, estimators, models, plugins):
        app.command(name=command.__name__)(handle_errors(command))
