"""The estimator benchmark: every registered estimator against ground truth.

For each estimator of a quantity (built-in or from a plugin, named QUANTITY/NAME), with its
documented option values swept, on a *family* of N Gaussian posteriors whose truths are known
(`elbokit.benchmark.truths`), over batch sizes M, dataset sizes N, latent dimensions L and
overlaps: the mean error (bias) with its standard error, the spread across batches, the RMSE,
the time of one call forward and backward, and the peak memory of that call.

The synthetic family, for overlap s in (0, 1]: means loc_n = sqrt(1 - s^2) u_n with u_n ~ N(0, I)
(fixed seed) and every scale s. At s = 1 all posteriors are N(0, I) (identical; I(x;z) = 0);
as s -> 0 they separate (I(x;z) -> log N); the aggregate posterior stays close to N(0, I)
throughout, so the cross-entropy to the standard normal is of the same size at every overlap.
Positives are a second code from the same posterior, z+ ~ q(z|x_n).

A batch is M distinct indices drawn without replacement (as a shuffled data loader does), the
posterior parameters in float32 requiring grad (as an encoder's output would) and z, z+ drawn by
reparameterisation. The estimate of a batch is the mean of the estimator's per-example output.

Only the public interface is used: `Estimator(**options)`, `check_prior`, `needs`, `kind`,
`forward(batch, prior)`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from elbokit.batch import Batch, gaussian_posterior
from elbokit.errors import ElbokitError

from .truths import Family, Truth, family_truths

# The option values each built-in estimator documents, swept by default (`--option` overrides a
# key or adds one). Keys are QUANTITY/NAME.
DOCUMENTED_SWEEPS: dict[str, dict[str, list[Any]]] = {
    "mi/infonce": {"critic": ["dot", "cosine", "encoder"]},
    "entropy/knn": {"k": [1, 3, 10]},
    "cross_entropy/knn": {"k": [1, 3, 10], "n_prior": [512, 2048]},
}

DEFAULTS = {
    "batch_sizes": [32, 128, 512],
    "dataset_sizes": [1000],
    "latent_dims": [5],
    "overlaps": [0.05, 0.3, 1.0],
    "repeats": 20,
    "truth_samples": 5000,
    "seed": 0,
}

# What each quantity's estimators are compared with, by key of `family_truths`.
TRUTH_OF = {"entropy": "entropy", "mi": "mi", "cross_entropy": "cross_entropy", "kl": "kl"}

COLUMNS = ["estimator", "quantity", "name", "options", "kind", "plugin", "prior", "source", "N", "L", "overlap",
           "M", "truth_of", "truth", "truth_se", "truth_method", "mean", "bias", "bias_se", "bias_over_se", "std",
           "rmse", "log_M", "ms_per_call", "peak_mb", "repeats"]


@dataclass
class Spec:
    """One estimator with one set of options."""

    quantity: str
    name: str
    options: dict[str, Any]
    cls: type
    plugin: str
    estimator: Any = field(default=None, repr=False)

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.quantity}/{self.name}" + (f"[{opts}]" if opts else "")

    @property
    def needs(self) -> frozenset[str]:
        return frozenset(getattr(self.estimator, "needs", self.cls.needs))


# -- choosing estimators -----------------------------------------------------------------
def parse_value(text: str) -> Any:
    text = text.strip()
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_options(items: list[str]) -> dict[str, list[Any]]:
    """["k=1,3", "critic=dot"] -> {"k": [1, 3], "critic": ["dot"]}."""
    out: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ElbokitError(f"--option takes KEY=V1,V2 (e.g. k=1,3,10), got {item!r}.")
        out[key.strip()] = [parse_value(v) for v in values.split(",") if v.strip()]
    return out


def _accepted(cls: type) -> set[str]:
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return set()
    return {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def select_specs(registry: Any, quantities: list[str] | None = None, estimators: list[str] | None = None,
                 options: dict[str, list[Any]] | None = None) -> list[Spec]:
    """The estimators to measure, each with every combination of its swept option values.

    `estimators` names are QUANTITY/NAME or NAME (every quantity with that name). An `options`
    key applies to every selected estimator whose constructor takes it; a key no selected
    estimator takes is an error.
    """
    options = options or {}
    wanted_q = set(quantities or [])
    known_q = {q for q, _ in registry.estimators}
    for q in wanted_q - known_q:
        raise ElbokitError(f"Unknown quantity '{q}'; valid quantities: {', '.join(sorted(known_q))}.")
    chosen: list[tuple[str, str]] = []
    for quantity, name in registry.estimators:
        if wanted_q and quantity not in wanted_q:
            continue
        if estimators and not any(e in (name, f"{quantity}/{name}") for e in estimators):
            continue
        chosen.append((quantity, name))
    for e in estimators or []:
        if not any(e in (n, f"{q}/{n}") for q, n in chosen):
            labels = [f"{q}/{n}" for q, n in registry.estimators if not wanted_q or q in wanted_q]
            from elbokit.errors import unknown_name

            raise unknown_name("estimator", e, labels)
    specs: list[Spec] = []
    used: set[str] = set()
    for quantity, name in chosen:
        entry = registry.estimators[(quantity, name)]
        cls, accepted = entry.obj, _accepted(entry.obj)
        sweep = {k: list(v) for k, v in DOCUMENTED_SWEEPS.get(f"{quantity}/{name}", {}).items() if k in accepted}
        for key, values in options.items():
            if key in accepted:
                sweep[key] = values
                used.add(key)
        keys = list(sweep)
        for combo in itertools.product(*(sweep[k] for k in keys)):
            opts = dict(zip(keys, combo))
            try:
                est = cls(**opts)
            except (TypeError, ValueError) as exc:
                raise ElbokitError(f"Bad option for estimator {quantity}/{name} ({opts}): {exc}") from None
            specs.append(Spec(quantity, name, opts, cls, entry.plugin, est))
    unused = sorted(set(options) - used)
    if unused:
        raise ElbokitError(f"No selected estimator takes the option '{unused[0]}'.")
    if not specs:
        raise ElbokitError("No estimator matches the selection.")
    return specs


# -- families and priors -----------------------------------------------------------------
def synthetic_family(n: int, dim: int, overlap: float, seed: int = 0) -> Family:
    """N posteriors N(sqrt(1 - s^2) u_n, s^2 I), u_n ~ N(0, I); s = overlap in (0, 1]."""
    if not 0.0 < overlap <= 1.0:
        raise ElbokitError(f"An overlap is a posterior scale in (0, 1] (1: identical posteriors), got {overlap}.")
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, dim, generator=g, dtype=torch.float64)
    loc = math.sqrt(1.0 - overlap**2) * u
    scale = torch.full_like(loc, overlap)
    return Family(loc, scale, loc, scale, f"synthetic N={n} L={dim} overlap={overlap}")


@functools.lru_cache(maxsize=16)
def gmm_prior(dim: int, seed: int = 0) -> Any:
    """A 3-component Gaussian mixture prior fitted (by the `gmm` prior) to samples of a mixture
    with means -1.5, 0, 1.5 along the diagonal direction and scale 0.7."""
    from elbokit import make_prior
    from elbokit.plugins import get_registry

    g = torch.Generator().manual_seed(seed + 1)
    centre = torch.tensor([-1.5, 0.0, 1.5]).repeat_interleave(1000)[:, None] * torch.ones(dim) / math.sqrt(dim)
    samples = centre + 0.7 * torch.randn(3000, dim, generator=g)
    return make_prior("gmm", samples=samples.numpy(), n_components=3, registry=get_registry())


def standard_normal(dim: int) -> Any:
    from elbokit import make_prior
    from elbokit.plugins import get_registry

    return make_prior("standard-normal", dim=dim, registry=get_registry())


def synthetic_priors(dim: int, seed: int, with_gmm: bool = True) -> dict[str, Any]:
    """The priors of the synthetic benchmark: the standard normal and (for kl and cross_entropy)
    a fitted Gaussian mixture."""
    priors = {"standard-normal": standard_normal(dim)}
    if with_gmm:
        priors["gmm"] = gmm_prior(dim, seed)
    return priors


@functools.lru_cache(maxsize=64)
def synthetic_truths(n: int, dim: int, overlap: float, samples: int, seed: int, with_gmm: bool = True) -> dict[str, Truth]:
    """Truths of the synthetic family, cached per (N, L, overlap) (and the Monte-Carlo settings)."""
    family = synthetic_family(n, dim, overlap, seed)
    return family_truths(family, samples=samples, seed=seed + 12345, priors=synthetic_priors(dim, seed, with_gmm))


# -- measuring ---------------------------------------------------------------------------
def truth_key(spec: Spec, prior_name: str) -> str:
    if spec.quantity == "mi" and "positives" in spec.needs:
        return "mi_positive"  # a critic of positive pairs bounds I(z; z+), not I(x; z)
    if spec.quantity in ("cross_entropy", "kl"):
        return f"{spec.quantity}:{prior_name}"
    return TRUTH_OF.get(spec.quantity, spec.quantity)


def priors_for(spec: Spec, priors: dict[str, Any]) -> list[tuple[str, Any, str | None]]:
    """(name, prior, reason it is refused or None) for each prior the estimator is run against.
    Only kl and cross_entropy depend on the prior; the others use the first one."""
    if spec.quantity not in ("kl", "cross_entropy"):
        name, prior = next(iter(priors.items()))
        return [(name, prior, None)]
    out = []
    for name, prior in priors.items():
        reason = None
        if "prior_log_prob" in spec.needs and not prior.has_log_prob:
            reason = f"prior '{name}' has no log_prob"
        else:
            reason = spec.estimator.check_prior(prior)
        out.append((name, prior, reason))
    return out


def make_batch(family: Family, index: torch.Tensor, g: torch.Generator, positives: bool) -> tuple[Batch, list]:
    loc = family.loc[index].float().requires_grad_()
    scale = family.scale[index].float().requires_grad_()
    z = loc + scale * torch.randn(loc.shape, generator=g)
    batch = Batch(x=loc.detach(), posterior=gaussian_posterior(loc, scale), z=z, dataset_size=family.size)
    leaves = [loc, scale]
    if positives:
        loc_pos = family.loc_pos[index].float().requires_grad_()
        scale_pos = family.scale_pos[index].float().requires_grad_()
        batch.x_pos = loc_pos.detach()
        batch.posterior_pos = gaussian_posterior(loc_pos, scale_pos)
        batch.z_pos = loc_pos + scale_pos * torch.randn(loc.shape, generator=g)
        leaves += [loc_pos, scale_pos]
    return batch, leaves


def call(estimator: Any, batch: Batch, prior: Any) -> float:
    """One forward and backward of the batch estimate; returns the estimate."""
    value = estimator(batch, prior).mean()
    if value.requires_grad:
        value.backward()
    return float(value.detach())


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 for a moment: the profiler's C++ side prints start/stop and
    allocator notes there, past Python's sys.stderr, and a command's stderr is for errors."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_mb(estimator: Any, batch: Batch, prior: Any) -> float:
    """Peak of torch's CPU allocator during one forward+backward, from torch.profiler.

    The profiler records each allocation and free with the allocator's running total; the peak
    is the largest total less the total before the call (the batch already exists).
    tracemalloc would not see torch's allocations."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call(estimator, batch, prior)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    if not memory:
        return 0.0
    # The running total includes whatever the process already held: subtract the total just
    # before the first recorded event.
    baseline = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(0, max(m["Total Allocated"] for m in memory) - baseline) / 2**20


def measure(spec: Spec, prior: Any, family: Family, m: int, truth: Truth, repeats: int, seed: int,
            memory: bool = True) -> dict[str, Any]:
    """Bias (with SE), spread, RMSE, time and peak memory of one estimator at batch size m."""
    torch.manual_seed(seed)  # estimators that draw (e.g. prior samples for knn) draw reproducibly
    g = torch.Generator().manual_seed(seed)
    positives = "positives" in spec.needs
    est = spec.estimator

    def batch_of() -> Batch:
        return make_batch(family, torch.randperm(family.size, generator=g)[:m], g, positives)[0]

    call(est, batch_of(), prior)  # warm-up
    values, times = [], []
    for _ in range(repeats):
        batch = batch_of()
        start = time.perf_counter()
        values.append(call(est, batch, prior))
        times.append(time.perf_counter() - start)
    vals = torch.tensor(values, dtype=torch.float64)
    if not torch.isfinite(vals).all():
        raise ElbokitError(f"{spec.label} returned a non-finite value at M={m}.")
    err = vals - truth.value
    bias = float(err.mean())
    std = float(vals.std(unbiased=True)) if repeats > 1 else float("nan")
    bias_se = math.sqrt((std**2 / repeats if repeats > 1 else 0.0) + truth.se**2)
    return {
        "mean": float(vals.mean()), "bias": bias, "bias_se": bias_se,
        "bias_over_se": bias / bias_se if bias_se > 0 else None,
        "std": std, "rmse": float(err.pow(2).mean().sqrt()),
        "ms_per_call": 1e3 * statistics.median(times),
        "peak_mb": peak_memory_mb(est, batch_of(), prior) if memory else None,
    }


def run_family(specs: list[Spec], family: Family, truths: dict[str, Truth], priors: dict[str, Any],
               batch_sizes: list[int], repeats: int, seed: int, source: str, overlap: float | None,
               memory: bool = True, progress: Any = None) -> tuple[list[dict], list[dict]]:
    rows, skipped = [], []
    for spec in specs:
        for prior_name, prior, reason in priors_for(spec, priors):
            base = {"estimator": spec.label, "quantity": spec.quantity, "name": spec.name,
                    "options": json.dumps(spec.options, sort_keys=True), "kind": getattr(spec.cls, "kind", ""),
                    "plugin": spec.plugin, "prior": prior_name, "source": source, "N": family.size,
                    "L": family.dim, "overlap": overlap}
            key = truth_key(spec, prior_name)
            if reason is None and key not in truths:
                reason = f"no ground truth for {key}"
            if reason is None and "positives" in spec.needs and family.loc_pos is None:
                reason = "the data has no positives"
            if reason is not None:
                skipped.append({**base, "reason": reason})
                continue
            truth = truths[key]
            for m in batch_sizes:
                if m > family.size:
                    skipped.append({**base, "M": m, "reason": f"batch size {m} > dataset size {family.size}"})
                    continue
                try:
                    stats = measure(spec, prior, family, m, truth, repeats, seed, memory)
                except ElbokitError as exc:
                    skipped.append({**base, "M": m, "reason": str(exc)})
                    continue
                rows.append({**base, "M": m, "truth_of": truth.quantity, "truth": truth.value,
                             "truth_se": truth.se, "truth_method": truth.method, **stats,
                             "log_M": math.log(m), "repeats": repeats})
                if progress is not None:
                    progress(rows[-1])
    return rows, skipped


def _check_grid(batch_sizes, dataset_sizes, latent_dims, overlaps, repeats, truth_samples) -> None:
    for what, values in (("batch size", batch_sizes), ("dataset size", dataset_sizes), ("latent dimension", latent_dims)):
        if not values or any(int(v) < 1 for v in values):
            raise ElbokitError(f"Every {what} must be a positive integer, got {values}.")
    if any(int(m) < 2 for m in batch_sizes):
        raise ElbokitError("Batch sizes must be at least 2 (pairwise estimators compare codes of a batch).")
    for s in overlaps:
        if not 0.0 < float(s) <= 1.0:
            raise ElbokitError(f"An overlap is a posterior scale in (0, 1] (1: identical posteriors), got {s}.")
    if int(repeats) < 2:
        raise ElbokitError("--repeats must be at least 2 (the spread across batches needs two).")
    if int(truth_samples) < 100:
        raise ElbokitError("--truth-samples must be at least 100.")


def run_synthetic(specs: list[Spec], batch_sizes=None, dataset_sizes=None, latent_dims=None, overlaps=None,
                  repeats=None, truth_samples=None, seed=None, memory: bool = True,
                  progress: Any = None) -> dict[str, Any]:
    """The benchmark on the synthetic families; returns {"settings", "truths", "rows", "skipped"}."""
    d = DEFAULTS
    batch_sizes = [int(v) for v in batch_sizes or d["batch_sizes"]]
    dataset_sizes = [int(v) for v in dataset_sizes or d["dataset_sizes"]]
    latent_dims = [int(v) for v in latent_dims or d["latent_dims"]]
    overlaps = [float(v) for v in overlaps or d["overlaps"]]
    repeats = int(repeats or d["repeats"])
    truth_samples = int(truth_samples or d["truth_samples"])
    seed = int(d["seed"] if seed is None else seed)
    _check_grid(batch_sizes, dataset_sizes, latent_dims, overlaps, repeats, truth_samples)
    rows, skipped, truth_rows = [], [], []
    for n, dim, overlap in itertools.product(dataset_sizes, latent_dims, overlaps):
        family = synthetic_family(n, dim, overlap, seed)
        # The mixture prior (and scikit-learn) only where an estimator depends on the prior.
        with_gmm = any(s.quantity in ("kl", "cross_entropy") for s in specs)
        truths = synthetic_truths(n, dim, overlap, truth_samples, seed, with_gmm)
        truth_rows += [{"N": n, "L": dim, "overlap": overlap, "key": k, **asdict(t)} for k, t in truths.items()]
        priors = synthetic_priors(dim, seed, with_gmm)
        r, s = run_family(specs, family, truths, priors, batch_sizes, repeats, seed, "synthetic", overlap,
                          memory, progress)
        rows += r
        skipped += s
    settings = {"source": "synthetic", "batch_sizes": batch_sizes, "dataset_sizes": dataset_sizes,
                "latent_dims": latent_dims, "overlaps": overlaps, "repeats": repeats,
                "truth_samples": truth_samples, "seed": seed}
    return {"settings": settings, "truths": truth_rows, "rows": rows, "skipped": skipped}


def run_family_from_run(run: Any, split: str = "train") -> Family:
    """A trained run's own posteriors over its data: its encoder applied to the split."""
    part = run.load_split(split)
    with torch.no_grad():
        q = run.model.encode(part.x)
        base = q.base_dist
        loc, scale = base.loc.double().cpu(), base.scale.double().cpu()
        if part.x_pos is not None:
            q_pos = run.model.encode(part.x_pos).base_dist
            loc_pos, scale_pos = q_pos.loc.double().cpu(), q_pos.scale.double().cpu()
        else:  # no positives in the data: a second code of the same posterior
            loc_pos, scale_pos = loc, scale
    return Family(loc, scale, loc_pos, scale_pos, f"run {run.run_dir} ({split} split, N={loc.shape[0]})")


def run_from_run(specs: list[Spec], run_dir: str | Path, batch_sizes=None, repeats=None, truth_samples=None,
                 seed=None, checkpoint: str = "best", memory: bool = True, progress: Any = None) -> dict[str, Any]:
    """The benchmark on a trained run's posteriors over its training split, against its own prior
    (and the standard normal), at the run's batch size and a few others."""
    from elbokit.run import load_run

    d = DEFAULTS
    run = load_run(run_dir, checkpoint=checkpoint)
    family = run_family_from_run(run, "train")
    run_batch = int(run.config["train"]["batch_size"])
    if not batch_sizes:
        batch_sizes = sorted({max(2, run_batch // 4), run_batch, 2 * run_batch})
    batch_sizes = [min(int(m), family.size) for m in batch_sizes]
    batch_sizes = sorted(set(batch_sizes))
    repeats = int(repeats or d["repeats"])
    truth_samples = int(truth_samples or d["truth_samples"])
    seed = int(d["seed"] if seed is None else seed)
    _check_grid(batch_sizes, [family.size], [family.dim], [1.0], repeats, truth_samples)
    prior = run.prior.cpu().float()
    priors = {prior.name: prior}
    if prior.name != "standard-normal":
        priors["standard-normal"] = standard_normal(family.dim)
    truths = family_truths(family, samples=truth_samples, seed=seed + 12345, priors=priors)
    truth_rows = [{"N": family.size, "L": family.dim, "overlap": None, "key": k, **asdict(t)} for k, t in truths.items()]
    rows, skipped = run_family(specs, family, truths, priors, batch_sizes, repeats, seed,
                               f"run:{Path(run_dir).name}", None, memory, progress)
    settings = {"source": "run", "run_dir": str(run_dir), "checkpoint": checkpoint, "run_batch_size": run_batch,
                "batch_sizes": batch_sizes, "dataset_sizes": [family.size], "latent_dims": [family.dim],
                "repeats": repeats, "truth_samples": truth_samples, "seed": seed, "prior": prior.name}
    return {"settings": settings, "truths": truth_rows, "rows": rows, "skipped": skipped}


# -- the record of where and how it ran --------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(), "load_average_start": load}


def commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# -- outputs -----------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ["estimator", "prior", "truth of", "N", "L", "overlap", "M", "truth (SE)", "bias +- SE", "std",
            "RMSE", "log M", "ms/call", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for r in rows:
        prior = r["prior"] if r["quantity"] in ("kl", "cross_entropy") else "-"
        cells = [
            r["estimator"], prior, r["truth_of"], str(r["N"]), str(r["L"]), _fmt(r["overlap"], 2), str(r["M"]),
            f"{_fmt(r['truth'])} ({_fmt(r['truth_se'])})", f"{_fmt(r['bias'])} +- {_fmt(r['bias_se'])}",
            _fmt(r["std"]), _fmt(r["rmse"]), _fmt(r["log_M"], 2), _fmt(r["ms_per_call"], 2),
            _fmt(r["peak_mb"], 2)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")  # a | would split the cell
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    return buf.getvalue()


def _file_label(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label.replace("/", "__")).strip("_")


def figures(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per estimator: bias (with 2 SE bars) and RMSE against batch size, one line per
    (prior, N, L, overlap)."""
    from elbokit.io import write_bytes
    from elbokit.plot import _pyplot

    plt = _pyplot()
    import io

    paths = []
    by_est: dict[str, list[dict]] = {}
    for r in rows:
        by_est.setdefault(r["estimator"], []).append(r)
    for label, group in by_est.items():
        fig, (ax_bias, ax_rmse) = plt.subplots(1, 2, figsize=(10, 3.8))
        lines: dict[tuple, list[dict]] = {}
        for r in group:
            key = (r["prior"] if r["quantity"] in ("kl", "cross_entropy") else "", r["N"], r["L"], r["overlap"])
            lines.setdefault(key, []).append(r)
        for (prior, n, dim, overlap), pts in sorted(lines.items(), key=lambda kv: str(kv[0])):
            pts = sorted(pts, key=lambda r: r["M"])
            ms = [p["M"] for p in pts]
            name = f"{prior + ' ' if prior else ''}N={n} L={dim}" + (f" s={overlap}" if overlap is not None else "")
            ax_bias.errorbar(ms, [p["bias"] for p in pts], yerr=[2 * p["bias_se"] for p in pts], marker="o",
                             capsize=3, label=name)
            ax_rmse.plot(ms, [p["rmse"] for p in pts], marker="o", label=name)
        for ax, what in ((ax_bias, "bias (nats, +- 2 SE)"), (ax_rmse, "RMSE (nats)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size M")
            ax.set_ylabel(what)
            ax.grid(alpha=0.3)
        ax_bias.axhline(0.0, color="black", lw=0.8)
        ax_rmse.set_yscale("log")
        ax_bias.legend(fontsize=7)
        fig.suptitle(f"{label}: estimate of {group[0]['truth_of']}")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        path = out_dir / f"{_file_label(label)}.png"
        write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


def check_out_dir(out_dir: Path) -> None:
    """Refuse an output directory that cannot be one, before anything is measured."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ElbokitError(f"--out {out_dir} exists and is not a directory.")
    parent = out_dir if out_dir.exists() else next((p for p in out_dir.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ElbokitError(f"--out {out_dir}: {parent} is not writable.")


def write_outputs(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """results.json, results.csv, results.md and one PNG per estimator in `out_dir`."""
    from elbokit.io import write_json, write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "results.csv", out_dir / "results.md"]
    write_json(paths[0], result)
    write_text(paths[1], csv_text(result["rows"]))
    header = (f"Estimator benchmark ({result['settings']['source']}); commit {result.get('commit')}; "
              f"command `{result.get('command')}`\n\n")
    write_text(paths[2], header + markdown_table(result["rows"]))
    return paths + figures(result["rows"], out_dir)
