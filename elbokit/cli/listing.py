"""`elbokit terms|priors|estimators|models|plugins`: what is registered, as rich tables or JSON,
and with a NAME (`elbokit terms infonce`, `elbokit estimators entropy/mws`) one component in
detail: its description, the plugin that supplies it, every option with type, default and
meaning (read from its declaration, `elbokit.option_specs`), what it needs, and an example."""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from typing import Any, Optional

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


def terms(name: Optional[str] = typer.Argument(None, help="A term's name (e.g. infonce): show its options, needs and an example."),
          json_output: bool = JSON_OPTION) -> None:
    """List the ELBO terms (presets: classic = recon,kl; ed = recon,infonce,entropy,xent), or show one: elbokit terms NAME."""
    if name is not None:
        return show_detail("term", name, json_output)
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


def priors(name: Optional[str] = typer.Argument(None, help="A prior's name (e.g. gmm): show its options, capabilities and an example."),
           json_output: bool = JSON_OPTION) -> None:
    """List the priors p(z), or show one: elbokit priors NAME."""
    if name is not None:
        return show_detail("prior", name, json_output)
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


def estimators(name: Optional[str] = typer.Argument(None, help="QUANTITY/NAME (e.g. entropy/mws): show its options, needs and an example."),
               json_output: bool = JSON_OPTION) -> None:
    """List the estimators, by the quantity they estimate, or show one: elbokit estimators QUANTITY/NAME."""
    if name is not None:
        return show_detail("estimator", name, json_output)
    rows = estimator_rows()
    if json_output:
        return print_json(rows)
    _table("Estimators", ["quantity", "name", "description", "kind", "needs", "plugin"],
           [[r["quantity"], r["name"], r["description"], r["kind"], ", ".join(r["needs"]) or "-", _plugin_label(r)] for r in rows])


def model_rows() -> list[dict[str, Any]]:
    reg = registry()
    return [{
        **_origin(reg, e),
        "description": e.description,
        "event_ndims": list(e.obj.event_ndims) if getattr(e.obj, "event_ndims", None) else None,
        "options": e.obj.option_defaults() if hasattr(e.obj, "option_defaults") else {},
    } for e in reg.entries("model")]


def models(name: Optional[str] = typer.Argument(None, help="A model's name (e.g. conv): show its options, the shapes it takes and an example."),
           json_output: bool = JSON_OPTION) -> None:
    """List the models, the encoder and decoder pairs that train takes as --model NAME, or show one: elbokit models NAME."""
    if name is not None:
        return show_detail("model", name, json_output)
    rows = model_rows()
    if json_output:
        return print_json(rows)
    shape = lambda n: "any (flattened)" if not n else " or ".join(f"{k}-D" for k in n)  # noqa: E731
    _table("Models", ["name", "description", "example shape", "options (defaults)", "plugin"],
           [[r["name"], r["description"], shape(r["event_ndims"]),
             ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-", _plugin_label(r)] for r in rows])


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




# -- detail views: `elbokit terms NAME`, `priors NAME`, `estimators QUANTITY/NAME`, `models NAME`,
# `data list NAME` ---------------------------------------------------------------------------
# Keyword arguments elbokit fills in itself, which are therefore not options (see
# docs/writing-plugins.md, "Options"): a term's estimator (chosen with TERM.estimator), the
# registry and recon's data_dim; a prior's dim and samples (--latent-dim, --prior-samples); a
# model's example shape and latent dimension; a dataset loader's seed (--data-seed).
FILLED_IN = {"term": ("estimator", "registry", "data_dim"), "prior": ("dim", "samples"), "estimator": (),
             "model": ("event_shape", "latent_dim"), "dataset": ("seed",)}

# How each kind's options are given on the command line; {name} is the component's.
OPTION_SYNTAX = {"term": "-o {name}.KEY=VALUE, or [terms.{name}] KEY = VALUE in a config file",
                 "prior": "--prior-option KEY=VALUE, or [prior.options] KEY = VALUE in a config file",
                 "model": "--model-option KEY=VALUE, or [model.options] KEY = VALUE in a config file",
                 "dataset": "--data-option KEY=VALUE, or [data.options] KEY = VALUE in a config file"}

# The options every term takes, handled by the objective rather than the term's constructor
# (elbokit.objective: `weight`, `estimator` and the warm-up keys WARMUP_KEYS).
WARMUP_HELP = {
    "warmup": "how the weight is annealed: linear (0 to the weight over warmup_steps) or cyclical",
    "warmup_steps": "optimiser steps of the warm-up (linear) or of one cycle (cyclical); unset: no warm-up",
    "warmup_ratio": "cyclical: the fraction of each cycle over which the weight ramps up",
    "warmup_cycles": "cyclical: the number of cycles, after which the weight stays at its value",
}


def _first_paragraph(obj: Any, fallback: str = "") -> str:
    """The docstring's first paragraph on one line (the listings show its first line)."""
    doc = inspect.getdoc(obj) or ""
    paragraph = doc.split("\n\n")[0].strip()
    return " ".join(paragraph.split()) or fallback


def _type_text(annotation: Any) -> str:
    """An annotation as users read it: `int | None`, `one of 'a', 'b'`, `Sequence[int]`."""
    from elbokit.objective import type_text

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if _is_union(annotation):
        return " | ".join(_type_text(a) for a in args)
    if isinstance(origin, type) and args:  # Sequence[int], list[float]: type_text says only "Sequence"
        return f"{origin.__name__}[{', '.join(_type_text(a) for a in args)}]"
    return type_text(annotation)


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _help_from_docstring(component: Any, option: str) -> str:
    """An option's meaning when the component has no `option_help` for it: the clause of its
    docstring that starts with the option's name in backquotes (`kernel` ...), if any."""
    doc = " ".join((inspect.getdoc(component) or "").split())
    match = re.search(rf"(?:^|[;:.(]\s)(`{re.escape(option)}`)", doc)
    if not match:
        return ""
    # The clause ends at a ';' or a full stop outside parentheses.
    depth, start = 0, match.start(1)
    for i in range(start, len(doc)):
        char = doc[i]
        depth += (char == "(") - (char == ")")
        if depth <= 0 and (char == ";" or (char == "." and (i + 1 == len(doc) or doc[i + 1] == " "))):
            return doc[start:i].strip()
    return doc[start:].strip()


def option_rows(component: Any, kind: str) -> list[dict[str, Any]]:
    """The declared options of a component (a class, or a dataset's loader): name, type,
    default, required, help, in signature order (see `elbokit.option_specs`)."""
    from elbokit.objective import option_specs

    rows = []
    for spec in option_specs(component, hidden=FILLED_IN[kind]):
        row = spec.as_dict()
        row["type"] = _type_text(spec.type) if spec.type is not None else None
        row["default"] = None if spec.required else _jsonable(spec.default)
        if not row["help"]:
            row["help"] = _help_from_docstring(component, spec.name)
        rows.append(row)
    return rows


def _common_term_options(cls: Any, reg: Any) -> list[dict[str, Any]]:
    from elbokit.objective import WARMUP_KEYS, WarmUp

    rows = [{"name": "weight", "type": "float", "default": 1.0, "required": False,
             "help": "the term's weight in the loss (also --terms NAME:WEIGHT)"}]
    if cls.quantity is not None:
        choices = sorted(n for (q, n) in reg.estimators if q == cls.quantity)
        rows.append({"name": "estimator", "type": "one of " + ", ".join(repr(c) for c in choices),
                     "default": cls.default_estimator, "required": False,
                     "help": f"the estimator of {cls.quantity} (elbokit estimators {cls.quantity}/NAME)"})
    warm = WarmUp()
    for key, field in zip(WARMUP_KEYS, dataclasses.fields(WarmUp)):
        default = getattr(warm, field.name)
        rows.append({"name": key, "type": type(default).__name__ if key != "warmup" else "one of 'linear', 'cyclical'",
                     "default": None if key == "warmup_steps" else default, "required": False,
                     "help": WARMUP_HELP[key]})
    return rows


def _needs_rows(needs: set[str], reg: Any) -> list[dict[str, Any]]:
    """Each need, what it means, and what cannot provide it."""
    from elbokit.estimators import NEEDS

    out = []
    for need in sorted(needs):
        row = {"name": need, "text": NEEDS.get(need, need)}
        if need == "prior_log_prob":
            row["refused_by_priors"] = [_display_name(reg, e) for e in reg.entries("prior") if not e.obj.has_log_prob]
        if need == "positives":
            row["provided_by_datasets"] = [n for n in reg.datasets]
        out.append(row)
    return out


def _example_value(row: dict[str, Any], spec_type: Any, kind: str) -> str | None:
    """A valid value that differs from the default, written as the command line takes it
    (None when the declaration does not say what else is valid, e.g. a plain `str`)."""
    default = row["default"]
    if row["required"]:
        return None
    members = typing.get_args(spec_type) if _is_union(spec_type) else (spec_type,)
    for t in members:
        if typing.get_origin(t) is typing.Literal:
            other = [a for a in typing.get_args(t) if a != default]
            if other:
                return str(other[0]).lower() if isinstance(other[0], bool) else str(other[0])
    if isinstance(default, bool):
        return str(not default).lower()
    if isinstance(default, int) and int in members:
        # Model and data sizes get smaller (a faster example), counts larger (more is always valid).
        return str(max(1, default // 2)) if kind in ("model", "dataset") else str(default * 2 if default > 0 else 1)
    if isinstance(default, float) and float in members:
        return f"{default * 2:g}" if default > 0 else ("0.5" if default == 0 else None)
    if isinstance(default, list) and default and all(isinstance(v, int) and not isinstance(v, bool) for v in default):
        return ",".join(str(max(1, v // 2)) for v in default)
    return None


def _pick_example(component: Any, kind: str, rows: list[dict[str, Any]]) -> tuple[str, str] | None:
    from elbokit.objective import option_specs

    declared_types = {s.name: s.type for s in option_specs(component, hidden=FILLED_IN[kind])}
    for row in rows:
        value = _example_value(row, declared_types.get(row["name"]), kind)
        if value is not None:
            return row["name"], value
    return None


def _terms_for(term_name: str, reg: Any) -> str:
    """A term list to show `term_name` in: the first built-in preset that holds it, else recon
    and it (or it alone for recon)."""
    from elbokit.objective import PRESETS

    for spec in PRESETS.values():
        if term_name in spec.split(","):
            return spec
    return term_name if term_name == "recon" or "recon" not in reg.terms else f"recon,{term_name}"


def _prior_args(entry: Any, reg: Any) -> list[str]:
    """--prior NAME, with the prior samples file it is fitted to."""
    args = ["--prior", _display_name(reg, entry)]
    if entry.obj.needs_samples:
        args += ["--prior-samples", "prior_samples.npy"]
    return args


def _example(kind: str, entry: Any, reg: Any, rows: list[dict[str, Any]], est_rows: list[dict[str, Any]] = ()) -> str:
    """An `elbokit train` command that uses the component with a non-default option value."""
    name = _display_name(reg, entry)
    args: list[str] = []
    if kind == "term":
        args += ["--terms", _terms_for(entry.name, reg)]
        picked = _pick_example(entry.obj, kind, rows)
        if picked is None and entry.obj.quantity is not None:
            est = reg.estimators.get((entry.obj.quantity, entry.obj.default_estimator))
            picked = _pick_example(est.obj, "estimator", est_rows) if est is not None else None
        if picked is not None:
            args += ["-o", f"{entry.name}.{picked[0]}={picked[1]}"]
    elif kind == "estimator":
        quantity = entry.obj.quantity
        users = [e for e in reg.entries("term") if e.obj.quantity == quantity and e.name in reg.terms]
        term = next((e for e in users if e.obj.default_estimator == entry.name), users[0] if users else None)
        if term is None:
            return ""
        args += ["--terms", _terms_for(term.name, reg), "-o", f"{term.name}.estimator={name}"]
        picked = _pick_example(entry.obj, kind, rows)
        if picked is not None:
            args += ["-o", f"{term.name}.{picked[0]}={picked[1]}"]
    elif kind == "prior":
        if not entry.obj.has_log_prob:  # the classic kl needs a density: the ed terms with knn
            args += ["--terms", "ed", "-o", "xent.estimator=knn"]
        args += _prior_args(entry, reg)
        picked = _pick_example(entry.obj, kind, rows)
        if picked is not None:
            args += ["--prior-option", f"{picked[0]}={picked[1]}"]
    elif kind == "model":
        ndims = getattr(entry.obj, "event_ndims", None)
        if ndims is not None and 1 not in ndims and 3 in ndims and "digits" in reg.datasets:
            args += ["--data", "digits"]  # (1, 8, 8) images
        args += ["--model", name]
        picked = _pick_example(entry.obj, kind, rows)
        if picked is not None:
            args += ["--model-option", f"{picked[0]}={picked[1]}"]
    elif kind == "dataset":
        args += ["--data", name]
        picked = _pick_example(entry.obj.loader, kind, rows)
        if picked is not None:
            args += ["--data-option", f"{picked[0]}={picked[1]}"]
    return " ".join(["elbokit", "train", *args])


def _resolve_estimator(text: str, reg: Any) -> Any:
    """`QUANTITY/NAME` (as the benchmark names estimators: `entropy/mws`), or a bare NAME that
    only one quantity has."""
    from elbokit.errors import ElbokitError, unknown_name
    from elbokit.estimators import QUANTITIES

    every = sorted(f"{q}/{n}" for (q, n) in reg.estimators)
    quantity, slash, name = text.partition("/")
    if slash:
        if quantity not in QUANTITIES:
            raise unknown_name("quantity", quantity, QUANTITIES)
        return reg.entry("estimator", name, quantity)
    found = [e for e in reg.entries("estimator") if e.name == text or e.qualified == text]
    if len(found) > 1:
        raise ElbokitError(f"The estimator name '{text}' is taken by several quantities; give QUANTITY/NAME: "
                           f"{', '.join(f'{e.obj.quantity}/{e.name}' for e in found)}.")
    if not found:
        raise unknown_name("estimator", text, every)
    return found[0]


def _provenance(entry: Any) -> dict[str, Any]:
    from elbokit.plugins import provenance_of

    return provenance_of(entry)


def term_detail(name: str) -> dict[str, Any]:
    from elbokit.estimators import QUANTITIES

    reg = registry()
    entry = reg.entry("term", name)
    cls = entry.obj
    rows = option_rows(cls, "term")
    needs = set(cls.needs)
    estimator = None
    est_rows: list[dict[str, Any]] = []
    if cls.quantity is not None:
        est = reg.estimators.get((cls.quantity, cls.default_estimator))
        est_rows = option_rows(est.obj, "estimator") if est is not None else []
        if est is not None:
            needs |= set(est.obj.needs)
        estimator = {"default": cls.default_estimator,
                     "choices": sorted(n for (q, n) in reg.estimators if q == cls.quantity),
                     "options": est_rows}
    from elbokit.objective import PRESETS

    return {
        "kind": "term", "name": _display_name(reg, entry), "qualified": entry.qualified,
        "description": _first_paragraph(cls, entry.description), "plugin": _provenance(entry),
        "quantity": cls.quantity, "quantity_description": QUANTITIES.get(cls.quantity or "", None),
        "sign": cls.sign, "options": rows, "estimator": estimator,
        "common_options": _common_term_options(cls, reg), "needs": _needs_rows(needs, reg),
        "presets": sorted(p for p, spec in PRESETS.items() if entry.name in spec.split(",")) if entry.builtin else [],
        "example": _example("term", entry, reg, rows, est_rows),
    }


def prior_detail(name: str) -> dict[str, Any]:
    reg = registry()
    entry = reg.entry("prior", name)
    cls = entry.obj
    rows = option_rows(cls, "prior")
    density_needed = sorted({f"{e.obj.quantity}/{e.name}" for e in reg.entries("estimator")
                             if "prior_log_prob" in e.obj.needs}
                            | {e.name for e in reg.entries("term") if "prior_log_prob" in e.obj.needs})
    return {
        "kind": "prior", "name": _display_name(reg, entry), "qualified": entry.qualified,
        "description": _first_paragraph(cls, entry.description), "plugin": _provenance(entry),
        "has_log_prob": cls.has_log_prob, "has_rsample": cls.has_rsample, "needs_samples": cls.needs_samples,
        "options": rows,
        "needs": (["prior samples: an (n, latent_dim) array in a .npy/.npz file, --prior-samples FILE"]
                  if cls.needs_samples else []),
        "refused_by": [] if cls.has_log_prob else density_needed,
        "example": _example("prior", entry, reg, rows),
    }


def estimator_detail(name: str) -> dict[str, Any]:
    from elbokit.estimators import QUANTITIES, SCOPES

    reg = registry()
    entry = _resolve_estimator(name, reg)
    cls = entry.obj
    rows = option_rows(cls, "estimator")
    terms_using = [{"term": e.name, "default": e.obj.default_estimator == entry.name}
                   for e in reg.entries("term") if e.obj.quantity == cls.quantity and e.name in reg.terms]
    return {
        "kind": "estimator", "name": f"{cls.quantity}/{_display_name(reg, entry)}", "qualified": entry.qualified,
        "quantity": cls.quantity, "quantity_description": QUANTITIES.get(cls.quantity, ""),
        "description": _first_paragraph(cls, entry.description), "plugin": _provenance(entry),
        "estimate_kind": cls.kind, "scope": cls.scope, "scope_description": SCOPES.get(cls.scope or "", None),
        "options": rows, "needs": _needs_rows(set(cls.needs), reg), "terms": terms_using,
        "example": _example("estimator", entry, reg, rows),
    }


def model_detail(name: str) -> dict[str, Any]:
    reg = registry()
    entry = reg.entry("model", name)
    cls = entry.obj
    rows = option_rows(cls, "model")
    ndims = getattr(cls, "event_ndims", None)
    return {
        "kind": "model", "name": _display_name(reg, entry), "qualified": entry.qualified,
        "description": _first_paragraph(cls, entry.description), "plugin": _provenance(entry),
        "event_ndims": list(ndims) if ndims else None, "options": rows,
        "example": _example("model", entry, reg, rows),
    }


def dataset_detail(name: str) -> dict[str, Any]:
    reg = registry()
    entry = reg.entry("dataset", name)
    loader = entry.obj.loader
    rows = option_rows(loader, "dataset")
    return {
        "kind": "dataset", "name": _display_name(reg, entry), "qualified": entry.qualified,
        "description": entry.description or _first_paragraph(loader), "plugin": _provenance(entry),
        "options": rows, "example": _example("dataset", entry, reg, rows),
    }


DETAILS = {"term": term_detail, "prior": prior_detail, "estimator": estimator_detail, "model": model_detail,
           "dataset": dataset_detail}


def _plugin_text(prov: dict[str, Any]) -> str:
    if prov["builtin"]:
        return f"built-in, {prov['distribution']} {prov['version']} ({prov['plugin']})"
    version = f" {prov['version']}" if prov.get("version") else ""
    return f"plugin {prov['distribution'] or prov['plugin']}{version}"


def _default_text(row: dict[str, Any]) -> str:
    if row["required"]:
        return "required"
    default = row["default"]
    return ",".join(str(v) for v in default) if isinstance(default, list) else repr(default)


def print_detail(d: dict[str, Any]) -> None:
    """The detail view as text: prose wrapped between words at the terminal's width (with a
    hanging indent), option tables that keep each option name whole, and the example command
    on one line so that it can be copied."""
    import textwrap

    out = console()
    width = max(40, out.width)
    blank = [False]  # the last line printed was blank: never two in a row

    def say(text: str = "", indent: str = "") -> None:
        if not text and blank[0]:
            return
        lines = textwrap.wrap(text, width=width, subsequent_indent=indent + "  ", initial_indent=indent,
                              break_long_words=False, break_on_hyphens=False) if text else [""]
        for line in lines:
            out.print(line, highlight=False, markup=False, soft_wrap=True)
        blank[0] = not text

    def options(title: str, rows: list[dict[str, Any]]) -> None:
        say()
        if not rows:
            say(f"{title}: none.")
            return
        say(title + ":")
        print_table(None, ["option", "type", "default", "meaning"],
                    [[r["name"], r["type"] or "any", _default_text(r), r["help"] or "-"] for r in rows])
        blank[0] = False

    kind = d["kind"]
    bare = d["name"].split("/")[-1]
    say(f"{kind} {d['name']}: {_plugin_text(d['plugin'])}")
    say(d["description"] or "(no description)")
    say()
    if kind == "term":
        if d["quantity"]:
            sign = "+" if d["sign"] > 0 else "-"
            say(f"Estimates {d['quantity']}, {d['quantity_description']}; the loss contribution is "
                f"{sign}{d['quantity']} (nats per example).")
            est = d["estimator"]
            others = [c for c in est["choices"] if c != est["default"]]
            say(f"Estimators: {est['default']} (default)" + (f", {', '.join(others)}" if others else "")
                + f"; pick one with -o {bare}.estimator=NAME (elbokit estimators {d['quantity']}/NAME).")
        if d["presets"]:
            say(f"In the presets: {', '.join(d['presets'])}.")
    elif kind == "estimator":
        say(f"Estimates {d['quantity']}, {d['quantity_description']}; the value is: {d['estimate_kind']}; "
            f"scope: {d['scope'] or 'undeclared (not usable on several processes)'}.")
        users = [t["term"] + (" (its default)" if t["default"] else "") for t in d["terms"]]
        if users:
            say(f"Used by the terms: {', '.join(users)}; pick it with -o TERM.estimator={bare}.")
    elif kind == "prior":
        yes = lambda b: "yes" if b else "no"  # noqa: E731
        say(f"log_prob: {yes(d['has_log_prob'])}; rsample: {yes(d['has_rsample'])}; "
            f"fitted to prior samples: {yes(d['needs_samples'])}.")
        if d["refused_by"]:
            say(f"It has no density, so these estimators refuse it: {', '.join(d['refused_by'])}.")
    elif kind == "model":
        ndims = d["event_ndims"]
        say("Takes examples of any shape (flattened)." if not ndims else
            f"Takes {' or '.join(f'{n}-D' for n in ndims)} examples" + (", (C, H, W)." if ndims == [3] else "."))
    if kind in ("term", "estimator", "prior"):
        needs = d.get("needs") or []
        say("Needs:" if needs else ("Needs: no input of its own." if kind == "prior"
                                    else "Needs: nothing beyond the batch's codes and the prior."))
        for n in needs:
            if isinstance(n, str):
                say(n, "  ")
                continue
            extra = ""
            if n.get("refused_by_priors"):
                extra = f" (not: {', '.join(n['refused_by_priors'])})"
            elif n.get("provided_by_datasets"):
                extra = f" (the datasets {', '.join(n['provided_by_datasets'])} have them; a file needs x_pos)"
            say(f"{n['name']}: {n['text']}{extra}", "  ")
    syntax = ("-o TERM.KEY=VALUE, TERM a term that uses it" if kind == "estimator"
              else OPTION_SYNTAX[kind].format(name=bare))
    options(f"Options ({syntax})", d["options"])
    if kind == "term":
        est = d["estimator"]
        if est is not None:
            options(f"Options of its default estimator {d['quantity']}/{est['default']} (-o {bare}.KEY=VALUE)",
                    est["options"])
        options(f"Options every term takes (-o {bare}.KEY=VALUE)", d["common_options"])
    if d.get("example"):
        say()
        say("Example:")
        out.print("  " + d["example"], highlight=False, markup=False, soft_wrap=True)


def show_detail(kind: str, name: str, json_output: bool) -> None:
    detail = DETAILS[kind](name)
    if json_output:
        return print_json(detail)
    print_detail(detail)


def register(app: typer.Typer) -> None:
    for command in (terms, priors, estimators, models, plugins):
        app.command(name=command.__name__)(handle_errors(command))
