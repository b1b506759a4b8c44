"""`elbokit sample RUN` and `elbokit encode RUN`: use a trained model from the command line."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import typer

from .common import console, handle_errors, print_json


def _check_out(out: Path, suffixes: tuple[str, ...], force: bool) -> None:
    """Refuse, before any work, an output that cannot or must not be written."""
    from elbokit.errors import ElbokitError
    from elbokit.io import check_can_create

    if out.suffix.lower() not in suffixes:
        raise ElbokitError(f"--out must end in {' or '.join(suffixes)}, got {out}.")
    if out.is_dir():
        raise ElbokitError(f"{out} is a directory; give --out a file name ending in {' or '.join(suffixes)}.")
    if out.exists() and not force:
        raise ElbokitError(f"{out} already exists; give another --out or --force to overwrite it.")
    check_can_create(out, "the output file", "give --out a path in a writable directory")


def _write_arrays(out: Path, arrays: dict[str, Any]) -> None:
    """One array to a .npy, or named arrays to a .npz, written atomically."""
    import numpy as np

    from elbokit.io import write_bytes

    buf = io.BytesIO()
    if out.suffix.lower() == ".npy":
        np.save(buf, next(iter(arrays.values())), allow_pickle=False)
    else:
        np.savez(buf, **arrays)
    write_bytes(out, buf.getvalue())


def _load_run(run_dir: Path, checkpoint: str, device: str):
    from elbokit.config import device_check
    from elbokit.errors import ElbokitError
    from elbokit.run import load_run

    device = device_check("--device", device)
    if not run_dir.is_dir():
        raise ElbokitError(f"Run directory not found: {run_dir}.")
    return load_run(run_dir, checkpoint, device=device)


def sample(
    run_dir: Path = typer.Argument(..., help="A run directory written by elbokit train."),
    n: int = typer.Option(1000, "--n", help="How many samples."),
    out: Path = typer.Option(..., "--out", help="A .npy (the samples x, (n, D)) or .npz (x and the latents z) to write."),
    seed: int = typer.Option(0, "--seed", help="Seed of the prior draws."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best, last, or a checkpoint file."),
    device: str = typer.Option("cpu", "--device", help="cpu (default), cuda, cuda:N or auto."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
    json_output: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """Draw z from the run's prior and decode it: E[x|z] in the original data units, to a .npy or .npz."""
    import numpy as np

    from elbokit.errors import ElbokitError
    from elbokit.inference import sample_data

    if n <= 0:
        raise ElbokitError(f"--n must be a positive number of samples, got {n}.")
    _check_out(out, (".npy", ".npz"), force)
    run = _load_run(run_dir, checkpoint, device)
    x, z = sample_data(run, n, seed=seed)
    _write_arrays(out, {"x": x, "z": z} if out.suffix.lower() == ".npz" else {"x": x})
    info = {"run_dir": str(run_dir), "checkpoint": checkpoint, "out": str(out), "n": n, "seed": seed,
            "prior": run.prior.name, "arrays": {"x": list(x.shape), **({"z": list(z.shape)} if out.suffix.lower() == ".npz" else {})},
            "what": "x = E[x|z] with z ~ p(z) (the decoder's mean, no observation noise)",
            "units": "original data units (the run's standardiser inverted)",
            "x_mean": float(np.mean(x)), "x_std": float(np.std(x))}
    if json_output:
        print_json(info)
    else:
        console().print(f"Wrote {out}: {n} samples x {tuple(x.shape)} (E[x|z], z ~ prior '{run.prior.name}', "
                        "original data units).", highlight=False)


def encode(
    run_dir: Path = typer.Argument(..., help="A run directory written by elbokit train."),
    data: str = typer.Option(..., "--data", help="The rows to encode, in original data units: a .npy, .npz (key x) or .csv file, or a dataset name."),
    out: Path = typer.Option(..., "--out", help="The .npz to write: loc and scale of q(z|x), (N, L) each."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best, last, or a checkpoint file."),
    device: str = typer.Option("cpu", "--device", help="cpu (default), cuda, cuda:N or auto."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
    json_output: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """Encode data with the run's encoder: the mean and standard deviation of q(z|x) for every row, to an .npz."""
    import numpy as np

    from elbokit.data import load_dataset
    from elbokit.inference import encode_data

    _check_out(out, (".npz",), force)
    run = _load_run(run_dir, checkpoint, device)
    dataset = load_dataset(data)
    loc, scale = encode_data(run, dataset.x)
    _write_arrays(out, {"loc": loc, "scale": scale})
    info = {"run_dir": str(run_dir), "checkpoint": checkpoint, "data": data, "out": str(out), "n": int(loc.shape[0]),
            "latent_dim": int(loc.shape[1]), "arrays": {"loc": list(loc.shape), "scale": list(scale.shape)},
            "what": "q(z|x) = N(loc, diag(scale^2)) per row",
            "loc_mean": np.mean(loc, axis=0).tolist(), "scale_mean": np.mean(scale, axis=0).tolist()}
    if json_output:
        print_json(info)
    else:
        console().print(f"Wrote {out}: loc and scale of q(z|x), {loc.shape[0]} x {loc.shape[1]}.", highlight=False)


def register(app: typer.Typer) -> None:
    app.command(name="sample")(handle_errors(sample))
    app.command(name="encode")(handle_errors(encode))
