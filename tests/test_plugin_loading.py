"""Loading third-party plugins from the `elbokit` entry-point group, and what a broken one does.

Fake plugins are real distributions: a module and a `*.dist-info` folder (METADATA and
entry_points.txt) in a temporary directory put on sys.path, which is how `pip install` leaves
a plugin, so `importlib.metadata` finds them as it finds installed ones. Every failure is one
line naming the plugin; the rest of elbokit goes on working.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from elbokit.errors import PluginError
from elbokit.plugins import DISABLE_ENV, Registry, set_registry

GOOD_PRIOR = '''
    import torch
    from elbokit import Prior, hookimpl

    class FakePrior(Prior):
        """A prior from a fake plugin."""

        name = "{name}"

        def sample(self, n):
            return torch.zeros(n, self.dim)

    @hookimpl
    def register_priors(register):
        register(FakePrior)
'''

IMPORT_FAILS = '''
    import a_dependency_that_is_not_installed
'''

HOOK_RAISES = '''
    from elbokit import hookimpl

    @hookimpl
    def register_priors(register):
        raise RuntimeError("cannot find the weights file")
'''


class FakePlugins:
    """Writes fake installed plugins; each in its own directory, on sys.path in creation order."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self.root, self.modules = root, []
        monkeypatch.setattr(sys, "path", list(sys.path))  # restored after the test
        monkeypatch.delenv(DISABLE_ENV, raising=False)

    def add(self, dist: str, source: str, version: str = "0.1.0") -> str:
        module = f"{dist.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
        where = self.root / dist
        where.mkdir()
        (where / f"{module}.py").write_text(textwrap.dedent(source))
        info = where / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[elbokit]\n{dist} = {module}\n")
        sys.path.insert(len(self.modules), str(where))
        importlib.invalidate_caches()
        self.modules.append(module)
        return module

    def cleanup(self) -> None:
        for module in self.modules:
            sys.modules.pop(module, None)


@pytest.fixture
def fake_plugins(tmp_path, monkeypatch):
    plugins = FakePlugins(tmp_path, monkeypatch)
    set_registry(None)
    yield plugins
    set_registry(None)
    plugins.cleanup()


def build() -> Registry:
    return Registry.build(load_entry_points=True)


# ----------------------------------------------------------------------- each failure mode
def test_a_plugin_that_fails_to_import_is_reported_and_skipped(fake_plugins):
    fake_plugins.add("elbokit-broken", IMPORT_FAILS)
    fake_plugins.add("elbokit-good", GOOD_PRIOR.format(name="good-prior"), version="0.3.1")
    registry = build()
    assert registry.failures == [(
        "elbokit-broken",
        "Plugin 'elbokit-broken' failed to load: ModuleNotFoundError: "
        "No module named 'a_dependency_that_is_not_installed'",
    )]
    assert registry.priors["good-prior"].plugin == "elbokit-good"   # the others still load
    assert "gmm" in registry.priors
    with pytest.raises(PluginError, match="^Plugin 'elbokit-broken' failed to load: ModuleNotFoundError"):
        Registry.build(load_entry_points=True, strict=True)


def test_a_hook_that_raises_is_reported_and_skipped(fake_plugins):
    fake_plugins.add("elbokit-raises", HOOK_RAISES)
    registry = build()
    assert registry.failures == [(
        "elbokit-raises",
        "Plugin 'elbokit-raises' raised in register_priors: RuntimeError: cannot find the weights file",
    )]
    assert {"standard-normal", "gmm", "samples"} <= set(registry.priors)


def test_a_name_taken_by_a_builtin_stays_the_builtins(fake_plugins):
    fake_plugins.add("elbokit-dup", GOOD_PRIOR.format(name="gmm"))
    registry = build()
    assert registry.failures == []
    assert registry.warnings == [(
        "elbokit-dup",
        "The prior name 'gmm' is a built-in's and stays so; plugin 'elbokit-dup' registers it too, and its prior is "
        "'elbokit-dup:gmm' (register it with override=True to replace the built-in).",
    )]
    assert registry.priors["gmm"].plugin == "elbokit.default_plugins.priors"
    assert registry.prior("elbokit-dup:gmm").__doc__ == "A prior from a fake plugin."  # still reachable
    with pytest.raises(PluginError, match="is a built-in's and stays so"):
        Registry.build(load_entry_points=True, strict=True)


OVERRIDE_PRIOR = GOOD_PRIOR.replace("register(FakePrior)", "register(FakePrior, override=True)")


def test_override_true_replaces_a_builtin_which_stays_reachable_by_its_qualified_name(fake_plugins):
    fake_plugins.add("elbokit-override", OVERRIDE_PRIOR.format(name="gmm"))
    registry = build()
    assert registry.priors["gmm"].plugin == "elbokit-override"
    assert registry.prior("elbokit:gmm").__module__ == "elbokit.default_plugins.priors"
    assert registry.warnings == [("elbokit-override", "Plugin 'elbokit-override' overrides the built-in prior 'gmm' "
                                  "(the built-in is still 'elbokit:gmm').")]


def test_a_name_registered_by_two_plugins_names_both(fake_plugins):
    fake_plugins.add("elbokit-twin-a", GOOD_PRIOR.format(name="twin"))
    fake_plugins.add("elbokit-twin-b", GOOD_PRIOR.format(name="twin"))
    registry = build()
    assert registry.warnings == [(
        "elbokit-twin-b",
        "The prior name 'twin' is registered by both 'elbokit-twin-a' and 'elbokit-twin-b'; "
        "use 'elbokit-twin-a:twin' or 'elbokit-twin-b:twin'.",
    )]
    assert "twin" not in registry.priors
    with pytest.raises(PluginError, match=r"^The prior name 'twin' is registered by several plugins; pick one: "
                                          r"'elbokit-twin-a:twin' or 'elbokit-twin-b:twin'\.$"):
        registry.prior("twin")
    assert registry.entry("prior", "elbokit-twin-b:twin").plugin == "elbokit-twin-b"
    with pytest.raises(PluginError, match="registered by both 'elbokit-twin-a' and 'elbokit-twin-b'"):
        Registry.build(load_entry_points=True, strict=True)


def test_provenance_names_plugin_distribution_and_version(fake_plugins):
    import elbokit

    fake_plugins.add("elbokit-good", GOOD_PRIOR.format(name="good-prior"), version="0.3.1")
    registry = build()
    assert registry.provenance("prior", "good-prior") == {
        "kind": "prior", "name": "good-prior", "qualified": "elbokit-good:good-prior", "plugin": "elbokit-good",
        "distribution": "elbokit-good", "version": "0.3.1", "entry_point": "elbokit-good", "builtin": False}
    assert registry.provenance("estimator", "mws", quantity="entropy") == {
        "kind": "estimator", "name": "entropy/mws", "qualified": "elbokit:mws", "plugin": "elbokit.default_plugins.estimators",
        "distribution": "elbokit", "version": elbokit.__version__, "entry_point": None, "builtin": True}
    prior = registry.prior("good-prior")(dim=2)
    assert registry.entry_for(prior) is registry.entry("prior", "good-prior")  # from a built object too


def test_each_failure_is_one_warning_line(fake_plugins, capsys):
    fake_plugins.add("elbokit-broken", IMPORT_FAILS)
    fake_plugins.add("elbokit-raises", HOOK_RAISES)
    build().warn_failures()
    assert capsys.readouterr().err.splitlines() == [
        "Warning: Plugin 'elbokit-broken' failed to load: ModuleNotFoundError: "
        "No module named 'a_dependency_that_is_not_installed'",
        "Warning: Plugin 'elbokit-raises' raised in register_priors: RuntimeError: cannot find the weights file",
    ]


# ------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("command", [["terms"], ["priors", "--json"], ["estimators"]])
def test_a_broken_plugin_never_breaks_other_commands(fake_plugins, run_cli, command):
    fake_plugins.add("elbokit-broken", IMPORT_FAILS)
    result = run_cli(*command)
    assert result.exit_code == 0
    assert result.stderr.splitlines() == [
        "Warning: Plugin 'elbokit-broken' failed to load: ModuleNotFoundError: "
        "No module named 'a_dependency_that_is_not_installed'",
    ]


def test_plugins_json_shows_versions_registrations_and_failures(fake_plugins, run_cli):
    fake_plugins.add("elbokit-good", GOOD_PRIOR.format(name="good-prior"), version="0.3.1")
    fake_plugins.add("elbokit-broken", IMPORT_FAILS)
    result = run_cli("plugins", "--json")
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["elbokit-good"]["version"] == "0.3.1"
    assert rows["elbokit-good"]["registers"] == {"priors": ["good-prior"]}
    assert rows["elbokit-good"]["error"] is None
    assert rows["elbokit-broken"]["error"] == (
        "Plugin 'elbokit-broken' failed to load: ModuleNotFoundError: "
        "No module named 'a_dependency_that_is_not_installed'")
    assert not any(r["builtin"] for r in rows.values())  # built-ins only with --all


# ------------------------------------------------------------ discovery and switching it off
def test_entry_point_discovery_finds_the_installed_example_plugins(monkeypatch):
    expected = {"elbokit-vampprior": ("priors", "vamp"), "elbokit-mmd": ("terms", "mmd")}
    for dist in expected:
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{dist} is not installed; install the examples with pip install ./plugins/*/ (CI does)")
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    registry = Registry.build()  # entry points on by default
    assert registry.failures == []
    for dist, (kind, name) in expected.items():
        info = registry.plugins[dist]
        assert info.version == importlib.metadata.version(dist) and not info.builtin
        assert info.registers[kind] == [name]
    assert registry.priors["vamp"].plugin == "elbokit-vampprior"
    assert registry.terms["mmd"].plugin == "elbokit-mmd"


@pytest.mark.parametrize("value, loaded", [("1", False), ("0", True), ("", True)])
def test_elbokit_disable_plugins_turns_entry_points_off(fake_plugins, monkeypatch, value, loaded):
    fake_plugins.add("elbokit-good", GOOD_PRIOR.format(name="good-prior"))
    fake_plugins.add("elbokit-broken", IMPORT_FAILS)
    monkeypatch.setenv(DISABLE_ENV, value)
    registry = Registry.build()
    assert ("good-prior" in registry.priors) is loaded
    assert bool(registry.failures) is loaded
    assert "gmm" in registry.priors  # built-ins always load


def test_a_plugin_whose_hook_raises_is_one_row_with_its_version_and_error(fake_plugins, run_cli):
    fake_plugins.add("elbokit-raises", HOOK_RAISES, version="2.0.0")
    rows = [r for r in json.loads(run_cli("plugins", "--json").stdout) if r["name"] == "elbokit-raises"]
    assert len(rows) == 1
    assert rows[0]["version"] == "2.0.0" and rows[0]["error"].startswith("Plugin 'elbokit-raises' raised in ")


def test_a_plugin_that_fails_to_import_keeps_its_version(fake_plugins, run_cli):
    fake_plugins.add("elbokit-broken", IMPORT_FAILS, version="1.2.3")
    rows = [r for r in json.loads(run_cli("plugins", "--json").stdout) if r["name"] == "elbokit-broken"]
    assert len(rows) == 1 and rows[0]["version"] == "1.2.3" and rows[0]["description"] == "failed to load"
