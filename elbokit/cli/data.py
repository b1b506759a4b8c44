"""`elbokit data generate|list`: the paper's synthetic datasets as .npz files, and the registered datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, handle_errors, print_json, print_table, registry

data_app = typer.Typer(help="Generate the paper's synthetic datasets and list the registered ones.", no_args_is_help=True)


@data_app.command("generate")
@handle_errors
def generate(
    kind: str = typer.Argument(..., help="gaussian (the paper's dataset 1) or mixture (dataset 2)."),
    out: Path = typer.Option(..., "--out", help="The .npz file to write (x, x_pos, z, W, noise_std, radius, seed)."),
    n: int = typer.Option(10000, "--n", help="Rows."),
    seed: int = typer.Option(0, "--seed", help="Seed of W, z, the noise and the positives."),
    data_dim: int = typer.Option(20, "--data-dim", help="Data dimension D."),
    latent_dim: int = typer.Option(5, "--latent-dim", help="True latent dimension L."),
    noise_std: float = typer.Option(0.5, "--noise-std", help="Observation noise std: x = z W + N(0, noise_std^2)."),
    radius: float = typer.Option(0.1, "--radius", help="Positives: x+ = x + N(0, radius^2)."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
    json_output: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """Write the paper's dataset 1 (gaussian) or 2 (mixture) to an .npz that `elbokit train --data` reads."""
    from elbokit.data import save_npz
    from elbokit.data.synthetic import generate as make
    from elbokit.errors import ElbokitError

    if out.suffix.lower() != ".npz":
        raise ElbokitError(f"--out must end in .npz, got {out}.")
    if out.exists() and not force:
        raise ElbokitError(f"{out} already exists; give another --out or --force to overwrite it.")
    if out.is_dir():
        raise ElbokitError(f"{out} is a directory; give --out a file name ending in .npz.")
    from elbokit.io import check_can_create

    check_can_create(out, "the data file", "give --out a path in a writable directory")
    ds = make(kind, n=n, data_dim=data_dim, latent_dim=latent_dim, noise_std=noise_std, radius=radius, seed=seed)
    save_npz(ds, out)
    info = {"out": str(out), "kind": kind, "n": n, "data_dim": data_dim, "latent_dim": latent_dim,
            "noise_std": noise_std, "radius": radius, "seed": seed,
            "arrays": {"x": list(ds.x.shape), "x_pos": list(ds.x_pos.shape), "z": list(ds.z.shape), "W": list(ds.meta["W"].shape)}}
    if json_output:
        print_json(info)
    else:
        console().print(f"Wrote {out}: x {ds.x.shape}, x_pos, z {ds.z.shape}, W {ds.meta['W'].shape}, "
                        f"noise_std {noise_std}, radius {radius}, seed {seed}.", highlight=False)


@data_app.command("list")
@handle_errors
def list_datasets(name: Optional[str] = typer.Argument(None, help="A dataset's name (e.g. gaussian): show its options and an example."),
                  json_output: bool = typer.Option(False, "--json", help="Print a JSON list.")) -> None:
    """List the registered datasets (built-in and from plugins), or show one: elbokit data list NAME."""
    if name is not None:
        from .listing import show_detail

        return show_detail("dataset", name, json_output)
    reg = registry()
    rows = [{"name": name, "description": e.description, "plugin": e.plugin} for name, e in reg.datasets.items()]
    if json_output:
        return print_json(rows)
    print_table("Datasets (or give a .npz/.npy/.csv file to --data)", ["name", "description", "plugin"],
                [[r["name"], r["description"],
                  "built-in" if r["plugin"].startswith("elbokit.default_plugins.") else r["plugin"]] for r in rows])


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")


__all__ = ["register", "Optional"]
