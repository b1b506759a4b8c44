"""Run directories: what a training run writes, and `load_run` to read it back.

Layout (every file is written atomically: temporary file, fsync, `os.replace`):

    RUN_DIR/
      config.toml               the fully resolved config (re-read by --resume and load_run)
      data.safetensors          the standardiser (mean, std, float64) and the split indices;
                                its JSON metadata names the dataset, its size and (for files) sha256
      metrics.jsonl             one JSON object per epoch (train terms, validation metrics)
      checkpoints/last.safetensors   the state after the latest epoch
      checkpoints/best.safetensors   the state at the best validation metric
      summary.json              written when training ends
      plots/                    `elbokit plot RUN_DIR`

A checkpoint is ONE safetensors file, so it is replaced atomically as a whole: tensors
`model.*`, `objective.*` (the terms' learnable parameters and the prior's buffers, under
`objective.prior.*`), `optimizer.*` and `rng.*` (torch, data order, numpy, python), and in the
header's JSON metadata (key "elbokit") the epoch, step, best value, patience counter, the
model's and prior's specs and the optimiser's hyper-parameters. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import config as config_mod
from .errors import ElbokitError
from .io import write_bytes, write_json, write_text

FORMAT_VERSION = 1
CHECKPOINTS = ("best", "last")
META_KEY = "elbokit"


# -- paths ------------------------------------------------------------------------------
def checkpoint_path(run_dir: str | Path, which: str) -> Path:
    return Path(run_dir) / "checkpoints" / f"{which}.safetensors"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ElbokitError(f"--device {name} was asked for but CUDA is not available here; use --device cpu or auto.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ElbokitError("--device mps was asked for but MPS is not available here; use --device cpu or auto.")
    return torch.device(name)


# -- building the model, prior and objective from a config ------------------------------
def split_term_config(cfg: dict[str, Any], data_dim: int, registry: Any) -> tuple[dict, dict]:
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


def build_model(cfg: dict[str, Any], data_dim: int):
    from .models import VAE

    return VAE(data_dim, cfg["model"]["latent_dim"], cfg["model"]["hidden"])


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


# -- checkpoints -------------------------------------------------------------------------
def _cpu(t: torch.Tensor) -> torch.Tensor:
    # safetensors refuses tensors that share storage; a contiguous CPU copy never does.
    return t.detach().to("cpu").contiguous().clone()


def rng_state(data_generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every random state a run uses (torch, CUDA, data order, numpy, python) as tensors + JSON."""
    tensors = {"rng.torch": torch.get_rng_state(), "rng.data_order": data_generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    tensors["rng.numpy_keys"] = torch.as_tensor(np_keys.astype(np.int64))
    py_version, py_state, py_gauss = random.getstate()
    tensors["rng.python"] = torch.as_tensor(py_state, dtype=torch.int64)
    meta = {"numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_cached)],
            "python": [py_version, py_gauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], data_generator: torch.Generator) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    data_generator.set_state(tensors["rng.data_order"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, gauss = meta["python"]
    random.setstate((version, tuple(int(v) for v in tensors["rng.python"].tolist()), gauss))


def tensors_crc32(tensors: dict[str, Any]) -> int:
    """CRC-32 of every tensor's name, shape and bytes, in name order. safetensors keeps no
    checksum, so this number in the header is what tells damaged tensor bytes from good ones."""
    crc = 0
    for name in sorted(tensors):
        t = tensors[name]
        if torch.is_tensor(t):
            shape, raw = list(t.shape), t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        else:
            shape, raw = list(np.shape(t)), np.ascontiguousarray(t).reshape(-1).view(np.uint8)
        crc = zlib.crc32(f"{name}{shape}".encode(), crc)
        crc = zlib.crc32(raw, crc)
    return crc


def _check_crc32(tensors: dict[str, Any], meta: dict[str, Any], path: Path) -> None:
    if "crc32" in meta and tensors_crc32(tensors) != meta["crc32"]:
        raise ElbokitError(f"{path} is damaged: its tensor bytes do not match the CRC-32 written with them; "
                           "restore it from a copy, or use the run's other checkpoint (best or last).")


def save_checkpoint(path: str | Path, **parts: Any) -> None:
    """Write one checkpoint file atomically (see the module docstring for its contents);
    `parts` as for `checkpoint_bytes`."""
    write_bytes(path, checkpoint_bytes(**parts))


def checkpoint_bytes(*, model: Any, objective: Any, optimizer: Any, data_generator: torch.Generator,
                     state: dict[str, Any], extra: dict[str, torch.Tensor] | None = None) -> bytes:
    """One checkpoint as safetensors bytes. `extra`: more tensors, e.g. the position in an
    interrupted epoch (`partial.*`)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model.{k}"] = _cpu(v)
    for k, v in objective.state_dict().items():
        tensors[f"objective.{k}"] = _cpu(v)
    opt_state = optimizer.state_dict()
    for idx, per_param in opt_state["state"].items():
        for k, v in per_param.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.state.{idx}.{k}"] = _cpu(v)
    rng_tensors, rng_meta = rng_state(data_generator)
    tensors.update({k: _cpu(v) for k, v in rng_tensors.items()})
    tensors.update({k: _cpu(v) for k, v in (extra or {}).items()})
    meta = dict(state)
    meta.update(format=FORMAT_VERSION, rng=rng_meta,
                optimizer={"param_groups": opt_state["param_groups"]}, crc32=tensors_crc32(tensors))
    return save(tensors, metadata={META_KEY: json.dumps(meta)})


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a checkpoint file; anything that is not an elbokit safetensors
    checkpoint (a pickle, a truncated file, another format) is refused without running it."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise ElbokitError(f"Checkpoint not found: {path}.")
    data = path.read_bytes()
    try:
        # Fresh (aligned) copies: tensors viewing the file buffer can be misaligned, and
        # vectorised CPU kernels then round differently in the last bit, which would make a
        # resumed run drift from an uninterrupted one.
        tensors = {k: v.clone() for k, v in load(data).items()}
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
    except (SafetensorError, ValueError, OSError, RuntimeError, UnicodeDecodeError) as exc:
        raise ElbokitError(f"{path} is not a readable elbokit checkpoint (safetensors): {_first_line(exc)}; "
                           "it may be truncated or another format (nothing in it was run).") from None
    try:
        meta = json.loads(header[META_KEY])
    except (KeyError, ValueError):
        raise ElbokitError(f"{path} is a safetensors file but not an elbokit checkpoint (no '{META_KEY}' metadata).") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ElbokitError(f"{path} has checkpoint format {found!r}; this elbokit reads format {FORMAT_VERSION}.")
    _check_crc32(tensors, meta, path)
    return tensors, meta


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__


def _sub(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    n = len(prefix)
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_module_state(module: Any, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        # torch lists each mismatch on a line of its own after a heading; show the first.
        lines = [line.strip() for line in str(exc).strip().splitlines()]
        detail = (lines[1:] or lines or [""])[0].rstrip(". ")
        raise ElbokitError(f"The {what} in {path} does not match this run's config.toml ({detail}): the "
                           "checkpoint comes from another run or architecture; use this run's own checkpoints.") from None


def load_optimizer_state(optimizer: Any, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in _sub(tensors, "optimizer.state.").items():
        idx, _, name = key.partition(".")
        state.setdefault(int(idx), {})[name] = value
    groups = meta["optimizer"]["param_groups"]
    for g in groups:  # JSON turned tuples into lists
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# -- data of a run -----------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_data_info(run_dir: Path, dataset: Any, indices: dict[str, np.ndarray], standardizer: Any) -> None:
    from safetensors.numpy import save

    arrays = {"standardizer.mean": np.asarray(standardizer.mean, dtype=np.float64),
              "standardizer.std": np.asarray(standardizer.std, dtype=np.float64)}
    arrays.update({f"indices.{k}": np.asarray(v, dtype=np.int64) for k, v in indices.items()})
    info = {"name": dataset.name, "n": len(dataset), "dim": dataset.dim,
            "has_positives": dataset.x_pos is not None, "has_latents": dataset.z is not None,
            "image_shape": list(dataset.image_shape) if dataset.image_shape else None,
            "source": dataset.meta.get("source")}
    if info["source"]:
        info["sha256"] = sha256_file(info["source"])
    info["crc32"] = tensors_crc32(arrays)
    write_bytes(run_dir / "data.safetensors", save(arrays, metadata={META_KEY: json.dumps(info)}))


def read_data_info(run_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file

    path = run_dir / "data.safetensors"
    if not path.is_file():
        raise ElbokitError(f"{run_dir} is not a complete run directory: {path.name} is missing.")
    try:
        arrays = load_file(str(path))
        with safe_open(str(path), framework="np") as fh:
            info = json.loads((fh.metadata() or {})[META_KEY])
    except (SafetensorError, ValueError, KeyError, OSError) as exc:
        raise ElbokitError(f"{path} is corrupt ({_first_line(exc)}); the run cannot be read without it.") from None
    _check_crc32(arrays, info, path)
    return arrays, info


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of a metrics.jsonl ([] if there is none). A last line without its
    newline is one a killed process was writing: it is skipped (a resumed run rewrites it);
    any other line that is not an epoch's JSON record is an error."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")[:-1]  # after the last newline: "" or a torn line
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise ElbokitError(f"{path} line {number} is not an epoch's metrics record (JSON with an 'epoch'); "
                               "the file was edited or damaged: restore it, or delete that line.")
        records.append(record)
    return records


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved config of a run (config.toml), validated like any config."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ElbokitError(f"Run directory not found: {run_dir}.")
    path = run_dir / "config.toml"
    if not path.is_file():
        raise ElbokitError(f"{run_dir} is not an elbokit run directory (no config.toml).")
    return config_mod.resolve(config_mod.load_toml(path), source=str(path))


def write_config(run_dir: Path, cfg: dict[str, Any]) -> None:
    write_text(run_dir / "config.toml", config_mod.dumps(cfg))


# -- loading a run -----------------------------------------------------------------------
@dataclass
class Run:
    """A trained run, loaded by `load_run`. See `load_run` for the attributes."""

    run_dir: Path
    checkpoint: str
    config: dict[str, Any]
    model: Any
    objective: Any
    prior: Any
    likelihood: Any
    standardizer: Any
    state: dict[str, Any]
    data_info: dict[str, Any]
    indices: dict[str, np.ndarray]
    device: torch.device
    _dataset: Any = field(default=None, repr=False)

    @property
    def summary(self) -> dict[str, Any] | None:
        path = self.run_dir / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def metrics(self) -> list[dict[str, Any]]:
        """The per-epoch records of metrics.jsonl."""
        return read_metrics(self.run_dir / "metrics.jsonl")

    def load_dataset(self):
        """The whole dataset in original units, regenerated from the config (generated data)
        or re-read from its file, checked against the run's record (size, file hash)."""
        if self._dataset is None:
            from .data import load_dataset

            cfg = self.config["data"]
            source = cfg["dataset"]
            ds = load_dataset(source, None if self.data_info.get("source") else config_mod.dataset_options(self.config),
                              seed=cfg["seed"])
            if len(ds) != self.data_info["n"] or ds.dim != self.data_info["dim"]:
                raise ElbokitError(f"The data '{source}' now has shape ({len(ds)}, {ds.dim}) but the run was trained on "
                                   f"({self.data_info['n']}, {self.data_info['dim']}).")
            if self.data_info.get("sha256") and sha256_file(ds.meta["source"]) != self.data_info["sha256"]:
                raise ElbokitError(f"The data file {source} has changed since the run was trained (sha256 differs).")
            self._dataset = ds
        return self._dataset

    def load_split(self, name: str = "test"):
        """One split ('train', 'val' or 'test') as an `elbokit.data.Split`: `.data` is a
        Dataset in ORIGINAL units (x, x_pos, z, meta such as W and noise_std); `.x` and
        `.x_pos` are the standardised float32 tensors on `run.device` (what the model sees);
        `.standardizer` maps between them."""
        from .data import SPLITS, make_split

        if name not in SPLITS:
            raise ElbokitError(f"Unknown split '{name}'; valid splits: {', '.join(SPLITS)}.")
        return make_split(name, self.load_dataset(), self.indices[name], self.standardizer, self.device)


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str | torch.device | None = None,
             registry: Any = None) -> Run:
    """Load a run directory written by `elbokit train` (or `elbokit.train.train`).

    checkpoint: "best" (the best validation metric; the default) or "last", or a path to a
    checkpoint file. device: where to put the model (default "cpu"; "auto" picks CUDA when
    available).

    Returns a `Run` with:
    - `.config`: the resolved config (dict of sections, as in config.toml);
    - `.model`: the `VAE`, in eval mode, on `.device`;
    - `.objective`: the training `Objective` (its state restored), `.prior`: the prior it was
      trained with (rebuilt as `PriorClass(**spec)` + the saved buffers, e.g. the fitted GMM);
    - `.likelihood`: p(x|z) of the recon term (`mse` when the objective has none); its
      `log_prob(x, model.decode(z))` is in the STANDARDISED space of `.x`;
    - `.standardizer`: the train-split `Standardizer`; add `standardizer.log_abs_det_jacobian`
      to a log-density of standardised x to express it in original units (DESIGN.md section 1);
    - `.state`: the checkpoint's metadata (epoch, step, best_value, select_metric, ...);
    - `.summary` (summary.json or None), `.metrics()` (metrics.jsonl records);
    - `.load_split(name)`: an `elbokit.data.Split` with `.data` (Dataset in original units,
      with x_pos, z and meta like W and noise_std where the data has them), `.x`/`.x_pos`
      (standardised tensors on `.device`) and `.indices`.
    Bad or foreign files raise `ElbokitError` (one line); nothing is unpickled.
    """
    from .plugins import get_registry

    registry = registry or get_registry()
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    arrays, info = read_data_info(run_dir)
    path = Path(checkpoint) if checkpoint not in CHECKPOINTS else checkpoint_path(run_dir, checkpoint)
    if checkpoint not in CHECKPOINTS and not path.is_file():
        raise ElbokitError(f"Unknown checkpoint '{checkpoint}': give best, last or a checkpoint file.")
    tensors, meta = read_checkpoint(path)
    dev = resolve_device(str(device)) if device is not None else torch.device("cpu")

    from .data import Standardizer

    standardizer = Standardizer(mean=arrays["standardizer.mean"], std=arrays["standardizer.std"])
    indices = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("indices.")}
    model = build_model(cfg, info["dim"])
    load_module_state(model, _sub(tensors, "model."), "model", path)
    prior_cls = registry.prior(meta["prior"]["name"])
    try:
        prior = prior_cls(**meta["prior"]["spec"])
    except (TypeError, ValueError) as exc:
        raise ElbokitError(f"Cannot rebuild prior '{meta['prior']['name']}' from {path}: {exc}") from None
    prior.attach(model)
    objective = build_objective_for(cfg, prior, info["dim"], meta["dataset_size"], meta["has_positives"], registry)
    load_module_state(objective, _sub(tensors, "objective."), "objective (terms and prior)", path)
    model.to(dev).eval()
    objective.to(dev).eval()
    return Run(run_dir=run_dir, checkpoint=str(checkpoint), config=cfg, model=model, objective=objective,
               prior=objective.prior, likelihood=reconstruction_likelihood(objective), standardizer=standardizer,
               state=meta, data_info=info, indices=indices, device=dev)
