"""The "your own data and model" guide (docs/own-data.md) is runnable as written, and digits at
its own defaults trains, with the rows an epoch leaves out said, to a held-out ELBO in the
units its summary states."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "own-data.md"


def guide_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(encoding="utf-8"), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_the_guides_commands_pass_every_check(run_cli, fresh_registry, tmp_path, monkeypatch):
    """Each `elbokit train` of the guide runs every check train makes (`--print-config`: build,
    contracts, one training step) on the file its first command writes; nothing is written."""
    commands = guide_commands()
    make_file = next(c for c in commands if c.startswith("python -c"))
    trains = [c for c in commands if c.startswith("elbokit train")]
    assert len(trains) == 2 and any("--terms classic" in c for c in trains) and any("--positives" in c for c in trains)
    assert subprocess.run([sys.executable, *shlex.split(make_file)[1:]], cwd=tmp_path).returncode == 0
    x = np.load(tmp_path / "digits.npy")
    assert x.shape == (1797, 1, 8, 8) and set(np.unique(x * 16)) == set(range(17))
    monkeypatch.chdir(tmp_path)
    for command in trains:
        res = run_cli(*shlex.split(command)[1:], "--print-config")
        assert res.exit_code == 0, (command, res.stderr)
        assert 'name = "conv"' in res.stdout and 'standardize = "none"' in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.npy"]


def test_the_guides_ed_command_without_positives_is_refused_naming_the_option(run_cli, fresh_registry, tmp_path,
                                                                                monkeypatch):
    np.save(tmp_path / "digits.npy", np.zeros((50, 1, 8, 8)))
    monkeypatch.chdir(tmp_path)
    command = next(c for c in guide_commands() if "--positives" in c)
    args = shlex.split(command.replace("--positives shift:1", ""))[1:]
    res = run_cli(*args)
    assert res.exit_code == 2 and "--positives" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_digits_at_its_defaults_trains_to_a_test_elbo_in_stated_units(run_cli, fresh_registry, tmp_path):
    res = run_cli("train", "--data", "digits", "--hidden", "32", "--max-epochs", "2", "--threads", "1",
                  "--out", tmp_path / "run", "-q", "--json")
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert any("29 of the 1437 training rows are left out of each epoch" in n for n in summary["notes"])
    assert summary["likelihood"] == {"name": "discretized", "units": "nats (probability mass over the levels)"}
    test = summary["test"]
    assert test["n"] == 180 and test["units"]["elbo"].startswith("nats per example")
    # A log-probability mass: each reconstruction term is at most 0 and the KL is at least 0, so
    # the ELBO is below 0 (a density on [0, 1] could exceed it); IWAE is above the ELBO.
    assert test["elbo"] < 0 and test["elbo"] <= test["iwae"]


def test_the_guides_grid_resolves_with_the_positives_in_every_cell(run_cli, fresh_registry, tmp_path, monkeypatch):
    np.save(tmp_path / "digits.npy", np.round(np.random.default_rng(0).random((100, 1, 8, 8)) * 16) / 16)
    monkeypatch.chdir(tmp_path)
    command = next(c for c in guide_commands() if c.startswith("elbokit benchmark grid"))
    res = run_cli(*shlex.split(command)[1:], "--print-grid", "--json")
    assert res.exit_code == 0, res.stderr
    plan = json.loads(res.stdout)
    assert len(plan["cells"]) == 10 and plan["estimate"]["upper_bound_seconds"] > 0
    assert all(c["config"]["data"]["positives"] == "shift:1" and c["config"]["model"]["name"] == "conv"
               for c in plan["cells"])
    assert not (tmp_path / "runs").exists()
