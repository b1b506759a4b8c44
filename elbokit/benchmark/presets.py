"""Named grids: `--preset table2` (the paper's section IV experiment) and `--preset choices`
(estimator choices around `ed`, one factor at a time). A preset is a grid file's table (the
format of docs/grids.md); `--quick` shrinks it to the same shape with fewer seeds, epochs and
rows."""

from __future__ import annotations

import copy
from typing import Any

from ..errors import ElbokitError

# docs/design.md section 6: the paper's model and data, with elbokit's defaults for what it leaves out
# (the gmm prior's default is 3 components fitted to 10000 draws of the generator's latents).
PAPER_SETTINGS: dict[str, Any] = {
    "data": {"n": 10000, "data_dim": 20, "noise_std": 0.5, "radius": 0.1, "split": [0.8, 0.1, 0.1]},
    "model": {"latent_dim": 5, "name": "mlp", "options": {"hidden": [400, 400]}},
    "train": {"lr": 0.001, "batch_size": 512, "max_epochs": 1000, "patience": 20, "select": "elbo", "threads": 1},
}

TABLE2: dict[str, Any] = {
    "title": "The paper's Table II: classic VAE against ED-VAE on datasets 1 and 2, scored on held-out bounds",
    "data": [{"label": "dataset1", "data": {"dataset": "gaussian"}}, {"label": "dataset2", "data": {"dataset": "mixture"}}],
    "terms": ["classic", "ed"],
    "prior": ["standard-normal", "gmm"],
    "seeds": "0-4",
    "fixed": PAPER_SETTINGS,
}

# The paper's Table II (mean ± sd over 5 seeds): (MSE, KLD, "ELBO" = -MSE - KLD).
PAPER_TABLE2 = {
    ("dataset1", "classic", "standard-normal"): ("VAE", "2.78 ± 0.1", "10.2 ± 0.2", "-12.98 ± 0.3"),
    ("dataset1", "ed", "standard-normal"): ("ED-VAE", "1.54 ± 0.05", "0.0 ± 0.0", "-1.54 ± 0.02"),
    ("dataset2", "classic", "standard-normal"): ("VAE", "20.7 ± 0.5", "12.5 ± 0.4", "-33.2 ± 0.6"),
    ("dataset2", "ed", "gmm"): ("ED-VAE", "19.36 ± 0.3", "0.05 ± 0.01", "-19.41 ± 0.2"),
}


def _variant(label: str, **sections: Any) -> dict[str, Any]:
    return {"label": label, **sections}


CHOICES: dict[str, Any] = {
    "title": "Estimator choices around `ed` (recon, infonce, entropy, xent) with the gmm prior on dataset 2, one factor at a time",
    "data": [{"label": "dataset2", "data": {"dataset": "mixture"}}],
    "terms": ["ed"],
    "prior": ["gmm"],
    "seeds": "0-2",
    "fixed": {**PAPER_SETTINGS, "train": {**PAPER_SETTINGS["train"], "max_epochs": 300}},
    "variant": [
        _variant("base"),  # entropy mws, infonce cosine critic (temperature 0.1), xent mc
        _variant("entropy=mss", terms={"entropy": {"estimator": "mss"}}),
        _variant("entropy=knn", terms={"entropy": {"estimator": "knn"}}),
        _variant("entropy=gaussian", terms={"entropy": {"estimator": "gaussian"}}),
        _variant("critic=encoder", terms={"infonce": {"critic": "encoder"}}),
        _variant("critic=dot", terms={"infonce": {"critic": "dot"}}),
        _variant("xent=knn", terms={"xent": {"estimator": "knn"}}),
        # A sample-only prior has no log p(z): xent needs the k-NN estimator with it.
        _variant("prior=samples", prior={"name": "samples"}, terms={"xent": {"estimator": "knn"}}),
    ],
}

PRESETS = {"table2": TABLE2, "choices": CHOICES}
QUICK = {"seeds": 2, "max_epochs": 30, "n": 2000}


def preset(name: str, quick: bool = False) -> dict[str, Any]:
    """The grid table of a preset; `quick`: the first QUICK['seeds'] seeds, at most
    QUICK['max_epochs'] epochs and QUICK['n'] generated rows (the same configurations)."""
    if name not in PRESETS:
        raise ElbokitError(f"Unknown preset '{name}'; valid presets: {', '.join(PRESETS)}.")
    raw = copy.deepcopy(PRESETS[name])
    if quick:
        from .grid import parse_seeds

        raw["seeds"] = parse_seeds(raw["seeds"])[:QUICK["seeds"]]
        raw["fixed"]["train"]["max_epochs"] = min(raw["fixed"]["train"]["max_epochs"], QUICK["max_epochs"])
        raw["fixed"]["data"]["n"] = QUICK["n"]
        raw["title"] += " (--quick: fewer seeds, epochs and rows)"
    return raw


def table2_markdown(groups: list[dict[str, Any]]) -> str:
    """The paper's Table II beside the same models here: the paper's metrics and the held-out IWAE."""
    from .grid import mean_sd

    lines = ["Beside the paper's Table II (its metrics are not bounds; IWAE is, higher is better):", "",
             "| data | model | terms, prior | MSE (paper) | MSE (here) | KLD (paper) | KLD (here) | "
             "ELBO = -MSE-KLD (paper) | same (here) | IWAE (here) | marginal KL (here) |",
             "|---" * 11 + "|"]
    for g in groups:
        key = (g["data"], g["terms"], g["prior"])
        if key not in PAPER_TABLE2:
            continue
        model, mse, kld, elbo = PAPER_TABLE2[key]
        m = g["metrics"]
        lines.append(f"| {g['data']} | {model} | {g['terms']}, {g['prior']} | {mse} | {mean_sd(m['paper_mse'])} | {kld} | "
                     f"{mean_sd(m['paper_kld'])} | {elbo} | {mean_sd(m['paper_elbo'])} | {mean_sd(m['iwae'])} | "
                     f"{mean_sd(m['marginal_kl'])} |")
    return "\n".join(lines) + "\n"


EXTRA_MARKDOWN = {"table2": table2_markdown}
