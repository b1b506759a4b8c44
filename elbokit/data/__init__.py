"""Datasets: the `Dataset` container shared by training, evaluation and plugins.

- `Dataset`: arrays in original units (what loaders return, what `Run.load_split` gives back);
- `load_dataset(source, options, seed)`: a registered name (`gaussian`, `mixture`, `digits`,
  or a plugin's) or a path to `.npz`/`.npy`/`.csv`, validated (`elbokit.data.files.validate`);
- `split_indices(n, seed)`: the deterministic 80/10/10 train/val/test split;
- `Standardizer`: standardisation fitted on the training split only, per feature (each value
  of an example), per channel (one mean/std per image channel) or none;
- `Split`: one split in original units plus its standardised float32 tensors;
- `RowView` / `StreamedRows`: the rows of a memory-mapped `.npy` file read on demand (in
  original units as float64 / standardised as float32 tensors), for data larger than memory
  (docs/data.md).
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

    @property
    def streamed(self) -> bool:
        """True when x is a memory-mapped file read on demand (`RowView`), not an array."""
        return isinstance(self.x, RowView)

    def subset(self, indices: np.ndarray) -> "Dataset":
        """The rows `indices` (x, x_pos, z); meta and image_shape are shared. For a streamed
        dataset the rows stay on disk (a `RowView` of them)."""
        pick = lambda a: None if a is None else a.take(indices) if isinstance(a, RowView) else a[indices]  # noqa: E731
        return Dataset(self.name, pick(self.x), pick(self.x_pos), pick(self.z), self.meta,
                       self.image_shape, self.sample_latents)


STANDARDIZE_MODES = ("feature", "channel", "none")
"""`data.standardize`: one mean/std per value of an example (`feature`), per channel of (C, H,
W) images (`channel`), or none. `true`/`false` in older configs mean `feature`/`none`."""

CHUNK_VALUES = 1 << 20
"""Values (not rows) read at once by the passes over a whole memory-mapped array (moments,
finiteness, likelihood support): 8 MB of float64 per chunk, whatever the shape of an example
(a pass makes a few temporaries of that size; larger chunks are no faster from the page cache)."""


def chunk_rows(event_size: int, values: int = CHUNK_VALUES) -> int:
    """Rows per chunk so that a chunk holds about `values` numbers."""
    return max(1, int(values) // max(1, int(event_size)))


def _moment_axes(mode: str, event_ndim: int) -> tuple[int, ...]:
    """The axes reduced by `mode`: the rows for `feature`, the rows and every axis after the
    channel axis for `channel`."""
    return (0,) if mode == "feature" else (0, *range(2, event_ndim + 1))


def chunked_moments(x: Any, axes: tuple[int, ...], rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mean, population variance) of `x` over `axes` (which include the row axis 0), read in
    chunks of `rows` rows with float64 accumulators, each chunk's (count, mean, M2) merged
    into the running ones by Chan, Golub and LeVeque's pairwise update (stable where the
    textbook sum of squares cancels). numpy has no streaming moments; this is its `mean` and
    `var` for an array that is never wholly in memory. Results keep the reduced axes (as 1)."""
    n_rows = int(x.shape[0])
    rows = int(rows or chunk_rows(int(np.prod(x.shape[1:]))))
    count, mean, m2 = 0, None, None
    for start in range(0, n_rows, rows):
        chunk = np.asarray(x[start:start + rows], dtype=np.float64)
        c = int(np.prod([chunk.shape[a] for a in axes]))
        c_mean = chunk.mean(axis=axes, keepdims=True)
        c_m2 = ((chunk - c_mean) ** 2).sum(axis=axes, keepdims=True)
        if mean is None:
            count, mean, m2 = c, c_mean, c_m2
            continue
        delta, total = c_mean - mean, count + c
        mean = mean + delta * (c / total)
        m2 = m2 + c_m2 + delta ** 2 * (count * c / total)
        count = total
    return mean, m2 / count


@dataclass
class Standardizer:
    """Standardisation fitted on the training split: x_model = (x - mean) / std, elementwise.

    `mean` and `std` have the shape of one example (or broadcast to it): per-channel
    standardisation stores each channel's mean and std at every value of that channel, so the
    stored record, `transform`, `inverse` and the Jacobian are the same code for every mode.
    A log-density in model space converts to original data units by adding
    `log_abs_det_jacobian` = -sum over the values of an example of log std (docs/design.md
    section 1); with one std per channel that is -H W sum_c log std_c."""

    mean: np.ndarray
    std: np.ndarray
    mode: str | None = None  # how it was fitted; None for a record read back (mean/std say it all)

    @classmethod
    def fit(cls, x: Any, eps: float = 1e-8, mode: str = "feature") -> "Standardizer":
        """Fit to the rows of `x` (an array, or a `RowView` of a memory-mapped file, read in
        chunks). Standard deviations below `eps` (constant values) are replaced by 1."""
        from elbokit.errors import ElbokitError

        event = tuple(int(s) for s in x.shape[1:])
        if mode == "none":
            return cls.identity(event)
        if mode not in STANDARDIZE_MODES:
            raise ElbokitError(f"data.standardize must be one of {', '.join(STANDARDIZE_MODES)}, got {mode!r}.")
        if mode == "channel" and len(event) < 2:
            raise ElbokitError(f"data.standardize = \"channel\" needs image-shaped examples (C, H, W), but the "
                               f"examples have shape {event}; use \"feature\" or \"none\".")
        axes = _moment_axes(mode, len(event))
        if isinstance(x, np.ndarray):
            # In memory: numpy's own reductions (the numbers of every earlier version).
            mean, std = x.mean(axis=axes, keepdims=True), x.std(axis=axes, keepdims=True)
        else:
            mean, var = chunked_moments(x, axes)
            std = np.sqrt(var)
        mean, std = np.broadcast_to(mean[0], event).copy(), np.broadcast_to(std[0], event).copy()
        return cls(mean=mean, std=np.where(std > eps, std, 1.0), mode=mode)

    @classmethod
    def identity(cls, shape: int | tuple[int, ...]) -> "Standardizer":
        return cls(mean=np.zeros(shape), std=np.ones(shape), mode="none")

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


class RowView:
    """Rows of an on-disk array (a read-only `np.memmap`), read on demand in original units.

    `view[i]` (an int, a slice or an index array) returns those rows as a float64 ndarray: the
    cast of file data happens here, a minibatch at a time, never for the whole file. An index
    array is read in sorted order (the pages of the file are then touched front to back, which
    is what makes random minibatches from a memmap fast) and returned in the order asked.
    `view.take(indices)` is a view of a subset of the rows, still on disk."""

    def __init__(self, array: np.ndarray, rows: np.ndarray | None = None):
        self.array = array
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        n = array.shape[0] if self.rows is None else len(self.rows)
        self.shape = (int(n), *(int(d) for d in array.shape[1:]))

    ndim = property(lambda self: len(self.shape))
    dtype = np.dtype(np.float64)

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, indices: np.ndarray) -> "RowView":
        indices = np.asarray(indices, dtype=np.int64)
        return RowView(self.array, indices if self.rows is None else self.rows[indices])

    def _positions(self, index: Any) -> tuple[np.ndarray | slice, bool]:
        """(rows of the file, whether a single row was asked for)."""
        if isinstance(index, (int, np.integer)):
            i = int(index) + (self.shape[0] if int(index) < 0 else 0)
            if not 0 <= i < self.shape[0]:
                raise IndexError(f"row {index} is out of range for {self.shape[0]} rows")
            return np.array([i if self.rows is None else self.rows[i]]), True
        if isinstance(index, slice):
            if self.rows is None and index.step in (None, 1):
                return slice(*index.indices(self.shape[0])[:2]), False  # a contiguous read
            picked = np.arange(self.shape[0])[index]
        else:
            picked = np.asarray(index.cpu() if hasattr(index, "cpu") else index, dtype=np.int64).reshape(-1)
        return (picked if self.rows is None else self.rows[picked]), False

    def __getitem__(self, index: Any) -> np.ndarray:
        where, single = self._positions(index)
        if isinstance(where, slice):
            out = np.asarray(self.array[where], dtype=np.float64)
        else:
            order = np.argsort(where, kind="stable")
            out = np.empty((len(where), *self.shape[1:]), dtype=np.float64)
            out[order] = self.array[where[order]]
        return out[0] if single else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        # Reads every row into memory: what the streamed code paths never do, kept so that a
        # plugin or a notebook that asks for the array still gets the right numbers.
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)

    def chunks(self, rows: int | None = None):
        """(start, float64 rows) for consecutive chunks of about CHUNK_VALUES values."""
        rows = int(rows or chunk_rows(int(np.prod(self.shape[1:]))))
        for start in range(0, self.shape[0], rows):
            yield start, self[start:start + rows]


class StreamedRows:
    """The standardised float32 rows of a `RowView`, made into tensors when indexed: what a
    streamed `Split` holds as `.x` in place of one tensor of the whole split. It answers what
    the training loop, validation and evaluation ask of that tensor (`shape`, `device`,
    `dtype`, `len`, and indexing by an int, a slice or an index tensor), and the rows it gives
    are bit for bit those of the in-memory tensor (the same float64 transform, then float32)."""

    def __init__(self, rows: RowView, standardizer: "Standardizer", device: Any = "cpu"):
        import torch

        self.rows, self.standardizer = rows, standardizer
        self.device = torch.device(device)
        self.dtype = torch.float32
        self.shape = torch.Size(rows.shape)

    ndim = property(lambda self: len(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def __getitem__(self, index: Any):
        import torch

        x = self.rows[index]  # a fresh float64 array: standardised in place, no temporaries
        mean, std = self.standardizer._params(x)
        np.subtract(x, mean, out=x)
        np.divide(x, std, out=x)  # the very operations of Standardizer.transform, so the same bits
        return torch.as_tensor(x, dtype=torch.float32, device=self.device)


def rows_of(x: Any, chunk: int | None = None):
    """(start, rows) over the whole of `x` (a tensor, an array or `StreamedRows`): one piece
    for data in memory, chunks of about CHUNK_VALUES values for streamed data."""
    n = int(x.shape[0])
    if not isinstance(x, (StreamedRows, RowView)):
        yield 0, x
        return
    rows = int(chunk or chunk_rows(int(np.prod(x.shape[1:]))))
    for start in range(0, n, rows):
        yield start, x[start:start + rows]


@dataclass
class Split:
    """One split of a dataset. `data` is in ORIGINAL units (x, x_pos, z, meta); `x` and
    `x_pos` are the standardised float32 tensors the model sees (on the run's device), or for
    a streamed dataset `StreamedRows` that make them a minibatch at a time; `indices` are the
    rows of the full dataset; `standardizer` converts between the two."""

    name: str
    data: Dataset
    x: Any
    x_pos: Any
    indices: np.ndarray
    standardizer: Standardizer

    def __len__(self) -> int:
        return len(self.data)

    @property
    def streamed(self) -> bool:
        return isinstance(self.x, StreamedRows)


def make_split(name: str, dataset: Dataset, indices: np.ndarray, standardizer: Standardizer,
               device: Any = "cpu") -> Split:
    import torch

    part = dataset.subset(indices)

    def to_t(a):
        if a is None:
            return None
        if isinstance(a, RowView):
            return StreamedRows(a, standardizer, device)
        return torch.as_tensor(standardizer.transform(a), dtype=torch.float32, device=device)

    return Split(name, part, to_t(part.x), to_t(part.x_pos), np.asarray(indices), standardizer)


def is_file_source(source: str) -> bool:
    from .files import FILE_SUFFIXES

    return Path(source).suffix.lower() in FILE_SUFFIXES or "/" in source or "\\" in source


DEFAULT_MAX_IN_MEMORY_MB = 512.0
"""`data.max_in_memory_mb`: a `.npy` file larger than this on disk is memory-mapped and read
in minibatches (docs/data.md); a smaller one is read whole, as float64, with its splits as
tensors (about 5 times the size of a float32 file in memory, the fastest way to train)."""


def load_dataset(source: str, options: dict[str, Any] | None = None, seed: int = 0,
                 registry: Any = None, max_in_memory_mb: float | None = DEFAULT_MAX_IN_MEMORY_MB) -> Dataset:
    """Load `source`: a registered dataset name (its loader gets `options` and `seed`, when
    it takes one) or a path to a data file (no options). The result is validated. A `.npy`
    file larger than `max_in_memory_mb` is memory-mapped (`Dataset.streamed`)."""
    from elbokit.errors import ElbokitError
    from elbokit.plugins import get_registry

    from .files import load_file, validate

    options = {k: v for k, v in (options or {}).items() if v is not None}
    registry = registry or get_registry()
    if source not in registry.datasets and (is_file_source(source) or Path(source).exists()):
        if options:
            raise ElbokitError(f"Dataset options ({', '.join(sorted(options))}) apply to generated datasets, not to the file {source}.")
        return load_file(source, max_in_memory_mb=max_in_memory_mb)
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
