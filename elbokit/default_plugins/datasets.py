"""Built-in datasets: the paper's synthetic `gaussian` and `mixture`, and scikit-learn's `digits`."""

from elbokit.hookspecs import hookimpl


def gaussian(n: int = 10000, data_dim: int = 20, latent_dim: int = 5, noise_std: float = 0.5,
             radius: float = 0.1, seed: int = 0):
    """The paper's dataset 1: z ~ N(0, I), x = z W + N(0, noise_std^2), positives x + N(0, radius^2)."""
    from elbokit.data.synthetic import generate

    return generate("gaussian", n=n, data_dim=data_dim, latent_dim=latent_dim, noise_std=noise_std,
                    radius=radius, seed=seed)


def mixture(n: int = 10000, data_dim: int = 20, latent_dim: int = 5, noise_std: float = 0.5,
            radius: float = 0.1, seed: int = 0):
    """The paper's dataset 2: sinusoid-modulated Gaussian latent columns, x = z W + noise, positives."""
    from elbokit.data.synthetic import generate

    return generate("mixture", n=n, data_dim=data_dim, latent_dim=latent_dim, noise_std=noise_std,
                    radius=radius, seed=seed)


def digits(radius: float = 0.1, seed: int = 0):
    """scikit-learn's 8x8 digits (1797 images, 1 x 8 x 8) in [0, 1] on 17 levels; positives are clipped pixel jitter."""
    from elbokit.data.files import load_digits

    return load_digits(radius=radius, seed=seed)


SYNTHETIC_HELP = {"n": "rows to generate", "data_dim": "data dimension D", "latent_dim": "true latent dimension L",
                  "noise_std": "observation noise: x = z W + N(0, noise_std^2)",
                  "radius": "positives: x+ = x + N(0, radius^2)"}
gaussian.option_help = mixture.option_help = SYNTHETIC_HELP
digits.option_help = {"radius": "std of the pixel jitter of the positives (clipped to [0, 1])"}

# A dataset's own defaults (a partial config under the user's config and options): digits are
# 17-level images in [0, 1], so the discretized likelihood on that grid with no standardisation
# (standardising near-constant border pixels adds a large log-Jacobian to every bound), and a
# batch of 128 rows (the 1437 training rows would make 2 steps per epoch at 512).
digits.defaults = {"data": {"standardize": False}, "train": {"batch_size": 128},
                   "terms": {"recon": {"likelihood": "discretized", "levels": 17}}}


@hookimpl
def register_datasets(register):
    register("gaussian", gaussian, "The paper's dataset 1: linear-Gaussian, z ~ N(0, I_5), 10000 x 20, with positives.")
    register("mixture", mixture, "The paper's dataset 2: modulated Gaussian-mixture latents, 10000 x 20, with positives.")
    register("digits", digits, "scikit-learn's 8x8 digits (1797 images, 1 x 8 x 8) on 17 levels in [0, 1], with jittered positives.")
