"""Figures of a run (matplotlib, Agg backend: no display needed), written to RUN_DIR/plots.

- `terms.png`: each training term and the validation metrics over epochs;
- `latents.png`: the test split's code means beside samples of the run's prior, for pairs of
  latent dimensions (0-1, 2-3, ...), on shared axes so the two can be compared;
- `reconstructions.png` (image data only): test images above their reconstructions.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ElbokitError
from .io import write_bytes

MAX_PAIRS = 4
N_POINTS = 2000


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    write_bytes(path, buf.getvalue())
    return path


def plot_terms(run: Any, out_dir: Path) -> Path:
    """One panel per training term (unweighted batch means), plus the validation metrics."""
    from .metrics import flat_record, term_losses

    records = [flat_record(r) for r in run.metrics()]  # old and current metric names alike
    if not records:
        raise ElbokitError(f"{run.run_dir} has no metrics yet (metrics.jsonl is empty): train at least one epoch first.")
    plt = _pyplot()
    epochs = [r["epoch"] for r in records]
    names = list(term_losses(records[0]))
    panels = [(f"train_loss_{n}", [term_losses(r)[n] for r in records]) for n in names]
    panels.append(("train_loss (weighted sum)", [r["train_loss"] for r in records]))
    for key in ("val_neg_elbo", "val_loss"):
        values = [r.get(key) for r in records]
        if all(v is not None for v in values):
            panels.append((key, values))
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    best = run.state.get("best_epoch")
    for ax, (label, values) in zip(axes.flat, panels):
        ax.plot(epochs, values, marker="." if len(epochs) < 30 else None)
        if best:
            ax.axvline(best, color="grey", lw=0.8, ls="--")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("epoch")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{run.config['objective']['terms']} / prior {run.prior.name}: nats per example "
                 "(dashed: best checkpoint)", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_dir / "terms.png")


def latent_codes(run: Any, split: str = "test", limit: int = N_POINTS) -> np.ndarray:
    import torch

    data = run.load_split(split)
    with torch.no_grad():
        return run.model.encode(data.x[:limit]).mean.cpu().numpy()


def plot_latents(run: Any, out_dir: Path, split: str = "test") -> Path:
    """Code means of `split` beside prior samples, one row per pair of latent dimensions."""
    import torch

    plt = _pyplot()
    codes = latent_codes(run, split)
    torch.manual_seed(0)
    with torch.no_grad():
        prior = run.prior.sample(len(codes)).cpu().numpy()
    dim = codes.shape[1]
    pairs = [(i, i + 1) for i in range(0, dim - 1, 2)][:MAX_PAIRS] or [(0, 0)]
    fig, axes = plt.subplots(len(pairs), 2, figsize=(8, 3.6 * len(pairs)), squeeze=False)
    for row, (i, j) in enumerate(pairs):
        both = np.concatenate([codes[:, [i, j]], prior[:, [i, j]]])
        lo, hi = np.percentile(both, 0.5, axis=0), np.percentile(both, 99.5, axis=0)
        pad = 0.05 * (hi - lo + 1e-9)
        for col, (points, title, color) in enumerate(((codes, f"codes E[z|x] ({split})", "C0"),
                                                       (prior, f"prior '{run.prior.name}' samples", "C1"))):
            ax = axes[row, col]
            ax.scatter(points[:, i], points[:, j], s=3, alpha=0.4, color=color, linewidths=0)
            ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
            ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
            ax.set_xlabel(f"z{i}")
            ax.set_ylabel(f"z{j}")
            ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out_dir / "latents.png")


def as_image(values: Any, shape: Any, lo: float, hi: float) -> np.ndarray:
    """One example as an image for imshow, scaled to [0, 1] by the data's range: (H, W) for
    one channel (or an (H, W) shape of old runs), (H, W, 3) for three channels; other channel
    counts show their mean."""
    img = (np.asarray(values, dtype=np.float64).reshape(tuple(shape)) - lo) / (hi - lo if hi > lo else 1.0)
    img = np.clip(img, 0.0, 1.0)
    if img.ndim == 3:
        img = img.transpose(1, 2, 0) if img.shape[0] == 3 else img.mean(0)
    return img


def plot_reconstructions(run: Any, out_dir: Path, split: str = "test", n: int = 16) -> Path | None:
    """Images (top) and reconstructions (bottom) in original units; None for non-image data."""
    import torch

    shape = run.data_info.get("image_shape")
    if not shape:
        return None
    plt = _pyplot()
    data = run.load_split(split)
    n = min(n, len(data))
    with torch.no_grad():
        out = run.model.decode(run.model.encode(data.x[:n]).mean)
        recon = run.likelihood.mean(out).cpu().numpy()
    recon = run.standardizer.inverse(recon)
    original = data.data.x[:n]
    fig, axes = plt.subplots(2, n, figsize=(0.9 * n, 2.1), squeeze=False)
    lo, hi = float(original.min()), float(original.max())
    for k in range(n):
        for row, img in enumerate((original[k], recon[k])):
            ax = axes[row, k]
            ax.imshow(as_image(img, shape, lo, hi), cmap="gray", vmin=0.0, vmax=1.0)
            ax.axis("off")
    fig.suptitle(f"{split} images (top) and reconstructions from E[z|x] (bottom)", fontsize=9)
    return _save(fig, out_dir / "reconstructions.png")


def plot_run(run_dir: str | Path, checkpoint: str = "best", split: str = "test") -> list[Path]:
    """Write every figure of the run into RUN_DIR/plots; return the paths written."""
    from .run import load_run

    from .io import check_can_create

    run = load_run(run_dir, checkpoint)
    out_dir = Path(run_dir) / "plots"
    # Everything that can be wrong is checked before the first figure is written.
    check_can_create(out_dir / "terms.png", "the figure", "make the run directory writable or remove the file in the way")
    run.load_split(split)
    if not run.metrics():
        raise ElbokitError(f"{run.run_dir} has no metrics yet (metrics.jsonl is empty): train at least one epoch first.")
    paths = [plot_terms(run, out_dir), plot_latents(run, out_dir, split)]
    recon = plot_reconstructions(run, out_dir, split)
    if recon is not None:
        paths.append(recon)
    return paths
