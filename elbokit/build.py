"""One function from a config to everything a run computes with: `build_components`.

Train, resume, evaluate and plot all build their data splits, model, prior, objective and
likelihood here, so that a check written once holds for each of them (and for benchmark cells
and distributed runs, which go through the same function):

    from elbokit import config, build
    components = build.build_components(config.resolve())
    build.precheck(components)   # one forward/backward pass on a training batch; writes nothing

Nothing here writes to disk. A new run fits its split and standardiser from the config; a
stored run (resume, evaluate) passes its `StoredRun` record so that the very same split,
standardiser and fitted prior are used again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import config as config_mod
from .errors import ElbokitError


@dataclass
class StoredRun:
    """What a run directory records about how its components were built: the data record
    (split indices, standardiser, dataset info) and the checkpoint's prior and sizes."""

    indices: dict[str, np.ndarray]
    standardizer: Any
    data_info: dict[str, Any]
    prior_name: str
    prior_spec: dict[str, Any]
    dataset_size: int | None = None
    has_positives: bool | None = None
    run_dir: Path | None = None

    def data_file_candidates(self, given: str) -> list[Path]:
        """Where a run's data file may be now: its absolute path when the run was made, the
        same file relative to the run directory (a run moved together with its data), then the
        path as given (relative to the working directory; older runs record only that)."""
        info, out = self.data_info, []
        if info.get("source_abs"):
            out.append(Path(info["source_abs"]))
        if info.get("source_from_run_dir") and self.run_dir is not None:
            out.append(Path(self.run_dir) / info["source_from_run_dir"])
        out.append(Path(given))
        return list(dict.fromkeys(out))


@dataclass
class Components:
    """Everything a run needs, built and checked, before anything is written."""

    config: dict[str, Any]
    device: torch.device
    dataset: Any
    indices: dict[str, np.ndarray]
    standardizer: Any
    splits: dict[str, Any]
    model: Any
    prior: Any
    objective: Any
    likelihood: Any
    registry: Any
    needs_positives: bool
    notes: list[str] = field(default_factory=list)
    checked: dict[str, Any] = field(default_factory=dict)  # what `precheck` found, e.g. {"auto": {...}}
    positives: Any = None  # elbokit.data.positives.PositiveSampler with data.positives, else None


# -- single components --------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ElbokitError(f"--device {name} was asked for but CUDA is not available here; use --device cpu or auto.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ElbokitError("--device mps was asked for but MPS is not available here; use --device cpu or auto.")
    return torch.device(name)


def available_cpus() -> int:
    """The CPUs this process may use: its affinity mask and its cgroup CPU quota (what SLURM,
    docker and Kubernetes set), via joblib's `cpu_count` (loky reads both; it ships with
    scikit-learn, a dependency already)."""
    import joblib

    return max(1, int(joblib.cpu_count()))


def default_threads() -> tuple[int, str]:
    """(threads, where the number comes from) for `train.threads = 0`: OMP_NUM_THREADS when the
    user set it (a scheduler starting several trainings sets it to share the cores), else the
    CPUs this process may use."""
    import os

    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    return available_cpus(), "cpus available to the process (affinity, cgroup quota)"


def resolve_threads(cfg: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """`cfg` with `train.threads = 0` (auto) replaced by the effective count, so that config.toml
    records what ran (and a re-run or resume from it uses the same count, on which the numbers
    depend); returns (config, where the count comes from)."""
    if cfg["train"]["threads"] > 0:
        return cfg, "train.threads"
    threads, source = default_threads()
    out = {**cfg, "train": {**cfg["train"], "threads": threads}}
    return out, source


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


def split_term_config(cfg: dict[str, Any], data_dim: Any, registry: Any) -> tuple[dict, dict]:
    """[terms.<name>] tables -> (options for build_objective, weights). `weight` is a weight,
    not an option; a term that takes `data_dim` (recon, for the gaussian likelihood) gets it."""
    from .objective import _accepted, parse_terms

    options: dict[str, dict[str, Any]] = {}
    weights: dict[str, float] = {}
    names = [n for n, _ in parse_terms(cfg["objective"]["terms"])]
    for term, opts in cfg["terms"].items():
        opts = dict(opts)
        if "weight" in opts:
            weights[term] = config_mod.finite_float(f"terms.{term}.weight", opts.pop("weight"))
        options[term] = opts
    for name in names:
        if "data_dim" in _accepted(registry.term(name)):
            options.setdefault(name, {}).setdefault("data_dim", data_dim)
    return options, weights


def model_name_for(cfg: dict[str, Any], event_shape: tuple[int, ...], from_file: bool) -> str:
    """The model of `cfg`: its `model.name`, or for `auto`, conv for (N, C, H, W) data files
    and mlp otherwise (registered image datasets such as digits choose mlp too)."""
    name = cfg["model"]["name"]
    if name != "auto":
        return name
    return "conv" if from_file and len(event_shape) == 3 else "mlp"


def resolve_model(cfg: dict[str, Any], event_shape: tuple[int, ...], registry: Any, from_file: bool = False) -> type:
    """Check `cfg`'s model against the data's event shape and its options against the model's
    declared ones, and write the chosen name and every option (given or default) back into
    `cfg["model"]`, so that the saved config.toml rebuilds exactly this model."""
    name = model_name_for(cfg, tuple(event_shape), from_file)
    model_cls = registry.model(name)
    problem = model_cls.unsupported(tuple(event_shape)) if hasattr(model_cls, "unsupported") else None
    if problem:
        raise ElbokitError(f"The {problem}; use --model mlp (it flattens any shape) or reshape the data.")
    defaults = model_cls.option_defaults() if hasattr(model_cls, "option_defaults") else {}
    given = dict(cfg["model"]["options"])
    bad = [k for k in given if k not in defaults]
    if bad:
        raise ElbokitError(f"Model '{name}' has no option '{bad[0]}' (its options: {', '.join(defaults) or 'none'}).")
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
    options.update(given)
    cfg["model"]["name"], cfg["model"]["options"] = name, options
    return model_cls


def build_model(cfg: dict[str, Any], event_shape: int | tuple[int, ...], registry: Any = None, from_file: bool = False):
    """The model of `cfg` for examples of `event_shape`, through the `register_models` hook."""
    from .plugins import get_registry

    registry = registry or get_registry()
    event_shape = (int(event_shape),) if isinstance(event_shape, int) else tuple(int(s) for s in event_shape)
    model_cls = resolve_model(cfg, event_shape, registry, from_file)
    try:
        return model_cls(event_shape, cfg["model"]["latent_dim"], **cfg["model"]["options"])
    except (TypeError, ValueError) as exc:
        raise ElbokitError(f"Bad option for model '{cfg['model']['name']}': {exc}.") from None


def build_objective_for(cfg: dict[str, Any], prior: Any, data_dim: int, dataset_size: int,
                        has_positives: bool, registry: Any):
    from .objective import build_objective

    options, weights = split_term_config(cfg, data_dim, registry)
    return build_objective(cfg["objective"]["terms"], prior, options=options, weights=weights,
                           dataset_size=dataset_size, has_positives=has_positives, registry=registry)


def reconstruction_likelihood(objective: Any):
    """The objective's likelihood, or the paper's `mse` when the objective has no recon term."""
    from .likelihoods import make_likelihood

    lik = objective.reconstruction_likelihood()
    return lik if lik is not None else make_likelihood("mse")


def prior_from_spec(name: str, spec: dict[str, Any], registry: Any, where: str = "the run"):
    """A stored prior: `PriorClass(**spec)` (its fitted buffers are loaded by the caller)."""
    prior_cls = registry.prior(name)
    try:
        return prior_cls(**spec)
    except (TypeError, ValueError) as exc:
        raise ElbokitError(f"Cannot rebuild prior '{name}' from {where}: {exc}") from None


def rebuild_prior(prior: Any, prior_cls: type) -> Any:
    """`PriorClass(**prior.spec())` + the fitted state: exactly how a checkpoint restores it.

    Training always runs on the rebuilt prior so that a resumed run computes with tensors of
    the same layout (a fitted buffer may be column-major, e.g. a Cholesky factor, and kernels
    round differently on other strides), and so that a prior whose spec() cannot rebuild it
    is refused now rather than when the run is loaded."""
    state = {k: v.detach().clone().contiguous() for k, v in prior.state_dict().items()}
    try:
        rebuilt = prior_cls(**prior.spec())
        rebuilt.load_state_dict(state, strict=True)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ElbokitError(f"Prior '{prior.name}' cannot be rebuilt from its spec() {prior.spec()} and state: {exc}") from None
    return rebuilt


def load_prior_samples(path: str | Path, latent_dim: int) -> np.ndarray:
    """Prior samples from .npy (an (n, L) array) or .npz (key `z`, `samples`, or its only array)."""
    path = Path(path)
    if not path.is_file():
        raise ElbokitError(f"Prior samples file not found: {path}.")
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                keys = archive.files
                key = next((k for k in ("z", "samples") if k in keys), keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise ElbokitError(f"{path} holds {', '.join(keys) or 'no arrays'}; name the prior samples 'z' or 'samples'.")
                arr = archive[key]
        elif path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            raise ElbokitError(f"Prior samples must be a .npy or .npz file, got {path}.")
    except ElbokitError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        reason = ("it holds Python objects, which elbokit never unpickles" if "allow_pickle" in str(exc)
                  else str(exc).splitlines()[0].rstrip(".") if str(exc) else type(exc).__name__)
        raise ElbokitError(f"Cannot read prior samples from {path}: {reason}; give an (n, {latent_dim}) numeric array saved with numpy.save.") from None
    if arr.dtype.kind not in "biuf" or arr.ndim != 2 or arr.shape[0] == 0:
        raise ElbokitError(f"The prior samples in {path} must be a non-empty numeric (n, {latent_dim}) array, got shape {arr.shape}.")
    if arr.shape[1] != latent_dim:
        raise ElbokitError(f"The prior samples in {path} have dimension {arr.shape[1]} but the latent dimension is {latent_dim} (--latent-dim).")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise ElbokitError(f"The prior samples in {path} have NaN or Inf in row {int(np.argmax(bad))} (0-based).")
    return arr.astype(np.float64)


def prior_samples_for(cfg: dict[str, Any], dataset: Any, prior_name: str) -> np.ndarray:
    latent_dim = cfg["model"]["latent_dim"]
    if cfg["prior"]["samples"]:
        return load_prior_samples(cfg["prior"]["samples"], latent_dim)
    if dataset.sample_latents is not None:
        z = np.asarray(dataset.sample_latents(cfg["prior"]["n_samples"]))
        if z.shape[1] != latent_dim:
            raise ElbokitError(
                f"Prior '{prior_name}' is fitted to the generator's latents, which have dimension {z.shape[1]}, "
                f"but the model's latent dimension is {latent_dim}; make them equal or give --prior-samples FILE.npy.")
        return z
    raise ElbokitError(
        f"Prior '{prior_name}' is fitted to prior samples and dataset '{dataset.name}' has no generator to draw "
        f"them from: give --prior-samples FILE.npy (an (n, {latent_dim}) array) or [prior] samples = \"FILE.npy\" in the config.")


def check_likelihood_support(cfg: dict[str, Any], splits: dict[str, Any]) -> None:
    """Bernoulli likelihoods are defined only for data in [0, 1], a discretized one only for data
    on its grid of levels (as the model sees it, after standardisation if on). Streamed splits
    are checked a chunk at a time."""
    from .data import rows_of

    recon = cfg["terms"].get("recon", {})
    name = str(recon.get("likelihood", "mse"))
    if name in ("bernoulli", "continuous-bernoulli"):
        for split_name, split in splits.items():
            for start, x in rows_of(split.x):
                outside = ((x < 0) | (x > 1)).flatten(1).any(dim=1).nonzero()
                if len(outside):
                    raise ElbokitError(
                        f"The {name} likelihood needs data in [0, 1], but {split_name} row {start + int(outside[0])} is outside it "
                        "(after standardisation, if on); scale the data to [0, 1] with data.standardize = \"none\", "
                        "or use recon.likelihood=mse or gaussian.")
    if name == "discretized":
        levels, low, high = int(recon.get("levels", 256)), float(recon.get("low", 0.0)), float(recon.get("high", 1.0))
        step = (high - low) / (levels - 1) if levels > 1 else 1.0
        for split_name, split in splits.items():
            for start, x in rows_of(split.x):
                k = (x.double() - low) / step
                off = ((k - k.round()).abs() > 1e-4) | (k < -1e-4) | (k > levels - 1 + 1e-4)
                bad = off.flatten(1).any(dim=1).nonzero()
                if len(bad):
                    raise ElbokitError(
                        f"The discretized likelihood needs data on its grid of {levels} levels in [{low:g}, {high:g}], but "
                        f"{split_name} row {start + int(bad[0])} is off it (after standardisation, if on); set recon.levels, "
                        "recon.low and recon.high to the data's grid, with data.standardize = \"none\".")


def standardize_mode(cfg: dict[str, Any], event_shape: tuple[int, ...]) -> str:
    """`data.standardize` of `cfg` with `auto` decided by the data's shape (`channel` for (C, H,
    W) examples, `feature` otherwise) and written back, so config.toml records what ran."""
    mode = cfg["data"]["standardize"]
    if mode == "auto":
        mode = cfg["data"]["standardize"] = "channel" if len(event_shape) == 3 else "feature"
    return mode


def positives_for(cfg: dict[str, Any], dataset: Any, splits: dict[str, Any], standardizer: Any):
    """With `data.positives` (an augmentation spec), the sampler that draws fresh positives for
    every training step, and each split's `x_pos` replaced by one fixed draw from (data.seed,
    split) (the dataset's own positives, if any, are not used); None without it."""
    spec = cfg["data"].get("positives")
    if not spec:
        return None
    from .data.positives import PositiveSampler, positives_of_split

    sampler = PositiveSampler(spec, dataset.event_shape, standardizer, seed=cfg["train"]["seed"])
    for name, split in splits.items():
        split.x_pos = positives_of_split(sampler, split, name, cfg["data"]["seed"])
    return sampler


# -- the whole set ------------------------------------------------------------------------
def load_data(cfg: dict[str, Any], registry: Any, stored: StoredRun | None = None):
    """The dataset of `cfg`; for a stored run, checked against its record (size, file hash)."""
    from .data import load_dataset

    dcfg = cfg["data"]
    source = dcfg["dataset"]
    from_file = stored is not None and bool(stored.data_info.get("source"))
    if from_file:
        candidates = stored.data_file_candidates(source)
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise ElbokitError(f"Data file not found: the run was trained on {source}; looked for "
                               f"{', '.join(map(str, candidates))}. Put the file back (the sha256 is checked).")
        source = str(found)
    options = None if from_file else config_mod.dataset_options(cfg)
    dataset = load_dataset(source, options, seed=dcfg["seed"], registry=registry,
                           max_in_memory_mb=dcfg.get("max_in_memory_mb", config_mod.SCHEMA["data"]["max_in_memory_mb"].default))
    if stored is not None:
        info = stored.data_info
        if len(dataset) != info["n"] or dataset.dim != info["dim"]:
            raise ElbokitError(f"The data '{dcfg['dataset']}' now has shape ({len(dataset)}, {dataset.dim}) but the run "
                               f"was trained on ({info['n']}, {info['dim']}).")
        if info.get("sha256"):
            from .run import file_unchanged

            if not file_unchanged(dataset.meta["source"], info):
                raise ElbokitError(f"The data file {dataset.meta['source']} has changed since the run was started (sha256 differs).")
    return dataset


def build_components(cfg: dict[str, Any], *, registry: Any = None, stored: StoredRun | None = None) -> Components:
    """Data splits, model, prior, objective and likelihood of `cfg` (a resolved config), on the
    config's device; with `stored`, the split, standardiser and prior of that stored run.
    Raises ElbokitError on any problem; writes nothing. The model is initialised from
    `train.seed` (for a stored run, the checkpoint's tensors replace it)."""
    from .data import Standardizer, make_split, split_indices
    from .plugins import get_registry

    registry = registry or get_registry()
    device = resolve_device(cfg["train"]["device"])
    dcfg = cfg["data"]
    dataset = load_data(cfg, registry, stored)
    if stored is not None:
        indices, standardizer = stored.indices, stored.standardizer
    else:
        indices = split_indices(len(dataset), dcfg["seed"], tuple(dcfg["split"]))
        # For a streamed dataset a view of the rows, still on disk (read in chunks by fit).
        train_x = dataset.x.take(indices["train"]) if dataset.streamed else dataset.x[indices["train"]]
        standardizer = Standardizer.fit(train_x, mode=standardize_mode(cfg, dataset.event_shape))
    splits = {name: make_split(name, dataset, idx, standardizer, device) for name, idx in indices.items() if len(idx)}
    check_likelihood_support(cfg, splits)
    positives = positives_for(cfg, dataset, splits, standardizer)

    # The model is initialised first from the training seed, so the prior and terms
    # (which may draw random numbers too) never change it.
    seed_everything(cfg["train"]["seed"])
    model = build_model(cfg, dataset.event_shape, registry, from_file=bool(dataset.meta.get("source")))
    prior_name = cfg["prior"]["name"]
    if stored is not None:
        prior = prior_from_spec(stored.prior_name, stored.prior_spec, registry)
    else:
        from . import make_prior

        prior_cls = registry.prior(prior_name)
        options = dict(cfg["prior"]["options"])
        if getattr(prior_cls, "needs_samples", False):
            options["samples"] = prior_samples_for(cfg, dataset, prior_name)
        elif cfg["prior"]["samples"]:
            raise ElbokitError(f"Prior '{prior_name}' is not fitted to samples; drop --prior-samples or use gmm or samples.")
        fitted = make_prior(prior_name, dim=cfg["model"]["latent_dim"], registry=registry, **options)
        prior = rebuild_prior(fitted, prior_cls)
    prior.attach(model)  # before the optimiser and before any checkpoint state
    has_positives = splits["train"].x_pos is not None
    objective = build_objective_for(cfg, prior, dataset.event_shape, len(indices["train"]), has_positives, registry)
    model.to(device)
    objective.to(device)
    components = Components(config=cfg, device=device, dataset=dataset, indices=indices,
                            standardizer=standardizer, splits=splits, model=model, prior=prior,
                            objective=objective, likelihood=reconstruction_likelihood(objective),
                            registry=registry, needs_positives="positives" in objective.needs() and has_positives,
                            positives=positives)
    n_train, batch_size = len(indices["train"]), min(cfg["train"]["batch_size"], len(indices["train"]))
    if stored is None and n_train % batch_size:  # said once, when the run is created
        components.notes.append(
            f"{n_train % batch_size} of the {n_train} training rows are left out of each epoch (batch size {batch_size}; "
            "a different random set each epoch); choose a batch size that divides the training rows to use them all.")
    if cfg["train"]["select"] == "elbo" and not prior.has_log_prob:
        components.notes.append(f"Prior '{prior.name}' has no log_prob, so the validation -ELBO cannot be computed; "
                                "early stopping and the best checkpoint use the objective's own validation loss.")
    return components


def check_contracts(components: Components) -> None:
    """The component contract (`elbokit.contracts.check_objective`, the checks `elbokit.testing`
    runs) on a small training batch, before any run directory exists: a broken plugin is one
    line naming it (exit code 2), not a wrong number. Adds any note (a skipped check) to
    `components.notes`; leaves the random state alone."""
    from .contracts import check_model_objective

    train = components.splits["train"]
    components.notes.extend(check_model_objective(
        components.model, components.objective, train.x,
        train.x_pos if components.needs_positives else None, registry=components.registry))


def build_from_record(cfg: dict[str, Any], data_dim: int, stored: StoredRun, registry: Any):
    """(model, prior, objective) of a stored run without loading its data: what `load_run`
    needs before the checkpoint's tensors are loaded into them."""
    info = stored.data_info
    event_shape = tuple(info.get("event_shape") or (data_dim,))
    model = build_model(cfg, event_shape, registry, from_file=bool(info.get("source")))
    prior = prior_from_spec(stored.prior_name, stored.prior_spec, registry)
    prior.attach(model)
    # The recon term's learned scales have the example's shape (flat (D,) for runs from before).
    scale_shape = event_shape if info.get("event_shape") else data_dim
    objective = build_objective_for(cfg, prior, scale_shape, stored.dataset_size, stored.has_positives, registry)
    return model, prior, objective


# -- the checks before a run directory exists ----------------------------------------------
def auto_choices(components: Components, batch: Any) -> dict[str, str]:
    """What each `auto` estimator resolves to for this prior and this model's posterior, on a
    real batch: {term: choice}. kl: `elbokit.estimators.kl_to_prior`, the one place that
    decides analytic or mc; cross_entropy: the rule of the built-in `auto` (analytic where that
    decision finds a closed form, as for the standard normal, mc for a prior with log_prob, else knn)."""
    from .estimators import has_analytic_kl, kl_to_prior

    prior = components.prior
    out: dict[str, str] = {}
    for name, term in components.objective.terms.items():
        estimator = getattr(term, "estimator", None)
        if estimator is None or estimator.name != "auto":
            continue
        if term.quantity == "kl":
            out[name] = kl_to_prior(batch.posterior, batch.z, prior, "auto")[1] if prior.has_log_prob else "mc"
        elif term.quantity == "cross_entropy":
            out[name] = "analytic" if has_analytic_kl(prior) else "mc" if prior.has_log_prob else "knn"
    return out


def _validation_chunk(n: int, batch_size: int) -> int:
    """The smallest chunk the validation pass uses (near-equal chunks of at most batch_size)."""
    import math

    return n // max(1, math.ceil(n / batch_size))


def precheck(components: Components) -> dict[str, Any]:
    """Everything that can fail in a run, tried before its directory exists: the split sizes,
    the contract checks, one forward and backward pass on a training batch of the run's batch
    size (a batch estimator's limits, e.g. knn's k < batch or mss's batch >= 2, depend on it:
    a smaller "tiny" batch would refuse good configs and pass bad ones) and one validation
    forward pass of the smallest validation chunk. The model, objective, gradients and every
    random stream are left exactly as they were, so a checked run computes the same numbers
    as an unchecked one. Returns what was learnt: {"auto": {term: estimator chosen}}."""
    cfg = components.config
    splits = components.splits
    n_train = len(components.indices["train"])
    if n_train == 0:
        raise ElbokitError("The training split is empty: use more data (e.g. --n) or a larger training fraction (data.split).")
    if "val" not in splits:
        raise ElbokitError("The validation split is empty; early stopping and the best checkpoint need it: "
                           "use more data (e.g. --n) or a larger validation fraction (data.split).")
    n_test = len(components.indices.get("test", ()))
    if cfg["train"]["evaluate"] and n_test == 1:
        raise ElbokitError("The test split has 1 row and the evaluation at the end needs at least 2: use more data "
                           "(e.g. --n), a larger test fraction (data.split) or --no-evaluate.")
    check_contracts(components)

    model, objective = components.model, components.objective
    batch_size = min(cfg["train"]["batch_size"], n_train)
    states = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in (model, objective)]
    was_training = model.training, objective.training
    np_state, py_state = np.random.get_state(), random.getstate()
    devices = [components.device] if components.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            train = splits["train"]
            x_pos = train.x_pos[:batch_size] if components.needs_positives else None
            model.train()
            objective.train()
            batch = model(train.x[:batch_size], x_pos, dataset_size=objective.dataset_size)
            objective(batch).loss.backward()
            choices = auto_choices(components, batch)
            val = splits["val"]
            rows = _validation_chunk(val.x.shape[0], cfg["train"]["batch_size"])
            model.eval()
            objective.eval()
            try:
                with torch.no_grad():
                    vbatch = model(val.x[:rows], val.x_pos[:rows] if components.needs_positives else None,
                                   dataset_size=objective.dataset_size)
                    objective(vbatch)
            except ElbokitError as exc:
                raise ElbokitError(f"{str(exc).rstrip('.')} (on the validation split, {val.x.shape[0]} rows, taken in "
                                   f"chunks of {rows}): use more data or a larger validation fraction (data.split).") from None
    finally:
        for module, state in zip((model, objective), states):
            module.load_state_dict(state)
            module.zero_grad(set_to_none=True)
        model.train(was_training[0])
        objective.train(was_training[1])
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {"auto": choices}


def _defaults(cls: type) -> dict[str, Any]:
    """The JSON-able keyword defaults of `cls.__init__` (the options a user did not set)."""
    import inspect

    out = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "registry", "data_dim") or p.default is inspect.Parameter.empty:
            continue
        if isinstance(p.default, (str, int, float, bool)) or p.default is None:
            out[name] = p.default
    return out


from .objective import WARMUP_KEYS  # noqa: E402


def describe_objective(components: Components) -> list[dict[str, Any]]:
    """Each term as it ran: name, weight, every option (set or default), its estimator and,
    for `auto`, the estimator it chose (from `precheck`)."""
    objective, registry = components.objective, components.registry
    options, _ = split_term_config(components.config, components.dataset.dim, registry)
    chosen = components.checked.get("auto", {})
    rows = []
    for name, term in objective.terms.items():
        term_cls = registry.term(name)
        given = {k: v for k, v in options.get(name, {}).items() if k != "data_dim"}
        row: dict[str, Any] = {"name": name, "weight": float(objective.weights[name])}
        estimator = getattr(term, "estimator", None)
        opts = {k: v for k, v in _defaults(term_cls).items() if k != "estimator"}
        if estimator is not None:
            row["estimator"] = estimator.name
            opts.update(_defaults(type(estimator)))
            if name in chosen:
                row["estimator_chosen"] = chosen[name]
        opts.update({k: v for k, v in given.items() if k != "estimator" and k not in WARMUP_KEYS})
        row["options"] = opts
        if name in objective.warmups:
            row.update(objective.warmups[name].describe())
        rows.append(row)
    return rows
