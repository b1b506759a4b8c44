"""The training configuration: a schema of sections and keys, loaded from TOML, overridden
from the command line, validated in one place and written back as the run's `config.toml`.

A config is a plain dict of sections (`data`, `model`, `prior`, `train`, `output`) plus the
free-form `terms` table of per-term options (`[terms.infonce] critic = "cosine"`, and `weight`).
`resolve(file_config, overrides)` returns the complete config with every default filled in;
unknown sections or keys, wrong types and out-of-range values are one `ElbokitError` line
naming the valid keys. TOML is parsed with `tomllib` (never evaluated).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import ElbokitError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


@dataclass(frozen=True)
class Key:
    default: Any
    check: Callable[[str, Any], Any]
    help: str
    flag: str | None = None  # the command-line option that sets it


def _where(name: str, flag: str | None) -> str:
    return f"{name} ({flag})" if flag else name


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(value: Any) -> bool:
    """A whole number: int, or a float equal to one (never NaN or Inf, which int() rejects)."""
    return _num(value) and math.isfinite(value) and float(value) == int(value)


def positive_int(name: str, value: Any) -> int:
    if not (_whole(value) and value > 0):
        raise ElbokitError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def optional_positive_int(name: str, value: Any) -> int | None:
    return None if value is None else positive_int(name, value)


def non_negative_int(name: str, value: Any) -> int:
    if not (_whole(value) and value >= 0):
        raise ElbokitError(f"{name} must be a non-negative integer, got {value!r}.")
    return int(value)


def any_int(name: str, value: Any) -> int:
    if not _whole(value):
        raise ElbokitError(f"{name} must be an integer, got {value!r}.")
    return int(value)


def finite_float(name: str, value: Any) -> float:
    if not (_num(value) and math.isfinite(value)):
        raise ElbokitError(f"{name} must be a finite number, got {value!r}.")
    return float(value)


def positive_float(name: str, value: Any) -> float:
    if not (_num(value) and math.isfinite(value) and value > 0):
        raise ElbokitError(f"{name} must be a positive number, got {value!r}.")
    return float(value)


def non_negative_float(name: str, value: Any) -> float:
    if not (_num(value) and math.isfinite(value) and value >= 0):
        raise ElbokitError(f"{name} must be a non-negative number, got {value!r}.")
    return float(value)


def optional_non_negative_float(name: str, value: Any) -> float | None:
    return None if value is None else non_negative_float(name, value)


def string(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ElbokitError(f"{name} must be a non-empty string, got {value!r}.")
    return value.strip()


def optional_string(name: str, value: Any) -> str | None:
    return None if value in (None, "") else string(name, value)


def string_list(name: str, value: Any) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ElbokitError(f"{name} must be a list of non-empty strings such as [\"baseline\", \"gmm\"], got {value!r}.")
    return list(dict.fromkeys(v.strip() for v in value))  # each tag once, in the order given


def fraction(name: str, value: Any) -> float:
    if not (_num(value) and 0 < value <= 1):
        raise ElbokitError(f"{name} must be a number in (0, 1], got {value!r}.")
    return float(value)


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ElbokitError(f"{name} must be true or false, got {value!r}.")
    return value


def table(name: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise ElbokitError(f"{name} must be a table of options, got {value!r}.")
    for k, v in value.items():
        if not isinstance(v, (str, int, float, bool)):
            raise ElbokitError(f"{name}.{k} must be a string, number or boolean, got {v!r}.")
    return dict(value)


def model_table(name: str, value: Any) -> dict[str, Any]:
    """Model options: like `table`, and lists of numbers too (layer sizes)."""
    if not isinstance(value, dict):
        raise ElbokitError(f"{name} must be a table of options, got {value!r}.")
    for k, v in value.items():
        ok = isinstance(v, (str, int, float, bool)) or (
            isinstance(v, (list, tuple)) and all(_num(e) for e in v))
        if not ok:
            raise ElbokitError(f"{name}.{k} must be a string, number, boolean or list of numbers, got {v!r}.")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}


def mlflow_check(name: str, value: Any) -> bool | str:
    """[output] mlflow: false (off), true (the default local store) or a tracking URI."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ElbokitError(f"{name} must be true, false or an MLflow tracking URI such as sqlite:///runs/mlflow.db, got {value!r}.")


def one_of(*choices: str) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if value not in choices:
            raise ElbokitError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")
        return value
    return check


STANDARDIZE_ALIASES = {True: "feature", False: "none"}
"""`data.standardize = true/false` (configs written before per-channel standardisation)."""


def standardize_check(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return STANDARDIZE_ALIASES[value]
    if value in ("auto", "feature", "channel", "none"):
        return value
    raise ElbokitError(f"{name} must be \"feature\", \"channel\", \"none\" or \"auto\" (true and false mean "
                       f"feature and none), got {value!r}.")


def split_check(name: str, value: Any) -> list[float]:
    if (not isinstance(value, (list, tuple)) or len(value) != 3 or not all(_num(v) and v >= 0 for v in value)
            or value[0] <= 0 or value[1] <= 0 or abs(sum(value) - 1.0) > 1e-6):
        raise ElbokitError(f"{name} must be three fractions [train, val, test] summing to 1 with train and val > 0, got {value!r}.")
    return [float(v) for v in value]


def positives_check(name: str, value: Any) -> str | None:
    """data.positives: unset (the dataset's own positives, if any) or an augmentation spec
    (elbokit.data.positives), recorded in its canonical form."""
    if value in (None, ""):
        return None
    from .data.positives import normalize

    if not isinstance(value, str):
        raise ElbokitError(f"{name} must be an augmentation such as \"gaussian:0.1\" or \"shift:1+flip\", got {value!r}.")
    return normalize(value)


def device_check(name: str, value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"cpu|auto|cuda(:\d+)?|mps", value):
        raise ElbokitError(f"{name} must be cpu, cuda, cuda:N or auto, got {value!r}.")
    return value


# The defaults of the paper's setup (docs/design.md section 6), except the epoch budget: the paper
# trains up to 1000 epochs; the default here keeps the README's command near two minutes on
# two CPU cores (see docs/training.md for the measurement), and --max-epochs 1000 restores it.
SCHEMA: dict[str, dict[str, Key]] = {
    "data": {
        "dataset": Key("mixture", string, "a registered dataset (gaussian, mixture, digits, ...) or a path to .npz/.npy/.csv", "--data"),
        "seed": Key(0, non_negative_int, "seed of the data generator and of the train/val/test split (kept apart from train.seed so every training seed sees the same data)", "--data-seed"),
        "n": Key(None, optional_positive_int, "rows to generate (generated datasets; default 10000)", "--n"),
        "data_dim": Key(None, optional_positive_int, "data dimension D (generated datasets; default 20)", "--data-dim"),
        "latent_dim": Key(None, optional_positive_int, "true latent dimension of a generated dataset (default: model.latent_dim)", "--data-latent-dim"),
        "noise_std": Key(None, optional_non_negative_float, "observation noise std of a generated dataset (default 0.5)", "--noise-std"),
        "radius": Key(None, optional_non_negative_float, "std of the positives' noise, x+ = x + N(0, radius^2) (default 0.1)", "--radius"),
        "positives": Key(None, positives_check, "positives x+ by augmentation, drawn afresh every training step, in place of the dataset's own: gaussian:RADIUS (x + N(0, RADIUS^2), in original data units), shift:PIXELS[:zero|edge] and flip[:PROB] for images, joined by + (docs/training.md); unset: the dataset's own positives", "--positives"),
        "options": Key({}, table, "other keyword options for a plugin dataset's loader", "--data-option"),
        "split": Key([0.8, 0.1, 0.1], split_check, "train/val/test fractions", None),
        "standardize": Key("auto", standardize_check, "standardise on the training split: feature (one mean/std per value of an example), channel (one per image channel), none; auto: none for the bernoulli, continuous-bernoulli and discretized likelihoods, else channel for (C, H, W) data and feature otherwise", None),
        "max_in_memory_mb": Key(512.0, non_negative_float, "a .npy data file larger than this (MB on disk) is memory-mapped and read in minibatches; smaller files are read whole (0: always memory-map)", None),
    },
    "model": {
        "latent_dim": Key(5, positive_int, "latent dimension L", "--latent-dim"),
        "name": Key("auto", string, "a registered model (mlp, conv, ...); auto: conv for (N, C, H, W) data files, mlp otherwise (elbokit models lists them)", "--model"),
        "options": Key({}, model_table, "the model's options, e.g. hidden = [400, 400] (mlp) or channels = [32, 64] (conv); [model] hidden = [...] is read as options.hidden", "--model-option"),
    },
    "prior": {
        "name": Key("standard-normal", string, "a registered prior (standard-normal, gmm, samples, ...)", "--prior"),
        "samples": Key(None, optional_string, "a .npy/.npz file of prior samples (n, latent_dim) for priors fitted to samples", "--prior-samples"),
        "n_samples": Key(10000, positive_int, "how many latents to draw from a generated dataset's own latent distribution for such priors", None),
        "options": Key({}, table, "keyword options of the prior, e.g. n_components = 3", "--prior-option"),
    },
    "objective": {
        "terms": Key("classic", string, "a preset (classic, ed) or name[:weight] items, e.g. recon,kl:0.5", "--terms"),
    },
    "train": {
        "seed": Key(0, any_int, "seed of the model's initialisation, the data order and the sampling", "--seed"),
        "lr": Key(1e-3, positive_float, "Adam learning rate", "--lr"),
        "batch_size": Key(512, positive_int, "minibatch size", "--batch-size"),
        "max_epochs": Key(300, positive_int, "the most epochs to train", "--max-epochs"),
        "patience": Key(20, positive_int, "stop after this many epochs without a better validation metric", "--patience"),
        "select": Key("elbo", one_of("elbo", "loss"), "validation metric for early stopping and the best checkpoint: elbo (-ELBO, the same for every objective) or loss (the objective's own)", "--select"),
        "grad_clip": Key(0.0, non_negative_float, "clip the gradient norm to this value (0: no clipping)", "--grad-clip"),
        "device": Key("cpu", device_check, "cpu, cuda, cuda:N or auto", "--device"),
        "threads": Key(0, non_negative_int, "CPU threads for torch; 0 (the default): OMP_NUM_THREADS if set, else the CPUs this process may use (affinity, cgroup quota), recorded as the number in the run's config.toml; 1 gives numbers bit-identical across machines of the same CPU type and torch build", "--threads"),
        "val_seed": Key(1234, any_int, "seed of the Monte-Carlo draws of the validation metric, so it is deterministic", None),
        "evaluate": Key(True, boolean, "evaluate the best checkpoint on the test split at the end (when elbokit.evaluate is installed)", "--evaluate/--no-evaluate"),
        "lr_schedule": Key("constant", one_of("constant", "cosine", "step", "plateau"), "learning-rate schedule (torch.optim.lr_scheduler): constant; cosine (CosineAnnealingLR from lr to lr_min over lr_cosine_epochs, per step, then lr_min); step (StepLR: times lr_gamma every lr_step_epochs epochs); plateau (ReduceLROnPlateau on the selection metric: times lr_gamma after lr_plateau_patience epochs without improvement)", "--lr-schedule"),
        "lr_warmup_steps": Key(0, non_negative_int, "linear learning-rate warm-up (LinearLR): optimiser step i (from 0) uses lr * (i + 1) / lr_warmup_steps until it reaches lr; with cosine, the cosine starts after it (0: none)", "--lr-warmup-steps"),
        "lr_min": Key(0.0, non_negative_float, "the learning rate the cosine schedule ends at", "--lr-min"),
        "lr_cosine_epochs": Key(0, non_negative_int, "the epochs (warm-up included) over which the cosine schedule falls from lr to lr_min (0: train.max_epochs when the run starts, recorded as the number so that a resume with more epochs keeps the schedule)", "--lr-cosine-epochs"),
        "lr_step_epochs": Key(30, positive_int, "step schedule: multiply the learning rate by lr_gamma every this many epochs", "--lr-step-epochs"),
        "lr_gamma": Key(0.1, fraction, "the factor of the step and plateau schedules, in (0, 1]", "--lr-gamma"),
        "lr_plateau_patience": Key(5, non_negative_int, "plateau schedule: epochs without a better selection metric before the learning rate is multiplied by lr_gamma", "--lr-plateau-patience"),
        "checkpoint_seconds": Key(10.0, non_negative_float, "write checkpoints at most this often during training (0: after every epoch); always at the end, on Ctrl-C/SIGTERM and before a divergence stops the run. A SIGKILL loses at most this much training, which a resume replays exactly", "--checkpoint-seconds"),
    },
    "output": {
        "out": Key(None, optional_string, "run directory (default runs/<date-time>)", "--out"),
        "name": Key(None, optional_string, "a name for the run, shown by `elbokit runs` (default: the directory's name)", "--name"),
        "tags": Key([], string_list, "labels for finding and grouping runs (`elbokit runs`)", "--tag"),
        "tensorboard": Key(False, boolean, "also write TensorBoard event files to RUN_DIR/tensorboard", "--tensorboard"),
        "mlflow": Key(False, mlflow_check, "log the run to MLflow while it trains: true for a local SQLite store beside the run (sqlite:///<runs dir>/mlflow.db), or a tracking URI; needs mlflow", "--mlflow"),
    },
}
FREE_SECTIONS = ("terms",)  # [terms.<name>] tables: per-term options, checked by build_objective


def defaults() -> dict[str, Any]:
    cfg = {section: {k: copy.deepcopy(key.default) for k, key in keys.items()} for section, keys in SCHEMA.items()}
    cfg["terms"] = {}
    return cfg


def valid_keys_text(section: str) -> str:
    return ", ".join(SCHEMA[section])


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; a missing, unreadable or malformed file is one line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ElbokitError(f"Config file not found: {path}.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ElbokitError(f"Cannot read config file {path}: {exc}.") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ElbokitError(f"Config file {path} is not valid TOML: {exc}.") from None


def merge(base: dict[str, Any], update: dict[str, Any], source: str = "the config") -> dict[str, Any]:
    """Overlay `update` (a partial config) on `base`, refusing unknown sections and keys."""
    out = copy.deepcopy(base)
    if not isinstance(update, dict):
        raise ElbokitError(f"{source} must be a table of sections.")
    for section, values in update.items():
        if section in FREE_SECTIONS:
            if not isinstance(values, dict) or not all(isinstance(v, dict) for v in values.values()):
                raise ElbokitError(f"[terms] in {source} must hold one table per term, e.g. [terms.infonce] critic = \"cosine\".")
            for term, opts in values.items():
                out["terms"].setdefault(term, {}).update(table(f"terms.{term}", opts))
            continue
        if section not in SCHEMA:
            raise ElbokitError(f"Unknown config section [{section}] in {source}; valid sections: {', '.join([*SCHEMA, *FREE_SECTIONS])}.")
        if not isinstance(values, dict):
            raise ElbokitError(f"[{section}] in {source} must be a table, got {values!r}.")
        if section == "model" and isinstance(values, dict) and "hidden" in values:
            # Configs written before models were plugins: [model] hidden is the mlp's option.
            values = dict(values)
            values["options"] = {"hidden": values.pop("hidden"), **(values.get("options") or {})}
        for key, value in values.items():
            if key not in SCHEMA[section]:
                raise ElbokitError(f"Unknown config key '{section}.{key}' in {source}; valid keys in [{section}]: {valid_keys_text(section)}.")
            if key == "options" and isinstance(value, dict) and isinstance(out[section].get(key), dict):
                out[section][key] = {**out[section][key], **value}
            else:
                out[section][key] = value
    return out


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check every key's type and range (one line naming the key and its option)."""
    out = copy.deepcopy(cfg)
    for section, keys in SCHEMA.items():
        for key, spec in keys.items():
            out[section][key] = spec.check(_where(f"{section}.{key}", spec.flag), out[section].get(key, spec.default))
    from .objective import parse_terms

    parse_terms(out["objective"]["terms"])  # syntax only; names are checked when the objective is built
    return out


def resolve(file_config: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
            source: str = "the config file", dataset_defaults: bool = True) -> dict[str, Any]:
    """defaults <- the dataset's own defaults <- file config <- command-line overrides (a
    partial config), then validated, with the derived defaults filled in so that the saved
    config says everything. A stored run's config is read with `dataset_defaults=False`: it
    already says everything, and a later change of a dataset's defaults must not change it."""
    cfg = merge(defaults(), file_config or {}, source)
    cfg = merge(cfg, overrides or {}, "the command line")
    if dataset_defaults:
        preset = _dataset_preset(cfg)
        if preset:
            base = merge(defaults(), preset, f"the defaults of dataset '{cfg['data']['dataset']}'")
            cfg = merge(merge(base, file_config or {}, source), overrides or {}, "the command line")
    cfg = validate(cfg)
    if dataset_defaults:
        _fill_likelihood_defaults(cfg)
    _fill_dataset_defaults(cfg)
    if cfg["train"]["lr_schedule"] == "cosine" and cfg["train"]["lr_cosine_epochs"] == 0:
        cfg["train"]["lr_cosine_epochs"] = cfg["train"]["max_epochs"]  # recorded, so a resume keeps it
    if cfg["train"]["lr_schedule"] == "plateau" and cfg["train"]["lr_gamma"] >= 1:
        raise ElbokitError("train.lr_gamma (--lr-gamma) must be below 1 for the plateau schedule (it multiplies the learning rate).")
    _fill_model_defaults(cfg)
    if cfg["data"]["standardize"] == "auto":
        likelihood = str(cfg["terms"].get("recon", {}).get("likelihood", "mse"))
        if likelihood in PIXEL_LIKELIHOODS:
            cfg["data"]["standardize"] = "none"  # else decided by the data's shape (elbokit.build)
    return cfg


PIXEL_LIKELIHOODS = ("bernoulli", "continuous-bernoulli", "discretized")
"""Likelihoods of data on a fixed range or grid, which standardisation would move off it."""


def _dataset_preset(cfg: dict[str, Any]) -> dict[str, Any]:
    """A registered dataset's own defaults (its loader's `defaults` attribute: a partial config,
    e.g. digits: batch size 128, no standardisation, the discretized likelihood), minus the
    [terms] part, which `_fill_likelihood_defaults` applies to a recon term only."""
    from .plugins import get_registry

    registry = get_registry()
    name = cfg["data"]["dataset"]
    if name not in registry.datasets:
        return {}
    preset = getattr(registry.dataset(name).loader, "defaults", None) or {}
    return {k: v for k, v in preset.items() if k != "terms"}


def _fill_likelihood_defaults(cfg: dict[str, Any]) -> None:
    """The dataset's default recon options (e.g. digits: discretized with 17 levels) when the
    objective has a recon term and no likelihood was chosen."""
    from .objective import parse_terms
    from .plugins import get_registry

    registry = get_registry()
    name = cfg["data"]["dataset"]
    if name not in registry.datasets:
        return
    preset = (getattr(registry.dataset(name).loader, "defaults", None) or {}).get("terms", {})
    names = {n for n, _ in parse_terms(cfg["objective"]["terms"])}
    for term, opts in preset.items():
        if term in names and "likelihood" not in cfg["terms"].get(term, {}):
            cfg["terms"].setdefault(term, {}).update({k: v for k, v in opts.items() if k not in cfg["terms"].get(term, {})})


DATASET_KEYS = ("n", "data_dim", "latent_dim", "noise_std", "radius")


def _fill_dataset_defaults(cfg: dict[str, Any]) -> None:
    """For a registered dataset, write the loader's own defaults for the unset generator keys
    it takes (a generated dataset's true latent dimension defaults to the model's), so that
    the saved config regenerates exactly this data even if a default changes later."""
    import inspect

    from .plugins import get_registry

    registry = get_registry()
    name = cfg["data"]["dataset"]
    if name not in registry.datasets:
        return
    # `--data-option n=500` is the generator key n: record it there (the effective value), not
    # beside a default n that the option silently overrides.
    for key in DATASET_KEYS:
        if key in cfg["data"]["options"]:
            cfg["data"][key] = _dataset_key_checks()[key](f"data.options.{key}", cfg["data"]["options"].pop(key))
    params = inspect.signature(registry.dataset(name).loader).parameters
    for key in DATASET_KEYS:
        if cfg["data"][key] is None and key in params:
            default = params[key].default
            if key == "latent_dim":
                default = cfg["model"]["latent_dim"]
            if default is not inspect.Parameter.empty and isinstance(default, (int, float)):
                cfg["data"][key] = default


def _dataset_key_checks() -> dict[str, Callable[[str, Any], Any]]:
    return {key: SCHEMA["data"][key].check for key in DATASET_KEYS}


def data_file_ndim(path: str | Path) -> int | None:
    """The number of dimensions of x in a .npy/.npz data file, read from the array header
    only (no data is loaded); None when it cannot be told (missing or unreadable file, .csv)."""
    import zipfile

    import numpy as np

    path = Path(path)
    def header_ndim(fh) -> int:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return len(read(fh)[0])

    try:
        if path.suffix.lower() == ".npy":
            with open(path, "rb") as fh:
                return header_ndim(fh)
        if path.suffix.lower() == ".npz":
            with zipfile.ZipFile(path) as archive, archive.open("x.npy") as fh:
                return header_ndim(fh)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError, SyntaxError):
        return None
    return 2 if path.suffix.lower() == ".csv" else None


def _fill_model_defaults(cfg: dict[str, Any]) -> None:
    """Choose the model for `auto` (conv for (N, C, H, W) data files, mlp otherwise) and write
    its option defaults for the options not given, so the saved config says everything.
    Unknown options are refused when the model is built (elbokit.build), with the valid ones."""
    from .plugins import get_registry

    registry = get_registry()
    mcfg = cfg["model"]
    if mcfg["name"] == "auto":
        dataset = cfg["data"]["dataset"]
        if dataset in registry.datasets:
            mcfg["name"] = "mlp"
        else:
            ndim = data_file_ndim(dataset)
            if ndim is not None:
                mcfg["name"] = "conv" if ndim == 4 else "mlp"
    if mcfg["name"] in registry.models:
        model_cls = registry.models[mcfg["name"]].obj
        defaults = model_cls.option_defaults() if hasattr(model_cls, "option_defaults") else {}
        if hasattr(model_cls, "check_options"):
            try:
                model_cls.check_options(mcfg["options"])
            except ValueError as exc:
                raise ElbokitError(f"model.options (--model-option): {exc}.") from None
        mcfg["options"] = {**{k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()},
                           **mcfg["options"]}


def dataset_options(cfg: dict[str, Any]) -> dict[str, Any]:
    """The loader options of `[data]`: the generator keys that are set, then `data.options`."""
    opts = {k: cfg["data"][k] for k in DATASET_KEYS if cfg["data"][k] is not None}
    opts.update(cfg["data"]["options"])
    return opts


def parse_assignment(text: str, what: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is read as a TOML value (numbers, true,
    false, "strings"), and a bare word is a string: `critic=cosine`, `temperature=0.1`."""
    if "=" not in text:
        raise ElbokitError(f"{what} must look like key=value, got '{text}'.")
    key, _, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not key:
        raise ElbokitError(f"{what} must look like key=value, got '{text}'.")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if isinstance(value, (dict, list)) or raw == "":
        raise ElbokitError(f"{what} '{text}': the value must be a number, true/false or a word.")
    return key, value


def term_options(assignments: list[str]) -> dict[str, dict[str, Any]]:
    """`["infonce.critic=cosine", "kl.estimator=mc"]` -> {"infonce": {"critic": "cosine"}, ...}."""
    out: dict[str, dict[str, Any]] = {}
    for text in assignments:
        key, value = parse_assignment(text, "--option")
        term, dot, opt = key.partition(".")
        if not dot or not term or not opt:
            raise ElbokitError(f"--option must look like term.option=value (e.g. infonce.critic=cosine), got '{text}'.")
        out.setdefault(term, {})[opt] = value
    return out


# -- writing TOML (tomllib only reads) ------------------------------------------------------
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        text = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        # TOML forbids other control characters in a basic string: write them as \uXXXX.
        text = "".join(f"\\u{ord(c):04x}" if (ord(c) < 0x20 and c != "\t") or ord(c) == 0x7f else c for c in text)
        return '"' + text + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def dumps(cfg: dict[str, Any], comments: bool = True) -> str:
    """The config as TOML, with each key's help as a comment; unset (None) keys are
    written commented out, since TOML has no null."""
    lines: list[str] = ["# elbokit training config (resolved: every key, with its default when not given)"]
    for section, keys in SCHEMA.items():
        lines += ["", f"[{section}]"]
        for key, spec in keys.items():
            value = cfg[section].get(key)
            if comments:
                lines.append(f"# {spec.help}" + (f" [{spec.flag}]" if spec.flag else ""))
            lines.append(f"# {key} =  (unset)" if value is None else f"{key} = {_toml_value(value)}")
    for term, opts in cfg.get("terms", {}).items():
        lines += ["", f"[terms.{_toml_key(term)}]"]
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in opts.items()]
    return "\n".join(lines) + "\n"
