"""The paper's synthetic datasets (appendix B-D), with the defaults docs/design.md section 6 fixes.

Both are linear-Gaussian observations of a latent code: x = z W + N(0, noise_std^2), with
W ~ N(0, 1) of shape (latent_dim, data_dim), and positives x+ = x + N(0, radius^2). They
differ in the latent distribution:

- `gaussian` (dataset 1): z ~ N(0, I).
- `mixture` (dataset 2), appendix B read literally: component i (means linspace(-3, 3, 3),
  scales linspace(0.5, 1.0, 3)) gives latent *column* i, z[:, i] ~ N(mu_i, s_i^2); each column
  is modulated, z + sin(0.5 pi z); with latent_dim above the 3 components, N(0, 1) columns
  are appended, below it the columns are truncated.

Every array comes from one `numpy.random.Generator` seeded with `seed`, drawn in a fixed
order (W, z, noise, positive noise), so a (name, options, seed) triple is the dataset.
Fresh latents for fitting a prior (`Dataset.sample_latents`) come from a separate stream
(seed, 1) so that drawing them never changes the data.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from elbokit.errors import ElbokitError

from . import Dataset

DEFAULTS = {"n": 10000, "data_dim": 20, "latent_dim": 5, "noise_std": 0.5, "radius": 0.1}
MIXTURE_MEANS = (-3.0, 3.0)
MIXTURE_SCALES = (0.5, 1.0)
MIXTURE_COMPONENTS = 3


def gaussian_latents(n: int, latent_dim: int, rng: np.random.Generator) -> np.ndarray:
    """Dataset 1's latents: z ~ N(0, I), shape (n, latent_dim)."""
    return rng.standard_normal((n, latent_dim))


def mixture_latents(n: int, latent_dim: int, rng: np.random.Generator,
                    n_components: int = MIXTURE_COMPONENTS) -> np.ndarray:
    """Dataset 2's latents (appendix B, literal reading): one modulated Gaussian column per
    component, then N(0, 1) columns up to latent_dim (or truncation below it)."""
    means = np.linspace(*MIXTURE_MEANS, n_components)
    scales = np.linspace(*MIXTURE_SCALES, n_components)
    cols = means + scales * rng.standard_normal((n, n_components))
    cols = cols + np.sin(0.5 * np.pi * cols)
    if latent_dim <= n_components:
        return cols[:, :latent_dim]
    return np.concatenate([cols, rng.standard_normal((n, latent_dim - n_components))], axis=1)


LATENTS = {"gaussian": gaussian_latents, "mixture": mixture_latents}


def _check_positive(name: str, value, kind=int, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok and kind is int:
        ok = float(value) == int(value)
    if ok:
        ok = value >= 0 if allow_zero else value > 0
    if not ok or not np.isfinite(float(value)):
        what = ("a non-negative integer" if allow_zero else "a positive integer") if kind is int else ("a non-negative number" if allow_zero else "a positive number")
        raise ElbokitError(f"{name} must be {what}, got {value!r}.")


def generate(kind: str, n: int = DEFAULTS["n"], data_dim: int = DEFAULTS["data_dim"],
             latent_dim: int = DEFAULTS["latent_dim"], noise_std: float = DEFAULTS["noise_std"],
             radius: float = DEFAULTS["radius"], seed: int = 0) -> Dataset:
    """Generate dataset `kind` ('gaussian' or 'mixture'); see the module docstring."""
    if kind not in LATENTS:
        from elbokit.errors import unknown_name

        raise unknown_name("generator", kind, LATENTS)
    _check_positive("n", n)
    _check_positive("data_dim", data_dim)
    _check_positive("latent_dim", latent_dim)
    _check_positive("noise_std", noise_std, float, allow_zero=True)
    _check_positive("radius", radius, float, allow_zero=True)
    _check_positive("seed", seed, int, allow_zero=True)
    n, data_dim, latent_dim, seed = int(n), int(data_dim), int(latent_dim), int(seed)
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((latent_dim, data_dim))
    z = LATENTS[kind](n, latent_dim, rng)
    x = z @ W + float(noise_std) * rng.standard_normal((n, data_dim))
    x_pos = x + float(radius) * rng.standard_normal((n, data_dim))
    meta = {"W": W, "noise_std": float(noise_std), "radius": float(radius), "seed": seed,
            "generator": kind}
    return Dataset(name=kind, x=x, x_pos=x_pos, z=z, meta=meta,
                   sample_latents=partial(_fresh_latents, kind, latent_dim, seed))


def _fresh_latents(kind: str, latent_dim: int, seed: int, n: int) -> np.ndarray:
    # A stream of its own, (seed, 1), so that prior samples never reuse the data's draws.
    return LATENTS[kind](int(n), latent_dim, np.random.default_rng([seed, 1]))


def load_gaussian(**options) -> Dataset:
    """The paper's dataset 1: z ~ N(0, I_5), x = z W + N(0, 0.5^2), 10000 x 20, with positives."""
    return generate("gaussian", **options)


def load_mixture(**options) -> Dataset:
    """The paper's dataset 2: sinusoid-modulated Gaussian columns, x = z W + noise, with positives."""
    return generate("mixture", **options)
