"""Models elbokit trains: the `Model` base class, the paper's MLP VAE and a convolutional VAE."""

from .base import Model
from .conv import ConvVAE
from .vae import MLP, VAE

__all__ = ["ConvVAE", "MLP", "Model", "VAE"]
