"""User data files (.npz, .npy, .csv), the bundled `digits`, and the checks every dataset passes.

Files are read with `allow_pickle=False`: a data file never runs code. Every problem is one
`ElbokitError` sentence that names the file and, for bad values, the row.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from elbokit.errors import ElbokitError

from . import Dataset, RowView

FILE_SUFFIXES = (".npz", ".npy", ".csv")


def load_file(path: str | Path, max_in_memory_mb: float | None = None) -> Dataset:
    """Load a user data file: `.npz` (key `x`, optional `x_pos` (same shape) and `z`),
    `.npy` (the x matrix) or `.csv` (numbers, comma-separated, an optional header row).

    A `.npy` file larger than `max_in_memory_mb` megabytes (10^6 bytes) on disk is opened
    memory-mapped (`np.load(mmap_mode="r")`): `x` is then a `RowView` that reads rows on
    demand, and the checks below read it in chunks (docs/data.md)."""
    path = Path(path)
    if not path.exists():
        raise ElbokitError(f"Data file not found: {path}.")
    if path.is_dir():
        raise ElbokitError(f"Expected a data file but {path} is a directory.")
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise ElbokitError(f"Cannot read {path}: data files must end in .npz, .npy or .csv.")
    try:
        if suffix == ".npz":
            ds = _load_npz(path)
        elif suffix == ".npy":
            big = max_in_memory_mb is not None and path.stat().st_size > float(max_in_memory_mb) * 1e6
            if big:
                ds = Dataset(name=path.stem, x=RowView(np.load(path, mmap_mode="r", allow_pickle=False)))
            else:
                ds = Dataset(name=path.stem, x=np.load(path, allow_pickle=False))
        else:
            ds = Dataset(name=path.stem, x=_load_csv(path))
    except ElbokitError:
        raise
    except PermissionError:
        raise ElbokitError(f"Cannot read {path}: permission denied.") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        # np.load raises ValueError for pickled (object) arrays and for truncated files.
        objects = "allow_pickle" in str(exc) or "Python objects" in str(exc)
        reason = "it holds Python objects, which elbokit never unpickles" if objects else str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ElbokitError(f"Cannot read {path} as {suffix[1:]} data: {reason}.") from None
    ds.meta["source"] = str(path)
    return validate(ds, source=str(path))


def _load_npz(path: Path) -> Dataset:
    with np.load(path, allow_pickle=False) as archive:
        keys = set(archive.files)
        if "x" not in keys:
            raise ElbokitError(
                f"{path} has no array named 'x' (found: {', '.join(sorted(keys)) or 'none'}); "
                "save the data with numpy.savez(file, x=..., x_pos=..., z=...)."
            )
        x = archive["x"]
        x_pos = archive["x_pos"] if "x_pos" in keys else None
        z = archive["z"] if "z" in keys else None
        meta = {}
        for key in ("W", "noise_std", "radius", "generator"):
            if key in keys:
                value = archive[key]
                meta[key] = value.item() if value.ndim == 0 else value
    return Dataset(name=path.stem, x=x, x_pos=x_pos, z=z, meta=meta)


def _load_csv(path: Path) -> np.ndarray:
    with open(path, encoding="utf-8") as fh:
        lines = [line for line in fh.read().splitlines() if line.strip()]
    if not lines:
        raise ElbokitError(f"{path} is empty: give at least one row of numbers.")
    first = lines[0].split(",")
    skip = 0
    try:
        [float(v) for v in first]
    except ValueError:
        skip = 1  # a header row
    rows = lines[skip:]
    if not rows:
        raise ElbokitError(f"{path} has a header but no rows of numbers.")
    width = len(rows[0].split(","))
    out = np.empty((len(rows), width))
    for i, line in enumerate(rows):
        cells = line.split(",")
        if len(cells) != width:
            raise ElbokitError(f"{path}: row {i} has {len(cells)} values but row 0 has {width}.")
        try:
            out[i] = [float(c) for c in cells]
        except ValueError:
            raise ElbokitError(f"{path}: row {i} has a value that is not a number.") from None
    return out


def validate(ds: Dataset, source: str | None = None) -> Dataset:
    """Check shapes and values; return the dataset with float64 arrays. Rows are 0-based.
    A memory-mapped x (`RowView`) is checked in chunks and cast a minibatch at a time when
    read, never as a whole."""
    where = source or ds.name
    if isinstance(ds.x, RowView):
        return _validate_streamed(ds, where)
    x = _numeric(ds.x, "x", where)
    if x.ndim < 2:
        raise ElbokitError(f"{where}: x must be an (n, ...) array of examples, (n, dim) or (n, C, H, W), got shape {x.shape}.")
    if x.shape[0] == 0 or x[0].size == 0:
        raise ElbokitError(f"{where}: the dataset is empty (x has shape {x.shape}); give at least one row and one column.")
    _finite(x, "x", where)
    x_pos = None
    if ds.x_pos is not None:
        x_pos = _numeric(ds.x_pos, "x_pos", where)
        if x_pos.shape != x.shape:
            raise ElbokitError(f"{where}: x_pos has shape {x_pos.shape} but x has shape {x.shape}; they must match.")
        _finite(x_pos, "x_pos", where)
    z = None
    if ds.z is not None:
        z = _numeric(ds.z, "z", where)
        if z.ndim == 1:
            z = z[:, None]
        if z.ndim != 2 or z.shape[0] != x.shape[0]:
            raise ElbokitError(f"{where}: z has shape {z.shape} but x has {x.shape[0]} rows; give one row of z per row of x.")
        _finite(z, "z", where)
    ds.x, ds.x_pos, ds.z = x, x_pos, z
    if ds.image_shape is None and x.ndim == 4:
        ds.image_shape = tuple(int(s) for s in x.shape[1:])  # (C, H, W)
    return ds


def _validate_streamed(ds: Dataset, where: str) -> Dataset:
    """`validate` for a memory-mapped x (a `.npy` file has no x_pos or z)."""
    x = ds.x
    if x.array.dtype.kind not in "biuf":
        raise ElbokitError(f"{where}: x must hold numbers, got dtype {x.array.dtype}.")
    if x.ndim < 2:
        raise ElbokitError(f"{where}: x must be an (n, ...) array of examples, (n, dim) or (n, C, H, W), got shape {x.shape}.")
    if x.shape[0] == 0 or int(np.prod(x.shape[1:])) == 0:
        raise ElbokitError(f"{where}: the dataset is empty (x has shape {x.shape}); give at least one row and one column.")
    if x.array.dtype.kind == "f":  # integers are always finite
        for start, chunk in x.chunks():
            _finite(chunk, "x", where, first_row=start)
    if ds.image_shape is None and x.ndim == 4:
        ds.image_shape = tuple(int(s) for s in x.shape[1:])
    return ds


def _numeric(a, what: str, where: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise ElbokitError(f"{where}: {what} must hold numbers, got dtype {arr.dtype}.")
    return arr.astype(np.float64, copy=False)


def _finite(a: np.ndarray, what: str, where: str, first_row: int = 0) -> None:
    bad = ~np.isfinite(a)
    if bad.any():
        flat = bad.reshape(a.shape[0], -1).any(axis=1)
        row = first_row + int(np.argmax(flat))
        raise ElbokitError(f"{where}: {what} has NaN or Inf in row {row} (0-based); remove or fix that row.")


def load_digits(radius: float = 0.1, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images of 1 x 8 x 8, bundled, no download), scaled to [0, 1]:
    each pixel is one of 17 levels k / 16, k = 0..16.

    Positives are x+ = clip(x + N(0, radius^2), 0, 1): a small pixel jitter that keeps the
    data in [0, 1] (so the bernoulli likelihood still applies), the image analogue of the
    synthetic datasets' positives. The digit labels are kept in meta['labels'].
    """
    from sklearn.datasets import load_digits as sk_load_digits

    if not (isinstance(radius, (int, float)) and np.isfinite(radius) and radius >= 0):
        raise ElbokitError(f"radius must be a non-negative number, got {radius!r}.")
    bunch = sk_load_digits()
    x = bunch.data.astype(np.float64) / 16.0  # pixel counts 0..16
    rng = np.random.default_rng(int(seed))
    x_pos = np.clip(x + float(radius) * rng.standard_normal(x.shape), 0.0, 1.0)
    # Kept as (N, 1, 8, 8) images: the row-major flattening the mlp does is sklearn's own
    # (N, 64) order, so flat models see exactly the numbers they saw before.
    return Dataset(name="digits", x=x.reshape(-1, 1, 8, 8), x_pos=x_pos.reshape(-1, 1, 8, 8),
                   meta={"labels": bunch.target, "radius": float(radius), "levels": 17},
                   image_shape=(1, 8, 8))
