"""The plugin manager and the registry of terms, priors, estimators, datasets and models.

Built-in components live in `elbokit.default_plugins` and are loaded exactly like third-party
plugins, which come from the `elbokit` entry-point group: every entry point is registered on
its own and attributed to its distribution (a package may ship several, one per module).

Each plugin is validated on its own before its components are accepted (the way pytest checks
a plugin when it registers it): a hook implementation whose name matches no hook spec, a
component registered as the wrong kind, an instance instead of a class, an empty or invalid
name, unknown `needs` or an unknown quantity keep that plugin out with one line naming it and
the component, recorded in `Registry.failures`; everything else goes on working. Set
ELBOKIT_DISABLE_PLUGINS=1 to skip entry-point plugins (built-ins are always loaded).

Names: a built-in keeps its name unless a plugin registers the same name with
`register(Cls, override=True)`. When two third-party plugins register one name, both are kept
and the bare name is refused in one line that offers the qualified names `PLUGIN:NAME`
(`elbokit:NAME` for a built-in), which always work.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import re
import sys
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from . import hookspecs
from .errors import PluginError, unknown_name

ENTRY_POINT_GROUP = "elbokit"
DISABLE_ENV = "ELBOKIT_DISABLE_PLUGINS"
BUILTIN_LABEL = "elbokit"  # what `PLUGIN:NAME` calls the built-ins

DEFAULT_PLUGINS = (
    "elbokit.default_plugins.priors",
    "elbokit.default_plugins.estimators",
    "elbokit.default_plugins.terms",
    "elbokit.default_plugins.datasets",
    "elbokit.default_plugins.models",
)

HOOKS = ("register_terms", "register_priors", "register_estimators", "register_datasets", "register_models")
KINDS = {"register_terms": "term", "register_priors": "prior",
         "register_estimators": "estimator", "register_datasets": "dataset", "register_models": "model"}
HOOK_OF = {kind: hook for hook, kind in KINDS.items()}

# What users type: the same rule as a `--terms` item. No ':' (that separates PLUGIN:NAME).
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]*$")


@dataclass
class Entry:
    """One registered component: its name, the object, the plugin that registered it."""

    kind: str
    name: str
    obj: Any
    plugin: str
    description: str = ""
    version: str | None = None
    distribution: str | None = None
    entry_point: str | None = None
    builtin: bool = False
    override: bool = False

    @property
    def source(self) -> str:
        """The PLUGIN of `PLUGIN:NAME`: the distribution, `elbokit` for the built-ins."""
        return BUILTIN_LABEL if self.builtin else (self.distribution or self.plugin)

    @property
    def qualified(self) -> str:
        return f"{self.source}:{self.name}"

    @property
    def label(self) -> str:
        """`prior 'laplace' (plugin 'elbokit-laplace' 0.1.0)`: how messages name a component."""
        what = f"{self.kind} '{self.name}'" if self.kind != "estimator" else f"estimator '{self.obj.quantity}/{self.name}'"
        if self.builtin:
            return f"{what} (built-in)"
        version = f" {self.version}" if self.version else ""
        return f"{what} (plugin '{self.plugin}'{version})"


@dataclass
class DatasetEntry:
    name: str
    loader: Callable[..., Any]
    description: str


@dataclass
class PluginInfo:
    """One plugin as `elbokit plugins` lists it: a distribution (with its entry points), a
    built-in module, or a module given to `Registry.build`."""

    name: str
    version: str | None
    builtin: bool
    registers: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    loaded: bool = True
    entry_points: list[str] = field(default_factory=list)
    status: str = "loaded"  # loaded, failed, disabled


@dataclass
class _Source:
    """One registered pluggy plugin: a module of hooks (an entry point, a built-in, ...)."""

    key: str  # the name under which it is registered with pluggy
    plugin: str  # what messages call it: the distribution (or module) name
    label: str  # the plugin, with the entry point when its distribution has several
    obj: Any
    version: str | None = None
    distribution: str | None = None
    entry_point: str | None = None
    builtin: bool = False


def first_line(obj: Any) -> str:
    doc = getattr(obj, "__doc__", None) or ""
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""


class _Refused(Exception):
    """A registration that breaks the component contract (one line, naming the component)."""


class Registry:
    """Everything the loaded plugins registered, by kind and name."""

    def __init__(self) -> None:
        self.terms: dict[str, Entry] = {}
        self.priors: dict[str, Entry] = {}
        self.estimators: dict[tuple[str, str], Entry] = {}
        self.datasets: dict[str, Entry] = {}
        self.models: dict[str, Entry] = {}
        self.plugins: dict[str, PluginInfo] = {}
        self.failures: list[tuple[str, str]] = []  # (plugin, message): the plugin is kept out
        self.warnings: list[tuple[str, str]] = []  # (plugin, message): the plugin is loaded
        # Every accepted entry, by kind and qualified key (`PLUGIN:NAME`).
        self.qualified: dict[tuple[str, Any], Entry] = {}
        # Bare names that two third-party plugins registered: refused, qualified names offered.
        self.ambiguous: dict[tuple[str, Any], list[Entry]] = {}
        self._plugin_modules: dict[str, str] = {}  # module name -> plugin (for tracebacks)

    # -- building -------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        plugins: list[Any] | None = None,
        *,
        load_entry_points: bool | None = None,
        strict: bool = False,
    ) -> Registry:
        """Load the default plugins, then `plugins` (modules or objects with hookimpls), then
        entry points unless disabled. With `strict`, the first plugin failure (or name clash)
        raises `PluginError`."""
        registry = cls()
        pm = pluggy.PluginManager("elbokit")
        pm.add_hookspecs(hookspecs)
        sources: list[_Source] = []
        for module_name in DEFAULT_PLUGINS:
            module = importlib.import_module(module_name)
            pm.register(module, name=module_name)
            registry.plugins[module_name] = PluginInfo(module_name, None, builtin=True)
            sources.append(_Source(module_name, module_name, module_name, module, builtin=True))
        for plugin in plugins or []:
            name = getattr(plugin, "__name__", None) or type(plugin).__name__
            registry.plugins[name] = PluginInfo(name, None, builtin=False)
            source = _Source(name, name, name, plugin)
            if registry._register(pm, source, strict):
                sources.append(source)
        from_env = load_entry_points is None
        if from_env:
            load_entry_points = os.environ.get(DISABLE_ENV, "") in ("", "0")
        if load_entry_points:
            sources.extend(registry._load_entry_points(pm, strict))
        elif from_env:
            registry._list_disabled()
        for source in sources:
            registry._collect(pm, source, strict)
        return registry

    def _fail(self, plugin: str, message: str, strict: bool) -> None:
        if strict:
            raise PluginError(message)
        self.failures.append((plugin, message))
        info = self.plugins.get(plugin)
        if info is not None:
            info.errors.append(message)

    def _warn(self, plugin: str, message: str, strict: bool = False) -> None:
        if strict:
            raise PluginError(message)
        self.warnings.append((plugin, message))
        info = self.plugins.get(plugin)
        if info is not None:
            info.warnings.append(message)

    def _register(self, pm: pluggy.PluginManager, source: _Source, strict: bool) -> bool:
        """Validate one plugin's hook implementations on their own, then register it.
        pluggy's `check_pending` would stop at the first offender across all plugins."""
        for attr in dir(source.obj):
            try:
                opts = pm.parse_hookimpl_opts(source.obj, attr)
            except Exception:  # noqa: BLE001 - an attribute that cannot be read is no hook
                opts = None
            if opts is not None and attr not in HOOKS:
                close = difflib.get_close_matches(attr, HOOKS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f"; the hooks are {', '.join(HOOKS)}"
                self._fail(source.plugin, f"Plugin '{source.label}' implements '{attr}', which is not an elbokit "
                           f"hook{hint}; the plugin is not loaded.", strict)
                return False
        try:
            pm.register(source.obj, name=source.key)
        except Exception as exc:  # noqa: BLE001 - pluggy's validation: wrong hook arguments, ...
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self._fail(source.plugin, f"Plugin '{source.label}' cannot be registered: {message}", strict)
            return False
        module = getattr(source.obj, "__name__", None)
        if not source.builtin and isinstance(module, str):
            self._plugin_modules[module] = source.plugin
        return True

    def _load_entry_points(self, pm: pluggy.PluginManager, strict: bool) -> list[_Source]:
        # Loaded one by one (not pm.load_setuptools_entrypoints) so that one broken plugin is
        # reported and skipped instead of stopping elbokit; each entry point on its own (a
        # distribution may ship several), attributed to its distribution.
        # In a fixed order (by distribution, then entry point), whatever the order of sys.path.
        eps = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (_dist_name(e), e.name))
        per_dist = Counter(_dist_name(ep) for ep in eps)
        sources = []
        for ep in eps:
            dist_name, version = _dist_name(ep), _dist_version(ep)
            info = self.plugins.setdefault(dist_name, PluginInfo(dist_name, version, builtin=False))
            info.entry_points.append(ep.name)
            label = dist_name if per_dist[dist_name] == 1 else f"{dist_name}' entry point '{ep.name}"
            try:
                obj = ep.load()
            except Exception as exc:  # noqa: BLE001 - any failure of foreign code is reported
                info.loaded = False
                self._fail(dist_name, f"Plugin '{label}' failed to load: {type(exc).__name__}: {exc}", strict)
                continue
            source = _Source(f"{dist_name}:{ep.name}", dist_name, label, obj, version, dist_name, ep.name)
            if self._register(pm, source, strict):
                sources.append(source)
        return sources

    def _list_disabled(self) -> None:
        """With ELBOKIT_DISABLE_PLUGINS set, name the installed plugins (without importing them)."""
        try:
            eps = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
        except Exception:  # noqa: BLE001 - broken metadata must not stop elbokit
            return
        for ep in eps:
            dist_name = _dist_name(ep)
            info = self.plugins.setdefault(dist_name, PluginInfo(dist_name, _dist_version(ep), builtin=False,
                                                                 loaded=False, status="disabled"))
            info.entry_points.append(ep.name)

    def _collect(self, pm: pluggy.PluginManager, source: _Source, strict: bool) -> None:
        """Call the plugin's hooks, validate what it registers, and accept all of it or none."""
        staged: list[Entry] = []
        refused: list[str] = []
        for hook_name in HOOKS:
            impls = [i for i in getattr(pm.hook, hook_name).get_hookimpls() if i.plugin_name == source.key]
            kind = KINDS[hook_name]
            for impl in impls:
                def register(*args: Any, override: bool = False, **kwargs: Any) -> None:
                    try:
                        staged.append(_make_entry(kind, source, *args, override=override, **kwargs))
                    except _Refused as exc:
                        refused.append(str(exc))

                try:
                    impl.function(register=register)
                except Exception as exc:  # noqa: BLE001
                    refused.insert(0, f"Plugin '{source.label}' raised in {hook_name}: {type(exc).__name__}: {exc}")
                    break
        if refused:
            # The first problem is the one line; the plugin is kept out as a whole.
            self._fail(source.plugin, refused[0], strict)
            return
        for entry in staged:
            if not entry.description and not entry.builtin:
                self._warn(source.plugin, f"Plugin '{source.label}': {entry.kind} '{entry.name}' has no docstring "
                           "(its first line is what the listings show).")
            self._add(entry, strict)

    def _add(self, entry: Entry, strict: bool) -> None:
        table, key = self._table(entry)
        qkey = (entry.obj.quantity, entry.qualified) if entry.kind == "estimator" else entry.qualified
        label = "/".join(key) if isinstance(key, tuple) else key
        if (entry.kind, qkey) in self.qualified:
            self._fail(entry.plugin, f"Plugin '{entry.plugin}' registers the {entry.kind} '{label}' twice.", strict)
            return
        self.qualified[(entry.kind, qkey)] = entry
        info = self.plugins.get(entry.plugin)
        if info is not None:
            info.registers.setdefault(entry.kind + "s", []).append(label)
        if (entry.kind, key) in self.ambiguous:
            self.ambiguous[(entry.kind, key)].append(entry)
            return
        other = table.get(key)
        if other is None:
            table[key] = entry
        elif other.builtin and not entry.override:
            self._warn(entry.plugin, f"The {entry.kind} name '{label}' is a built-in's and stays so; plugin "
                       f"'{entry.plugin}' registers it too, and its {entry.kind} is '{entry.qualified}' (register it "
                       "with override=True to replace the built-in).", strict)
        elif other.builtin:
            table[key] = entry
            self._warn(entry.plugin, f"Plugin '{entry.plugin}' overrides the built-in {entry.kind} '{label}' "
                       f"(the built-in is still '{other.qualified}').")
        else:
            del table[key]
            self.ambiguous[(entry.kind, key)] = [other, entry]
            self._warn(entry.plugin, f"The {entry.kind} name '{label}' is registered by both '{other.plugin}' and "
                       f"'{entry.plugin}'; use '{other.qualified}' or '{entry.qualified}'.", strict)

    def _table(self, entry: Entry) -> tuple[dict, Any]:
        if entry.kind == "estimator":
            return self.estimators, (entry.obj.quantity, entry.name)
        return {"term": self.terms, "prior": self.priors, "dataset": self.datasets,
                "model": self.models}[entry.kind], entry.name

    # -- lookup ---------------------------------------------------------------------------
    def entry(self, kind: str, name: str, quantity: str | None = None) -> Entry:
        """The entry a user means by `name` (bare or `PLUGIN:NAME`); one line if none or two."""
        table = {"term": self.terms, "prior": self.priors, "estimator": self.estimators, "dataset": self.datasets,
                 "model": self.models}[kind]
        key = (quantity, name) if kind == "estimator" else name
        what = f"{quantity} estimator" if kind == "estimator" else kind
        if ":" in name:
            found = self.qualified.get((kind, key))
            if found is None:
                choices = [q for (k, q) in self.qualified if k == kind]
                choices = [q[1] for q in choices if q[0] == quantity] if kind == "estimator" else choices
                raise unknown_name(what, name, choices)
            return found
        if (kind, key) in self.ambiguous:
            options = " or ".join(f"'{e.qualified}'" for e in self.ambiguous[(kind, key)])
            raise PluginError(f"The {what} name '{name}' is registered by several plugins; pick one: {options}.")
        if key not in table:
            choices = [k[1] for k in table if k[0] == quantity] if kind == "estimator" else list(table)
            choices += [k[1] if isinstance(k, tuple) else k for (kk, k) in self.ambiguous if kk == kind
                        and (kind != "estimator" or k[0] == quantity)]
            raise unknown_name(what, name, choices)
        return table[key]

    def term(self, name: str) -> type:
        return self.entry("term", name).obj

    def prior(self, name: str) -> type:
        return self.entry("prior", name).obj

    def estimator(self, quantity: str, name: str) -> type:
        return self.entry("estimator", name, quantity).obj

    def model(self, name: str) -> type:
        return self.entry("model", name).obj

    def dataset(self, name: str) -> DatasetEntry:
        return self.entry("dataset", name).obj

    def entries(self, kind: str) -> list[Entry]:
        """Every accepted entry of a kind, in registration order (ambiguous names included)."""
        return [e for (k, _), e in self.qualified.items() if k == kind]

    def entry_for(self, obj: Any) -> Entry | None:
        """The entry that registered `obj` (a class, an instance of one, or a dataset loader)."""
        cls = obj if isinstance(obj, type) else type(obj)
        for entry in self.qualified.values():
            target = entry.obj.loader if entry.kind == "dataset" else entry.obj
            if target is obj or (entry.kind != "dataset" and target is cls):
                return entry
        return None

    def provenance(self, kind: str, name: str, quantity: str | None = None) -> dict[str, Any]:
        """Where the component a user names comes from, for run metadata:
        {kind, name, qualified, plugin, distribution, version, entry_point, builtin}.
        Built-ins report the distribution `elbokit` and its version."""
        return provenance_of(self.entry(kind, name, quantity))

    def blame(self, exc: BaseException) -> tuple[str, Entry | None] | None:
        """(plugin, entry or None) when `exc` was raised inside a plugin's code, else None.

        The traceback is walked from the innermost frame out: the first frame that belongs to
        a plugin (a method of a class it registered, its dataset loader, or a function of its
        modules) names the plugin; the component is the first such class or loader found from
        there outwards."""
        frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)][::-1]
        plugin: str | None = None
        for frame in frames:
            entry = self._entry_of_frame(frame)
            if entry is not None and not entry.builtin and plugin in (None, entry.plugin):
                return entry.plugin, entry
            if plugin is None:
                module = frame.f_globals.get("__name__", "")
                for prefix, owner in self._plugin_modules.items():
                    if module == prefix or module.startswith(prefix + "."):
                        plugin = owner
                        break
        return (plugin, None) if plugin is not None else None

    def _entry_of_frame(self, frame: Any) -> Entry | None:
        this = frame.f_locals.get("self")
        for entry in self.qualified.values():
            if entry.builtin:
                continue
            if entry.kind == "dataset":
                if getattr(entry.obj.loader, "__code__", None) is frame.f_code:
                    return entry
            elif this is not None and isinstance(this, entry.obj):
                return entry
        return None

    def warn_failures(self, stream: Any = None) -> None:
        """One warning line per plugin failure or name clash (to stderr)."""
        stream = stream or sys.stderr
        for _plugin, message in self.failures + self.warnings:
            print(f"Warning: {message}", file=stream)


def provenance_of(entry: Entry) -> dict[str, Any]:
    """See `Registry.provenance`."""
    if entry.builtin:
        from . import __version__

        distribution, version = "elbokit", __version__
    else:
        distribution, version = entry.distribution, entry.version
    name = f"{entry.obj.quantity}/{entry.name}" if entry.kind == "estimator" else entry.name
    return {"kind": entry.kind, "name": name, "qualified": entry.qualified, "plugin": entry.plugin,
            "distribution": distribution, "version": version, "entry_point": entry.entry_point,
            "builtin": entry.builtin}


def _dist_name(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else ep.name


def _dist_version(ep: Any) -> str | None:
    dist = getattr(ep, "dist", None)
    return dist.version if dist is not None else None


def _base_classes() -> dict[str, type]:
    from .estimators import Estimator
    from .models import Model
    from .priors import Prior
    from .terms import ElboTerm

    return {"term": ElboTerm, "prior": Prior, "estimator": Estimator, "model": Model}


def _make_entry(kind: str, source: _Source, *args: Any, override: bool = False, **kwargs: Any) -> Entry:
    """Check one registration against the component contract; raise `_Refused` (one line)."""
    where = f"Plugin '{source.label}'"
    hook = HOOK_OF[kind]
    common = dict(plugin=source.plugin, version=source.version, distribution=source.distribution,
                  entry_point=source.entry_point, builtin=source.builtin, override=bool(override))
    if kind == "dataset":
        if len(args) < 2:
            raise _Refused(f"{where}: register_datasets takes register(name, loader, description).")
        name, loader, *rest = args
        _check_name(where, "dataset", name, repr(loader))
        if not callable(loader):
            raise _Refused(f"{where}: dataset '{name}' has a loader that is not callable ({type(loader).__name__}).")
        description = kwargs.get("description") or (rest[0] if rest else first_line(loader))
        return Entry(kind, name, DatasetEntry(name, loader, description), description=description, **common)
    if len(args) != 1:
        raise _Refused(f"{where}: {hook} takes register(Class), one class per call; got {len(args)} arguments.")
    (obj,) = args
    bases = _base_classes()
    base = bases[kind]
    if not isinstance(obj, type):
        what = type(obj).__name__
        raise _Refused(f"{where} registers an instance of {what} with {hook}; register the class itself "
                       f"(register({what})): elbokit builds it with the user's options.")
    if not issubclass(obj, base):
        other = next((k for k, b in bases.items() if issubclass(obj, b)), None)
        if other is not None:
            raise _Refused(f"{where} registers {obj.__name__}, a {other} ({bases[other].__name__} subclass), with "
                           f"{hook}; register it with {HOOK_OF[other]}.")
        raise _Refused(f"{where} registers {obj.__name__} with {hook}, but it is not an elbokit.{base.__name__} subclass.")
    name = getattr(obj, "name", "")
    _check_name(where, kind, name, obj.__name__)
    label = f"{kind} '{name}'"
    from .estimators import NEEDS, QUANTITIES

    needs = getattr(obj, "needs", frozenset())
    unknown = sorted(str(n) for n in set(needs) - set(NEEDS)) if isinstance(needs, (set, frozenset, list, tuple)) else None
    if unknown is None:
        raise _Refused(f"{where}: {label} declares needs = {needs!r}; it must be a frozenset of {', '.join(NEEDS)}.")
    if unknown:
        raise _Refused(f"{where}: {label} declares unknown needs {', '.join(unknown)}; valid needs: {', '.join(NEEDS)}.")
    quantity = getattr(obj, "quantity", None)
    if (kind == "estimator" or quantity is not None) and quantity not in QUANTITIES:
        raise _Refused(f"{where}: {label} estimates unknown quantity {quantity!r}; the quantities are fixed: "
                       f"{', '.join(QUANTITIES)}.")
    return Entry(kind, name, obj, description=first_line(obj), **common)


def _check_name(where: str, kind: str, name: Any, what: str) -> None:
    if not isinstance(name, str) or not name:
        raise _Refused(f"{where}: {kind} {what} has no name; set name = \"...\" (what users type).")
    if not NAME_PATTERN.match(name):
        raise _Refused(f"{where}: {kind} name {name!r} ({what}) is not valid: use lower-case letters, digits, "
                       "'-' and '_', starting with a letter.")


_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use (with entry points unless disabled)."""
    global _registry
    if _registry is None:
        _registry = Registry.build()
    return _registry


def set_registry(registry: Registry | None) -> None:
    """Replace (or with None, reset) the process-wide registry; used by tests."""
    global _registry
    _registry = registry
