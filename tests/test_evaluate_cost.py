"""`elbokit evaluate` with a large --iw-samples: the cost is estimated before the pass, an
impossible request is refused up front, and the pass reports its progress."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from elbokit.cli import main

    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--n", "300", "--hidden", "16", "--batch-size", "64", "--max-epochs", "1",
                 "--no-evaluate", "-q", "--out", str(out)]) == 0
    return out


def test_an_impossible_iw_samples_is_refused_up_front_with_its_estimate(small_run, run_cli):
    # 3e12 decoder evaluations: days on any CPU, so the refusal does not depend on the machine.
    res = run_cli("evaluate", small_run, "--iw-samples", "100000000000")
    assert res.exit_code == 2 and res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --iw-samples 100000000000 means 3e+12 decoder evaluations")
    assert "estimated at" in lines[0] and "--max-minutes 60" in lines[0]


def test_the_limit_is_the_users_and_a_small_k_passes(small_run, run_cli):
    res = run_cli("evaluate", small_run, "--iw-samples", "50", "--max-minutes", "1e-12")
    assert res.exit_code == 2 and "more than --max-minutes 1e-12" in res.stderr
    res = run_cli("evaluate", small_run, "--iw-samples", "50", "--json")
    assert res.exit_code == 0 and res.stderr == ""


def test_progress_counts_every_pair_once_and_the_estimate_leaves_the_numbers_unchanged(small_run):
    from elbokit.evaluate import evaluate_run
    from elbokit.run import load_run

    run = load_run(small_run)
    calls, costs = [], []
    with_hooks = evaluate_run(run, iw_samples=300, chunk=1000, progress=lambda d, t: calls.append((d, t)),
                              check_cost=lambda s, p: costs.append((s, p)))
    plain = evaluate_run(run, iw_samples=300, chunk=1000)
    n = with_hooks["n"]
    assert costs and costs[0][1] == n * 300 and costs[0][0] > 0
    done = [d for d, _ in calls]
    assert all(t == n * 300 for _, t in calls) and done == sorted(set(done)) and done[-1] == n * 300
    # Blocks of 1000 pairs at K = 300: 3 examples per block, so ceil(n / 3) calls.
    assert len(calls) == -(-n // 3)
    for key in ("elbo", "iwae", "kl", "recon"):
        assert with_hooks[key] == plain[key]  # the timing probe does not move the random stream
