"""The grid's PNG figures (matplotlib, Agg): each metric per configuration with error bars of
one standard deviation over seeds, and training speed against the IWAE bound."""

from __future__ import annotations

from pathlib import Path
from typing import Any

FIGURE_METRICS = ["elbo", "iwae", "recon", "kl", "mi", "marginal_kl", "active_units", "latent_r2"]


def _series(groups: list[dict[str, Any]], key: str) -> tuple[list[str], list[float], list[float]]:
    names, means, sds = [], [], []
    for g in groups:
        stats = g["metrics"][key]
        if stats["mean"] is not None:
            names.append(g["configuration"])
            means.append(stats["mean"])
            sds.append(stats["std"] or 0.0)
    return names, means, sds


def write_figures(groups: list[dict[str, Any]], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_write

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    keys = [k for k in FIGURE_METRICS if _series(groups, k)[0]]
    if keys:
        cols = 2
        rows = (len(keys) + cols - 1) // cols
        height = max(2.5, 0.35 * len(groups) + 1.2)
        fig, axes = plt.subplots(rows, cols, figsize=(12, height * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            names, means, sds = _series(groups, key)
            ax.errorbar(means, range(len(names)), xerr=sds, fmt="o", capsize=3)
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.invert_yaxis()
            ax.set_title(key, fontsize=9)
            ax.grid(axis="x", alpha=0.3)
        for ax in list(axes.flat)[len(keys):]:
            ax.set_visible(False)
        fig.suptitle("Held-out metrics per configuration (mean ± sd over seeds)", fontsize=10)
        fig.tight_layout()
        path = directory / "metrics.png"
        with atomic_write(path, "wb") as fh:
            fig.savefig(fh, format="png", dpi=110)
        plt.close(fig)
        written.append(path)
    points = [g for g in groups if g["metrics"]["iwae"]["mean"] is not None and g["metrics"]["steps_per_second"]["mean"] is not None]
    if points:
        fig, ax = plt.subplots(figsize=(7, 5))
        for g in points:
            s, i = g["metrics"]["steps_per_second"], g["metrics"]["iwae"]
            ax.errorbar(s["mean"], i["mean"], xerr=s["std"] or 0.0, yerr=i["std"] or 0.0, fmt="o", capsize=3,
                        label=g["configuration"])
        ax.set_xlabel("training steps per second (one thread per cell)")
        ax.set_ylabel("held-out IWAE, nats per example (higher is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
        fig.tight_layout()
        path = directory / "speed_vs_iwae.png"
        with atomic_write(path, "wb") as fh:
            fig.savefig(fh, format="png", dpi=110)
        plt.close(fig)
        written.append(path)
    return written
