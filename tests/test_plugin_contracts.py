"""A broken plugin is caught at load or build time with one line that names it.

The plugins are real installed distributions, written into a temporary directory the way
`pip install` leaves them (a package, and a `NAME-VERSION.dist-info` folder with METADATA and
entry_points.txt), so `importlib.metadata` finds them as it finds installed ones.
`elbokit-fixtures` is one distribution with several entry points, one module each: the good
ones load, each broken one is kept out on its own. For every mistake the test asserts the one
`Error:` line naming the plugin and the component, the exit code, that no run directory was
created, and (once, with every broken plugin installed) that the built-ins and the good
plugin still list and train.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Literal  # noqa: F401 - in annotations read by option_specs

import pytest

from elbokit.plugins import DISABLE_ENV, Registry, set_registry

import torch  # noqa: E402
from torch import distributions as D  # noqa: E402
from torch import nn  # noqa: E402

from elbokit import Prior  # noqa: E402


# [docs: options example]
class LaplacePrior(Prior):
    """Product of Laplace(0, scale) densities."""

    name = "laplace"
    option_help = {"scale": "the Laplace scale b > 0 of every coordinate"}

    def __init__(self, dim: int, scale: float = 1.0):
        super().__init__(dim)
        self.scale = float(scale)
# [/docs: options example]

    def distribution(self):
        loc = torch.zeros(self.dim, device=self.device, dtype=self.dtype)
        return D.Independent(D.Laplace(loc, torch.full_like(loc, self.scale)), 1)

    def sample(self, n):
        return self.distribution().sample((n,))

    def spec(self):
        return {"dim": self.dim, "scale": self.scale}


# [docs: rsample example]
class LearnedShiftPrior(Prior):
    """N(shift, I) with a learned shift: samples carry its gradient."""

    name = "learned-shift"
    has_rsample = True

    def __init__(self, dim: int):
        super().__init__(dim)
        self.shift = nn.Parameter(torch.zeros(dim))

    def log_prob(self, z):
        return D.Normal(self.shift, 1.0).log_prob(z).sum(-1)

    def rsample(self, n):
        eps = torch.randn(n, self.dim, device=self.device, dtype=self.dtype)
        return self.shift + eps  # reparameterised: d(sample)/d(shift) = 1

    def sample(self, n):
        with torch.no_grad():
            return self.rsample(n)
# [/docs: rsample example]


DIST, VERSION = "elbokit-fixtures", "0.1.0"
PACKAGE = "elbokit_contract_fixtures"

MODULES = {
    "good": '''
        import torch
        from torch import distributions as D
        from elbokit import Dataset, ElboTerm, Prior, hookimpl


        class FineLaplace(Prior):
            """Product of Laplace(0, scale) densities."""

            name = "fine-laplace"
            has_rsample = True
            option_help = {"scale": "the Laplace scale b > 0"}

            def __init__(self, dim: int, scale: float = 1.0):
                super().__init__(dim)
                self.scale = float(scale)

            def distribution(self):
                loc = torch.zeros(self.dim, device=self.device, dtype=self.dtype)
                return D.Independent(D.Laplace(loc, torch.full_like(loc, self.scale)), 1)

            def sample(self, n):
                return self.distribution().sample((n,))

            def rsample(self, n):
                return self.distribution().rsample((n,))

            def spec(self):
                return {"dim": self.dim, "scale": self.scale}


        class CodeNorm(ElboTerm):
            """0.5 * ||E[z|x]||^2 per example."""

            name = "fine-norm"

            def forward(self, batch, prior):
                return 0.5 * batch.posterior_loc.pow(2).sum(-1)


        def raising_loader(n: int = 100):
            """A dataset whose download fails."""
            raise RuntimeError("cannot reach the download server")


        @hookimpl
        def register_priors(register):
            register(FineLaplace)


        @hookimpl
        def register_terms(register):
            register(CodeNorm)


        @hookimpl
        def register_datasets(register):
            register("raising-data", raising_loader)
    ''',
    "typo": '''
        from elbokit import hookimpl
        from .good import FineLaplace


        class TypoPrior(FineLaplace):
            """Never registered: the hook name is misspelt."""

            name = "typo-prior"


        @hookimpl
        def register_prior(register):
            register(TypoPrior)
    ''',
    "wrongkind": '''
        from elbokit import hookimpl
        from .good import CodeNorm


        @hookimpl
        def register_priors(register):
            register(CodeNorm)
    ''',
    "instance": '''
        from elbokit import hookimpl
        from .good import FineLaplace


        class InstancePrior(FineLaplace):
            """Registered as an instance."""

            name = "instance-prior"


        @hookimpl
        def register_priors(register):
            register(InstancePrior(dim=2))
    ''',
    "badname": '''
        from elbokit import hookimpl
        from .good import FineLaplace


        class BadName(FineLaplace):
            """A name users cannot type."""

            name = "Bad Name"


        @hookimpl
        def register_priors(register):
            register(BadName)
    ''',
    "unknownneed": '''
        from elbokit import hookimpl
        from .good import CodeNorm


        class Labelled(CodeNorm):
            """Needs labels, which no batch has."""

            name = "labelled"
            needs = frozenset({"labels"})


        @hookimpl
        def register_terms(register):
            register(Labelled)
    ''',
    "contract": '''
        import math

        import torch
        from torch import distributions as D
        from elbokit import ElboTerm, Prior, hookimpl


        class Gaussian(Prior):
            """N(0, I) through log_prob only (no distribution(): KL by Monte Carlo)."""

            name = "contract-gaussian"
            calls = 0

            def log_prob(self, z):
                self.calls += 1
                return -0.5 * z.pow(2).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)

            def sample(self, n):
                return torch.randn(n, self.dim, device=self.device, dtype=self.dtype)


        class ColumnPrior(Gaussian):
            """log_prob of shape (B, 1)."""

            name = "column-prior"

            def log_prob(self, z):
                return super().log_prob(z)[:, None]


        class OffsetPrior(Gaussian):
            """log_prob one nat too high."""

            name = "offset-prior"

            def log_prob(self, z):
                return super().log_prob(z) + 1.0


        class WidePrior(Gaussian):
            """Samples one coordinate too many."""

            name = "wide-prior"

            def sample(self, n):
                return torch.randn(n, self.dim + 1)


        class RaisingPrior(Gaussian):
            """log_prob raises."""

            name = "raising-prior"

            def log_prob(self, z):
                raise RuntimeError("the density table is missing")


        class NaNPrior(Gaussian):
            """log_prob is NaN everywhere."""

            name = "nan-prior"

            def log_prob(self, z):
                return super().log_prob(z) * float("nan")


        class LateNaNPrior(Gaussian):
            """log_prob turns NaN after a few calls (as training moves a parameter, say)."""

            name = "late-nan-prior"

            def log_prob(self, z):
                out = super().log_prob(z)
                return out * float("nan") if self.calls > 6 else out


        class LateRaisingPrior(Gaussian):
            """log_prob raises after a few calls."""

            name = "late-raising-prior"

            def log_prob(self, z):
                out = super().log_prob(z)
                if self.calls > 6:
                    raise RuntimeError("the density table is missing")
                return out


        class ColumnTerm(ElboTerm):
            """Returns (B, 1)."""

            name = "column-term"

            def forward(self, batch, prior):
                return batch.z.pow(2).sum(-1, keepdim=True)


        @hookimpl
        def register_priors(register):
            for cls in (ColumnPrior, OffsetPrior, WidePrior, RaisingPrior, NaNPrior, LateNaNPrior, LateRaisingPrior):
                register(cls)


        @hookimpl
        def register_terms(register):
            register(ColumnTerm)
    ''',
}

TWIN = '''
    from elbokit import hookimpl
    from {package}.good import FineLaplace


    class Twin(FineLaplace):
        """A Laplace prior that two plugins call 'twin'."""

        name = "twin"


    @hookimpl
    def register_priors(register):
        register(Twin)
'''


def write_distribution(root: Path, dist: str, version: str, package: str, modules: dict[str, str]) -> None:
    """`package/` with one module per entry point, and `dist-version.dist-info/`."""
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    for module, source in modules.items():
        (root / package / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(
        "[elbokit]\n" + "".join(f"{module} = {package}.{module}\n" for module in modules))


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    write_distribution(root, DIST, VERSION, PACKAGE, MODULES)
    for twin, version in (("a", "1.0.0"), ("b", "2.0.0")):
        write_distribution(root, f"elbokit-twin-{twin}", version, f"elbokit_twin_{twin}",
                           {"priors": TWIN.format(package=PACKAGE)})
    yield root
    for name in list(sys.modules):
        if name.startswith((PACKAGE, "elbokit_twin_")):
            sys.modules.pop(name)


@pytest.fixture
def installed(plugin_dir, monkeypatch):
    """The fixture plugins installed, and the process registry built with entry points."""
    monkeypatch.setattr(sys, "path", [str(plugin_dir), *sys.path])
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    importlib.invalidate_caches()
    registry = Registry.build(load_entry_points=True)
    registry._warned = True  # the CLI's load warnings are tested on their own
    set_registry(registry)
    yield registry
    set_registry(None)


def train_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "--hidden", "8", "--max-epochs", "1", "--n", "200", "--batch-size", "16",
            "--no-evaluate", "-q", "--out", str(tmp_path / "run"), *extra]


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


# ------------------------------------------------------------------- refused when loaded
LOAD_FAILURES = {
    "typo": "Plugin 'elbokit-fixtures' entry point 'typo' implements 'register_prior', which is not an elbokit hook "
            "(did you mean 'register_priors'?); the plugin is not loaded.",
    "wrongkind": "Plugin 'elbokit-fixtures' entry point 'wrongkind' registers CodeNorm, a term (ElboTerm subclass), "
                 "with register_priors; register it with register_terms.",
    "instance": "Plugin 'elbokit-fixtures' entry point 'instance' registers an instance of InstancePrior with "
                "register_priors; register the class itself (register(InstancePrior)): elbokit builds it with the "
                "user's options.",
    "badname": "Plugin 'elbokit-fixtures' entry point 'badname': prior name 'Bad Name' (BadName) is not valid: use "
               "lower-case letters, digits, '-' and '_', starting with a letter.",
    "unknownneed": "Plugin 'elbokit-fixtures' entry point 'unknownneed': term 'labelled' declares unknown needs labels; "
                   "valid needs: x_recon, positives, dataset_size, prior_log_prob, prior_samples.",
}


def test_each_broken_entry_point_is_one_failure_and_the_rest_of_its_package_loads(installed):
    mine = [message for plugin, message in installed.failures if plugin == DIST]
    assert sorted(mine) == sorted(LOAD_FAILURES.values())
    info = installed.plugins[DIST]
    assert info.version == VERSION and sorted(info.entry_points) == sorted(MODULES)
    # the good entry points of the same distribution load, attributed to it
    assert installed.priors["fine-laplace"].plugin == DIST and installed.terms["fine-norm"].plugin == DIST
    assert installed.priors["column-prior"].entry_point == "contract"
    for name in ("typo-prior", "instance-prior", "Bad Name"):
        assert name not in installed.priors
    assert "labelled" not in installed.terms


@pytest.mark.parametrize("module", sorted(LOAD_FAILURES))
def test_a_plugin_refused_at_load_time_is_one_warning_line_and_listed_as_failed(installed, run_cli, module):
    installed._warned = False
    result = run_cli("priors", "--json")
    assert result.exit_code == 0
    warnings = result.stderr.splitlines()
    assert f"Warning: {LOAD_FAILURES[module]}" in warnings and all(w.startswith("Warning: ") for w in warnings)
    rows = {r["name"]: r for r in json.loads(run_cli("plugins", "--json").stdout)}
    assert LOAD_FAILURES[module] in rows[DIST]["error"] and rows[DIST]["status"] == "loaded"  # partly loaded


def test_a_component_of_a_refused_plugin_is_an_unknown_name(installed, run_cli, tmp_path):
    result = run_cli(*train_args(tmp_path, "--prior", "typo-prior"))
    assert result.exit_code == 2 and "Unknown prior 'typo-prior'" in error_line(result)
    assert not (tmp_path / "run").exists()


def test_builtins_and_good_plugins_still_list_and_train_beside_every_broken_one(installed, run_cli, tmp_path):
    rows = {r["name"]: r for r in json.loads(run_cli("priors", "--json").stdout)}
    assert {"standard-normal", "gmm", "samples", "fine-laplace"} <= set(rows)
    assert rows["fine-laplace"]["plugin"] == DIST and rows["fine-laplace"]["version"] == VERSION
    assert rows["gmm"]["builtin"] and rows["gmm"]["version"] is None
    for command in ("terms", "estimators", "plugins"):
        assert run_cli(command, "--json").exit_code == 0
    result = run_cli(*train_args(tmp_path, "--terms", "recon,kl,fine-norm", "--prior", "fine-laplace"))
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.safetensors").is_file()


# ---------------------------------------------------------------------- two plugins, one name
def test_two_plugins_with_one_name_are_both_listed_and_the_bare_name_is_refused(installed, run_cli, tmp_path):
    assert ("elbokit-twin-b", "The prior name 'twin' is registered by both 'elbokit-twin-a' and 'elbokit-twin-b'; "
            "use 'elbokit-twin-a:twin' or 'elbokit-twin-b:twin'.") in installed.warnings
    rows = [r for r in json.loads(run_cli("priors", "--json").stdout) if r["qualified"].endswith(":twin")]
    assert [(r["name"], r["version"]) for r in rows] == [("elbokit-twin-a:twin", "1.0.0"), ("elbokit-twin-b:twin", "2.0.0")]
    result = run_cli(*train_args(tmp_path, "--prior", "twin"))
    assert result.exit_code == 2
    assert error_line(result) == ("Error: The prior name 'twin' is registered by several plugins; pick one: "
                                  "'elbokit-twin-a:twin' or 'elbokit-twin-b:twin'.")
    assert not (tmp_path / "run").exists()
    result = run_cli(*train_args(tmp_path, "--prior", "elbokit-twin-b:twin"))
    assert result.exit_code == 0, result.stderr
    assert installed.provenance("prior", "elbokit-twin-b:twin")["version"] == "2.0.0"
    # The run records the plugin that supplied its prior, not whichever registered the bare name first.
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    (prior,) = [c for c in meta["components"] if c["kind"] == "prior"]
    assert (prior["plugin"], prior["plugin_version"], prior["qualified"]) == ("elbokit-twin-b", "2.0.0", "elbokit-twin-b:twin")
    result = run_cli("evaluate", str(tmp_path / "run"), "--iw-samples", "2", "--json")
    assert result.exit_code == 0, result.stderr


# -------------------------------------------------------------- refused when the objective is built
CONTRACT_FAILURES = [
    ("column-prior", ["--prior", "column-prior"],
     "Error: prior 'column-prior' (plugin 'elbokit-fixtures' 0.1.0): log_prob of (4000, 5) samples must have shape "
     "(4000,), one value per sample, got (4000, 1)."),
    ("offset-prior", ["--prior", "offset-prior"],
     "Error: prior 'offset-prior' (plugin 'elbokit-fixtures' 0.1.0): log_prob is not normalised: the integral of "
     "exp(log_prob) is estimated as exp(1.0"),
    ("wide-prior", ["--prior", "wide-prior"],
     "Error: prior 'wide-prior' (plugin 'elbokit-fixtures' 0.1.0): sample(4000) must have shape (4000, 5) (the latent "
     "dimension is 5), got (4000, 6)."),
    ("nan-prior", ["--prior", "nan-prior"],
     "Error: prior 'nan-prior' (plugin 'elbokit-fixtures' 0.1.0): log_prob is NaN or infinite at its own samples."),
    ("column-term", ["--terms", "recon,kl,column-term"],
     "Error: term 'column-term' (plugin 'elbokit-fixtures' 0.1.0): must return one loss value per example, shape "
     "(64,) for a batch of 64 (or a scalar), got (64, 1)."),
    ("option-type", ["--prior", "fine-laplace", "--prior-option", "scale=abc"],
     "Error: Option 'scale' of prior 'fine-laplace' must be float, got 'abc'. Valid options: scale (float, default 1.0)."),
    ("unknown-option", ["--prior", "fine-laplace", "--prior-option", "shape=2"],
     "Error: Unknown option 'shape' for prior 'fine-laplace'. Valid options: scale (float, default 1.0)."),
]


@pytest.mark.parametrize("case, args, line", CONTRACT_FAILURES, ids=[c[0] for c in CONTRACT_FAILURES])
def test_a_contract_failure_is_one_line_exit_2_and_no_run_directory(installed, run_cli, tmp_path, case, args, line):
    result = run_cli(*train_args(tmp_path, *args))
    assert result.exit_code == 2
    assert error_line(result).startswith(line)
    assert not (tmp_path / "run").exists()


def test_the_normalisation_check_can_be_switched_off(installed, run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("ELBOKIT_NO_DENSITY_CHECK", "1")
    result = run_cli(*train_args(tmp_path, "--prior", "offset-prior"))
    assert result.exit_code == 0, result.stderr


# --------------------------------------------------------------- exceptions inside plugin code
EXCEPTIONS = [
    ("log_prob", ["--prior", "raising-prior"],
     "Error: prior 'raising-prior' (plugin 'elbokit-fixtures' 0.1.0) raised RuntimeError: the density table is "
     "missing. This is a bug in the plugin, not in your input"),
    ("loader", ["--data", "raising-data"],
     "Error: dataset 'raising-data' (plugin 'elbokit-fixtures' 0.1.0) raised RuntimeError: cannot reach the download "
     "server. This is a bug in the plugin"),
]


@pytest.mark.parametrize("case, args, line", EXCEPTIONS, ids=[c[0] for c in EXCEPTIONS])
def test_an_exception_in_plugin_code_is_one_line_naming_it_with_exit_1(installed, run_cli, tmp_path, case, args, line):
    result = run_cli(*train_args(tmp_path, *args))
    assert result.exit_code == 1
    assert error_line(result).startswith(line)
    assert not (tmp_path / "run").exists()


def test_traceback_flag_prints_the_traceback_before_the_line(installed, run_cli, tmp_path):
    result = run_cli("--traceback", *train_args(tmp_path, "--prior", "raising-prior"))
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.stderr and "raise RuntimeError" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("Error: prior 'raising-prior'")


def test_an_exception_during_training_leaves_the_run_resumable(installed, run_cli, tmp_path):
    result = run_cli(*train_args(tmp_path, "--prior", "late-raising-prior"))
    assert result.exit_code == 1
    assert error_line(result).startswith("Error: prior 'late-raising-prior' (plugin 'elbokit-fixtures' 0.1.0) raised "
                                         "RuntimeError: the density table is missing.")
    from elbokit.run import load_run

    run = load_run(tmp_path / "run", "last")  # whole and loadable: --resume continues from it
    assert run.config["prior"]["name"] == "late-raising-prior"


def test_nan_from_a_plugin_prior_keeps_exit_3_and_names_the_prior(installed, run_cli, tmp_path):
    result = run_cli(*train_args(tmp_path, "--prior", "late-nan-prior"))
    assert result.exit_code == 3
    line = error_line(result)
    assert line.startswith("Error: Training diverged: term 'kl' became NaN or Inf at step ")
    assert "computed with prior 'late-nan-prior' (plugin 'elbokit-fixtures' 0.1.0)" in line
    assert "learning rate" not in line


# --------------------------------------------------------------------- the command line, installed
def test_plugins_on_pythonpath_are_found_by_the_command_line(plugin_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")])}
    env.pop(DISABLE_ENV, None)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "elbokit.cli", *train_args(tmp_path, "--prior", "offset-prior")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert errors and errors[0].startswith("Error: prior 'offset-prior' (plugin 'elbokit-fixtures' 0.1.0): log_prob "
                                           "is not normalised")
    assert not out.exists()


# ------------------------------------------------------------------------- option declarations
def test_option_specs_read_names_types_defaults_and_help(fresh_registry):
    import elbokit
    from elbokit import option_specs

    specs = {s.name: s for s in option_specs(fresh_registry.prior("gmm"), hidden=("dim", "samples"))}
    assert list(specs) == ["n_components", "max_components", "seed"]
    assert specs["n_components"].as_dict() == {
        "name": "n_components", "type": "int | None", "default": 3, "required": False,
        "help": "mixture components; 0 (or unset) chooses by BIC over 1..max_components"}

    class Documented(elbokit.ElboTerm):
        """A term with declared options."""

        name = "documented"
        option_help = {"mode": "how to reduce"}

        def __init__(self, mode: Literal["sum", "mean"] = "sum", scale=2, *, flag: bool = False):
            super().__init__()

    rows = [s.as_dict() for s in option_specs(Documented)]
    assert rows == [
        {"name": "mode", "type": "one of 'sum', 'mean'", "default": "sum", "required": False, "help": "how to reduce"},
        {"name": "scale", "type": None, "default": 2, "required": False, "help": ""},  # untyped: passed as given
        {"name": "flag", "type": "bool", "default": False, "required": False, "help": ""},
    ]


@pytest.mark.parametrize("annotation, value, expected", [
    (int, "5", 5), (int, 3.0, 3), (float, 2, 2.0), (float, "0.5", 0.5), (bool, "true", True), (str, 7, "7"),
    ("int | None", None, None), ("int | float", 3, 3), ("Literal['a', 'b']", "b", "b"), (None, [1, 2], [1, 2]),
])
def test_option_values_are_converted_to_the_declared_type(annotation, value, expected):
    from elbokit.objective import OptionSpec, coerce_options

    annotation = eval(annotation) if isinstance(annotation, str) else annotation
    out = coerce_options("prior 'p'", [OptionSpec("k", annotation, None)], {"k": value})
    assert out == {"k": expected} and type(out["k"]) is type(expected)


@pytest.mark.parametrize("annotation, value", [(int, "abc"), (int, 2.5), (int, True), (float, "x"), (bool, 1),
                                               ("Literal['a', 'b']", "c"), ("int | None", "x")])
def test_a_value_of_the_wrong_type_is_refused_listing_the_options(annotation, value):
    from elbokit.errors import ElbokitError
    from elbokit.objective import OptionSpec, coerce_options

    annotation = eval(annotation) if isinstance(annotation, str) else annotation
    spec = OptionSpec("k", annotation, 1)
    with pytest.raises(ElbokitError) as info:
        coerce_options("prior 'p'", [spec], {"k": value})
    assert str(info.value) == (f"Option 'k' of prior 'p' must be {spec.type_text}, got {value!r}. "
                               f"Valid options: k ({spec.type_text}, default 1).")


# ------------------------------------------------------------------------------ has_rsample
def test_the_documented_rsample_example_keeps_the_contract():
    from elbokit.testing import check_prior

    prior = LearnedShiftPrior(dim=2)
    report = check_prior(prior)
    assert abs(report["log_normaliser"]) < 0.1
    prior.rsample(8).sum().backward()
    assert torch.equal(prior.shift.grad, torch.full((2,), 8.0))  # d/d(shift) of the sum of 8 samples


def test_the_documented_options_example_declares_its_option():
    from elbokit import option_specs

    assert [s.as_dict() for s in option_specs(LaplacePrior, hidden=("dim",))] == [
        {"name": "scale", "type": "float", "default": 1.0, "required": False,
         "help": "the Laplace scale b > 0 of every coordinate"}]
    from elbokit.testing import check_prior

    assert abs(check_prior(LaplacePrior(dim=2, scale=0.5))["log_normaliser"]) < 0.1


def test_has_rsample_without_rsample_is_refused_in_one_line():
    import torch

    from elbokit import Prior
    from elbokit.contracts import ContractError, check_prior_contract

    class NoRsample(Prior):
        """Says has_rsample but has neither distribution() nor rsample."""

        name = "no-rsample"
        has_rsample = True

        def log_prob(self, z):
            return -0.5 * z.pow(2).sum(-1)

        def sample(self, n):
            return torch.randn(n, self.dim)

    with pytest.raises(ContractError, match=r"^prior 'no-rsample': has_rsample is True but rsample\(n\) is not implemented"):
        check_prior_contract(NoRsample(2), what="prior 'no-rsample'", density=False)


# ------------------------------------------------------------------ elbokit plugins: the states
def test_plugins_tells_disabled_from_none_installed(plugin_dir, monkeypatch, run_cli):
    monkeypatch.setattr(sys, "path", [str(plugin_dir), *sys.path])
    importlib.invalidate_caches()
    monkeypatch.setenv(DISABLE_ENV, "1")
    monkeypatch.setenv("COLUMNS", "200")
    set_registry(None)  # the process registry is built from the environment
    try:
        rows = {r["name"]: r for r in json.loads(run_cli("plugins", "--json").stdout)}
        assert rows[DIST]["status"] == "disabled" and rows[DIST]["version"] == VERSION
        assert rows[DIST]["registers"] == {} and sorted(rows[DIST]["entry_points"]) == sorted(MODULES)
        assert "Entry-point plugins are disabled (ELBOKIT_DISABLE_PLUGINS is set)" in run_cli("plugins").stdout
        monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kwargs: [])
        set_registry(None)
        assert run_cli("plugins").stdout.startswith("No third-party plugins installed")
    finally:
        set_registry(None)


def test_a_plugin_whose_only_entry_point_fails_is_listed_as_failed(installed, run_cli):
    rows = {r["name"]: r for r in json.loads(run_cli("plugins", "--json").stdout)}
    assert rows[DIST]["status"] == "loaded" and rows["elbokit-twin-a"]["status"] == "loaded"
    installed.plugins["elbokit-twin-a"].registers.clear()  # as if its only entry point had failed
    installed.plugins["elbokit-twin-a"].errors.append("Plugin 'elbokit-twin-a' failed to load: ImportError: x")
    rows = {r["name"]: r for r in json.loads(run_cli("plugins", "--json").stdout)}
    assert rows["elbokit-twin-a"]["status"] == "failed" and rows["elbokit-twin-a"]["description"] == "failed to load"
