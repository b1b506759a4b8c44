"""The paper's model (section IV-C): MLP encoder and mirrored decoder, Gaussian q(z|x)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import Model, posterior_from


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def check_sizes(name: str, value: Sequence[int] | int) -> tuple[int, ...]:
    """A non-empty list of positive layer sizes (a single number is one layer)."""
    values = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{name} must be a non-empty list of layer sizes such as [400, 400], got {value!r}")
    for i, v in enumerate(values):
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and float(v) == int(v) and v > 0):
            raise ValueError(f"{name}: layer sizes must be positive integers, got {v!r} at position {i + 1}")
    return tuple(int(v) for v in values)


class MLP(Model):
    """MLP encoder and mirrored decoder (the paper's), for examples of any shape, flattened.

    Encoder: Linear-ReLU layers of sizes `hidden` to the 2L parameters of a diagonal Gaussian
    q(z|x) (scale = softplus + 1e-4); decoder: the mirror image, to prod(event_shape) values
    reshaped to the example's shape. Option: `hidden` (default [400, 400])."""

    name = "mlp"
    option_help = {"hidden": "hidden layer sizes of the encoder (the decoder mirrors them)"}

    def __init__(self, event_shape: int | Sequence[int], latent_dim: int = 5, hidden: Sequence[int] = (400, 400)):
        super().__init__(event_shape, latent_dim)
        self.hidden = check_sizes("hidden", hidden)
        self.encoder = mlp([self.data_dim, *self.hidden, 2 * self.latent_dim])
        self.decoder = mlp([self.latent_dim, *reversed(self.hidden), self.data_dim])

    @classmethod
    def check_options(cls, options: dict) -> None:
        super().check_options(options)
        check_sizes("hidden", options.get("hidden", (400,)))

    def encode(self, x: torch.Tensor):
        """q(z|x) as Independent(Normal(loc, scale), 1)."""
        return posterior_from(self.encoder(x.flatten(1) if x.dim() > 2 else x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        out = self.decoder(z)
        return out if len(self.event_shape) == 1 else out.unflatten(-1, self.event_shape)


class VAE(MLP):
    """The `mlp` model under its former name, taking `data_dim` (an int or an example's shape)."""

    def __init__(self, data_dim: int | Sequence[int], latent_dim: int = 5, hidden: Sequence[int] = (400, 400)):
        super().__init__(data_dim, latent_dim, hidden)
