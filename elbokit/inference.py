"""Use a trained run: draw new data from the model, and encode data into its latent space.

    import elbokit
    from elbokit.inference import sample_data, encode_data
    run = elbokit.load_run("runs/ed-gmm")
    x, z = sample_data(run, 1000, seed=0)        # z ~ p(z), x = E[x|z], in original data units
    loc, scale = encode_data(run, x_original)    # q(z|x) = N(loc, diag(scale^2)) per row

Both work in the units the user has: `sample_data` maps the decoder's mean back through the
run's standardiser, and `encode_data` standardises its input with it first, as the model saw
its training data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ElbokitError


def sample_data(run: Any, n: int, seed: int = 0, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """`n` draws z ~ p(z) from the run's prior, decoded: x = E[x|z] (the likelihood's mean:
    the decoder output for mse and gaussian, sigmoid of the logits for bernoulli) in original
    data units. Returns (x (n, D), z (n, L)) as float64 arrays; deterministic in `seed`."""
    import torch

    n = int(n)
    if n <= 0:
        raise ElbokitError(f"--n must be a positive number of samples, got {n}.")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(int(seed))
        z = run.prior.sample(n).to(run.device)
        means = [run.likelihood.mean(run.model.decode(z[i:i + chunk])) for i in range(0, n, chunk)]
    x = torch.cat(means).double().cpu().numpy()
    return run.standardizer.inverse(x), z.double().cpu().numpy()


def encode_data(run: Any, x: Any, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The posterior q(z|x) of each row of `x` (original data units, (N, D)): its mean `loc`
    and standard deviation `scale`, each (N, L) float64."""
    import torch

    from .evaluate import encode_all

    x = np.asarray(x, dtype=np.float64)
    expected = run.data_info["dim"]
    if x.ndim != 2 or x.shape[1] != expected:
        raise ElbokitError(f"The data to encode have shape {tuple(x.shape)}, but the model takes (N, {expected}) "
                           "rows in the run's original data units.")
    if not np.isfinite(x).all():
        row = int(np.argmax(~np.isfinite(x).all(axis=1)))
        raise ElbokitError(f"The data to encode have NaN or Inf in row {row} (0-based).")
    dtype = next(run.model.parameters()).dtype
    xt = torch.as_tensor(run.standardizer.transform(x), dtype=dtype, device=run.device)
    loc, scale = encode_all(run.model, xt, chunk=chunk)
    return loc.double().cpu().numpy(), scale.double().cpu().numpy()
