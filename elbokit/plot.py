"""Figures of a run (matplotlib, Agg backend: no display needed), by default into RUN_DIR/plots.

- `loss`: the training loss and the validation loss (and the validation -ELBO) per epoch on
  one axes, in nats per example (model space), the best epoch dashed;
- `terms`: each term's loss contribution per epoch (its own scale), names from
  `elbokit.metrics`;
- `latents`: samples of the aggregate posterior q(z) = (1/N) sum_n q(z|x_n) of a split
  beside the prior: for latent dimension 1 the two densities on one axis (the prior's exact
  density where it has one), for L >= 2 a corner plot of every pair of latent dimensions
  (up to MAX_CORNER; above that the most active ones) with the prior's samples as density
  contours over the posterior's samples, and histograms of both on the diagonal;
- `reconstructions` (image data only): images above their reconstructions.

Formats: png, svg, pdf. Old run directories (metric names before `elbokit.metrics`, no
run.json) plot the same.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ElbokitError
from .io import write_bytes

FORMATS = ("png", "svg", "pdf")
FIGURES = ("loss", "terms", "latents", "reconstructions")
MAX_CORNER = 6
N_POINTS = 2000
DPI = 110


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def figure_bytes(fig: Any, fmt: str = "png") -> bytes:
    """The figure rendered as `fmt` (png, svg or pdf); the figure is closed."""
    if fmt not in FORMATS:
        raise ElbokitError(f"Unknown figure format '{fmt}'; use one of {', '.join(FORMATS)}.")
    buf = io.BytesIO()
    # Fixed metadata: the same run gives the same svg/pdf bytes (no creation date in them).
    metadata = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}.get(fmt)
    fig.savefig(buf, format=fmt, dpi=DPI, bbox_inches="tight", metadata=metadata)
    _pyplot().close(fig)
    return buf.getvalue()


def _records(run: Any) -> list[dict[str, Any]]:
    from .metrics import flat_record

    records = [flat_record(r) for r in run.metrics()]  # old and current metric names alike
    if not records:
        raise ElbokitError(f"{run.run_dir} has no metrics yet (metrics.jsonl is empty): train at least one epoch first.")
    return records


def _best_epoch(run: Any, records: list[dict[str, Any]]) -> int | None:
    return records[-1].get("best_epoch") or run.state.get("best_epoch")


def loss_figure(run: Any) -> Any:
    """Training and validation loss per epoch on one axes (nats per example, model space)."""
    from .metrics import metric

    records = _records(run)
    plt = _pyplot()
    epochs = [r["epoch"] for r in records]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    marker = "." if len(epochs) < 30 else None
    for key, label, style in (("train_loss", "train loss (the objective, mean over the epoch)", "-"),
                              ("val_loss", "validation loss (the objective)", "-"),
                              ("val_neg_elbo", "validation -ELBO", "--")):
        values = [r.get(key) for r in records]
        if all(v is not None for v in values):
            ax.plot(epochs, values, style, marker=marker, label=f"{label} [{key}]")
    best = _best_epoch(run, records)
    if best:
        ax.axvline(best, color="grey", lw=0.8, ls=":", label=f"best checkpoint (epoch {best})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"loss ({metric('train_loss').units})")
    ax.set_title(f"{run.config['objective']['terms']} / prior {run.prior.name}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def terms_figure(run: Any) -> Any:
    """One panel per term's loss contribution (unweighted batch means), its own scale."""
    from .metrics import term_loss_metric, term_losses

    records = _records(run)
    plt = _pyplot()
    epochs = [r["epoch"] for r in records]
    names = list(term_losses(records[0]))
    cols = min(3, len(names)) or 1
    rows = -(-len(names) // cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.9 * rows), squeeze=False)
    best = _best_epoch(run, records)
    for ax, name in zip(axes.flat, names):
        m = term_loss_metric(name)
        ax.plot(epochs, [term_losses(r)[name] for r in records], marker="." if len(epochs) < 30 else None)
        if best:
            ax.axvline(best, color="grey", lw=0.8, ls=":")
        ax.set_title(m.name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"nats per example ({m.units.split(', ')[-1]})", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("Loss contribution of each term, ELBO sign (dotted: best checkpoint)", fontsize=10)
    fig.tight_layout()
    return fig


def aggregate_posterior_samples(run: Any, split: str = "test", limit: int = N_POINTS, seed: int = 0) -> np.ndarray:
    """z ~ q(z|x_n), one per example of `split` (at most `limit`): samples of the aggregate
    posterior of that split."""
    import torch

    data = run.load_split(split)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        return run.model.encode(data.x[:limit]).sample().double().cpu().numpy()


def _prior_samples(run: Any, n: int, seed: int = 1) -> np.ndarray:
    import torch

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        return run.prior.sample(n).double().cpu().numpy()


def latent_figure(run: Any, split: str = "test", max_dims: int = MAX_CORNER) -> Any:
    """The aggregate posterior of `split` over the prior (see the module's docstring)."""
    plt = _pyplot()
    z = aggregate_posterior_samples(run, split)
    prior = _prior_samples(run, max(len(z), N_POINTS))
    dim = z.shape[1]
    posterior_label, prior_label = f"aggregate posterior q(z), {split} split", f"prior p(z): {run.prior.name}"
    if dim == 1:
        return _latent_figure_1d(run, z[:, 0], prior[:, 0], posterior_label, prior_label)
    dims = list(range(dim))
    note = ""
    if dim > max_dims:  # the most active dimensions: largest variance of the codes
        order = np.argsort(-z.var(axis=0))[:max_dims]
        dims = sorted(int(i) for i in order)
        note = f" ({max_dims} of {dim} dimensions, the most active)"
    k = len(dims)
    both = np.concatenate([z[:, dims], prior[:, dims]])
    lo, hi = np.percentile(both, 0.5, axis=0), np.percentile(both, 99.5, axis=0)
    pad = 0.05 * (hi - lo + 1e-9)
    lo, hi = lo - pad, hi + pad
    fig, axes = plt.subplots(k, k, figsize=(2.2 * k + 1, 2.2 * k + 0.6), squeeze=False)
    for row in range(k):
        for col in range(k):
            ax = axes[row, col]
            i, j = dims[col], dims[row]
            if col > row:
                ax.axis("off")
                continue
            if row == col:
                bins = np.linspace(lo[col], hi[col], 40)
                ax.hist(z[:, i], bins=bins, density=True, alpha=0.5, color="C0")
                ax.hist(prior[:, i], bins=bins, density=True, histtype="step", color="C1")
                ax.set_yticks([])
            else:
                ax.scatter(z[:, i], z[:, j], s=2, alpha=0.35, color="C0", linewidths=0, rasterized=True)
                counts, xe, ye = np.histogram2d(prior[:, i], prior[:, j], bins=30,
                                                range=[[lo[col], hi[col]], [lo[row], hi[row]]], density=True)
                if counts.max() > 0:
                    ax.contour(0.5 * (xe[1:] + xe[:-1]), 0.5 * (ye[1:] + ye[:-1]), counts.T,
                               levels=np.quantile(counts[counts > 0], [0.5, 0.8, 0.95]), colors="C1",
                               linewidths=0.8)
                ax.set_ylim(lo[row], hi[row])
            ax.set_xlim(lo[col], hi[col])
            if row == k - 1:
                ax.set_xlabel(f"z{i} (latent units)")
            else:
                ax.set_xticklabels([])
            if col == 0 and row > 0:
                ax.set_ylabel(f"z{j} (latent units)")
            elif row != col:
                ax.set_yticklabels([])
    handles = [plt.Line2D([], [], color="C0", marker="o", ls="", label=posterior_label + " (points, histograms)"),
               plt.Line2D([], [], color="C1", label=prior_label + " (contours of its samples, histograms)")]
    fig.legend(handles=handles, loc="upper right", fontsize=8, frameon=False)
    fig.suptitle(f"Aggregate posterior over the prior{note}", fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def _latent_figure_1d(run: Any, z: np.ndarray, prior: np.ndarray, posterior_label: str, prior_label: str) -> Any:
    """L = 1: a histogram of the aggregate posterior and the prior's density on one axis."""
    import torch

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    lo, hi = np.percentile(np.concatenate([z, prior]), [0.5, 99.5])
    pad = 0.05 * (hi - lo + 1e-9)
    grid = np.linspace(lo - pad, hi + pad, 400)
    ax.hist(z, bins=np.linspace(grid[0], grid[-1], 50), density=True, alpha=0.5, color="C0", label=posterior_label)
    if getattr(run.prior, "has_log_prob", False):
        with torch.no_grad():
            param = next(run.model.parameters())
            zt = torch.as_tensor(grid, dtype=param.dtype, device=run.device).reshape(-1, 1)
            density = run.prior.log_prob(zt).exp().double().cpu().numpy()
        ax.plot(grid, density, color="C1", label=prior_label + " (density)")
    else:
        ax.hist(prior, bins=np.linspace(grid[0], grid[-1], 50), density=True, histtype="step", color="C1",
                label=prior_label + " (samples)")
    ax.set_xlabel("z0 (latent units)")
    ax.set_ylabel("density (per latent unit)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def as_image(values: Any, shape: Any, lo: float, hi: float) -> np.ndarray:
    """One example as an image for imshow, scaled to [0, 1] by the data's range: (H, W) for
    one channel (or an (H, W) shape of old runs), (H, W, 3) for three channels; other channel
    counts show their mean."""
    img = (np.asarray(values, dtype=np.float64).reshape(tuple(shape)) - lo) / (hi - lo if hi > lo else 1.0)
    img = np.clip(img, 0.0, 1.0)
    if img.ndim == 3:
        img = img.transpose(1, 2, 0) if img.shape[0] == 3 else img.mean(0)
    return img


def reconstructions_figure(run: Any, split: str = "test", n: int = 16) -> Any | None:
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
    return fig


def _targets(run_dir: Path, out: str | Path | None, fmt: str | None, figures: list[str],
             force: bool) -> tuple[dict[str, Path], str]:
    """Where each figure goes, checked before anything is drawn."""
    from .io import check_can_create

    if fmt is not None and fmt not in FORMATS:
        raise ElbokitError(f"Unknown --format '{fmt}'; use one of {', '.join(FORMATS)}.")
    if out is None:
        directory, fmt = run_dir / "plots", fmt or "png"
        targets = {f: directory / f"{f}.{fmt}" for f in figures}
        user_named = False
    else:
        out = Path(out)
        suffix = out.suffix.lower().lstrip(".")
        if suffix in FORMATS:  # one file
            if fmt is not None and fmt != suffix:
                raise ElbokitError(f"--out {out} ends in .{suffix} but --format is {fmt}; make them agree.")
            if len(figures) != 1:
                raise ElbokitError(f"--out {out} names one file: choose one figure with --figure "
                                   f"({', '.join(FIGURES)}), or give --out a directory.")
            fmt, targets = suffix, {figures[0]: out}
        elif suffix:
            raise ElbokitError(f"--out {out}: a figure file must end in .png, .svg or .pdf (or give a directory).")
        else:
            fmt = fmt or "png"
            targets = {f: out / f"{f}.{fmt}" for f in figures}
        user_named = True
    for path in targets.values():
        if path.is_dir():
            raise ElbokitError(f"{path} is a directory; give --out a file name or another directory.")
        if user_named and path.exists() and not force:
            raise ElbokitError(f"{path} already exists; give another --out or --force to overwrite it.")
        check_can_create(path, "the figure", "give --out a path in a writable directory")
    return targets, fmt


def plot_run(run_dir: str | Path, checkpoint: str = "best", split: str = "test", *, out: str | Path | None = None,
             fmt: str | None = None, figures: list[str] | None = None, force: bool = False) -> list[Path]:
    """Write the run's figures; return the paths written. By default every figure (the
    reconstructions for image data only) as PNG into RUN_DIR/plots, replaced on each call.
    `out`: a directory for them, or one file (with one of `figures`); a file there is not
    overwritten without `force`. `fmt`: png, svg or pdf (or the suffix of `out`)."""
    from .run import load_run

    figures = list(figures or FIGURES)
    unknown = [f for f in figures if f not in FIGURES]
    if unknown:
        raise ElbokitError(f"Unknown figure '{unknown[0]}'; the figures are {', '.join(FIGURES)}.")
    run = load_run(run_dir, checkpoint)
    if run.data_info.get("image_shape") is None and "reconstructions" in figures:
        if figures == ["reconstructions"]:
            raise ElbokitError(f"{run_dir} was not trained on images: there are no reconstructions to show.")
        figures.remove("reconstructions")
    # Everything that can be wrong is checked before the first figure is written.
    targets, fmt = _targets(Path(run_dir), out, fmt, figures, force)
    run.load_split(split)
    _records(run)
    makers = {"loss": lambda: loss_figure(run), "terms": lambda: terms_figure(run),
              "latents": lambda: latent_figure(run, split), "reconstructions": lambda: reconstructions_figure(run, split)}
    written = []
    for name, path in targets.items():
        write_bytes(path, figure_bytes(makers[name](), fmt))
        written.append(path)
    return written
