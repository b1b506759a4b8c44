"""A small convolutional VAE for (C, H, W) examples."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .base import Model, posterior_from
from .vae import check_sizes


class ConvVAE(Model):
    """Convolutional encoder and transposed-convolutional decoder for (C, H, W) images.

    Encoder: for each entry of `channels`, a 3x3 convolution with stride 2 (padding 1, so each
    spatial size s becomes ceil(s / 2)) and a ReLU, then Linear(`hidden`)-ReLU-Linear to the 2L
    parameters of a diagonal Gaussian q(z|x). Decoder: the mirror image, Linear layers to the
    smallest feature map and 3x3 transposed convolutions with stride 2 whose output padding
    restores each size exactly (odd sizes too), the last one to C channels with no activation
    (the likelihood's parameters). Options: `channels` (default [32, 64]), `hidden` (256)."""

    name = "conv"
    event_ndims = (3,)
    option_help = {"channels": "output channels of each stride-2 convolution (each halves the height and width)",
                   "hidden": "width of the linear layer between the feature map and the code"}

    def __init__(self, event_shape: Sequence[int], latent_dim: int = 5, channels: Sequence[int] = (32, 64),
                 hidden: int = 256):
        super().__init__(event_shape, latent_dim)
        problem = self.unsupported(self.event_shape)
        if problem:
            raise ValueError(problem)
        self.channels = check_sizes("channels", channels)
        (self.hidden,) = check_sizes("hidden", hidden)
        c, h, w = self.event_shape
        # Spatial sizes after each stride-2 convolution: s -> ceil(s / 2).
        self.sizes = [(h, w)]
        for _ in self.channels:
            self.sizes.append((math.ceil(self.sizes[-1][0] / 2), math.ceil(self.sizes[-1][1] / 2)))
        conv: list[nn.Module] = []
        for c_in, c_out in zip((c, *self.channels[:-1]), self.channels):
            conv += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1), nn.ReLU()]
        self.feature_shape = (self.channels[-1], *self.sizes[-1])
        flat = math.prod(self.feature_shape)
        self.encoder = nn.Sequential(*conv, nn.Flatten(), nn.Linear(flat, self.hidden), nn.ReLU(),
                                     nn.Linear(self.hidden, 2 * self.latent_dim))
        self.decoder_in = nn.Sequential(nn.Linear(self.latent_dim, self.hidden), nn.ReLU(),
                                        nn.Linear(self.hidden, flat), nn.ReLU())
        deconv: list[nn.Module] = []
        outs = (*reversed(self.channels[:-1]), c)
        for i, (c_in, c_out) in enumerate(zip(reversed(self.channels), outs)):
            (h_in, w_in), (h_out, w_out) = self.sizes[-1 - i], self.sizes[-2 - i]
            # (s - 1) * 2 - 2 + 3 + output_padding = s_out, so output_padding = s_out - 2 s + 1 (0 or 1).
            padding = (h_out - 2 * h_in + 1, w_out - 2 * w_in + 1)
            deconv.append(nn.ConvTranspose2d(c_in, c_out, kernel_size=3, stride=2, padding=1, output_padding=padding))
            if i < len(self.channels) - 1:
                deconv.append(nn.ReLU())
        self.decoder_conv = nn.Sequential(*deconv)

    @classmethod
    def check_options(cls, options: dict) -> None:
        super().check_options(options)
        check_sizes("channels", options.get("channels", (1,)))
        check_sizes("hidden", options.get("hidden", 1))

    def encode(self, x: torch.Tensor):
        """q(z|x) as Independent(Normal(loc, scale), 1)."""
        return posterior_from(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.decoder_in(z).unflatten(-1, self.feature_shape)
        return self.decoder_conv(h)
