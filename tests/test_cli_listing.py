"""`elbokit terms|priors|estimators|plugins`: tables, JSON, and one-line usage errors."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("command", ["terms", "priors", "estimators"])
def test_json_lists_have_name_and_description(run_cli, fresh_registry, command):
    result = run_cli(command, "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert rows and all(r["name"] and r["description"] for r in rows)


def test_terms_json_says_what_each_term_needs(run_cli, fresh_registry):
    rows = {r["name"]: r for r in json.loads(run_cli("terms", "--json").stdout)}
    assert set(rows) == {"recon", "kl", "infonce", "mi", "entropy", "xent", "marginal-kl"}
    assert "positives" in rows["infonce"]["needs"]          # the default critic `cosine` compares x with x+
    assert "dataset_size" in rows["entropy"]["needs"]       # MWS divides by N M
    assert "prior_log_prob" in rows["kl"]["needs"]
    assert rows["entropy"]["sign"] == -1 and rows["xent"]["sign"] == 1
    assert rows["recon"]["presets"] == ["classic", "ed"] and rows["kl"]["presets"] == ["classic"]


def test_estimators_json_names_quantities_and_bounds(run_cli, fresh_registry):
    rows = json.loads(run_cli("estimators", "--json").stdout)
    by_key = {(r["quantity"], r["name"]): r for r in rows}
    assert by_key[("mi", "infonce")]["kind"] == "lower bound"
    # Biased low on a finite batch, so not a bound (docs/design.md section 3).
    assert by_key[("entropy", "gaussian")]["kind"] == "estimate"
    # The listing says which priors have a closed-form cross-entropy.
    assert "standard-normal" in by_key[("cross_entropy", "analytic")]["description"]
    assert "conditional" in by_key[("entropy", "logvar")]["description"].lower()
    assert {q for q, _ in by_key} == {"kl", "entropy", "cross_entropy", "mi"}


def test_priors_json_flags(run_cli, fresh_registry):
    rows = {r["name"]: r for r in json.loads(run_cli("priors", "--json").stdout)}
    assert rows["samples"]["has_log_prob"] is False
    assert rows["gmm"]["needs_samples"] is True and rows["gmm"]["has_log_prob"] is True


def test_plugins_all_lists_builtins_and_what_they_register(run_cli, fresh_registry):
    rows = json.loads(run_cli("plugins", "--all", "--json").stdout)
    registers = {r["name"]: r["registers"] for r in rows}
    assert "gmm" in registers["elbokit.default_plugins.priors"]["priors"]
    assert "entropy/mss" in registers["elbokit.default_plugins.estimators"]["estimators"]
    assert all("version" in r for r in rows)


def test_tables_render_brackets_literally(run_cli, fresh_registry, monkeypatch):
    # rich would swallow "[q(z)]" as markup if cells were not escaped.
    monkeypatch.setenv("COLUMNS", "300")
    out = run_cli("terms").stdout
    assert "-H[q(z)], the negative entropy" in out


@pytest.mark.parametrize("args", [["nonsense"], ["terms", "--jsn"], ["terms", "extra-arg"]])
def test_usage_errors_are_one_line_with_exit_code_2(run_cli, args):
    result = run_cli(*args)
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert "Traceback" not in result.stderr


def test_help_does_not_import_torch():
    # The CLI imports the library inside its commands, so `elbokit --help` stays fast.
    import subprocess
    import sys

    code = ("import sys\nfrom elbokit.cli import main\nmain(['--help'])\n"
            "sys.stderr.write('TORCH=' + str('torch' in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "TORCH=False" in proc.stderr, proc.stderr
