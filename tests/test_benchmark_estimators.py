"""`elbokit benchmark estimators`: the float64 truths against closed forms and limits, a wrong
plugin estimator caught by its bias, the built-in MWS inside its documented interval, and the
command on a trained run."""

from __future__ import annotations

import json
import math

import pytest
import torch

import elbokit
from elbokit.benchmark import estimators as bench
from elbokit.benchmark.truths import LOG_2PI, Family, family_truths, gmm_log_density, prior_log_density

FAST = ["--repeats", "8", "--truth-samples", "2000", "--no-memory", "--json"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster and immune to a busy second core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- the truths
def test_truths_on_identical_posteriors_match_the_gaussian_closed_form():
    """Overlap 1: every posterior is N(0, I), so q(z) = N(0, I): H = (L/2) log(2 pi e), I(x;z) = 0,
    I(z;z+) = 0, H[q, N(0,I)] = H and KL = 0."""
    dim = 4
    family = bench.synthetic_family(300, dim, 1.0, seed=3)
    truths = family_truths(family, samples=4000, seed=1, priors={"sn": elbokit.make_prior("standard-normal", dim=dim)})
    closed = 0.5 * dim * (1.0 + LOG_2PI)
    h = truths["entropy"]
    assert h.se > 0 and abs(h.value - closed) < 4 * h.se
    assert abs(truths["mi"].value) < 1e-9 and abs(truths["mi_positive"].value) < 1e-9
    assert truths["conditional_entropy"].value == pytest.approx(closed, abs=1e-12)
    assert truths["cross_entropy:sn"].value == pytest.approx(closed, abs=1e-12)
    assert truths["kl:sn"].value == pytest.approx(0.0, abs=1e-12)


def test_truths_in_the_well_separated_limit():
    """Posteriors far apart relative to their scale: H = log N + the per-component entropy and
    I(x;z) = I(z;z+) = log N."""
    n, dim, s = 200, 5, 1e-3
    family = bench.synthetic_family(n, dim, s, seed=0)
    gaps = torch.cdist(family.loc, family.loc) + torch.eye(n) * 1e9
    assert gaps.min() / s > 40  # the premise: separated by many posterior scales
    truths = family_truths(family, samples=3000, seed=2)
    per_component = 0.5 * dim * (1.0 + LOG_2PI) + dim * math.log(s)
    h = truths["entropy"]
    assert abs(h.value - (math.log(n) + per_component)) < 4 * h.se
    assert truths["mi"].value == pytest.approx(math.log(n), abs=1e-6)
    assert truths["mi_positive"].value == pytest.approx(math.log(n), abs=1e-6)


def test_truths_of_an_uneven_family_match_torch_distributions():
    """Per-component scales and a GMM prior: the broadcast float64 code against torch's own
    MixtureSameFamily log_prob (float64) on the same draws, and a KL identity."""
    g = torch.Generator().manual_seed(0)
    n, dim = 50, 3
    loc = torch.randn(n, dim, generator=g, dtype=torch.float64)
    scale = 0.2 + torch.rand(n, dim, generator=g, dtype=torch.float64)
    family = Family(loc, scale, loc, scale)
    z = torch.randn(400, dim, generator=g, dtype=torch.float64)
    mix = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(torch.full((n,), 1.0 / n, dtype=torch.float64)),
                                                torch.distributions.Independent(torch.distributions.Normal(loc, scale), 1))
    from elbokit.benchmark.truths import mixture_terms

    log_q, log_q_pos, _ = mixture_terms(z, z, family)
    torch.testing.assert_close(log_q, mix.log_prob(z), rtol=0, atol=1e-10)
    torch.testing.assert_close(log_q_pos, log_q, rtol=0, atol=0)
    prior = elbokit.make_prior("gmm", samples=torch.randn(500, dim, generator=g).numpy() * 1.5, n_components=2)
    log_p, _how = prior_log_density(prior)
    torch.testing.assert_close(log_p(z).float(), prior.log_prob(z.float()), rtol=0, atol=1e-4)
    # H[q, p] - H[q] = KL(q(z) || p) and E_x KL(q(z|x)||p) = I + KL(q(z)||p): same draws, exact.
    t = family_truths(family, samples=1500, seed=4, priors={"gmm": prior})
    assert t["kl:gmm"].value == pytest.approx(t["mi"].value + t["cross_entropy:gmm"].value - t["entropy"].value, abs=1e-9)


def test_gmm_log_density_against_sklearn():
    from sklearn.mixture import GaussianMixture

    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(200, 2, generator=g) - 2, torch.randn(200, 2, generator=g) * 0.5 + 1]).double().numpy()
    gm = GaussianMixture(2, covariance_type="full", random_state=0).fit(x)
    ours = gmm_log_density(torch.as_tensor(x), torch.as_tensor(gm.weights_), torch.as_tensor(gm.means_),
                           torch.as_tensor(gm.covariances_))
    torch.testing.assert_close(ours, torch.as_tensor(gm.score_samples(x)), rtol=0, atol=1e-10)


# ---------------------------------------------------------------- a wrong plugin estimator
class EntropyMWSWithoutNormalisation(elbokit.Estimator):
    """MWS without its log(N M) term (deliberately wrong: the benchmark must catch it)."""

    quantity, name = "entropy", "mws-unnormalised"
    needs = frozenset({"dataset_size"})

    def forward(self, batch, prior):
        # Written with torch.distributions broadcasting, not elbokit's helpers: (M, M) log q(z_i|x_j).
        q = torch.distributions.Independent(torch.distributions.Normal(batch.posterior_loc[None], batch.posterior_scale[None]), 1)
        return -torch.logsumexp(q.log_prob(batch.z[:, None, :]), dim=1)


class WrongPlugin:
    __name__ = "wrong-mws-plugin"

    @elbokit.hookimpl
    def register_estimators(self, register):
        register(EntropyMWSWithoutNormalisation)


@pytest.fixture
def registry_with_wrong_plugin():
    from elbokit.plugins import Registry, set_registry

    registry = Registry.build(plugins=[WrongPlugin()], load_entry_points=False, strict=True)
    set_registry(registry)
    yield registry
    set_registry(None)


def test_wrong_plugin_estimator_is_caught_and_builtin_mws_is_in_its_interval(run_cli, registry_with_wrong_plugin):
    n, sizes = 400, (16, 64)
    res = run_cli("benchmark", "estimators", "-e", "entropy/mws,entropy/mws-unnormalised", "-n", n,
                  "-m", ",".join(map(str, sizes)), "--overlap", "0.05,0.5,1", *FAST)
    assert res.exit_code == 0, res.stderr
    rows = json.loads(res.stdout)["rows"]
    assert {r["estimator"] for r in rows} == {"entropy/mws", "entropy/mws-unnormalised"}
    # The plugin's estimator is listed under its plugin, without any change to the benchmark.
    assert {r["plugin"] for r in rows if r["name"] == "mws-unnormalised"} == {"wrong-mws-plugin"}
    by = {(r["name"], r["overlap"], r["M"]): r for r in rows}
    assert len(by) == 2 * 3 * len(sizes)
    for (name, overlap, m), r in by.items():
        if name == "mws":
            # docs/concepts.md: the value sits a constant above H[q(z)], between log M and log N.
            assert math.log(m) - 3 * r["bias_se"] <= r["bias"] <= math.log(n) + 3 * r["bias_se"], r
        else:
            assert abs(r["bias"]) > 10 * r["bias_se"], r
            # Same batches (same seed): the two differ by exactly log(N M).
            assert r["mean"] == pytest.approx(by[("mws", overlap, m)]["mean"] - math.log(n * m), abs=1e-3)
    # The two ends of the interval are reached: log M well separated, log N identical.
    assert by[("mws", 0.05, 16)]["bias"] == pytest.approx(math.log(16), abs=4 * by[("mws", 0.05, 16)]["bias_se"] + 0.05)
    assert by[("mws", 1.0, 64)]["bias"] == pytest.approx(math.log(n), abs=4 * by[("mws", 1.0, 64)]["bias_se"])


def test_unbiased_estimators_are_within_their_standard_error(run_cli, fresh_registry):
    """kl/analytic, kl/mc and cross_entropy/mc estimate dataset means without bias; mss is close."""
    res = run_cli("benchmark", "estimators", "-e", "kl/analytic,kl/mc,cross_entropy/mc,cross_entropy/analytic",
                  "-n", "300", "-m", "32", "--overlap", "0.3", *FAST)
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    rows = out["rows"]
    assert {(r["estimator"], r["prior"]) for r in rows} == {
        ("kl/analytic", "standard-normal"), ("kl/mc", "standard-normal"), ("kl/mc", "gmm"),
        ("cross_entropy/mc", "standard-normal"), ("cross_entropy/mc", "gmm"),
        ("cross_entropy/analytic", "standard-normal")}
    for r in rows:
        assert abs(r["bias"]) < 4 * r["bias_se"], r
    # What could not run is said, with the estimator's own reason.
    skipped = {(s["estimator"], s["prior"]): s["reason"] for s in out["skipped"]}
    assert "kl/mc" not in {k[0] for k in skipped}
    assert "standard-normal" in skipped[("cross_entropy/analytic", "gmm")]


def test_documented_sweeps_and_option_override(fresh_registry):
    specs = bench.select_specs(fresh_registry, ["mi"], ["infonce"])
    assert [s.label for s in specs] == ["mi/infonce[critic=dot]", "mi/infonce[critic=cosine]", "mi/infonce[critic=encoder]"]
    assert [s.needs for s in specs] == [{"positives"}, {"positives"}, frozenset()]
    specs = bench.select_specs(fresh_registry, None, ["knn"], bench.parse_options(["k=2,5"]))
    assert sorted(s.label for s in specs) == sorted(
        ["entropy/knn[k=2]", "entropy/knn[k=5]"]
        + [f"cross_entropy/knn[k={k},n_prior={p}]" for k in (2, 5) for p in (512, 2048)])


def test_infonce_never_exceeds_log_m_and_the_critics_bound_their_own_truth(run_cli, fresh_registry):
    res = run_cli("benchmark", "estimators", "-e", "mi/infonce,mi/mws", "-n", "300", "-m", "16,64",
                  "--overlap", "0.05", *FAST)
    assert res.exit_code == 0, res.stderr
    rows = json.loads(res.stdout)["rows"]
    for r in rows:
        if r["name"] == "infonce":
            assert r["mean"] <= r["log_M"] + 1e-5
            assert r["truth_of"] == ("I(x;z)" if "encoder" in r["estimator"] else "I(z;z+)")
    # encoder critic = mi_mws - log N on the same batches (docs/design.md section 2).
    enc = {r["M"]: r["mean"] for r in rows if r["estimator"] == "mi/infonce[critic=encoder]"}
    mws = {r["M"]: r["mean"] for r in rows if r["estimator"] == "mi/mws"}
    for m in enc:
        assert enc[m] == pytest.approx(mws[m] - math.log(300), abs=1e-3)


# ---------------------------------------------------------------- the command
def test_outputs_are_written(run_cli, fresh_registry, tmp_path):
    out = tmp_path / "bench"
    res = run_cli("benchmark", "estimators", "-e", "entropy/mss", "-n", "200", "-m", "8,32", "--overlap", "0.5",
                  "--repeats", "4", "--truth-samples", "500", "--out", out)
    assert res.exit_code == 0, res.stderr
    assert res.stderr == ""
    lines = (out / "results.csv").read_text().splitlines()
    assert lines[0].split(",")[:3] == ["estimator", "quantity", "name"] and len(lines) == 3
    assert "| entropy/mss |" in (out / "results.md").read_text()
    data = json.loads((out / "results.json").read_text())
    assert all(r["peak_mb"] > 0 for r in data["rows"]) and data["machine"]["threads"] >= 1
    assert (out / "entropy__mss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--option", "k"], "KEY=V1,V2"),
    (["--overlap", "1.5"], "overlap"),
    (["-e", "entropy/nope"], "Unknown estimator"),
    (["-q", "entropy", "-o", "critic=dot"], "No selected estimator takes the option 'critic'"),
    (["-m", "1"], "at least 2"),
    (["-m", "a,b"], "--batch-size"),
])
def test_bad_input_is_one_line_and_writes_nothing(run_cli, fresh_registry, tmp_path, args, message):
    out = tmp_path / "bench"
    res = run_cli("benchmark", "estimators", *args, "--out", out)
    assert res.exit_code == 2
    assert res.stderr.startswith("Error:") and message in res.stderr and res.stderr.count("\n") == 1
    assert not out.exists()


# ---------------------------------------------------------------- --from-run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`elbokit train --terms ed --prior gmm` for 2 epochs on 300 points of dataset 2."""
    from elbokit.cli import main

    out = tmp_path_factory.mktemp("runs") / "mixture"
    code = main(["train", "--data", "mixture", "--terms", "ed", "--prior", "gmm", "--prior-option", "n_components=2",
                 "--n", "300", "--hidden", "16", "--batch-size", "64", "--max-epochs", "2", "--no-evaluate", "-q",
                 "--out", str(out)])
    assert code == 0
    return out


def test_from_run_measures_on_the_runs_own_posteriors(run_cli, fresh_registry, tiny_run):
    res = run_cli("benchmark", "estimators", "--from-run", tiny_run, "-e", "kl/analytic,kl/mc,entropy/mws,mi/infonce",
                  "-o", "critic=cosine,encoder", *FAST)
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["settings"]["run_batch_size"] == 64 and out["settings"]["batch_sizes"] == [16, 64, 128]
    rows = out["rows"]
    assert rows and {r["N"] for r in rows} == {240} and {r["source"] for r in rows} == {"run:mixture"}
    assert {r["prior"] for r in rows if r["quantity"] == "kl"} == {"gmm", "standard-normal"}
    for r in rows:
        if r["estimator"] in ("kl/analytic", "kl/mc"):
            assert abs(r["bias"]) < 4 * r["bias_se"], r
        if r["estimator"] == "entropy/mws":
            assert math.log(r["M"]) - 3 * r["bias_se"] <= r["bias"] <= math.log(240) + 3 * r["bias_se"], r
    skipped = {(s["estimator"], s["prior"]) for s in out["skipped"]}
    assert ("kl/analytic", "gmm") in skipped


def test_from_run_refuses_synthetic_grid_options(run_cli, fresh_registry, tiny_run):
    res = run_cli("benchmark", "estimators", "--from-run", tiny_run, "--overlap", "0.5")
    assert res.exit_code == 2 and res.stderr.startswith("Error:") and "--from-run" in res.stderr


def test_markdown_table_escapes_pipes_in_cells():
    import re

    row = {"estimator": "kl/mc", "quantity": "kl", "prior": "gmm", "truth_of": "E_x KL(q(z|x) || p(z))", "N": 10,
           "L": 2, "overlap": 0.5, "M": 4, "truth": 1.0, "truth_se": 0.1, "bias": 0.2, "bias_se": 0.1, "std": 0.3,
           "rmse": 0.4, "log_M": math.log(4), "ms_per_call": 1.0, "peak_mb": 0.5}
    lines = bench.markdown_table([row]).splitlines()
    columns = [len(re.findall(r"(?<!\\)\|", line)) for line in lines]
    assert len(set(columns)) == 1, lines
