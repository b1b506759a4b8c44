"""The paper's model (section IV-C): MLP encoder and mirrored decoder, Gaussian q(z|x)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from elbokit.batch import Batch, gaussian_posterior


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """Encoder x -> (loc, scale) of a diagonal Gaussian q(z|x); decoder z -> likelihood parameters."""

    def __init__(self, data_dim: int, latent_dim: int = 5, hidden: Sequence[int] = (400, 400)):
        super().__init__()
        self.data_dim, self.latent_dim, self.hidden = int(data_dim), int(latent_dim), tuple(int(h) for h in hidden)
        self.encoder = mlp([self.data_dim, *self.hidden, 2 * self.latent_dim])
        self.decoder = mlp([self.latent_dim, *reversed(self.hidden), self.data_dim])

    def encode(self, x: torch.Tensor):
        """q(z|x) as Independent(Normal(loc, scale), 1)."""
        loc, pre_scale = self.encoder(x).chunk(2, dim=-1)
        # softplus keeps scales positive without the exp overflow of a raw log-variance.
        return gaussian_posterior(loc, F.softplus(pre_scale) + 1e-4)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor, x_pos: torch.Tensor | None = None,
                dataset_size: int | None = None) -> Batch:
        """Encode, sample and decode one minibatch (and its positives when given)."""
        posterior = self.encode(x)
        z = posterior.rsample()
        batch = Batch(x=x, posterior=posterior, z=z, x_recon=self.decode(z), dataset_size=dataset_size)
        if x_pos is not None:
            batch.x_pos = x_pos
            batch.posterior_pos = self.encode(x_pos)
            batch.z_pos = batch.posterior_pos.rsample()
        return batch
