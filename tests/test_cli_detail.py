"""Detail views: `elbokit terms NAME`, `priors NAME`, `estimators QUANTITY/NAME`, `models NAME`,
`data list NAME`. Every option of every built-in component is listed, computed here from the
constructor's (or loader's) signature, so an option added later cannot be missed."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import json
import re
import shlex
import tomllib

import numpy as np
import pytest

# The keyword arguments elbokit fills in itself, which are not options (docs/writing-plugins.md,
# "Options"): a term's estimator, registry and recon's data_dim; a prior's dim and samples; a
# model's example shape and latent dimension; a dataset loader's seed.
NOT_OPTIONS = {"term": {"self", "estimator", "registry", "data_dim"}, "prior": {"self", "dim", "samples"},
               "estimator": {"self"}, "model": {"self", "event_shape", "latent_dim"}, "dataset": {"seed"}}


def declared(func, kind: str) -> dict[str, object]:
    """{option: default} from the signature (inspect.Parameter.empty when required)."""
    params = inspect.signature(func).parameters.values()
    return {p.name: p.default for p in params if p.name not in NOT_OPTIONS[kind]
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def as_json(value):
    return [as_json(v) for v in value] if isinstance(value, (tuple, list)) else value


def check_options(rows: list[dict], func, kind: str) -> None:
    expected = declared(func, kind)
    assert [r["name"] for r in rows] == list(expected), func
    for row in rows:
        default = expected[row["name"]]
        if default is inspect.Parameter.empty:
            assert row["required"] is True
        else:
            assert row["required"] is False and row["default"] == as_json(default), (func, row)


def builtins(registry, kind: str) -> list[str]:
    if kind == "estimator":
        return [f"{e.obj.quantity}/{e.name}" for e in registry.entries(kind) if e.builtin]
    return [e.name for e in registry.entries(kind) if e.builtin]


COMMANDS = {"term": ["terms"], "prior": ["priors"], "estimator": ["estimators"], "model": ["models"],
            "dataset": ["data", "list"]}


def detail(run_cli, kind: str, name: str) -> dict:
    result = run_cli(*COMMANDS[kind], name, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def component(registry, kind: str, name: str):
    if kind == "estimator":
        quantity, _, bare = name.partition("/")
        return registry.entry(kind, bare, quantity).obj
    obj = registry.entry(kind, name).obj
    return obj.loader if kind == "dataset" else obj.__init__


ALL_KINDS = ("term", "prior", "estimator", "model", "dataset")


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_every_builtin_lists_exactly_its_declared_options_with_the_constructors_defaults(run_cli, fresh_registry, kind):
    names = builtins(fresh_registry, kind)
    assert names
    for name in names:
        d = detail(run_cli, kind, name)
        assert d["kind"] == kind and d["description"]
        target = component(fresh_registry, kind, name)
        check_options(d["options"], target.__init__ if kind == "estimator" else target, kind)
        # Built-ins say what each option means.
        assert all(r["help"] for r in d["options"]), (name, d["options"])
        assert d["plugin"]["builtin"] is True and d["plugin"]["distribution"] == "elbokit"


def test_a_term_lists_its_default_estimators_options_and_the_options_every_term_takes(run_cli, fresh_registry):
    from elbokit.objective import WARMUP_KEYS, WarmUp

    for name in builtins(fresh_registry, "term"):
        d = detail(run_cli, "term", name)
        cls = fresh_registry.term(name)
        common = {r["name"]: r for r in d["common_options"]}
        assert set(common) == {"weight", *WARMUP_KEYS} | ({"estimator"} if cls.quantity else set())
        assert common["warmup_ratio"]["default"] == WarmUp().ratio and common["warmup_cycles"]["default"] == WarmUp().cycles
        if cls.quantity is None:
            assert d["estimator"] is None
            continue
        est = fresh_registry.estimator(cls.quantity, cls.default_estimator)
        assert d["estimator"]["default"] == cls.default_estimator == common["estimator"]["default"]
        assert d["estimator"]["choices"] == sorted(n for q, n in fresh_registry.estimators if q == cls.quantity)
        check_options(d["estimator"]["options"], est.__init__, "estimator")


def test_needs_come_from_the_declarations(run_cli, fresh_registry):
    infonce = detail(run_cli, "term", "infonce")
    assert [n["name"] for n in infonce["needs"]] == ["positives"]  # the default critic compares x with x+
    assert {n["name"] for n in detail(run_cli, "term", "kl")["needs"]} == {"prior_log_prob"}  # kl/auto
    kl_mc = detail(run_cli, "estimator", "kl/mc")
    assert kl_mc["needs"][0]["refused_by_priors"] == ["samples"]
    samples = detail(run_cli, "prior", "samples")
    assert samples["has_log_prob"] is False and "kl/mc" in samples["refused_by"] and samples["needs"]
    assert detail(run_cli, "prior", "standard-normal")["refused_by"] == []
    assert detail(run_cli, "estimator", "mi/infonce")["estimate_kind"] == "lower bound"
    assert detail(run_cli, "model", "conv")["event_ndims"] == [3]


def test_text_at_80_columns_keeps_every_option_name_whole(run_cli, fresh_registry, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    for kind in ALL_KINDS:
        for name in builtins(fresh_registry, kind):
            d = detail(run_cli, kind, name)
            out = run_cli(*COMMANDS[kind], name).stdout
            names = [r["name"] for r in d["options"] + (d.get("common_options") or [])
                     + ((d.get("estimator") or {}).get("options") or [])]
            for option in names:
                assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", out), (name, option, out)
            # Everything fits 80 columns but the example, printed whole on one line to be copied.
            example = d["example"]
            assert example and f"  {example}\n" in out
            assert all(len(line.rstrip()) <= 80 for line in out.splitlines() if line.strip() != example), out


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_example_commands_parse_and_set_a_non_default_value(run_cli, fresh_registry, tmp_path, monkeypatch, kind):
    """Each example runs through `train --print-config` (every check train makes, one step,
    nothing written), and the value it shows off is in the resolved config."""
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "prior_samples.npy", np.random.default_rng(0).standard_normal((400, 5)))
    checked = 0
    for name in builtins(fresh_registry, kind):
        d = detail(run_cli, kind, name)
        example = d["example"]
        defaults = {r["name"]: r["default"] for r in d["options"] + ((d.get("estimator") or {}).get("options") or [])}
        argv = shlex.split(example)
        assert argv[:2] == ["elbokit", "train"], example
        fast = ["--max-epochs", "1"] + ([] if "--data" in argv else ["--n", "400"])
        result = run_cli(*argv[1:], *fast, "--print-config")
        assert result.exit_code == 0, (example, result.stderr)
        cfg = tomllib.loads(result.stdout)
        assert not (tmp_path / "runs").exists()
        for flag, value in zip(argv, argv[1:]):
            key, _, text = value.partition("=")
            if flag == "-o":
                term, _, option = key.partition(".")
                assert str(cfg["terms"][term][option]).lower() == text.lower(), (example, cfg["terms"])
                if option != "estimator":
                    assert cfg["terms"][term][option] != defaults[option], example
                    checked += 1
            elif flag in ("--prior-option", "--model-option", "--data-option"):
                section = {"--prior-option": "prior", "--model-option": "model", "--data-option": "data"}[flag]
                got = cfg[section]["options"].get(key, cfg[section].get(key))
                want = [int(v) for v in text.split(",")] if "," in text else type(got)(text)
                assert got == want != as_json(defaults[key]), (example, cfg[section])
                checked += 1
    assert checked >= 1  # some component of each kind shows a non-default option value


@pytest.mark.parametrize("args, hint", [
    (["terms", "foo"], "Unknown term 'foo'"),
    (["priors", "gm"], "Did you mean 'gmm'?"),
    (["models", "mpl"], "Did you mean 'mlp'?"),
    (["estimators", "entropy/mw"], "Did you mean 'mws'?"),
    (["estimators", "entrpy/mws"], "Did you mean 'entropy'?"),
    (["estimators", "mws"], "entropy/mws, mi/mws"),  # two quantities have an mws
    (["estimators", "nothing"], "Unknown estimator 'nothing'"),
    (["data", "list", "gausian"], "Did you mean 'gaussian'?"),
])
def test_unknown_names_are_one_line_exit_2(run_cli, fresh_registry, args, hint):
    result = run_cli(*args)
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and hint in lines[0], result.stderr
    assert result.stdout == ""


def test_a_bare_estimator_name_that_one_quantity_has_is_enough(run_cli, fresh_registry):
    assert detail(run_cli, "estimator", "logvar")["name"] == "entropy/logvar"


def test_a_plugin_component_names_its_plugin(run_cli):
    import types

    from elbokit import ElboTerm, hookimpl
    from elbokit.plugins import Registry, set_registry

    class Scaled(ElboTerm):
        """A constant loss, for the listing.

        Options: `scale` the constant."""

        name = "scaled"
        scope = "example"

        def __init__(self, scale: float = 2.0, mode: str = "fixed"):
            super().__init__()
            self.scale = scale

        def forward(self, batch, prior):
            return batch.z.new_full((batch.size,), self.scale)

    plugin = types.SimpleNamespace(__name__="scaled-plugin",
                                   register_terms=hookimpl(specname="register_terms")(lambda register: register(Scaled)))
    set_registry(Registry.build([plugin], load_entry_points=False, strict=True))
    try:
        d = detail(run_cli, "term", "scaled")
        assert d["plugin"]["plugin"] == "scaled-plugin" and d["plugin"]["builtin"] is False
        check_options(d["options"], Scaled.__init__, "term")
        # Without option_help, the meaning comes from the docstring's clause on the option.
        assert d["options"][0]["help"] == "`scale` the constant" and d["options"][1]["help"] == ""
        assert d["description"] == "A constant loss, for the listing."
        assert d["example"] == "elbokit train --terms recon,scaled -o scaled.scale=4"
        assert "plugin scaled-plugin" in run_cli("terms", "scaled").stdout.splitlines()[0]
    finally:
        set_registry(None)


def test_installed_example_plugins_show_their_distribution_and_version(run_cli, monkeypatch):
    from elbokit.plugins import Registry, set_registry

    try:
        version = importlib.metadata.version("elbokit-mmd")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the example plugin elbokit-mmd is not installed")
    set_registry(Registry.build(load_entry_points=True))
    try:
        d = detail(run_cli, "term", "mmd")
        assert (d["plugin"]["distribution"], d["plugin"]["version"]) == ("elbokit-mmd", version)
        from elbokit_mmd import MMD

        check_options(d["options"], MMD.__init__, "term")
        # No option_help: each meaning is the docstring's clause on the option, whole across the
        # ';' and '.' inside its parentheses.
        kernel, bandwidth = d["options"][0]["help"], d["options"][1]["help"]
        assert kernel.startswith("`kernel` `rbf`") and kernel.endswith("Tolstikhin et al.'s WAE)")
        assert bandwidth.startswith("`bandwidth` s or C (default:") and bandwidth.endswith("e^-1 or 1/3)")
        assert f"plugin elbokit-mmd {version}" in run_cli("terms", "mmd").stdout
    finally:
        set_registry(None)


def test_warmup_defaults_are_the_objectives(fresh_registry):
    # The listing reads WarmUp's own defaults: a changed default shows up in the view.
    from elbokit.cli.listing import _common_term_options
    from elbokit.objective import WarmUp

    rows = {r["name"]: r for r in _common_term_options(fresh_registry.term("kl"), fresh_registry)}
    assert rows["warmup"]["default"] == WarmUp().kind
    assert [f.name for f in dataclasses.fields(WarmUp)] == ["kind", "steps", "ratio", "cycles"]
