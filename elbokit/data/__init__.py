"""Datasets: the `Dataset` container shared by training, evaluation and plugins.

- `Dataset`: arrays in original units (what loaders return, what `Run.load_split` gives back);
- `load_dataset(source, options, seed)`: a registered name (`gaussian`, `mixture`, `digits`,
  or a plugin's) or a path to `.npz`/`.npy`/`.csv`, validated (`elbokit.data.files.validate`);
- `split_indices(n, seed)`: the deterministic 80/10/10 train/val/test split;
- `Standardizer`: per-feature standardisation fitted on the training split only;
- `Split`: one split in original units plus its standardised float32 tensors.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np


@dataclass
class Dataset:
    """Data as arrays, before splitting. x (N, *event_shape): (N, D) vectors or (N, C, H, W)
    images; optional positives x_pos (same shape) and true latents z (N, L); `meta` holds
    generator parameters (e.g. W, noise_std) as arrays or numbers, and `levels` for data on a
    grid of levels; `image_shape` is set for image data (e.g. (1, 8, 8))."""

    name: str
    x: np.ndarray
    x_pos: np.ndarray | None = None
    z: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    image_shape: tuple[int, ...] | None = None
    sample_latents: Callable[[int], np.ndarray] | None = None
    """For generated data: `sample_latents(n)` draws n fresh latents (n, L) from the
    generator's own latent distribution (what `--prior gmm` is fitted to by default)."""

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def dim(self) -> int:
        """The number of values in one example, prod(event_shape)."""
        return int(np.prod(self.x.shape[1:]))

    @property
    def event_shape(self) -> tuple[int, ...]:
        """The shape of one example: (D,) for vectors, (C, H, W) for images."""
        return tuple(int(s) for s in self.x.shape[1:])

    def subset(self, indices: np.ndarray) -> "Dataset":
        """The rows `indices` (x, x_pos, z); meta and image_shape are shared."""
        pick = lambda a: None if a is None else a[indices]  # noqa: E731
        return Dataset(self.name, self.x[indices], pick(self.x_pos), pick(self.z), self.meta,
                       self.image_shape, self.sample_latents)


@dataclass
class Standardizer:
    """Per-feature standardisation fitted on the training split: x_model = (x - mean) / std.

    A log-density in model space converts to original data units by adding
    `log_abs_det_jacobian` = -sum(log std) (docs/design.md section 1)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, eps: float = 1e-8) -> "Standardizer":
        std = x.std(axis=0)
        return cls(mean=x.mean(axis=0), std=np.where(std > eps, std, 1.0))

    @classmethod
    def identity(cls, shape: int | tuple[int, ...]) -> "Standardizer":
        return cls(mean=np.zeros(shape), std=np.ones(shape))

    def _params(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # A record written for flat (N, D) data applies to the same values laid out as images.
        event = np.shape(x)[1:]
        if np.shape(self.mean) != event and np.size(self.mean) == int(np.prod(event)):
            return np.reshape(self.mean, event), np.reshape(self.std, event)
        return self.mean, self.std

    def transform(self, x: np.ndarray) -> np.ndarray:
        mean, std = self._params(x)
        return (x - mean) / std

    def inverse(self, x: np.ndarray) -> np.ndarray:
        mean, std = self._params(x)
        return x * std + mean

    @property
    def log_abs_det_jacobian(self) -> float:
        """Add this to a log-density of standardised x to get one in original units."""
        return float(-np.log(self.std).sum())


SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def split_indices(n: int, seed: int, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> dict[str, np.ndarray]:
    """A deterministic train/val/test partition of range(n): a permutation drawn from the
    stream (seed, 2) (apart from the generators' streams), cut at round(f * n). The
    validation and test splits get at least one row each."""
    from elbokit.errors import ElbokitError

    n = int(n)
    n_val = max(1, int(round(fractions[1] * n)))
    n_test = max(1, int(round(fractions[2] * n))) if fractions[2] > 0 else 0
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ElbokitError(f"The dataset has {n} rows, too few for a train/val/test split; give at least 3 rows.")
    perm = np.random.default_rng([int(seed), 2]).permutation(n)
    return {"train": np.sort(perm[:n_train]), "val": np.sort(perm[n_train:n_train + n_val]),
            "test": np.sort(perm[n_train + n_val:])}


@dataclass
class Split:
    """One split of a dataset. `data` is in ORIGINAL units (x, x_pos, z, meta); `x` and
    `x_pos` are the standardised float32 tensors the model sees (on the run's device);
    `indices` are the rows of the full dataset; `standardizer` converts between the two."""

    name: str
    data: Dataset
    x: Any
    x_pos: Any
    indices: np.ndarray
    standardizer: Standardizer

    def __len__(self) -> int:
        return len(self.data)


def make_split(name: str, dataset: Dataset, indices: np.ndarray, standardizer: Standardizer,
               device: Any = "cpu") -> Split:
    import torch

    part = dataset.subset(indices)
    to_t = lambda a: torch.as_tensor(standardizer.transform(a), dtype=torch.float32, device=device)  # noqa: E731
    return Split(name, part, to_t(part.x), None if part.x_pos is None else to_t(part.x_pos),
                 np.asarray(indices), standardizer)


def is_file_source(source: str) -> bool:
    from .files import FILE_SUFFIXES

    return Path(source).suffix.lower() in FILE_SUFFIXES or "/" in source or "\\" in source


def load_dataset(source: str, options: dict[str, Any] | None = None, seed: int = 0,
                 registry: Any = None) -> Dataset:
    """Load `source`: a registered dataset name (its loader gets `options` and `seed`, when
    it takes one) or a path to a data file (no options). The result is validated."""
    from elbokit.errors import ElbokitError
    from elbokit.plugins import get_registry

    from .files import load_file, validate

    options = {k: v for k, v in (options or {}).items() if v is not None}
    registry = registry or get_registry()
    if source not in registry.datasets and (is_file_source(source) or Path(source).exists()):
        if options:
            raise ElbokitError(f"Dataset options ({', '.join(sorted(options))}) apply to generated datasets, not to the file {source}.")
        return load_file(source)
    entry = registry.dataset(source)  # unknown names: one line listing the valid ones
    from elbokit.objective import coerce_options, option_specs

    params = inspect.signature(entry.loader).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    specs = option_specs(entry.loader, hidden=("seed",))
    if not takes_any:  # the declared options, with their types: one line listing them if wrong
        options = coerce_options(f"dataset '{source}'", specs, options)
    if takes_any or "seed" in params:
        options["seed"] = int(seed)
    try:
        ds = entry.loader(**options)
    except TypeError as exc:
        raise ElbokitError(f"Bad option for dataset '{source}': {exc}") from None
    if not isinstance(ds, Dataset):
        raise ElbokitError(f"The loader of dataset '{source}' returned {type(ds).__name__}, not an elbokit Dataset.")
    return validate(ds, source=f"dataset '{source}'")


def save_npz(dataset: Dataset, path: str | Path) -> None:
    """Write a dataset as .npz (x, x_pos, z and the numeric meta such as W and noise_std),
    atomically; `load_dataset(path)` reads it back."""
    from elbokit.io import atomic_write

    arrays: dict[str, np.ndarray] = {"x": dataset.x}
    if dataset.x_pos is not None:
        arrays["x_pos"] = dataset.x_pos
    if dataset.z is not None:
        arrays["z"] = dataset.z
    for key, value in dataset.meta.items():
        # `generator` too: with W and noise_std it lets `elbokit evaluate` compute the exact
        # log-likelihood of a file (a unicode array, loadable without pickle).
        if (isinstance(value, (int, float, np.ndarray, np.generic)) and not isinstance(value, bool)) or key == "generator":
            arrays[key] = np.asarray(value)
    with atomic_write(path, "wb") as fh:
        np.savez(fh, **arrays)
