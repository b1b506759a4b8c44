"""Use elbokit's objectives inside your own PyTorch training loop.

Your model, your data, your optimiser: elbokit only supplies the objective. Here a small VAE
is trained on scikit-learn's bundled 8x8 digits with the entropy-decomposed ELBO ('ed' =
recon, infonce, entropy, xent) against a Gaussian mixture prior fitted to prior samples.

    python examples/own_training_loop.py            # a few epochs, prints each term
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import elbokit


class TinyVAE(nn.Module):
    def __init__(self, data_dim: int, latent_dim: int = 2, hidden: int = 128):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(data_dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, data_dim))

    def encode(self, x: torch.Tensor):
        loc, pre_scale = self.encoder(x).chunk(2, dim=-1)
        return elbokit.gaussian_posterior(loc, nn.functional.softplus(pre_scale) + 1e-4)


def main(epochs: int = 5, batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    x_all = torch.as_tensor(load_digits().data / 16.0, dtype=torch.float32)  # (1797, 64) in [0, 1]
    n, d = x_all.shape
    latent_dim = 2

    # The prior: a 3-component GMM fitted to samples you can draw (here, a ring of points).
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, 2 * np.pi, 5000)
    ring = np.stack([2 * np.cos(angle), 2 * np.sin(angle)], 1) + 0.3 * rng.standard_normal((5000, 2))
    prior = elbokit.make_prior("gmm", samples=ring, n_components=3)

    # Positives for InfoNCE: a noisy copy of each image.
    def positive(x: torch.Tensor) -> torch.Tensor:
        return (x + 0.05 * torch.randn_like(x)).clamp(0, 1)

    objective = elbokit.build_objective(
        "ed", prior,
        options={"recon": {"likelihood": "bernoulli"}, "infonce": {"critic": "cosine", "temperature": 0.1}},
        dataset_size=n, has_positives=True,
    )
    model = TinyVAE(d, latent_dim)
    optimiser = torch.optim.Adam([*model.parameters(), *objective.parameters()], lr=1e-3)

    for epoch in range(epochs):
        totals: dict[str, torch.Tensor] = {}
        for idx in torch.randperm(n).split(batch_size):
            x = x_all[idx]
            x_pos = positive(x)
            q, q_pos = model.encode(x), model.encode(x_pos)
            z, z_pos = q.rsample(), q_pos.rsample()
            batch = elbokit.Batch(x=x, posterior=q, z=z, x_recon=model.decoder(z),
                                  x_pos=x_pos, posterior_pos=q_pos, z_pos=z_pos)
            out = objective(batch)
            optimiser.zero_grad()
            out.loss.backward()
            optimiser.step()
            for name, value in out.terms.items():  # tensors: no per-step .item() sync
                totals[name] = totals.get(name, 0) + value * len(idx) / n
        print(f"epoch {epoch + 1}: " + "  ".join(f"{k}={float(v):.3f}" for k, v in totals.items()))
    return {k: float(v) for k, v in totals.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    main(parser.parse_args().epochs)
