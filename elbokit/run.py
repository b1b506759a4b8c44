"""Run directories: what a training run writes, and `load_run` to read it back.

Layout (every file is written atomically: temporary file, fsync, `os.replace`):

    RUN_DIR/
      config.toml               the fully resolved config (re-read by --resume and load_run)
      data.safetensors          the standardiser (mean, std, float64) and the split indices;
                                its JSON metadata names the dataset, its size and (for files) sha256
      metrics.jsonl             one JSON object per epoch (train terms, validation metrics)
      checkpoints/last.safetensors   the state after the latest epoch
      checkpoints/best.safetensors   the state at the best validation metric
      run.json                  metadata: format version, versions of elbokit, torch, numpy and
                                python, the provenance of each component (plugin and version),
                                threads, world size, host, times
      summary.json              written when training ends
      plots/                    `elbokit plot RUN_DIR`
      .lock                     held (flock) by the one process writing the directory; it
                                names that process's pid and host. Readers never take it.

`RunDir` is the directory as one object: created complete (staged in a hidden directory and
renamed into place) under its lock, or opened for writing under the lock, and read back
without it.

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
from .build import (  # noqa: F401 - their former home; build.py is where components are made
    StoredRun, build_model, build_objective_for, reconstruction_likelihood, resolve_device, split_term_config)
from .io import write_bytes, write_json, write_text

FORMAT_VERSION = 1
CHECKPOINTS = ("best", "last")
META_KEY = "elbokit"


# -- paths ------------------------------------------------------------------------------
def checkpoint_path(run_dir: str | Path, which: str) -> Path:
    return Path(run_dir) / "checkpoints" / f"{which}.safetensors"


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


class CheckpointSnapshot:
    """A checkpoint's contents taken now and serialised later: CPU copies of the tensors and
    the metadata already as JSON, so that training can go on changing the originals.

    Why not serialise at once: the CRC-32 and safetensors' encoding are most of a checkpoint's
    cost (about 4 of 7.5 ms for the default model), and a best model reached between two
    checkpoint writes (train.checkpoint_seconds) is usually replaced by a better one before it
    is written; the copies alone are about 0.7 ms (docs/benchmarks.md)."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]):
        self.tensors = tensors
        self._meta_json = json.dumps(meta)  # now: the state it holds keeps changing
        self._bytes: bytes | None = None

    def to_bytes(self) -> bytes:
        """The safetensors file's bytes (computed once)."""
        if self._bytes is None:
            from safetensors.torch import save

            meta = json.loads(self._meta_json)
            meta["crc32"] = tensors_crc32(self.tensors)
            self._bytes = save(self.tensors, metadata={META_KEY: json.dumps(meta)})
        return self._bytes


def checkpoint_snapshot(*, model: Any, objective: Any, optimizer: Any, data_generator: torch.Generator,
                        state: dict[str, Any], extra: dict[str, torch.Tensor] | None = None) -> CheckpointSnapshot:
    """One checkpoint, copied now and serialised by `CheckpointSnapshot.to_bytes`. `extra`:
    more tensors, e.g. the position in an interrupted epoch (`partial.*`)."""
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
    meta.update(format=FORMAT_VERSION, rng=rng_meta, optimizer={"param_groups": opt_state["param_groups"]})
    return CheckpointSnapshot(tensors, meta)


def checkpoint_bytes(**parts: Any) -> bytes:
    """One checkpoint as safetensors bytes; `parts` as for `checkpoint_snapshot`."""
    return checkpoint_snapshot(**parts).to_bytes()


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
    """The file's sha256, read in 1 MiB chunks (memory does not grow with the file)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_stamp(path: str | Path) -> dict[str, int]:
    """{"size", "mtime_ns"} of a file: recorded beside its sha256 so that a later check can
    skip re-hashing a file whose size and modification time are unchanged."""
    import os

    st = os.stat(path)
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def file_unchanged(path: str | Path, info: dict[str, Any]) -> bool:
    """True when the data file at `path` is the one `info` (a run's data record) was made from:
    its size and mtime_ns equal the recorded ones (no reading; what rsync and make trust), or
    else its sha256 equals the recorded one (hashed in chunks). Records written before size and
    mtime_ns were kept are always re-hashed."""
    if "size" in info and "mtime_ns" in info and file_stamp(path) == {"size": info["size"], "mtime_ns": info["mtime_ns"]}:
        return True
    return sha256_file(path) == info["sha256"]


def save_data_info(run_dir: Path, dataset: Any, indices: dict[str, np.ndarray], standardizer: Any,
                   final_dir: Path | None = None) -> None:
    """data.safetensors. A data file is recorded as given, as an absolute path and relative to
    the run directory (`final_dir`, where the run will live), so that the run finds it from any
    working directory, and after being moved together with its data."""
    from safetensors.numpy import save

    arrays = {"standardizer.mean": np.asarray(standardizer.mean, dtype=np.float64),
              "standardizer.std": np.asarray(standardizer.std, dtype=np.float64)}
    arrays.update({f"indices.{k}": np.asarray(v, dtype=np.int64) for k, v in indices.items()})
    info = {"name": dataset.name, "n": len(dataset), "dim": dataset.dim, "event_shape": list(dataset.event_shape),
            "has_positives": dataset.x_pos is not None, "has_latents": dataset.z is not None,
            "image_shape": list(dataset.image_shape) if dataset.image_shape else None,
            "source": dataset.meta.get("source")}
    if info["source"]:
        import os

        stamp = file_stamp(info["source"])
        info["sha256"] = sha256_file(info["source"])
        info.update(stamp)  # taken before hashing: a file changed while being hashed is re-hashed later
        info["source_abs"] = str(Path(info["source"]).resolve())
        info["source_from_run_dir"] = os.path.relpath(info["source_abs"], Path(final_dir or run_dir).resolve())
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
    return config_mod.resolve(config_mod.load_toml(path), source=str(path), dataset_defaults=False)


def write_config(run_dir: Path, cfg: dict[str, Any]) -> None:
    write_text(run_dir / "config.toml", config_mod.dumps(cfg))


# -- the run directory as one object ----------------------------------------------------
LOCK_NAME = ".lock"
METADATA_NAME = "run.json"


class RunDirLocked(ElbokitError):
    """Another live process holds the run directory's lock (bad input: exit code 2)."""


def default_run_dir(root: str | Path = "runs") -> Path:
    """runs/<YYYYmmdd-HHMMSS> (with -2, -3, ... if taken): never an existing directory."""
    import datetime as _dt

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / stamp
    candidate, i = base, 1
    while candidate.exists():
        i += 1
        candidate = base.with_name(f"{stamp}-{i}")
    return candidate


def check_new_run_dir(path: Path) -> None:
    """Refuse, before anything is built or written, an --out that exists (non-empty) or
    cannot be created."""
    from .io import check_can_create

    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ElbokitError(f"The run directory {path} already exists; choose another --out, or continue it with --resume {path}.")
    check_can_create(path, "the run directory", "give --out a path in a writable directory")


def _holder_text(raw: bytes) -> str:
    try:
        holder = json.loads(raw.decode("utf-8"))
        return f"pid {holder['pid']} on host {holder['host']}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "a process whose pid is not recorded yet"


def _lock(path: Path) -> tuple[int, bool]:
    """Take the exclusive advisory lock on `path` (created if missing) without waiting; return
    the open descriptor, which holds the lock until it is closed. flock, not lockf: a POSIX
    record lock is dropped when ANY descriptor of the file in the process is closed (e.g. by a
    reader of the same file), a flock only with this one. The kernel releases it when the
    process dies, so a SIGKILL never leaves a stale lock. The holder is recorded in the file by
    `_record_holder` once the process starts writing (so a refused command changes nothing).
    Returns the descriptor and whether this call created the file (`RunDir.close` removes a
    lock file it created for a command refused before writing, see `_unlink_own_lock`)."""
    import fcntl
    import os

    from .io import _FILE_MODE

    while True:
        try:
            fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, _FILE_MODE), True
        except FileExistsError:
            try:
                fd, created = os.open(path, os.O_RDWR), False
            except FileNotFoundError:  # removed between the two calls: create it again
                continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(os.pread(fd, 4096, 0))
            os.close(fd)
            raise RunDirLocked(f"{path.parent} is being written by another process ({holder}); wait for it to "
                               "finish or stop it, then try again.") from None
        except OSError as exc:
            os.close(fd)
            if created:
                path.unlink(missing_ok=True)
            raise ElbokitError(f"Cannot lock {path}: {exc.strerror or exc}; the filesystem does not support file "
                               "locks (on Lustre, mount with -o flock; see docs/training.md).") from None
        # The lock counts only on the file that is at `path` now: a refused process removes the
        # lock file it created (holding its lock), so one that opened it just before may hold a
        # lock on a file no longer there. Then try again on the current one.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd, created
        os.close(fd)


def _unlink_own_lock(path: Path, fd: int) -> None:
    """Remove the lock file `path` this process created and still locks (fd), before releasing
    it: a command refused under the lock leaves the directory as it found it. Another process
    waiting on the removed file sees it is gone (see `_lock`) and locks a new one."""
    import os

    try:
        if os.path.samestat(os.fstat(fd), os.stat(path)):
            path.unlink()
    except OSError:
        pass  # not ours any more, or the directory is not writable: the file means nothing unlocked


def _record_holder(fd: int) -> None:
    import datetime as _dt
    import os
    import socket

    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)


def _version(distribution: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def plugin_version(registry: Any, plugin: str) -> str | None:
    """The version of the distribution that provides `plugin` (elbokit's for the built-ins)."""
    from . import __version__

    info = getattr(registry, "plugins", {}).get(plugin)
    if info is not None and info.builtin:
        return __version__
    if info is not None and info.version:
        return info.version
    return _version(plugin)


def provenance(components: Any) -> list[dict[str, Any]]:
    """Where each component of a run comes from: kind, name, the plugin that registered it and
    that plugin's version (the dataset, the prior, each term and each term's estimator)."""
    registry = components.registry
    rows: list[dict[str, Any]] = []

    def add(kind: str, name: str, table: dict, key: Any, obj: Any = None) -> None:
        # The object itself identifies its plugin even when two plugins share a bare name.
        entry = registry.entry_for(obj) if obj is not None and hasattr(registry, "entry_for") else None
        if entry is None:
            entry = table.get(key)
        plugin = entry.plugin if entry is not None else None
        row = {"kind": kind, "name": name, "plugin": plugin,
               "plugin_version": plugin_version(registry, plugin) if plugin else None}
        if entry is not None and getattr(entry, "qualified", None):
            row["qualified"] = entry.qualified
        rows.append(row)

    dataset = components.config["data"]["dataset"]
    if dataset in registry.datasets:
        add("dataset", dataset, registry.datasets, dataset)
    else:
        rows.append({"kind": "dataset", "name": dataset, "plugin": None, "plugin_version": None, "file": True})
    model = components.config["model"]["name"]
    add("model", model, getattr(registry, "models", {}), model, components.model)
    add("prior", components.prior.name, registry.priors, components.prior.name, components.prior)
    for name, term in components.objective.terms.items():
        add("term", name, registry.terms, name, term)
        estimator = getattr(term, "estimator", None)
        if estimator is not None:
            add("estimator", f"{term.quantity}/{estimator.name}", registry.estimators,
                (term.quantity, estimator.name), estimator)
    return rows


def check_metadata(rd: "RunDir", registry: Any) -> list[str]:
    """Read run.json and compare it with what is installed now: refuse (one line) a run of
    another format or whose component's plugin is gone; return one warning per plugin whose
    installed version differs from the run's. A run made before run.json existed has nothing
    to compare (its checkpoints' own format is checked when they are read)."""
    meta = rd.read_metadata()
    if meta is None:
        return []
    found = meta.get("format")
    if found != FORMAT_VERSION:
        made_by = (meta.get("versions") or {}).get("elbokit", "another version")
        raise ElbokitError(f"{rd.path} has run-directory format {found!r} (written by elbokit {made_by}); this elbokit "
                           f"reads format {FORMAT_VERSION}: read it with the elbokit that wrote it.")
    tables = {"dataset": registry.datasets, "prior": registry.priors, "term": registry.terms,
              "model": getattr(registry, "models", {})}
    warnings: dict[str, str] = {}
    for c in meta.get("components", []):
        if not c.get("plugin"):
            continue
        kind, name = c["kind"], c["name"]
        key = tuple(name.split("/", 1)) if kind == "estimator" else name
        entry = None
        qualified = c.get("qualified")
        if qualified and hasattr(registry, "qualified"):
            qkey = (key[0], qualified) if kind == "estimator" else qualified
            entry = registry.qualified.get((kind, qkey))
        if entry is None:
            entry = (registry.estimators if kind == "estimator" else tables.get(kind, {})).get(key)
        if entry is None:
            raise ElbokitError(f"{rd.path} was made with the {kind} '{name}' of plugin '{c['plugin']}' "
                               f"{c.get('plugin_version') or ''}, which is not installed now: install that plugin to use this run.")
        now = plugin_version(registry, entry.plugin)
        if now != c.get("plugin_version") and entry.plugin not in warnings:
            warnings[entry.plugin] = (f"{rd.path} was made with {c['plugin']} {c.get('plugin_version')}; {now} is "
                                      f"installed now, so its {kind} '{name}' may compute differently.")
    return list(warnings.values())


def run_metadata(components: Any, *, threads_from: str = "train.threads", world_size: int = 1) -> dict[str, Any]:
    """run.json: what made this run, beside what it computed (config.toml, summary.json)."""
    import datetime as _dt
    import platform
    import socket

    from . import __version__

    return {
        "format": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "versions": {"elbokit": __version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "threads": torch.get_num_threads(), "threads_from": threads_from,
        "world_size": world_size,
        "device": str(components.device),
        "components": provenance(components),
    }


class RunDir:
    """A run directory. `RunDir(path)` reads (never locks, never blocks: every file is
    replaced atomically, metrics.jsonl only grows by whole lines); `RunDir.create(...)` and
    `RunDir.open(path)` return one that holds the directory's lock and may write, until
    `close()` (or the end of a `with` block, or the death of the process)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._created_lock = False  # `open` created the lock file and nothing was written yet

    # -- paths ---------------------------------------------------------------------------
    def checkpoint_path(self, which: str) -> Path:
        return checkpoint_path(self.path, which)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def metadata_path(self) -> Path:
        return self.path / METADATA_NAME

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_NAME

    # -- reading (no lock) ---------------------------------------------------------------
    def read_config(self) -> dict[str, Any]:
        return read_config(self.path)

    def read_data_record(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return read_data_info(self.path)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_path)

    def read_checkpoint(self, which: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return read_checkpoint(self.checkpoint_path(which))

    def read_summary(self) -> dict[str, Any] | None:
        return json.loads(self.summary_path.read_text()) if self.summary_path.is_file() else None

    def read_metadata(self) -> dict[str, Any] | None:
        """run.json, or None for a run directory written before it existed."""
        if not self.metadata_path.is_file():
            return None
        try:
            meta = json.loads(self.metadata_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ElbokitError(f"{self.metadata_path} is damaged ({_first_line(exc)}); restore it from a copy.") from None
        return meta if isinstance(meta, dict) else None

    def stored_run(self, which: str = "last", meta: dict[str, Any] | None = None) -> StoredRun:
        """How the run's components were built (data record + a checkpoint's prior and sizes)."""
        from .data import Standardizer

        arrays, info = self.read_data_record()
        if meta is None:
            _, meta = self.read_checkpoint(which)
        return StoredRun(run_dir=self.path,
                         indices={k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("indices.")},
                         standardizer=Standardizer(arrays["standardizer.mean"], arrays["standardizer.std"]),
                         data_info=info, prior_name=meta["prior"]["name"], prior_spec=meta["prior"]["spec"],
                         dataset_size=meta.get("dataset_size"), has_positives=meta.get("has_positives"))

    # -- writing (under the lock) --------------------------------------------------------
    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    @classmethod
    def create(cls, path: str | Path, *, config: dict[str, Any], dataset: Any, indices: dict[str, np.ndarray],
               standardizer: Any, metadata: dict[str, Any], checkpoint: bytes) -> "RunDir":
        """Write the config, run.json, the data record, an empty metrics.jsonl and the initial
        checkpoint (as checkpoints/last) into a hidden directory beside `path`, holding its
        lock, then rename it into place: a run directory is complete and resumable, or absent,
        and it is never without its writer's lock."""
        import errno
        import os
        import shutil

        from .io import fsync_dir, make_temporary_dir

        path = Path(path)
        staging = make_temporary_dir(path)
        run = cls(staging)
        try:
            run._lock_fd, _ = _lock(run.lock_path)
            _record_holder(run._lock_fd)
            (staging / "checkpoints").mkdir()
            write_config(staging, config)
            write_json(run.metadata_path, metadata)
            save_data_info(staging, dataset, indices, standardizer, final_dir=path)
            run.metrics_path.write_text("")
            run.write_checkpoint("last", checkpoint)
            try:
                os.replace(staging, path)  # an empty --out directory is replaced too
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise
                # Created meanwhile by another process (two commands with the same --out).
                other = cls(path)
                holder = ""
                if other.lock_path.is_file():
                    holder = " by another process (" + _holder_text(other.lock_path.read_bytes()) + ")"
                raise RunDirLocked(f"The run directory {path} was created{holder} while this run was being "
                                   "prepared; choose another --out.") from None
        except BaseException:
            run.close()
            shutil.rmtree(staging, ignore_errors=True)
            raise
        run.path = path
        fsync_dir(path.parent)
        return run

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        """An existing run directory, locked for writing: a second writer is refused, naming
        the holder. Nothing is written until `begin_writing()`, so that checks made under the
        lock can still refuse the command without a trace."""
        run = cls(path)
        run.read_config()  # one clear line when it is not a run directory at all
        run._lock_fd, run._created_lock = _lock(run.lock_path)
        return run

    def begin_writing(self) -> None:
        """Record this process as the holder (pid, host) and remove the temporary files a
        process killed while writing left behind."""
        from .io import remove_temporaries

        self._check_writer()
        _record_holder(self._lock_fd)
        self._created_lock = False  # written under it: the lock file stays, as in every run directory
        for directory in (self.path, self.path / "checkpoints"):
            remove_temporaries(directory)

    def close(self) -> None:
        """Release the lock (the lock file stays; holding it is what counts), except that a lock
        file `open` created is removed when nothing was written (`begin_writing` never called):
        a refused command leaves a run directory without one (an older layout) as it was."""
        import os

        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            if self._created_lock:
                self._created_lock = False
                _unlink_own_lock(self.lock_path, fd)
            os.close(fd)

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_writer(self) -> None:
        if self._lock_fd is None:
            raise RuntimeError(f"{self.path} is open for reading only; use RunDir.open or RunDir.create to write")
        self._created_lock = False  # about to write: the lock file stays (see close)

    def write_config(self, cfg: dict[str, Any]) -> None:
        self._check_writer()
        write_config(self.path, cfg)

    def write_metadata(self, metadata: dict[str, Any]) -> None:
        self._check_writer()
        write_json(self.metadata_path, metadata)

    def write_checkpoint(self, which: str, data: bytes) -> None:
        self._check_writer()
        write_bytes(self.checkpoint_path(which), data)

    def write_summary(self, summary: dict[str, Any]) -> None:
        self._check_writer()
        write_json(self.summary_path, summary)

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one epoch's record. A process killed while writing leaves a last line
        without its newline, which `read_metrics` skips and a resumed run rewrites."""
        import os

        from .io import CRASH_ENV, crash_point

        self._check_writer()
        line = json.dumps(record) + "\n"
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            if os.environ.get(CRASH_ENV):  # test-only: stop with half a line written
                fh.write(line[:len(line) // 2])
                fh.flush()
                crash_point("mid-line", self.metrics_path.name)
                line = line[len(line) // 2:]
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        crash_point("after-line", self.metrics_path.name)

    def truncate_metrics(self, upto_epoch: int) -> None:
        """Keep the records of epochs <= upto_epoch (a run killed between writing an epoch's
        metrics and its checkpoint re-runs that epoch, and must not list it twice)."""
        self._check_writer()
        keep = [r for r in self.read_metrics() if r["epoch"] <= upto_epoch]
        write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in keep))


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
    warnings: list[str] = field(default_factory=list)  # installed plugin versions that differ from the run's
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
            from .build import load_data
            from .plugins import get_registry

            self._dataset = load_data(self.config, get_registry(), RunDir(self.run_dir).stored_run(meta=self.state))
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
      to a log-density of standardised x to express it in original units (docs/design.md section 1);
    - `.state`: the checkpoint's metadata (epoch, step, best_value, select_metric, ...);
    - `.summary` (summary.json or None), `.metrics()` (metrics.jsonl records);
    - `.load_split(name)`: an `elbokit.data.Split` with `.data` (Dataset in original units,
      with x_pos, z and meta like W and noise_std where the data has them), `.x`/`.x_pos`
      (standardised tensors on `.device`) and `.indices`.
    Bad or foreign files raise `ElbokitError` (one line); nothing is unpickled.
    """
    from .plugins import get_registry

    registry = registry or get_registry()
    rd = RunDir(run_dir)
    cfg = rd.read_config()
    warnings = check_metadata(rd, registry)
    path = Path(checkpoint) if checkpoint not in CHECKPOINTS else rd.checkpoint_path(checkpoint)
    if checkpoint not in CHECKPOINTS and not path.is_file():
        raise ElbokitError(f"Unknown checkpoint '{checkpoint}': give best, last or a checkpoint file.")
    rd.read_data_record()  # a missing or damaged data record is named before the checkpoint
    tensors, meta = read_checkpoint(path)
    dev = resolve_device(str(device)) if device is not None else torch.device("cpu")

    from .build import build_from_record

    stored = rd.stored_run(meta=meta)
    model, prior, objective = build_from_record(cfg, stored.data_info["dim"], stored, registry)
    load_module_state(model, _sub(tensors, "model."), "model", path)
    load_module_state(objective, _sub(tensors, "objective."), "objective (terms and prior)", path)
    model.to(dev).eval()
    objective.to(dev).eval()
    return Run(run_dir=rd.path, checkpoint=str(checkpoint), config=cfg, model=model, objective=objective,
               prior=objective.prior, likelihood=reconstruction_likelihood(objective),
               standardizer=stored.standardizer, state=meta, data_info=stored.data_info, indices=stored.indices,
               device=dev, warnings=warnings)
