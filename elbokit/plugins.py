"""The plugin manager and the registry of terms, priors, estimators and datasets.

Built-in components live in `elbokit.default_plugins` and are loaded exactly like third-party
plugins, which come from the `elbokit` entry-point group. A plugin that fails to import, raises
in a hook or registers a name that is already taken is recorded in `Registry.failures` and
reported as one warning; the rest of elbokit goes on working. Set ELBOKIT_DISABLE_PLUGINS=1 to
skip entry-point plugins (built-ins are always loaded).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from . import hookspecs
from .errors import PluginError, unknown_name

ENTRY_POINT_GROUP = "elbokit"
DISABLE_ENV = "ELBOKIT_DISABLE_PLUGINS"

DEFAULT_PLUGINS = (
    "elbokit.default_plugins.priors",
    "elbokit.default_plugins.estimators",
    "elbokit.default_plugins.terms",
    "elbokit.default_plugins.datasets",
)

HOOKS = ("register_terms", "register_priors", "register_estimators", "register_datasets")
KINDS = {"register_terms": "term", "register_priors": "prior",
         "register_estimators": "estimator", "register_datasets": "dataset"}


@dataclass
class Entry:
    """One registered component: its name, the object, the plugin that registered it."""

    kind: str
    name: str
    obj: Any
    plugin: str
    description: str = ""


@dataclass
class DatasetEntry:
    name: str
    loader: Callable[..., Any]
    description: str


@dataclass
class PluginInfo:
    name: str
    version: str | None
    builtin: bool
    registers: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    loaded: bool = True


def first_line(obj: Any) -> str:
    doc = getattr(obj, "__doc__", None) or ""
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""


class Registry:
    """Everything the loaded plugins registered, by kind and name."""

    def __init__(self) -> None:
        self.terms: dict[str, Entry] = {}
        self.priors: dict[str, Entry] = {}
        self.estimators: dict[tuple[str, str], Entry] = {}
        self.datasets: dict[str, Entry] = {}
        self.plugins: dict[str, PluginInfo] = {}
        self.failures: list[tuple[str, str]] = []  # (plugin, message)

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
        entry points unless disabled. With `strict`, the first plugin failure raises."""
        registry = cls()
        pm = pluggy.PluginManager("elbokit")
        pm.add_hookspecs(hookspecs)
        for module_name in DEFAULT_PLUGINS:
            module = importlib.import_module(module_name)
            pm.register(module, name=module_name)
            registry.plugins[module_name] = PluginInfo(module_name, None, builtin=True)
        for plugin in plugins or []:
            name = getattr(plugin, "__name__", None) or type(plugin).__name__
            pm.register(plugin, name=name)
            registry.plugins[name] = PluginInfo(name, None, builtin=False)
        if load_entry_points is None:
            load_entry_points = os.environ.get(DISABLE_ENV, "") in ("", "0")
        if load_entry_points:
            registry._load_entry_points(pm, strict)
        for hook in HOOKS:
            registry._call_hook(pm, hook, strict)
        return registry

    def _fail(self, plugin: str, message: str, strict: bool) -> None:
        if strict:
            raise PluginError(message)
        self.failures.append((plugin, message))
        if plugin in self.plugins:
            self.plugins[plugin].errors.append(message)

    def _load_entry_points(self, pm: pluggy.PluginManager, strict: bool) -> None:
        # Loaded one by one (not pm.load_setuptools_entrypoints) so that one broken plugin
        # is reported and skipped instead of stopping elbokit.
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            version = dist.version if dist is not None else None
            name = dist.name if dist is not None else ep.name
            try:
                plugin = ep.load()
                pm.register(plugin, name=name)
            except Exception as exc:  # noqa: BLE001 - any failure of foreign code is reported
                self.plugins[name] = PluginInfo(name, version, builtin=False, loaded=False)
                self._fail(name, f"Plugin '{name}' failed to load: {type(exc).__name__}: {exc}", strict)
                continue
            self.plugins[name] = PluginInfo(name, version, builtin=False)

    def _call_hook(self, pm: pluggy.PluginManager, hook_name: str, strict: bool) -> None:
        kind = KINDS[hook_name]
        # Each implementation is called on its own so that one that raises skips only itself,
        # in registration order: a name belongs to the plugin loaded first (the built-ins), and
        # a later plugin that registers it again is the one reported.
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            plugin = impl.plugin_name
            staged: list[Entry] = []

            def register(*args: Any, **kwargs: Any) -> None:
                staged.append(_make_entry(kind, plugin, *args, **kwargs))

            try:
                impl.function(register=register)
            except Exception as exc:  # noqa: BLE001
                self._fail(plugin, f"Plugin '{plugin}' raised in {hook_name}: {type(exc).__name__}: {exc}", strict)
                continue
            for entry in staged:
                self._add(entry, strict)

    def _add(self, entry: Entry, strict: bool) -> None:
        table, key = self._table(entry)
        if key in table:
            other = table[key].plugin
            label = "/".join(key) if isinstance(key, tuple) else key
            self._fail(entry.plugin, f"The {entry.kind} name '{label}' is registered by both "
                       f"'{other}' and '{entry.plugin}'; keeping the one from '{other}'.", strict)
            return
        table[key] = entry
        info = self.plugins.get(entry.plugin)
        if info is not None:
            label = "/".join(key) if isinstance(key, tuple) else key
            info.registers.setdefault(entry.kind + "s", []).append(label)

    def _table(self, entry: Entry) -> tuple[dict, Any]:
        if entry.kind == "estimator":
            return self.estimators, (entry.obj.quantity, entry.name)
        return {"term": self.terms, "prior": self.priors, "dataset": self.datasets}[entry.kind], entry.name

    # -- lookup ---------------------------------------------------------------------------
    def term(self, name: str) -> type:
        if name not in self.terms:
            raise unknown_name("term", name, self.terms)
        return self.terms[name].obj

    def prior(self, name: str) -> type:
        if name not in self.priors:
            raise unknown_name("prior", name, self.priors)
        return self.priors[name].obj

    def estimator(self, quantity: str, name: str) -> type:
        if (quantity, name) not in self.estimators:
            choices = [n for (q, n) in self.estimators if q == quantity]
            raise unknown_name(f"{quantity} estimator", name, choices)
        return self.estimators[(quantity, name)].obj

    def dataset(self, name: str) -> DatasetEntry:
        if name not in self.datasets:
            raise unknown_name("dataset", name, self.datasets)
        return self.datasets[name].obj

    def warn_failures(self, stream: Any = None) -> None:
        """One warning line per plugin failure (to stderr)."""
        stream = stream or sys.stderr
        for _plugin, message in self.failures:
            print(f"Warning: {message}", file=stream)


def _make_entry(kind: str, plugin: str, *args: Any, **kwargs: Any) -> Entry:
    if kind == "dataset":
        name, loader, *rest = args
        description = kwargs.get("description") or (rest[0] if rest else first_line(loader))
        return Entry(kind, name, DatasetEntry(name, loader, description), plugin, description)
    (cls,) = args
    name = getattr(cls, "name", "")
    if not name:
        raise TypeError(f"{cls!r} has no `name`")
    if kind == "estimator" and not getattr(cls, "quantity", ""):
        raise TypeError(f"estimator {cls!r} has no `quantity`")
    return Entry(kind, name, cls, plugin, first_line(cls))


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
